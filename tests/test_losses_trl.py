"""Every loss against TRL 1.16 itself, on the same per-token log-probs: loss value, its gradient and the logged
metrics, to rtol 1e-5. Skipped cleanly without torch and trl (`pip install -e ".[trl]"`).

TRL runs its real code: `DPOTrainer._compute_loss` and `compute_ref_log_probs` on an instance built without
`__init__`, fed by a stand-in model that returns given per-token log-probs (what TRL's fused LM head returns:
zeros off the completion); `CPOTrainer.get_batch_loss_metrics` / `ORPOTrainer.get_batch_loss_metrics` fed by a
stand-in model that returns given logits (TRL then takes its own log-softmax, averages and cross-entropy NLL).
poet-mlx runs `objective.row_sums` (LD-DPO weighting), `batching.reference_sum` and `mixture.pair_objective`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"these checks pin TRL 1.16.0 (found {trl.__version__})", allow_module_level=True)

from poet_mlx.batching import reference_sum  # noqa: E402
from poet_mlx.config import LossConfig  # noqa: E402
from poet_mlx.losses.mixture import pair_objective  # noqa: E402
from poet_mlx.losses.pairwise import PairLogps  # noqa: E402
from poet_mlx.objective import row_sums, shared_lengths  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class Batch:
    """B pairs as TRL's DPO collator lays them out: 2B rows [chosen; rejected], prompt + completion, right-padded;
    per-token log-probs (2B, T-1) of policy and reference, zero off the completion."""

    def __init__(self, seed: int, b: int = 4, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.prompt = np.tile(rng.integers(2, 6, b), 2)  # (2B,) a pair shares its prompt
        self.lens = rng.integers(1, 14, 2 * b)  # (2B,) completion lengths, chosen then rejected
        self.t = int((self.prompt + self.lens).max()) + 1
        self.mask = np.zeros((2 * b, self.t), np.int64)
        self.policy = np.zeros((2 * b, self.t - 1), dtype)
        self.reference = np.zeros_like(self.policy)
        for r in range(2 * b):
            p, n = self.prompt[r], self.lens[r]
            self.mask[r, p : p + n] = 1
            lp = rng.uniform(-3.0, -0.01, n).astype(dtype)
            self.policy[r, p - 1 : p - 1 + n] = lp
            self.reference[r, p - 1 : p - 1 + n] = np.minimum(lp + rng.normal(0, 0.3, n), -1e-3).astype(dtype)
        self.b = b

    def packed(self, a: np.ndarray):
        """(values, rows, offsets) of the completion positions, as poet-mlx's Feed packs them."""
        vals, rows, offs = [], [], []
        for r in range(2 * self.b):
            p, n = self.prompt[r], self.lens[r]
            vals.append(a[r, p - 1 : p - 1 + n])
            rows.append(np.full(n, r))
            offs.append(np.arange(n))
        return tuple(np.concatenate(x) for x in (vals, rows, offs))


# ------------------------------------------------------------------ TRL's side


class LogProbModel:
    """Stands in for a model with TRL's fused LM head: returns the given per-token log-probs."""

    training, is_gradient_checkpointing = True, False

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **_):
        lp = self.log_probs
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool), aux_loss=None)


def accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           autocast=nullcontext)


def trl_dpo(batch: Batch, loss_types, weights=None, beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
            ld_alpha=None):
    """(loss, d loss / d policy per-token log-probs (2B, T-1), metrics) from TRL's DPOTrainer."""
    from trl.trainer.dpo_trainer import DPOTrainer

    policy = torch.tensor(batch.policy, requires_grad=True)
    model, ref_model = LogProbModel(policy), LogProbModel(torch.tensor(batch.reference))
    t = DPOTrainer.__new__(DPOTrainer)
    vars(t).update(model=model, ref_model=ref_model, accelerator=accelerator(), beta=beta, loss_types=list(loss_types),
                   loss_weights=list(weights or [1.0] * len(loss_types)), ld_alpha=ld_alpha,
                   f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, label_smoothing=label_smoothing,
                   use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=True, _tp_size=1,
                   _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                   args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None))
    ids = torch.ones(batch.mask.shape, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": ids, "completion_mask": torch.tensor(batch.mask)}
    ref_c, ref_r = DPOTrainer.compute_ref_log_probs(t, ref_model, inputs)
    inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = DPOTrainer._compute_loss(t, model, inputs, False)
    loss.backward()
    # The real fused head has no gradient off the completion (it scatters into zeros); the stand-in passes one.
    grad = policy.grad.numpy() * batch.mask[:, 1:]
    return float(loss.detach()), grad, {k: v[-1] for k, v in t._metrics["train"].items()}


# ------------------------------------------------------------------ poet-mlx's side


def ours_dpo(batch: Batch, cfg: LossConfig, poet: bool = False):
    """(loss, gradient (2B, T-1), mean metrics) of poet-mlx's objective on the same log-probs. With `poet`, the
    pair is scored on its first k = min(len) tokens (counts k; the NLL terms keep the whole chosen response)."""
    values, rows, offsets = batch.packed(batch.policy)
    ref_values, _, _ = batch.packed(batch.reference)
    b, lens = batch.b, batch.lens.astype(np.int32)
    k = np.tile(np.minimum(lens[:b], lens[b:]), 2)
    score = k if poet else lens
    starts = np.concatenate([[0], np.cumsum(lens)])
    dtype = batch.policy.dtype
    ref = np.asarray([reference_sum(ref_values[starts[r]:starts[r + 1]], int(score[r]), int(k[r]), cfg.ld_alpha)
                      for r in range(2 * b)], dtype)
    rows_, offs = mx.array(rows.astype(np.int32)), mx.array(offsets.astype(np.int32))
    mdt = mx.float64 if dtype == np.float64 else mx.float32

    def arr(x):  # mx.array reads float64 numpy as float32 unless told
        return mx.array(x, dtype=mdt)

    def objective(v):
        ld = cfg.ld_alpha is not None
        shared = shared_lengths(mx.array(score)) if ld else None
        sums = row_sums(v, rows_, offs, mx.array(score), shared, cfg.ld_alpha if ld else 1.0)
        full = row_sums(v, rows_, offs, mx.array(lens))[:b]
        counts = arr(score)
        p = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:], arr(ref[:b]), arr(ref[b:]), full, arr(lens[:b]))
        losses, metrics = pair_objective(p, cfg.mixture)
        return losses.mean(), metrics

    (loss, metrics), grad = mx.value_and_grad(objective)(arr(values))
    dense = np.zeros_like(batch.policy)
    for r in range(2 * b):
        p = batch.prompt[r]
        dense[r, p - 1 : p - 1 + lens[r]] = np.array(grad)[starts[r]:starts[r + 1]]
    return float(loss), dense, {k: float(np.mean(np.array(v))) for k, v in metrics.items()}


def assert_matches(trl_out, ours_out, what, metrics=METRICS, rtol=RTOL, atol=ATOL, grad_rtol=None):
    """Loss and metrics to rtol (atol near 0); each gradient entry to grad_rtol (default rtol) of itself plus
    of the gradient's largest entry (float32 sums taken in another order round differently)."""
    (l_t, g_t, m_t), (l_o, g_o, m_o) = trl_out, ours_out
    grad_rtol = grad_rtol or rtol
    np.testing.assert_allclose(l_o, l_t, rtol=rtol, atol=atol, err_msg=f"{what}: loss")
    np.testing.assert_allclose(g_o, g_t, rtol=grad_rtol, atol=max(atol, grad_rtol * float(np.abs(g_t).max())),
                               err_msg=f"{what}: gradient")
    for k in metrics:
        np.testing.assert_allclose(m_o[k], m_t[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


# ------------------------------------------------------------------ DPOTrainer's 15 loss types


CASES = [(t, {}) for t in TRL_TYPES if t != "exo_pair"] + [
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.1}), ("aot", {"label_smoothing": 0.2}), ("aot_unpaired", {"label_smoothing": 0.2}),
    ("discopop", {"discopop_tau": 0.5}),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss,knobs", CASES, ids=[f"{c[0]}{'-' + str(c[1]) if c[1] else ''}" for c in CASES])
def test_dpo_loss_types_match_trl(loss, knobs, beta, dtype):
    """float32 to 1e-5; float64 (both frameworks) to 1e-6: MLX computes exp, log and the sigmoid of float64
    arrays to float32 accuracy on the CPU (~1e-8 relative), so float64 cannot go further here."""
    seed = [c[0] for c in CASES].index(loss) + 31 * int(beta * 10)
    batch = Batch(seed, dtype=np.dtype(dtype))
    cfg = LossConfig(loss=loss, beta=beta, **knobs)
    # TRL logs beta * log-ratios even for sft; poet-mlx scores sft alone without a reference (beta * policy sums).
    metrics = () if loss == "sft" else METRICS
    tol = {"rtol": RTOL, "atol": ATOL} if dtype == "float32" else {"rtol": 1e-6, "atol": 1e-9}
    if loss == "discopop" and dtype == "float32":
        # d/dz of s(z / tau) is up to 1 / (4 tau) = 5 at tau 0.05: near a zero margin both float32 gradients
        # are ~3e-5 off the float64 value (measured: TRL -1.7e-6, poet-mlx +0.8e-6 on 0.0532), so 1e-4 here;
        # the float64 case checks the same formula to 1e-6.
        tol["grad_rtol"] = 1e-4
    assert_matches(trl_dpo(batch, [loss], beta=beta, **knobs), ours_dpo(batch, cfg), loss, metrics, **tol)


@pytest.mark.parametrize("types,weights", [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
                                           (["ipo", "hinge", "apo_zero"], None)])
def test_loss_mixtures_match_trl(types, weights):
    """TRL's MPO recipe and an unweighted mix: sum_i w_i mean(loss_i), one set of rewards (beta * log-ratios)."""
    batch = Batch(seed=3)
    cfg = LossConfig(loss=" ".join(types), loss_weights=weights)
    assert_matches(trl_dpo(batch, types, weights), ours_dpo(batch, cfg), " ".join(types))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss", [t for t in TRL_TYPES if t != "sft"])
def test_ld_dpo_matches_trl(loss, ld_alpha):
    """ld_alpha: the shared-length prefix scored fully, the longer reply's tail weighted by alpha (policy and
    reference); ipo and sigmoid_norm still divide by the full completion lengths, as TRL does."""
    batch = Batch(seed=11)
    knobs = {"label_smoothing": 0.1} if loss == "exo_pair" else {}
    cfg = LossConfig(loss=loss, ld_alpha=ld_alpha, **knobs)
    assert_matches(trl_dpo(batch, [loss], ld_alpha=ld_alpha, **knobs), ours_dpo(batch, cfg), f"{loss} {ld_alpha}")


@pytest.mark.parametrize("loss", [t for t in TRL_TYPES if t not in ("ipo", "sigmoid_norm")]
                         + ["sigmoid bco_pair sft"])
def test_poet_equals_trls_ld_dpo_alpha_zero(loss):
    """POET.md: poet-mlx's POET (pairs cut to k = min(len)) == TRL's DPOTrainer with ld_alpha = 0.0, for every
    loss type on summed log-probs (sft scores the whole chosen responses in both)."""
    batch = Batch(seed=5)
    types = loss.split()
    weights = [0.8, 0.2, 1.0] if len(types) > 1 else None
    metrics = () if loss == "sft" else METRICS
    knobs = {"label_smoothing": 0.1} if loss == "exo_pair" else {}
    assert_matches(trl_dpo(batch, types, weights, ld_alpha=0.0, **knobs),
                   ours_dpo(batch, LossConfig(loss=loss, loss_weights=weights, poet=True, **knobs), poet=True), loss,
                   metrics)


# ------------------------------------------------------------------ SimPO and CPO (CPOTrainer), ORPO (ORPOTrainer)


class LogitModel:
    """Stands in for a causal LM: returns the given (2B, T, V) logits."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *_, **__):
        return SimpleNamespace(logits=self.logits)


def logit_batch(seed: int, b: int = 3, vocab: int = 11, prompt_len=None):
    """Token ids, labels (prompt and padding -100) and logits for b pairs; prompts of 1 token when prompt_len=1."""
    rng = np.random.default_rng(seed)
    prompts = [int(prompt_len or rng.integers(2, 5)) for _ in range(b)]
    lens = rng.integers(2, 9, 2 * b)
    rows = []
    for r in range(2 * b):
        p = prompts[r % b]
        rows.append((np.concatenate([rng.integers(0, vocab, p), rng.integers(0, vocab, lens[r])]), p))
    t = max(len(ids) for ids, _ in rows)
    ids = np.zeros((2 * b, t), np.int64)
    labels = np.full((2 * b, t), -100, np.int64)
    attn = np.zeros((2 * b, t), np.int64)
    for r, (x, p) in enumerate(rows):
        ids[r, : len(x)], attn[r, : len(x)] = x, 1
        labels[r, p : len(x)] = x[p:]
    logits = rng.normal(0, 2, (2 * b, t, vocab)).astype(np.float32)
    return ids, labels, attn, logits


def trl_reference_free(trainer_cls, ids, labels, attn, logits, **attrs):
    """(loss, d loss / d logits, metrics) from TRL's get_batch_loss_metrics with a stand-in model."""
    b = ids.shape[0] // 2
    t = trainer_cls.__new__(trainer_cls)
    vars(t).update(is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False,
                   accelerator=accelerator(), **attrs)
    x = torch.tensor(logits, requires_grad=True)
    tensors = {k: torch.tensor(v) for k, v in (("input_ids", ids), ("labels", labels), ("attention_mask", attn))}
    batch = {f"{side}_{k}": v[sl] for side, sl in (("chosen", slice(0, b)), ("rejected", slice(b, None)))
             for k, v in tensors.items()}
    loss, metrics = trainer_cls.get_batch_loss_metrics(t, LogitModel(x), batch)
    loss.backward()
    return float(loss.detach()), x.grad.numpy(), {k: float(v) for k, v in metrics.items()}


def ours_reference_free(ids, labels, logits, cfg: LossConfig):
    """poet-mlx's objective from the same logits: log-softmax at the response targets, sums and counts."""
    from poet_mlx.logprobs import per_token_logps

    b = ids.shape[0] // 2
    targets, mask = mx.array(ids[:, 1:].astype(np.int32)), mx.array((labels[:, 1:] != -100).astype(np.float32))
    counts = mask.sum(axis=1)

    def objective(x):
        sums = (per_token_logps(x[:, :-1], targets) * mask).sum(axis=1)  # (2B,)
        p = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:], None, None, sums[:b], counts[:b])
        losses, metrics = pair_objective(p, cfg.mixture)
        return losses.mean(), metrics

    (loss, metrics), grad = mx.value_and_grad(objective)(mx.array(logits))
    return float(loss), np.array(grad), {k: float(np.mean(np.array(v))) for k, v in metrics.items()}


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("loss", ["simpo", "cpo"])
@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_simpo_and_cpo_match_trls_cpo_trainer(loss, eps, nll_weight):
    """SimPO = CPOTrainer(loss_type="simpo", simpo_gamma = gamma_beta_ratio * beta, cpo_alpha = sft_weight),
    CPO = CPOTrainer(loss_type="sigmoid", cpo_alpha): loss (with the NLL as a token mean over the batch), its
    gradient w.r.t. the logits, rewards and logps (averages for SimPO) and nll_loss."""
    from trl.experimental.cpo import CPOTrainer

    ids, labels, attn, logits = logit_batch(seed=7)
    beta = 2.0 if loss == "simpo" else 0.3
    knobs = {"sft_weight": nll_weight} if loss == "simpo" else {"cpo_alpha": nll_weight}
    cfg = LossConfig(loss=loss, beta=beta, label_smoothing=eps, gamma_beta_ratio=0.5, **knobs)
    theirs = trl_reference_free(CPOTrainer, ids, labels, attn, logits, beta=beta, label_smoothing=eps,
                                loss_type="simpo" if loss == "simpo" else "sigmoid", cpo_alpha=nll_weight,
                                simpo_gamma=0.5 * beta, alpha=0.0)
    ours = ours_reference_free(ids, labels, logits, cfg)
    metrics = METRICS + (("nll_loss",) if nll_weight else ())
    assert_matches(theirs, ours, f"{loss} eps={eps} nll={nll_weight}", metrics)


def test_orpo_matches_trls_orpo_trainer():
    """ORPO = ORPOTrainer: NLL - beta mean(log s(log odds)); loss, gradient, rewards, logps (averages), nll_loss,
    log_odds_ratio, log_odds_chosen. TRL's NLL also scores the prompt tokens; with one-token prompts (never a
    target) the two definitions coincide."""
    from trl.experimental.orpo import ORPOTrainer

    ids, labels, attn, logits = logit_batch(seed=9, prompt_len=1)
    theirs = trl_reference_free(ORPOTrainer, ids, labels, attn, logits, beta=0.25)
    ours = ours_reference_free(ids, labels, logits, LossConfig(loss="orpo", beta=0.25))
    assert_matches(theirs, ours, "orpo", METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"))
