"""Next-token entropy by response position (`poet-mlx eval --entropy`), from `scoring.pair_token_logps`.

The entropy at response position t (1-based) is that of the model's distribution over the token at t, given
the prompt and the t-1 response tokens before it (teacher forcing). At t = 1 the context is the prompt alone,
so the chosen and rejected replies of a pair share it: that is the distribution generation samples its first
token from. Training that sharpens the policy where replies diverge shows up as lower entropy there.

The entropies come from the same forward as the log-probs (`logprobs.token_entropy` on the packed response
logits); this module only averages them by position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..batching import TokenLogps


def entropy_by_position(values: Sequence[np.ndarray], max_position: Optional[int] = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ragged per-position values over the sequences that reach each position.

    Args:
        values: N 1-D arrays (e.g. one response's per-token entropies).
        max_position: keep positions 1..max_position (default: the longest sequence).

    Returns:
        (means, counts): (P,) float64 means (NaN where no sequence reaches) and (P,) int64 counts; index
        t - 1 holds position t.
    """
    longest = max((len(v) for v in values), default=0)
    width = longest if max_position is None else max_position
    sums, counts = np.zeros(width), np.zeros(width, np.int64)
    for v in values:
        n = min(len(v), width)
        sums[:n] += v[:n]
        counts[:n] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts


def entropy_profile(entropies: TokenLogps, label: str = "") -> dict:
    """The JSON form of `poet-mlx eval --entropy` for one model: mean next-token entropy by response position
    over chosen and over rejected responses (teacher-forced), with the number of responses reaching each.

    Returns {"label", "position": [1..P], "chosen": [...], "rejected": [...], "chosen_count": [...],
    "rejected_count": [...]} with null where no response reaches a position.
    """
    out: dict = {"label": label}
    longest = max((max(len(c), len(r)) for c, r in entropies), default=0)
    out["position"] = list(range(1, longest + 1))
    for side, name in ((0, "chosen"), (1, "rejected")):
        means, counts = entropy_by_position([e[side] for e in entropies], longest)
        out[name] = [None if np.isnan(m) else float(m) for m in means]
        out[f"{name}_count"] = [int(c) for c in counts]
    return out
