"""Preference losses: every formula's value and gradient on numbers worked out by hand, the registry, mixtures
and TRL's metrics, the fidelity fixes of issue #13, and the loss settings' validation.

Notation (POET.md, `losses.pairwise`): pi policy log-prob sums, ref the reference's, n token counts,
l = pi - ref, h = l_c - l_r, r = beta l, s the sigmoid, L(z) = -log s(z) = log(1 + e^-z), eps = label_smoothing.

THE HAND PAIR (one pair unless a test says otherwise): pi_c = -10, ref_c = -12 (l_c = 2); pi_r = -15,
ref_r = -14 (l_r = -1); n_c = 4, n_r = 2; beta = 0.5. So h = 3, beta h = 1.5, r_c = 1, r_r = -0.5.
Useful values: L(1.5) = 0.201413278, s(-1.5) = 0.182425524, L(1) = 0.313261688, L(-1) = 1.313261688,
L(0.5) = 0.474076984, and L(-z) = z + L(z), dL/dz = -s(-z), ds/dz = s(z) s(-z).
"""

from __future__ import annotations

import inspect
import math

import mlx.core as mx
import numpy as np
import pytest

from poet_mlx.losses import pairwise as pw
from poet_mlx.losses.mixture import PAIR_METRICS, metric_names, pair_objective
from poet_mlx.losses.registry import ALIASES, LOSS_SPECS, REWARDS, Mixture

TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""TRL 1.16's DPOConfig.loss_type choices, in its order."""


def L(z):  # noqa: N802  (the docstring's name)
    return math.log1p(math.exp(-z))


def s(z):
    return 1.0 / (1.0 + math.exp(-z))


def f32(*v):
    return mx.array(np.asarray(v, np.float32))


def hand_pair(pi_c=-10.0, pi_r=-15.0, full=(-12.0, 6.0)):
    """THE HAND PAIR; the whole chosen response (for the NLL terms) has log-prob -12 over 6 tokens."""
    return pw.PairLogps(f32(pi_c), f32(pi_r), f32(4.0), f32(2.0), f32(-12.0), f32(-14.0), f32(full[0]), f32(full[1]))


def value_and_grads(name, p, **knobs):
    """(loss, d/d pi_c, d/d pi_r, d/d chosen_full) of LOSS_SPECS[name]'s formula, summed over pairs."""
    fn = LOSS_SPECS[name].fn

    def f(pc, pr, full):
        q = pw.PairLogps(pc, pr, p.chosen_tokens, p.rejected_tokens, p.reference_chosen, p.reference_rejected,
                         full, p.chosen_full_tokens)
        return fn(q, **knobs).sum()

    value = f(p.policy_chosen, p.policy_rejected, p.chosen_full)
    grads = mx.grad(f, argnums=(0, 1, 2))(p.policy_chosen, p.policy_rejected, p.chosen_full)
    return float(value), *(float(g.sum()) for g in grads)


# (loss, knobs, value, d/d pi_c, d/d pi_r, d/d chosen_full), every number derived by hand in the comment.
HAND = [
    # L(beta h) = L(1.5); d/d pi_c = -beta s(-1.5), d/d pi_r = +beta s(-1.5).
    ("sigmoid", {}, L(1.5), -0.5 * s(-1.5), 0.5 * s(-1.5), 0.0),
    # cDPO eps 0.1: 0.9 L(1.5) + 0.1 L(-1.5) = L(1.5) + 0.15; d/dz = -0.9 s(-z) + 0.1 s(z).
    ("sigmoid", {"label_smoothing": 0.1}, L(1.5) + 0.15, 0.5 * (-0.9 * s(-1.5) + 0.1 * s(1.5)),
     -0.5 * (-0.9 * s(-1.5) + 0.1 * s(1.5)), 0.0),
    # beta 0.25: relu(1 - 0.75) = 0.25; d/d pi_c = -beta, d/d pi_r = +beta.
    ("hinge", {"beta": 0.25}, 0.25, -0.25, 0.25, 0.0),
    # beta 1: l_c/n_c - l_r/n_r = 0.5 + 0.5 = 1, minus 1/(2 beta) = 0.5: 0.5^2 = 0.25;
    # d/d pi_c = 2 * 0.5 / n_c = 0.25, d/d pi_r = -2 * 0.5 / n_r = -0.5.
    ("ipo", {"beta": 1.0}, 0.25, 0.25, -0.5, 0.0),
    # eps 0.1, z = 1.5: s(z)(log s(z) - log 0.9) + s(-z)(log s(-z) - log 0.1) = 0.031138796;
    # d/dz = s(z) s(-z) [log(s(z)/0.9) - log(s(-z)/0.1)].
    ("exo_pair", {"label_smoothing": 0.1}, 0.031138796406299074,
     0.5 * s(1.5) * s(-1.5) * (math.log(s(1.5) / 0.9) - math.log(s(-1.5) / 0.1)),
     -0.5 * s(1.5) * s(-1.5) * (math.log(s(1.5) / 0.9) - math.log(s(-1.5) / 0.1)), 0.0),
    # L(1) + L(-1)/2 + L(0.5)/2 = 1.206931023; d/d r_c = -s(-1) + s(1)/2, d/d r_r = s(-0.5)/2; times beta.
    ("nca_pair", {}, 1.2069310233673876, 0.5 * (-s(-1) + 0.5 * s(1)), 0.5 * 0.5 * s(-0.5), 0.0),
    # eps 0.1: [0.9 L(1.5) - 0.1 (1.5 + L(1.5))] / 0.8 = L(1.5) - 0.1875; d/dz = (-0.9 s(-z) - 0.1 s(z)) / 0.8.
    ("robust", {"label_smoothing": 0.1}, L(1.5) - 0.1875, 0.5 * (-0.9 * s(-1.5) - 0.1 * s(1.5)) / 0.8,
     -0.5 * (-0.9 * s(-1.5) - 0.1 * s(1.5)) / 0.8, 0.0),
    # L(r_c) + L(-r_r) = L(1) + L(0.5) = 0.787338672; d/d pi_c = -beta s(-1), d/d pi_r = beta s(-0.5).
    ("bco_pair", {}, L(1) + L(0.5), -0.5 * s(-1), 0.5 * s(-0.5), 0.0),
    # (l_c - 1)^2 + (l_r + 1)^2 = 1 + 0; d/d pi_c = 2 (l_c - 1) = 2, d/d pi_r = 2 (l_r + 1) = 0.
    ("sppo_hard", {}, 1.0, 2.0, 0.0, 0.0),
    # 1 - s(1) + s(-0.5) = 0.646482090; d/d pi_c = -beta s(1) s(-1), d/d pi_r = beta s(-0.5) s(0.5).
    ("apo_zero", {}, 1 - s(1) + s(-0.5), -0.5 * s(1) * s(-1), 0.5 * s(-0.5) * s(0.5), 0.0),
    # s(1) + 1 - s(1.5) = 0.913484102; d/d pi_c = beta [s(1) s(-1) - s(1.5) s(-1.5)], d/d pi_r = beta s(1.5) s(-1.5).
    ("apo_down", {}, s(1) + 1 - s(1.5), 0.5 * (s(1) * s(-1) - s(1.5) * s(-1.5)), 0.5 * s(1.5) * s(-1.5), 0.0),
    # tau 1, z = 1.5, m = s(1.5): (1 - m) L(z) + m e^-z = 0.219168447;
    # d/dz = m' (e^-z - L(z)) - (1 - m) s(-z) - m e^-z, m' = s(z) s(-z).
    ("discopop", {"discopop_tau": 1.0}, 0.21916844654391518,
     0.5 * (s(1.5) * s(-1.5) * (math.exp(-1.5) - L(1.5)) - s(-1.5) * s(-1.5) - s(1.5) * math.exp(-1.5)),
     -0.5 * (s(1.5) * s(-1.5) * (math.exp(-1.5) - L(1.5)) - s(-1.5) * s(-1.5) - s(1.5) * math.exp(-1.5)), 0.0),
    # NLL of the whole chosen response: 12 / 6 = 2; d/d chosen_full = -1/6; the scored sums do not enter.
    ("sft", {}, 2.0, 0.0, 0.0, -1 / 6),
    # L(beta (l_c/n_c - l_r/n_r)) = L(0.5 * 1) = 0.474076984; d/d pi_c = -beta s(-0.5) / 4, d/d pi_r = +... / 2.
    ("sigmoid_norm", {}, L(0.5), -0.5 * s(-0.5) / 4, 0.5 * s(-0.5) / 2, 0.0),
    # beta 2, gamma 1: m = 2 (-10/4 + 15/2) - 1 = 9; L(9) + 0.5 * 2 (NLL); d/d pi_c = -(2/4) s(-9),
    # d/d pi_r = (2/2) s(-9), d/d chosen_full = -0.5 / 6.
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.5}, L(9) + 1.0, -0.5 * s(-9), s(-9),
     -0.5 / 6),
    # L(beta (pi_c - pi_r)) = L(2.5) + 1 * NLL 2; d/d pi_c = -beta s(-2.5), d/d chosen_full = -1/6.
    ("cpo", {}, L(2.5) + 2.0, -0.5 * s(-2.5), 0.5 * s(-2.5), -1 / 6),
]


@pytest.mark.parametrize("name,knobs,value,g_c,g_r,g_full", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_value_and_gradient(name, knobs, value, g_c, g_r, g_full):
    kw = {"beta": 0.5, **knobs}
    got = value_and_grads(name, hand_pair(), **kw)
    np.testing.assert_allclose(got, (value, g_c, g_r, g_full), rtol=1e-5, atol=1e-7, err_msg=name)


def test_orpo_hand_value_and_gradient():
    """pi_c = -2 over 4 tokens (a_c = -0.5), pi_r = -6 over 3 (a_r = -2); beta 0.5; chosen NLL 12/6 = 2.
    log odds z = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)) = 2.287338672; loss = 2 + 0.5 L(z)
    = 2.048352932. dz/da_c = 1 / (1 - e^a_c), dz/da_r = -1 / (1 - e^a_r), dL/dz = -s(-z): d/d pi_c =
    -0.5 s(-z) / (1 - e^-0.5) / 4, d/d pi_r = 0.5 s(-z) / (1 - e^-2) / 3, d/d chosen_full = -1/6.
    """
    p = pw.PairLogps(f32(-2.0), f32(-6.0), f32(4.0), f32(3.0), None, None, f32(-12.0), f32(6.0))
    z = 2.2873386716983295
    want = (2.0 + 0.5 * L(z), -0.5 * s(-z) / (1 - math.exp(-0.5)) / 4, 0.5 * s(-z) / (1 - math.exp(-2)) / 3, -1 / 6)
    np.testing.assert_allclose(value_and_grads("orpo", p, beta=0.5), want, rtol=1e-5, atol=1e-7)
    extras = pw.orpo_metrics(p)
    np.testing.assert_allclose([float(extras["log_odds_chosen"][0]), float(extras["log_odds_ratio"][0])],
                               [z, -L(z)], rtol=1e-6)


def test_aot_sorts_over_the_batch():
    """Two pairs, beta 1. A: pi_c - pi_r = 5, ref_c - ref_r = 2 (h = 3); B: 1 and 4 (h = -3).
    aot: d = sort(5, 1) - sort(2, 4) = (1 - 2, 5 - 4) = (-1, 1): losses L(-1), L(1), mean 0.813261688 (DPO: the
    mean of L(3), L(-3) = 1.548...). The rank-0 value belongs to B's policy gap: d/d pi_c(B) = -s(1), d/d pi_c(A)
    = -s(-1). aot_unpaired with l_c = (2, 0), l_r = (-1, 2): d = sort(2, 0) - sort(-1, 2) = (1, 0): L(1), L(0).
    """
    p = pw.PairLogps(f32(-10, -12), f32(-15, -13), f32(1, 1), f32(1, 1), f32(-12, -12), f32(-14, -16), f32(0, 0),
                     f32(1, 1))
    value, g_c, g_r, _ = value_and_grads("aot", p, beta=1.0)
    assert value / 2 == pytest.approx(0.8132616875182228, rel=1e-6)
    g = mx.grad(lambda pc: pw.aot_loss(pw.PairLogps(pc, p.policy_rejected, p.chosen_tokens, p.rejected_tokens,
                                                       p.reference_chosen, p.reference_rejected), 1.0).sum())
    np.testing.assert_allclose(np.array(g(p.policy_chosen)), [-s(-1), -s(1)], rtol=1e-6)
    q = pw.PairLogps(f32(-10, -12), f32(-15, -14), f32(1, 1), f32(1, 1), f32(-12, -12), f32(-14, -16))
    np.testing.assert_allclose(np.array(pw.aot_unpaired_loss(q, 1.0)), [L(1), L(0)], rtol=1e-6)


def test_large_margins_are_finite():
    """|beta h| = 1000 overflows nothing: DPO ~ 0 and ~ 1000; the sigmoid losses saturate; EXO stays finite."""
    p = pw.PairLogps(f32(0.0, 0.0), f32(0.0, 0.0), f32(1, 1), f32(1, 1), f32(-1000.0, 1000.0), f32(0.0, 0.0))
    np.testing.assert_allclose(np.array(pw.sigmoid_loss(p, 1.0)), [0.0, 1000.0], rtol=1e-6, atol=1e-6)
    for name in ("nca_pair", "robust", "bco_pair", "apo_zero", "apo_down", "exo_pair"):
        kw = {"label_smoothing": 0.1} if LOSS_SPECS[name].knobs else {}
        assert np.all(np.isfinite(np.array(LOSS_SPECS[name].fn(p, 1.0, **kw)))), name


# ------------------------------------------------------------------ the registry


def test_registry_has_trls_losses_and_matching_signatures():
    assert tuple(LOSS_SPECS)[:15] == TRL_DPO_LOSS_TYPES and set(LOSS_SPECS) - set(TRL_DPO_LOSS_TYPES) == {
        "simpo", "cpo", "orpo"}
    assert ALIASES == {"dpo": "sigmoid"}
    for spec in LOSS_SPECS.values():
        params = list(inspect.signature(spec.fn).parameters)
        assert params[:2] == ["p", "beta"] and tuple(params[2:]) == spec.knobs, spec.name
        assert spec.reward in (None, *REWARDS) and spec.fn.__doc__, spec.name
        assert spec.reference == (spec.reward == "log_ratio"), spec.name
        for knob in spec.knobs:
            assert knob in inspect.signature(spec.fn).parameters
    assert [s.name for s in LOSS_SPECS.values() if s.averaged] == ["simpo", "orpo"]
    assert [s.name for s in LOSS_SPECS.values() if not s.reference] == ["sft", "simpo", "cpo", "orpo"]


# ------------------------------------------------------------------ mixtures and metrics


def mix(loss, weights=None, beta=None, **knobs):
    from poet_mlx.config import LossConfig

    return LossConfig(loss=loss, beta=beta, loss_weights=weights, **knobs).mixture


def test_mixture_is_the_weighted_sum_with_one_set_of_rewards():
    """MPO (TRL's recipe): 0.8 sigmoid + 0.2 bco_pair + 1.0 sft on THE HAND PAIR:
    0.8 L(1.5) + 0.2 (L(1) + L(0.5)) + 2.0; rewards are beta l: 1 and -0.5 (margin 1.5, accurate)."""
    m = mix("sigmoid bco_pair sft", [0.8, 0.2, 1.0], beta=0.5)
    losses, metrics = pair_objective(hand_pair(), m)
    assert list(metrics) == metric_names(m) == [*PAIR_METRICS, "nll_loss", "loss/sigmoid", "loss/bco_pair",
                                                  "loss/sft"]
    expected = 0.8 * L(1.5) + 0.2 * (L(1) + L(0.5)) + 2.0
    assert float(losses[0]) == pytest.approx(expected, rel=1e-6) == float(metrics["loss"][0])
    got = {k: float(metrics[k][0]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                             "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss")}
    assert got == pytest.approx({"rewards/chosen": 1.0, "rewards/rejected": -0.5, "rewards/margins": 1.5,
                                 "rewards/accuracies": 1.0, "logps/chosen": -10.0, "logps/rejected": -15.0,
                                 "nll_loss": 2.0})
    assert float(metrics["loss/bco_pair"][0]) == pytest.approx(L(1) + L(0.5), rel=1e-6)


def test_ipo_rewards_are_summed_log_ratios():
    """Fidelity (issue #13): TRL 1.16 logs beta * summed log-ratios for IPO; poet-mlx logged averages. Pair with
    l_c = 2 over 40 tokens and l_r = 1 over 2 tokens: summed rewards 2 beta > beta (accurate), averaged ones
    0.05 beta < 0.5 beta (the accuracy flips)."""
    p = pw.PairLogps(f32(-10.0), f32(-15.0), f32(40.0), f32(2.0), f32(-12.0), f32(-16.0))
    _, metrics = pair_objective(p, mix("ipo", beta=0.1))
    assert float(metrics["rewards/chosen"][0]) == pytest.approx(0.2)
    assert float(metrics["rewards/rejected"][0]) == pytest.approx(0.1)
    assert float(metrics["rewards/accuracies"][0]) == 1.0


def test_simpo_logs_average_log_probs():
    """Fidelity (issue #13): princeton SimPO and TRL's CPO log average log-probs as logps/chosen|rejected;
    THE HAND PAIR: -10/4 = -2.5 and -15/2 = -7.5 (poet-mlx logged the sums -10 and -15). ORPO likewise."""
    for loss, beta in (("simpo", 2.0), ("orpo", 0.1)):
        _, metrics = pair_objective(hand_pair(), mix(loss))
        assert [float(metrics["logps/chosen"][0]), float(metrics["logps/rejected"][0])] == [-2.5, -7.5], loss
        assert float(metrics["rewards/chosen"][0]) == pytest.approx(-2.5 * beta), loss
    _, metrics = pair_objective(hand_pair(), mix("cpo"))  # CPO's sigmoid loss type logs sums
    assert float(metrics["logps/chosen"][0]) == -10.0 and float(metrics["rewards/chosen"][0]) == pytest.approx(-1.0)


def test_simpo_sft_term_is_a_token_mean_over_the_batch():
    """Fidelity (issue #13): the official SimPO/POET code (cross-entropy) and TRL's CPO average the NLL over all
    chosen tokens of the batch. Two pairs whose whole chosen responses have log-probs -12 over 6 tokens and -2
    over 2: token mean 14 / 8 = 1.75 (the mean of the per-pair means, 1.5, was poet-mlx's). d/d full_i = -1/8."""
    p = pw.PairLogps(f32(-4.0, -4.0), f32(-9.0, -9.0), f32(4, 4), f32(3, 3), None, None, f32(-12.0, -2.0), f32(6, 2))
    plain = pw.simpo_loss(p, 2.0, 0.5)
    with_sft = pw.simpo_loss(p, 2.0, 0.5, sft_weight=0.5)
    np.testing.assert_allclose(np.array(with_sft - plain), [0.875, 0.875], rtol=1e-6)

    def f(full):
        return pw.simpo_loss(pw.PairLogps(p.policy_chosen, p.policy_rejected, p.chosen_tokens, p.rejected_tokens,
                                          None, None, full, p.chosen_full_tokens), 2.0, 0.5, sft_weight=1.0).mean()

    np.testing.assert_allclose(np.array(mx.grad(f)(p.chosen_full)), [-1 / 8, -1 / 8], rtol=1e-6)


def test_reward_kinds_must_agree_in_a_mixture():
    with pytest.raises(ValueError, match="measure rewards differently"):
        mix("simpo sigmoid", beta=1.0)
    assert mix("sft").reward == "logps" and mix("sigmoid sft").reward == "log_ratio"
    assert mix("simpo sft", beta=2.0).reward == "mean_logps"
    assert isinstance(mix("dpo"), Mixture) and mix("dpo").names == ("sigmoid",)


# ------------------------------------------------------------------ every loss through the objective, POET or not

VOCAB = 97


def tiny_lora_model(seed: int = 0):
    """A 2-layer llama (hidden 32) with LoRA whose B is random, so every LoRA matrix gets a gradient."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model = Model(ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    rng = np.random.default_rng(seed)
    model.load_weights([(n, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                        for n, v in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")], strict=False)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def setting():
    """(model, pairs, reference per-token log-probs): 6 pairs of very different lengths, one of which has a
    rejected response that starts with the chosen one (identical POET prefixes)."""
    from poet_mlx.data.tokenization import TokenizedPair

    rng = np.random.default_rng(0)
    ints = lambda k: rng.integers(1, VOCAB, k).astype(np.int32)  # noqa: E731
    pairs = [TokenizedPair(ints(int(rng.integers(2, 6))), ints(int(rng.integers(3, 12))),
                           ints(int(rng.integers(8, 30))), i) for i in range(6)]
    pairs[5] = TokenizedPair(pairs[5].prompt, pairs[5].chosen, np.concatenate([pairs[5].chosen, ints(4)]), 5)
    ref = [(rng.normal(-4, 1, len(p.chosen)).astype(np.float32), rng.normal(-4, 1, len(p.rejected)).astype(np.float32))
           for p in pairs]
    return tiny_lora_model(), pairs, ref


def response_logps(model, prompt, response):
    """(len(response),) log-probs of one unpadded prompt + response under the model (no batching code)."""
    from poet_mlx.logprobs import per_token_logps

    seq = mx.array(np.concatenate([prompt, response])[None])
    return per_token_logps(model(seq[:, :-1]), seq[:, 1:])[0, len(prompt) - 1:]


def independent_objective(model, pairs, ref, cfg):
    """The objective from one unpadded forward per response: sums cut by hand (POET's k, LD-DPO's weights),
    the whole chosen response for the NLL terms, then `pair_objective`."""
    sums = {"pc": [], "pr": [], "nc": [], "nr": [], "rc": [], "rr": [], "full": [], "nfull": []}
    for p, (ref_c, ref_r) in zip(pairs, ref):
        n_c, n_r = len(p.chosen), len(p.rejected)
        k = min(n_c, n_r)
        score = max(1, math.floor(cfg.poet_ratio * k + 1e-9)) if cfg.poet else None
        lp_c, lp_r = response_logps(model, p.prompt, p.chosen), response_logps(model, p.prompt, p.rejected)
        for side, lp, rf, n in (("c", lp_c, ref_c, n_c), ("r", lp_r, ref_r, n_r)):
            m = score or n
            w = np.ones(n, np.float32)
            w[m:] = 0.0
            if cfg.ld_alpha is not None:
                w[k:] = cfg.ld_alpha
            sums[f"p{side}"].append((lp * mx.array(w)).sum())
            sums[f"r{side}"].append(float((rf * w).sum()))
            sums[f"n{side}"].append(float(m))
        sums["full"].append(lp_c.sum())
        sums["nfull"].append(float(n_c))
    a = {k: mx.stack(v) if isinstance(v[0], mx.array) else mx.array(np.asarray(v, np.float32)) for k, v in sums.items()}
    p = pw.PairLogps(a["pc"], a["pr"], a["nc"], a["nr"], a["rc"], a["rr"], a["full"], a["nfull"])
    losses, metrics = pair_objective(p, cfg.mixture)
    return losses.mean(), metrics


def through_the_objective(model, pairs, ref, cfg):
    from poet_mlx.batching import pair_set
    from poet_mlx.head import output_head
    from poet_mlx.objective import batch_inputs, batch_objective

    s = pair_set(pairs, cfg)
    s.ref = ref if cfg.needs_reference else None
    return batch_objective(model, *batch_inputs(s.batch(list(range(len(pairs))), 0)), cfg, output_head(model))


def loss_and_grads(fn, model):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    (loss, metrics), grads = nn.value_and_grad(model, lambda m: fn(m))(model)
    mx.eval(loss, metrics, grads)
    return float(loss), metrics, dict(tree_flatten(grads))


def config_for(name, **kw):
    from poet_mlx.config import LossConfig

    knobs = {"label_smoothing": 0.1} if "label_smoothing" in LOSS_SPECS[name].knobs else {}
    knobs.update({"sft_weight": 0.5} if name == "simpo" else {})
    return LossConfig(loss=name, **knobs, **kw)


def assert_same(a, b, what):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6), what
    for k in mb:
        np.testing.assert_allclose(np.array(ma[k]), np.array(mb[k]), rtol=1e-4, atol=1e-5, err_msg=f"{what} {k}")
    assert set(ga) == set(gb)
    for k in ga:
        scale = max(float(np.abs(np.array(gb[k])).max()), 1e-8)
        np.testing.assert_allclose(np.array(ga[k]), np.array(gb[k]), rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=f"{what} grad {k}")


@pytest.mark.parametrize("poet", [False, True], ids=["full", "poet"])
@pytest.mark.parametrize("name", list(LOSS_SPECS))
def test_every_loss_through_the_objective(name, poet, setting):
    """Value, metrics and LoRA gradients of batch_objective (packed feed, POET cut by truncation) equal the
    same loss on sums taken by hand from one unpadded forward per response."""
    model, pairs, ref = setting
    cfg = config_for(name, poet=poet)
    got = loss_and_grads(lambda m: through_the_objective(m, pairs, ref, cfg), model)
    want = loss_and_grads(lambda m: independent_objective(m, pairs, ref, cfg), model)
    assert_same(got, want, f"{name} poet={poet}")
    assert any(float(np.abs(np.array(g)).max()) > 0 for g in got[2].values())


LD_LOSSES = [n for n, s in LOSS_SPECS.items() if s.ld_alpha]


@pytest.mark.parametrize("name", LD_LOSSES)
def test_ld_dpo_through_the_objective(name, setting):
    """LD-DPO (ld_alpha 0.5): every response's tokens past the shorter one's length count half, for the policy
    and the reference; averaged losses (ipo, sigmoid_norm) still divide by the full lengths, as TRL."""
    model, pairs, ref = setting
    cfg = config_for(name, ld_alpha=0.5)
    got = loss_and_grads(lambda m: through_the_objective(m, pairs, ref, cfg), model)
    assert_same(got, loss_and_grads(lambda m: independent_objective(m, pairs, ref, cfg), model), name)


@pytest.mark.parametrize("loss", [n for n in LD_LOSSES if n not in ("ipo", "sigmoid_norm")]
                         + ["sigmoid bco_pair sft"])
def test_poet_equals_ld_dpo_with_alpha_zero(loss, setting):
    """POET.md: TRL's LD-DPO with ld_alpha = 0 is POET, for every loss on log-prob sums: same loss, rewards,
    logps and gradients (num_tokens differ: POET counts k, LD-DPO the full lengths; the sft term scores the whole
    chosen responses in both). Not for ipo/sigmoid_norm, which divide by the full lengths under LD-DPO."""
    from poet_mlx.config import LossConfig

    model, pairs, ref = setting
    knobs = {"label_smoothing": 0.1} if loss in ("exo_pair", "robust", "sigmoid", "aot", "aot_unpaired") else {}
    weights = [0.8, 0.2, 1.0] if " " in loss else None
    poet = loss_and_grads(lambda m: through_the_objective(m, pairs, ref, LossConfig(
        loss, loss_weights=weights, poet=True, **knobs)), model)
    ld = loss_and_grads(lambda m: through_the_objective(m, pairs, ref, LossConfig(
        loss, loss_weights=weights, ld_alpha=0.0, **knobs)), model)
    for m in (poet[1], ld[1]):
        m.pop("num_tokens/chosen"), m.pop("num_tokens/rejected")
    assert_same(poet, ld, loss)


def test_averaged_losses_under_ld_dpo_divide_by_the_full_length(setting):
    """ipo with ld_alpha 0 = the IPO formula on POET's prefix sums over the FULL lengths (TRL), not over k."""
    model, pairs, ref = setting
    _, metrics = through_the_objective(model, pairs, ref, config_for("ipo", ld_alpha=0.0))
    assert np.array(metrics["num_tokens/chosen"]).tolist() == [len(p.chosen) for p in pairs]
    _, poet = through_the_objective(model, pairs, ref, config_for("ipo", poet=True))
    np.testing.assert_allclose(np.array(metrics["rewards/margins"]), np.array(poet["rewards/margins"]), rtol=1e-5)
    assert not np.allclose(np.array(metrics["loss"]), np.array(poet["loss"]))


# ------------------------------------------------------------------ settings: one flag / YAML key, knobs checked


def validated(**flat):
    from poet_mlx.config import RunConfig, validate

    cfg = RunConfig.from_flat({"model": "m/x", "data": "d.jsonl", **flat})
    validate(cfg)
    return cfg.loss


def test_several_losses_from_flags_and_yaml(tmp_path):
    from poet_mlx.cli.args import build_config
    from poet_mlx.cli.train import build_parser
    from poet_mlx.config import RunConfig, load_yaml

    args = build_parser().parse_args(["--model", "m/x", "--data", "d.jsonl", "--loss", "sigmoid", "bco_pair", "sft",
                                      "--loss-weights", "0.8", "0.2", "1.0"])
    ls = build_config(args).loss
    assert (ls.loss, ls.loss_weights, ls.weights) == ("sigmoid bco_pair sft", [0.8, 0.2, 1.0], (0.8, 0.2, 1.0))
    assert ls.needs_reference and ls.needs_full_chosen and ls.reward == "log_ratio"
    for text in ("loss: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1]\n",
                 "loss: sigmoid bco_pair sft\nloss_weights: [0.8, 0.2, 1.0]\n"):
        (tmp_path / "c.yaml").write_text(text)
        again = RunConfig.from_flat(load_yaml(tmp_path / "c.yaml")).loss
        assert (again.loss, again.loss_weights) == (ls.loss, ls.loss_weights)
    dpo = validated(loss="dpo")  # the old spelling keeps working, as an alias
    assert dpo.loss == "dpo" and dpo.specs == validated(loss="sigmoid").specs and dpo.resolved_beta == 0.1


@pytest.mark.parametrize("flat,key", [
    ({"loss": "ipo", "label_smoothing": 0.3}, "label_smoothing"),  # accepted and ignored before issue #13
    ({"loss": "hinge", "gamma_beta_ratio": 0.8}, "gamma_beta_ratio"),
    ({"loss": "dpo", "sft_weight": 0.5}, "sft_weight"),
    ({"loss": "simpo", "cpo_alpha": 0.5}, "cpo_alpha"),
    ({"loss": "sigmoid", "discopop_tau": 0.1}, "discopop_tau"),
    ({"loss": "simpo", "ld_alpha": 0.5}, "ld_alpha"),
    ({"loss": "sft", "ld_alpha": 0.5}, "ld_alpha"),
    ({"loss": "sigmoid", "ld_alpha": 0.5, "poet": True}, "ld_alpha"),
    ({"loss": "sigmoid", "ld_alpha": 1.5}, "ld_alpha"),
    ({"loss": "exo_pair"}, "label_smoothing"),
    ({"loss": "sigmoid bco_pair", "loss_weights": [1.0]}, "loss_weights"),
    ({"loss": "sigmoid bco_pair", "loss_weights": [1.0, 0.0]}, "loss_weights"),
    ({"loss": "dpo sigmoid"}, "loss"),
    ({"loss": "simpo sigmoid", "beta": 0.5}, "loss"),
    ({"loss": "simpo orpo"}, "beta"),
    ({"loss": "orpo", "ref_model": "m/ref"}, "ref_model"),
])
def test_a_knob_no_loss_reads_is_an_error(flat, key):
    from poet_mlx.errors import PoetError

    with pytest.raises(PoetError, match=f"^'{key}' "):
        validated(**flat)


def test_knobs_a_loss_reads_are_accepted():
    assert validated(loss="robust", label_smoothing=0.2).label_smoothing == 0.2
    assert validated(loss="sigmoid sft", ld_alpha=0.5).ld_alpha == 0.5  # sigmoid reads it
    assert validated(loss="simpo orpo", beta=1.0).resolved_beta == 1.0
    assert validated(loss="cpo", cpo_alpha=0.0).needs_full_chosen is False
    assert validated(loss="exo_pair", label_smoothing=1e-3).needs_reference
    assert validated(loss="simpo sft").resolved_beta == 2.0  # sft's beta only scales rewards: it adopts SimPO's


def test_reference_free_mixes_skip_the_reference():
    assert [validated(loss=n).needs_reference for n in ("simpo", "cpo", "orpo", "sft")] == [False] * 4
    assert validated(loss="sigmoid sft").needs_reference
    assert validated(loss="simpo sft").needs_reference is False


def test_train_help_lists_every_loss(capsys):
    from conftest import cli

    assert cli("train", "--help") == 0
    out = capsys.readouterr().out
    for name in LOSS_SPECS:
        assert f"\n  {name} " in out or f"\n  {name}(" in out or f"\n  {name} (= dpo)" in out, name
    assert "--loss-weights" in out and "--ld-alpha" in out and "--cpo-alpha" in out


def test_readme_losses_table_has_every_loss_with_its_reference_column():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Losses"):]
    section = section[: section.index("\n## ", 5)]
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line.split("|") for line in section.splitlines()
            if line.startswith("| `")}
    assert list(rows) == list(LOSS_SPECS)
    for name, cells in rows.items():
        assert cells[3].strip() == ("yes" if LOSS_SPECS[name].reference else "no"), name
        for knob in LOSS_SPECS[name].knobs:
            assert f"`{knob}`" in cells[4], (name, knob)
