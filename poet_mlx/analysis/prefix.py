"""Prefix-level implicit rewards: does the model prefer the chosen reply's first k tokens?

This is the reward-generation gap (POET.md, "Analyses worth offering"): DPO and SimPO rank whole replies, but
generation commits to a prefix first. A model can rank full replies correctly while preferring the wrong
prefix. Given per-token log-probs of every full response (one forward pass), the implicit reward of every
prefix length k is a cumulative sum, so the whole curve costs no extra model call.

Definitions (k counts response tokens, after the chat template and EOS, exactly as training sees them):
- The reward is the loss's own (`losses.registry`, the `reward` of its entry, as its rewards/* metrics):
  reference-based losses (the DPO family, IPO included, as TRL logs them): r(k) = beta * (sum of the first k
  policy log-probs - the same sum of the reference's); CPO and SFT: beta * the sum of the first k policy
  log-probs; SimPO and ORPO: beta * their average, with no gamma (the margin is chosen - rejected).
- A pair *reaches* k when both responses have at least k tokens; a curve point averages the pairs that
  reach it (`pairs` says how many). Below k the pair's shorter reply has ended, so "the first k tokens" of
  it would be the whole reply: such a pair is left out rather than compared on unequal terms.
- "full": each response scored on all of its tokens (its own length; the two may differ): the full-length
  metric plain DPO/SimPO optimizes, equal to `poet-mlx eval --no-poet`'s rewards/accuracies. Every pair
  reaches it.
- accuracy = share of pairs with chosen reward > rejected reward (strictly, as TRL's rewards/accuracies, so
  an exact tie counts as wrong); margin = mean of chosen - rejected reward.

Everything here is numpy on per-pair arrays; nothing touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..losses.registry import reward_of

PREFIX_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The prefix lengths of `poet-mlx eval --prefix-curve` (plus "full")."""


TokenLogps = Sequence[tuple[np.ndarray, np.ndarray]]
"""Per pair: (chosen, rejected) 1-D arrays of per-token log-probs over the full responses."""


@dataclass
class PrefixCurve:
    """Implicit-reward accuracy and mean margin by prefix length, for one model on one data set.

    `k`, `accuracy`, `margin`, `pairs` are parallel lists over the numeric prefix lengths; a point no pair
    reaches has accuracy and margin None. `full` holds the same three numbers for the full responses.
    `to_json()` is the file format (see the module docstring and README).
    """

    k: list[int]
    accuracy: list[Optional[float]]
    margin: list[Optional[float]]
    pairs: list[int]
    full: dict
    label: str = ""
    loss: str = "dpo"
    beta: float = 0.1
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"label": self.label, "loss": self.loss, "beta": self.beta, "k": list(self.k),
                "accuracy": list(self.accuracy), "margin": list(self.margin), "pairs": list(self.pairs),
                "full": dict(self.full), **self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> "PrefixCurve":
        known = {"label", "loss", "beta", "k", "accuracy", "margin", "pairs", "full"}
        return cls(k=list(obj["k"]), accuracy=list(obj["accuracy"]), margin=list(obj["margin"]),
                   pairs=list(obj["pairs"]), full=dict(obj["full"]), label=obj.get("label", ""),
                   loss=obj.get("loss", "dpo"), beta=obj.get("beta", 0.1),
                   meta={k: v for k, v in obj.items() if k not in known})


def padded_cumsum(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums of ragged 1-D arrays.

    Args:
        seqs: N arrays of lengths n_i.

    Returns:
        (cums, lengths): cums is (N, L+1) float64 with cums[i, k] = sum(seqs[i][:k]) for k <= n_i (and the
        full sum beyond), L = max n_i; lengths is (N,) int64.
    """
    lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
    width = int(lengths.max()) if len(seqs) else 0
    padded = np.zeros((len(seqs), width), np.float64)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    cums = np.concatenate([np.zeros((len(seqs), 1)), np.cumsum(padded, axis=1)], axis=1)
    return cums, lengths


def prefix_rewards(policy: TokenLogps, reference: Optional[TokenLogps], ks: Sequence[int], loss: str,
                   beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Implicit rewards of every pair's chosen and rejected prefixes of each length in `ks`.

    Args:
        policy: per pair (chosen, rejected) per-token log-probs of the scored model, full responses.
        reference: the reference's, same shapes; ignored (may be None) for reference-free rewards.
        ks: K prefix lengths (>= 1).
        loss: the loss setting (one name or several), whose registry entry says how rewards are measured.

    Returns:
        (chosen, rejected, reached): (N, K+1) float64 rewards, the last column being "full", and an (N, K+1)
        bool mask of the pairs that reach each k (the last column all True). Unreached entries are 0.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"prefix lengths must be >= 1, got {list(ks)}")
    kind = reward_of(loss)
    uses_reference, averaged = kind == "log_ratio", kind == "mean_logps"
    if uses_reference and reference is None:
        raise ValueError(f"loss {loss!r} needs reference log-probs")
    out = []
    reached = None
    for side in (0, 1):
        cum, n = padded_cumsum([p[side] for p in policy])
        if uses_reference:
            ref_cum, ref_n = padded_cumsum([r[side] for r in reference])
            if not np.array_equal(n, ref_n):
                raise ValueError("policy and reference log-probs cover different response lengths")
            cum = cum - ref_cum
        rewards = np.zeros((len(n), len(ks) + 1))
        side_reached = np.ones((len(n), len(ks) + 1), bool)
        for j, k in enumerate(ks):
            side_reached[:, j] = n >= k
            col = min(k, cum.shape[1] - 1)
            rewards[:, j] = cum[:, col] / (k if averaged else 1)
        rewards[:, -1] = cum[np.arange(len(n)), n] / (np.maximum(n, 1) if averaged else 1)
        out.append(beta * rewards)
        reached = side_reached if reached is None else reached & side_reached
    chosen, rejected = out
    return np.where(reached, chosen, 0.0), np.where(reached, rejected, 0.0), reached


def prefix_curve(policy: TokenLogps, reference: Optional[TokenLogps], loss: str, beta: float,
                 ks: Sequence[int] = PREFIX_KS, label: str = "") -> PrefixCurve:
    """Accuracy and mean margin of the chosen vs the rejected prefix at each k, and for the full replies.

    Args: as `prefix_rewards`. Returns a PrefixCurve (see the module docstring for the definitions).
    """
    chosen, rejected, reached = prefix_rewards(policy, reference, ks, loss, beta)
    margins = chosen - rejected  # (N, K+1)
    counts = reached.sum(axis=0)
    acc, mean = [], []
    for j in range(len(ks) + 1):
        m = margins[reached[:, j], j]
        acc.append(float((m > 0).mean()) if len(m) else None)
        mean.append(float(m.mean()) if len(m) else None)
    full = {"accuracy": acc[-1], "margin": mean[-1], "pairs": int(counts[-1])}
    return PrefixCurve(list(ks), acc[:-1], mean[:-1], [int(c) for c in counts[:-1]], full, label, loss, beta)
