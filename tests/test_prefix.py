"""Prefix-level implicit rewards: hand-made arrays, and a brute-force recomputation on truncated pairs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_config

from poet_mlx.analysis.prefix import PrefixCurve, padded_cumsum, prefix_curve, prefix_rewards


def arrays(*values):
    return np.asarray(values, np.float32)


# Two pairs. Pair 0: chosen 3 tokens, rejected 2; pair 1: chosen 1 token, rejected 4.
POLICY = [(arrays(-1, -2, -3), arrays(-2, -1)), (arrays(-0.5), arrays(-1, -1, -1, -1))]
REFERENCE = [(arrays(-1, -1, -1), arrays(-1, -1)), (arrays(-1), arrays(-1, -1, -1, -1))]


def test_padded_cumsum():
    cums, n = padded_cumsum([arrays(1, 2), arrays(5), arrays()])
    assert n.tolist() == [2, 1, 0]
    assert cums.tolist() == [[0, 1, 3], [0, 5, 5], [0, 0, 0]]


def test_dpo_prefix_rewards_by_hand():
    """log-ratios: pair 0 chosen (0, -1, -2), rejected (-1, 0); pair 1 chosen (0.5), rejected (0, 0, 0, 0)."""
    chosen, rejected, reached = prefix_rewards(POLICY, REFERENCE, (1, 2, 4), "dpo", beta=0.5)
    # k=1: both pairs reach it. k=2: only pair 0 (pair 1's chosen has 1 token). k=4: none. Then "full".
    assert reached.tolist() == [[True, True, False, True], [True, False, False, True]]
    np.testing.assert_allclose(chosen[0], [0.5 * 0, 0.5 * -1, 0, 0.5 * -3])
    np.testing.assert_allclose(rejected[0], [0.5 * -1, 0.5 * -1, 0, 0.5 * -1])
    np.testing.assert_allclose(chosen[1], [0.5 * 0.5, 0, 0, 0.5 * 0.5])
    np.testing.assert_allclose(rejected[1], [0, 0, 0, 0])


def test_curve_counts_accuracy_and_margin():
    c = prefix_curve(POLICY, REFERENCE, "dpo", beta=1.0, ks=(1, 2, 4), label="run")
    assert c.k == [1, 2, 4] and c.pairs == [2, 1, 0]
    # k=1 margins: pair 0: 0 - (-1) = 1; pair 1: 0.5 - 0 = 0.5 -> both right.
    assert c.accuracy[0] == 1.0 and c.margin[0] == pytest.approx(0.75)
    # k=2: pair 0 only: -1 - (-1) = 0, an exact tie: wrong, as TRL counts it.
    assert c.accuracy[1] == 0.0 and c.margin[1] == pytest.approx(0.0)
    assert c.accuracy[2] is None and c.margin[2] is None
    # full: pair 0: -3 - (-1) = -2; pair 1: 0.5 - 0 = 0.5.
    assert c.full == {"accuracy": 0.5, "margin": pytest.approx(-0.75), "pairs": 2}


def test_simpo_and_orpo_average_over_the_prefix_ipo_sums():
    c = prefix_curve(POLICY, None, "simpo", beta=2.0, ks=(1, 2))
    # k=2, pair 0: 2 * mean(-1, -2) - 2 * mean(-2, -1) = 0; full: 2 * (-2) - 2 * (-1.5) = -1 (pair 0),
    # 2 * (-0.5) - 2 * (-1) = 1 (pair 1).
    assert c.margin[1] == pytest.approx(0.0) and c.full["margin"] == pytest.approx(0.0)
    assert c.full["accuracy"] == 0.5
    orpo = prefix_curve(POLICY, None, "orpo", beta=2.0, ks=(1, 2))
    assert orpo.to_json()["margin"] == c.to_json()["margin"] and orpo.full == c.full
    # IPO's rewards are beta times the summed log-ratios, as TRL 1.16 logs them (its loss averages).
    ipo = prefix_curve(POLICY, REFERENCE, "ipo", beta=1.0, ks=(2,))
    assert ipo.margin[0] == pytest.approx(-1 - (-1))  # summed log-ratios (0, -1) vs (-1, 0)
    # full, pair 0: (0 - 1 - 2) - (-1 + 0) = -2; pair 1: 0.5 - 0 = 0.5.
    assert ipo.full["margin"] == pytest.approx((-2 + 0.5) / 2)
    # CPO: beta times the policy's sums, no reference; k=1: pair 0: -1 - (-2) = 1, pair 1: -0.5 - (-1) = 0.5.
    cpo = prefix_curve(POLICY, None, "cpo", beta=1.0, ks=(1,))
    assert cpo.margin[0] == pytest.approx(0.75) and cpo.accuracy[0] == 1.0


def test_errors_and_json_round_trip():
    with pytest.raises(ValueError, match="reference"):
        prefix_curve(POLICY, None, "dpo", 0.1)
    with pytest.raises(ValueError, match=">= 1"):
        prefix_curve(POLICY, REFERENCE, "dpo", 0.1, ks=(0, 1))
    c = prefix_curve(POLICY, REFERENCE, "dpo", 0.1, ks=(1, 2), label="x")
    c.meta = {"data": "d.jsonl"}
    again = PrefixCurve.from_json(c.to_json())
    assert again.to_json() == c.to_json() and again.meta == {"data": "d.jsonl"}
    assert set(c.to_json()) == {"label", "loss", "beta", "k", "accuracy", "margin", "pairs", "full", "data"}


def test_prefix_curve_equals_brute_force_truncation(tiny_model_dir, tiny_data_dir):
    """One forward + cumulative sums == scoring each k separately on pairs cut to their first k tokens,
    through the training objective's own metrics (evaluation.evaluate, no POET)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from poet_mlx.adapters import adapters_disabled, attach_trainable, lora_parameters
    from poet_mlx.batching import PairSet, layout
    from poet_mlx.config import LossConfig
    from poet_mlx.data.splits import load_pairs
    from poet_mlx.data.tokenization import TokenizedPair
    from poet_mlx.models import load_model
    from poet_mlx.reporting import Reporter
    from poet_mlx.scoring import pair_token_logps
    from poet_mlx.train.evaluation import evaluate

    cfg = run_config(tiny_model_dir, tiny_data_dir, "unused")
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    pairs = load_pairs(cfg, tokenizer, "valid", Reporter()).pairs
    mx.random.seed(1)
    attach_trainable(model, "lora", -1, lora_parameters(4, 20.0, 0.0, None))
    # A policy that differs from the base: random LoRA B matrices (they start at zero).
    lora_b = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())
              if k.endswith("lora_b")]
    model.update(tree_unflatten(lora_b))
    with adapters_disabled(model):
        reference = pair_token_logps(model, pairs, 4)[0]
    policy, _ = pair_token_logps(model, pairs, 4)
    ks = (1, 2, 4, 8, 16, 32, 64)
    for loss, beta in (("dpo", 0.1), ("simpo", 2.0)):
        curve = prefix_curve(policy, reference, loss, beta, ks)
        assert curve.pairs[0] == len(pairs) and curve.pairs[-1] < len(pairs)  # some pairs are shorter than 64
        for j, k in enumerate(ks + (None,)):
            if k is None:  # "full": every pair as it is
                cut, acc, margin, n = list(pairs), curve.full["accuracy"], curve.full["margin"], curve.full["pairs"]
            else:
                cut = [TokenizedPair(p.prompt, p.chosen[:k], p.rejected[:k], p.index) for p in pairs
                       if len(p.chosen) >= k and len(p.rejected) >= k]
                acc, margin, n = curve.accuracy[j], curve.margin[j], curve.pairs[j]
            assert len(cut) == n, (loss, k)
            if not cut:
                assert acc is None and margin is None
                continue
            with adapters_disabled(model):
                ref = pair_token_logps(model, cut, 4)[0]
            pair_set = PairSet(cut, [layout(p, poet=False) for p in cut], ref if loss != "simpo" else None)
            _, per_pair = evaluate(model, pair_set, LossConfig(loss, beta), 4)
            assert acc == pytest.approx(per_pair["rewards/accuracies"].mean()), (loss, k)
            assert margin == pytest.approx(per_pair["rewards/margins"].mean(), rel=1e-4, abs=1e-6), (loss, k)


def test_base_model_prefix_curve_against_another_reference_model(tiny_model_dir, tiny_data_dir, tmp_path):
    """Fidelity (issue #13): `poet-mlx eval --prefix-curve --ref-model R` with no adapters took the model for its
    own reference and reported accuracy 0 at every k. It must score --model against R: the same curve as
    `prefix_curve` of the two models' own per-token log-probs."""
    import json

    from conftest import cli

    from poet_mlx.data.splits import load_pairs
    from poet_mlx.demo import task as demo_task
    from poet_mlx.demo import tiny
    from poet_mlx.models import load_model
    from poet_mlx.reporting import Reporter
    from poet_mlx.scoring import pair_token_logps

    other = tiny.save_tiny_model(tmp_path / "other", texts=demo_task.corpus_texts(0), seed=1)  # same tokenizer
    data, out = tiny_data_dir / "valid.jsonl", tmp_path / "curves.json"
    assert cli("eval", "--model", tiny_model_dir, "--ref-model", other, "--data", data, "--prefix-curve",
               "--curve-output", out, "--quiet", "--max-length", 128, "--max-prompt-length", 32) == 0
    got = json.loads(out.read_text())["curves"][0]
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    pairs = load_pairs(run_config(tiny_model_dir, data, "unused"), tokenizer, "train", Reporter()).pairs
    want = prefix_curve(pair_token_logps(model, pairs, 4)[0], pair_token_logps(load_model(str(other))[0], pairs, 4)[0],
                        "dpo", 0.1)
    assert any(a not in (None, 0.0) for a in got["accuracy"]), "scored against the other model, not itself"
    assert got["accuracy"] == want.accuracy and got["full"]["accuracy"] == want.full["accuracy"]
    np.testing.assert_allclose([m for m in got["margin"] if m is not None],
                               [m for m in want.margin if m is not None], rtol=1e-4)
