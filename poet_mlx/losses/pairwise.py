"""The loss formulas: pure functions of per-pair log-probs, one per `registry.LossSpec`.

Each formula is `f(p: PairLogps, beta, **knobs) -> (B,)` per-pair losses; its keyword arguments are exactly
the spec's knobs. Notation (POET.md): pi_c, pi_r policy log-prob sums over the scored response tokens (under
LD-DPO the tail beyond the shorter response weighted by alpha), ref_c, ref_r the reference's, n_c, n_r the
scored token counts, l_c = pi_c - ref_c, l_r = pi_r - ref_r, h = l_c - l_r, s the logistic sigmoid,
L(z) = -log s(z), eps = label_smoothing. Each formula is TRL 1.16's (DPOTrainer, CPOTrainer, ORPOTrainer) on
the same inputs; `tests/test_losses_trl.py` runs TRL itself on them.

A batch-level term (the chosen NLL, a token mean over the batch; AOT's sort over the batch) is returned
broadcast to every pair, so the mean over pairs is TRL's batch loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class PairLogps:
    """Per-pair inputs of a loss; every field is a (B,) float32 array.

    chosen_full, chosen_full_tokens: log-prob sum and token count of the whole chosen response (the NLL terms
    use it even when POET cuts the pair); None means the scored ones.
    """

    policy_chosen: mx.array
    policy_rejected: mx.array
    chosen_tokens: mx.array
    rejected_tokens: mx.array
    reference_chosen: mx.array | None = None
    reference_rejected: mx.array | None = None
    chosen_full: mx.array | None = None
    chosen_full_tokens: mx.array | None = None

    def log_ratios(self) -> tuple[mx.array, mx.array]:
        """(l_c, l_r) = (pi_c - ref_c, pi_r - ref_r)."""
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError("this loss needs reference log-probs")
        return self.policy_chosen - self.reference_chosen, self.policy_rejected - self.reference_rejected


def log_sigmoid(x: mx.array) -> mx.array:
    return -nn.softplus(-x)


def smoothed_sigmoid(z: mx.array, eps: float) -> mx.array:
    """(1 - eps) L(z) + eps L(-z): cDPO's conservative loss; eps = 0 is -log s(z)."""
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def chosen_nll(p: PairLogps) -> mx.array:
    """Negative log-likelihood per token of the chosen responses, averaged over all their tokens in the batch
    (a token mean, as TRL's CPO/sft terms and princeton SimPO's cross-entropy), broadcast to (B,)."""
    logps = p.chosen_full if p.chosen_full is not None else p.policy_chosen
    tokens = p.chosen_full_tokens if p.chosen_full_tokens is not None else p.chosen_tokens
    return mx.broadcast_to(-logps.sum() / tokens.sum(), p.policy_chosen.shape)


# -- TRL DPOTrainer loss types -------------------------------------------------------------------------------
def sigmoid_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """DPO (Rafailov et al. 2023): L(beta h). label_smoothing = eps > 0 gives cDPO, (1-eps) L(beta h) +
    eps L(-beta h) (TRL 1.16's sigmoid has no eps; poet-mlx keeps cDPO under this name)."""
    l_c, l_r = p.log_ratios()
    return smoothed_sigmoid(beta * (l_c - l_r), label_smoothing)


def hinge_loss(p: PairLogps, beta: float) -> mx.array:
    """SLiC-style hinge (Zhao et al. 2023): relu(1 - beta h)."""
    l_c, l_r = p.log_ratios()
    return nn.relu(1.0 - beta * (l_c - l_r))


def ipo_loss(p: PairLogps, beta: float) -> mx.array:
    """IPO (Azar et al. 2023, Eq. 17, tau = beta): (l_c / n_c - l_r / n_r - 1 / (2 beta))^2, the log-ratios
    averaged per token as TRL does."""
    l_c, l_r = p.log_ratios()
    return (l_c / p.chosen_tokens - l_r / p.rejected_tokens - 1.0 / (2.0 * beta)) ** 2


def exo_pair_loss(p: PairLogps, beta: float, label_smoothing: float = 1e-3) -> mx.array:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q || p_eps) over {chosen, rejected}, q = (s(z), s(-z)), z = beta h,
    p_eps = (1 - eps, eps): s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps). Needs eps > 0."""
    l_c, l_r = p.log_ratios()
    z = beta * (l_c - l_r)
    eps = label_smoothing
    return (mx.sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps))
            + mx.sigmoid(-z) * (log_sigmoid(-z) - math.log(eps)))


def nca_pair_loss(p: PairLogps, beta: float) -> mx.array:
    """NCA (Chen et al. 2024): L(r_c) + L(-r_c) / 2 + L(-r_r) / 2, r = beta l."""
    l_c, l_r = p.log_ratios()
    r_c, r_r = beta * l_c, beta * l_r
    return -log_sigmoid(r_c) - 0.5 * log_sigmoid(-r_c) - 0.5 * log_sigmoid(-r_r)


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """Robust DPO (Chowdhury et al. 2024): [(1 - eps) L(beta h) - eps L(-beta h)] / (1 - 2 eps)."""
    l_c, l_r = p.log_ratios()
    z, eps = beta * (l_c - l_r), label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(p: PairLogps, beta: float) -> mx.array:
    """BCO on pairs (Jung et al. 2024, as TRL: no running reward shift): L(beta l_c) + L(-beta l_r)."""
    l_c, l_r = p.log_ratios()
    return -log_sigmoid(beta * l_c) - log_sigmoid(-beta * l_r)


def sppo_hard_loss(p: PairLogps, beta: float) -> mx.array:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7, P = 1 / 0):
    (l_c - 1/(2 beta))^2 + (l_r + 1/(2 beta))^2."""
    l_c, l_r = p.log_ratios()
    return (l_c - 0.5 / beta) ** 2 + (l_r + 0.5 / beta) ** 2


def aot_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """AOT, paired (Melnyk et al. 2024): cDPO on d = sort(pi_c - pi_r) - sort(ref_c - ref_r), each sorted over
    the batch (a per-pair value belongs to a rank, not to a pair; only the mean is meaningful)."""
    if p.reference_chosen is None:
        raise ValueError("this loss needs reference log-probs")
    d = mx.sort(p.policy_chosen - p.policy_rejected) - mx.sort(p.reference_chosen - p.reference_rejected)
    return smoothed_sigmoid(beta * d, label_smoothing)


def aot_unpaired_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """AOT, unpaired (Melnyk et al. 2024): cDPO on d = sort(l_c) - sort(l_r), each sorted over the batch."""
    l_c, l_r = p.log_ratios()
    return smoothed_sigmoid(beta * (mx.sort(l_c) - mx.sort(l_r)), label_smoothing)


def apo_zero_loss(p: PairLogps, beta: float) -> mx.array:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 - s(beta l_c) + s(beta l_r)."""
    l_c, l_r = p.log_ratios()
    return 1.0 - mx.sigmoid(beta * l_c) + mx.sigmoid(beta * l_r)


def apo_down_loss(p: PairLogps, beta: float) -> mx.array:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): s(beta l_c) + 1 - s(beta (l_c - l_r))."""
    l_c, l_r = p.log_ratios()
    return mx.sigmoid(beta * l_c) + 1.0 - mx.sigmoid(beta * (l_c - l_r))


def discopop_loss(p: PairLogps, beta: float, discopop_tau: float = 0.05) -> mx.array:
    """DiscoPOP (Chris Lu et al. 2024, Eq. 5): (1 - m) L(z) + m exp(-z), z = beta h, m = s(z / tau)."""
    l_c, l_r = p.log_ratios()
    z = beta * (l_c - l_r)
    m = mx.sigmoid(z / discopop_tau)
    return (1.0 - m) * -log_sigmoid(z) + m * mx.exp(-z)


def sft_loss(p: PairLogps, beta: float) -> mx.array:
    """SFT term: the chosen responses' NLL, token mean over the batch (`chosen_nll`); beta only scales the
    logged rewards."""
    return chosen_nll(p)


def sigmoid_norm_loss(p: PairLogps, beta: float) -> mx.array:
    """Length-normalized DPO (TRL's sigmoid_norm): L(beta (l_c / n_c - l_r / n_r))."""
    l_c, l_r = p.log_ratios()
    return -log_sigmoid(beta * (l_c / p.chosen_tokens - l_r / p.rejected_tokens))


# -- reference-free pairwise losses ----------------------------------------------------------------------
def simpo_loss(p: PairLogps, beta: float, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0,
               sft_weight: float = 0.0) -> mx.array:
    """SimPO (Meng et al. 2024): (1-eps) L(m) + eps L(-m), m = beta (pi_c / n_c - pi_r / n_r) - gamma, gamma =
    gamma_beta_ratio * beta (princeton-nlp's parameterisation), plus sft_weight * `chosen_nll` (token mean, as
    the official code's cross-entropy)."""
    m = beta * (p.policy_chosen / p.chosen_tokens - p.policy_rejected / p.rejected_tokens) - gamma_beta_ratio * beta
    losses = smoothed_sigmoid(m, label_smoothing)
    return losses + sft_weight * chosen_nll(p) if sft_weight else losses


def cpo_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> mx.array:
    """CPO (Xu et al. 2024, Eq. 3 as TRL's CPOTrainer): (1-eps) L(beta (pi_c - pi_r)) + eps L(-beta (pi_c - pi_r))
    + cpo_alpha * `chosen_nll` (the behaviour-cloning term)."""
    losses = smoothed_sigmoid(beta * (p.policy_chosen - p.policy_rejected), label_smoothing)
    return losses + cpo_alpha * chosen_nll(p) if cpo_alpha else losses


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, stable on both sides of -log 2."""
    return mx.where(x < -math.log(2.0), mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def log_odds(p: PairLogps) -> mx.array:
    """ORPO's log odds ratio: log(odds(p_c) / odds(p_r)), odds(p) = p / (1 - p), p = exp(mean log-prob)."""
    a_c, a_r = p.policy_chosen / p.chosen_tokens, p.policy_rejected / p.rejected_tokens
    return (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))


def orpo_loss(p: PairLogps, beta: float) -> mx.array:
    """ORPO (Hong et al. 2024, Eqs. 4-7, lambda = beta): `chosen_nll` - beta log s(log odds ratio)."""
    return chosen_nll(p) - beta * log_sigmoid(log_odds(p))


def orpo_metrics(p: PairLogps) -> dict:
    """TRL's ORPO logs: log_odds_ratio = log s(log odds ratio), log_odds_chosen = the log odds ratio."""
    z = log_odds(p)
    return {"log_odds_ratio": log_sigmoid(z), "log_odds_chosen": z}
