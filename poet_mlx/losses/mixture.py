"""A loss setting on one batch of pairs: the weighted sum of its formulas, and the metrics TRL logs.

`pair_objective(p, mix)` is the whole preference objective as a pure function of `PairLogps`; the trainer
and evaluation reach it through `poet_mlx.objective`. TRL's DPOTrainer combines several loss types as
sum_i w_i mean(loss_i) and logs one set of rewards for the mix; so does this.
"""

from __future__ import annotations

import mlx.core as mx

from .pairwise import PairLogps, chosen_nll
from .registry import Mixture

PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
"""The names every loss logs, in order (TRL's)."""


def metric_names(mix: Mixture) -> list[str]:
    """The per-pair metrics `pair_objective` returns for `mix`, in its order."""
    names = list(PAIR_METRICS)
    if mix.uses_nll:
        names.append("nll_loss")
    for s, _ in mix.terms:
        names += list(s.metrics)
    if len(mix.terms) > 1:
        names += [f"loss/{s.name}" for s, _ in mix.terms]
    return names


def rewards(p: PairLogps, kind: str, beta: float) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) implicit rewards of kind `kind` (`registry.REWARDS`)."""
    if kind == "log_ratio":
        l_c, l_r = p.log_ratios()
        return beta * l_c, beta * l_r
    chosen, rejected = p.policy_chosen, p.policy_rejected
    if kind == "mean_logps":
        chosen, rejected = chosen / p.chosen_tokens, rejected / p.rejected_tokens
    return beta * chosen, beta * rejected


def pair_objective(p: PairLogps, mix: Mixture) -> tuple[mx.array, dict]:
    """Per-pair losses of the mix and the metrics of `metric_names(mix)`.

    Returns:
        ((B,) sum_i w_i loss_i per pair, dict name -> (B,) array). Batch-level terms (the chosen NLL, AOT's
        sort) are spread over the pairs, so means over pairs are TRL's batch values.
    """
    from . import pairwise

    total, parts, extras = None, {}, {}
    for s, weight in mix.terms:
        losses = s.fn(p, mix.beta, **{k: mix.knobs[k] for k in s.knobs})
        parts[f"loss/{s.name}"] = losses
        total = weight * losses if total is None else total + weight * losses
        if s.metrics:
            extras.update(getattr(pairwise, f"{s.name}_metrics")(p))
    chosen, rejected = rewards(p, mix.reward, mix.beta)
    logps_c, logps_r = p.policy_chosen, p.policy_rejected
    if mix.averaged:  # princeton SimPO and TRL's CPO/ORPO log the averages they score
        logps_c, logps_r = logps_c / p.chosen_tokens, logps_r / p.rejected_tokens
    values = (total, chosen, rejected, chosen - rejected, (chosen > rejected).astype(mx.float32), logps_c, logps_r)
    metrics = dict(zip(PAIR_METRICS, values))
    if mix.uses_nll:
        metrics["nll_loss"] = chosen_nll(p)
    metrics.update(extras)
    if len(mix.terms) > 1:
        metrics.update(parts)
    return total, metrics
