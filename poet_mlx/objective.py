"""The training objective on one batch: one forward over [chosen; rejected], then the preference loss.

Kept apart from the trainer so that training, evaluation and tests share exactly one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .config import LossConfig
from .logprobs import per_token_logps, sequence_logps
from .losses import PairLogps, pair_metrics, preference_loss, sft_nll


@dataclass(frozen=True)
class Objective:
    """The loss settings (python constants, so a compiled step closes over them)."""

    loss: str = "dpo"
    beta: float = 0.1
    gamma_beta_ratio: float = 0.5
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "Objective":
        return cls(cfg.loss, cfg.resolved_beta, cfg.gamma_beta_ratio, cfg.label_smoothing, cfg.sft_weight)

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"

    @property
    def needs_full_chosen(self) -> bool:
        """SimPO's SFT term scores the whole chosen response, even when POET cuts the preference term."""
        return self.loss == "simpo" and self.sft_weight > 0


def model_token_logps(model, tokens: mx.array) -> mx.array:
    """(N, L) tokens -> (N, L-1) log-probs of tokens[:, 1:] under the model."""
    logits = model(tokens[:, :-1])  # (N, L-1, V)
    return per_token_logps(logits, tokens[:, 1:])


def batch_objective(model, tokens, starts, score_lens, keep_lens, ref_logps, objective: Objective):
    """Loss and per-pair metrics for one batch.

    Args:
        tokens: (2B, L) int32, chosen rows then rejected rows.
        starts, score_lens, keep_lens: (2B,) int32 (see `batching.PairBatch`).
        ref_logps: (2B,) float32 reference sums over the scored tokens (ignored by SimPO).

    Returns:
        (scalar mean loss, dict of (B,) per-pair metrics with TRL names).
    """
    token_logps = model_token_logps(model, tokens)  # (2B, L-1)
    logps = sequence_logps(token_logps, starts, score_lens)  # (2B,)
    b = tokens.shape[0] // 2
    counts = score_lens.astype(mx.float32)
    pairs = PairLogps(
        policy_chosen=logps[:b],
        policy_rejected=logps[b:],
        chosen_tokens=counts[:b],
        rejected_tokens=counts[b:],
        reference_chosen=ref_logps[:b],
        reference_rejected=ref_logps[b:],
    )
    losses, chosen_rewards, rejected_rewards = preference_loss(
        objective.loss, pairs, objective.beta, objective.gamma_beta_ratio, objective.label_smoothing
    )
    metrics = pair_metrics(pairs, losses, chosen_rewards, rejected_rewards)
    if objective.needs_full_chosen:
        full = sequence_logps(token_logps[:b], starts[:b], keep_lens[:b])
        nll = sft_nll(full, keep_lens[:b].astype(mx.float32))
        metrics["sft_nll"] = nll
        losses = losses + objective.sft_weight * nll
        metrics["loss"] = losses
    if objective.needs_reference:
        metrics["ref_logps/chosen"] = pairs.reference_chosen
        metrics["ref_logps/rejected"] = pairs.reference_rejected
    metrics["num_tokens/chosen"] = pairs.chosen_tokens
    metrics["num_tokens/rejected"] = pairs.rejected_tokens
    return losses.mean(), metrics
