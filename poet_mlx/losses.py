"""Preference losses (DPO family, SimPO) and their TRL-named metrics, as pure functions of sequence log-probs.

Every loss maps per-pair log-probs to `(losses, chosen_rewards, rejected_rewards)`, each of shape (B,).
Notation (POET.md): pi_c, pi_r policy log-prob sums over the scored response tokens, ref_c, ref_r the
reference's, n_c, n_r the scored token counts, beta, eps = label_smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class PairLogps:
    """Per-pair inputs of a preference loss; every field is a (B,) float32 array."""

    policy_chosen: mx.array
    policy_rejected: mx.array
    chosen_tokens: mx.array
    rejected_tokens: mx.array
    reference_chosen: mx.array | None = None
    reference_rejected: mx.array | None = None


def _log_sigmoid(x: mx.array) -> mx.array:
    return -nn.softplus(-x)


def _smoothed_sigmoid_loss(logits: mx.array, eps: float) -> mx.array:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): cDPO's conservative loss; eps = 0 is plain DPO."""
    return -(1.0 - eps) * _log_sigmoid(logits) - eps * _log_sigmoid(-logits)


def _dpo_rewards(p: PairLogps, beta: float):
    chosen = beta * (p.policy_chosen - p.reference_chosen)
    rejected = beta * (p.policy_rejected - p.reference_rejected)
    return chosen, rejected


def dpo_sigmoid_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, **_):
    """DPO (Rafailov et al. 2023): -log sigma(beta h), h = (pi_c - ref_c) - (pi_r - ref_r).

    label_smoothing = eps > 0 gives cDPO: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    Rewards are beta (pi - ref) from sums.
    """
    chosen, rejected = _dpo_rewards(p, beta)
    return _smoothed_sigmoid_loss(chosen - rejected, label_smoothing), chosen, rejected


def ipo_loss(p: PairLogps, beta: float, **_):
    """IPO (Azar et al. 2023): (h_avg - 1 / (2 beta))^2 with length-averaged log-ratios.

    h_avg = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r. Rewards are beta times the averaged log-ratios,
    as TRL reports them for IPO.
    """
    chosen_ratio = (p.policy_chosen - p.reference_chosen) / p.chosen_tokens
    rejected_ratio = (p.policy_rejected - p.reference_rejected) / p.rejected_tokens
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio, beta * rejected_ratio


def hinge_loss(p: PairLogps, beta: float, **_):
    """SLiC-style hinge: relu(1 - beta h)."""
    chosen, rejected = _dpo_rewards(p, beta)
    return nn.relu(1.0 - (chosen - rejected)), chosen, rejected


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, **_):
    """Robust DPO (Chowdhury et al. 2024): [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)."""
    chosen, rejected = _dpo_rewards(p, beta)
    z = chosen - rejected
    eps = label_smoothing
    losses = (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return losses, chosen, rejected


def simpo_loss(p: PairLogps, beta: float, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0, **_):
    """SimPO (Meng et al. 2024): -log sigma(m), m = beta (pi_c / n_c - pi_r / n_r) - gamma.

    gamma = gamma_beta_ratio * beta (princeton-nlp's parameterisation); eps > 0 gives the cDPO form.
    No reference model. Rewards are beta times the average log-prob. The optional SFT term lives in
    `sft_nll`, added by the caller with its weight.
    """
    chosen = beta * p.policy_chosen / p.chosen_tokens
    rejected = beta * p.policy_rejected / p.rejected_tokens
    margin = chosen - rejected - gamma_beta_ratio * beta
    return _smoothed_sigmoid_loss(margin, label_smoothing), chosen, rejected


LOSS_FUNCTIONS = {
    "dpo": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
}


def preference_loss(name: str, p: PairLogps, beta: float, gamma_beta_ratio: float = 0.5,
                    label_smoothing: float = 0.0):
    """Dispatch to the loss called `name` (a key of LOSS_FUNCTIONS); returns (losses, chosen, rejected)."""
    return LOSS_FUNCTIONS[name](p, beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing)


def sft_nll(chosen_logps_full: mx.array, chosen_tokens_full: mx.array) -> mx.array:
    """Mean negative log-likelihood per token of the (full) chosen response, per pair: (B,)."""
    return -chosen_logps_full / chosen_tokens_full


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
"""The names `pair_metrics` returns, in order (TRL's)."""


def pair_metrics(p: PairLogps, losses: mx.array, chosen_rewards: mx.array, rejected_rewards: mx.array) -> dict:
    """Per-pair metrics under TRL's names (PAIR_METRICS); each value is a (B,) array (average them for a batch)."""
    values = (losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
              (chosen_rewards > rejected_rewards).astype(mx.float32), p.policy_chosen, p.policy_rejected)
    return dict(zip(PAIR_METRICS, values))
