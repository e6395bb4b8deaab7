"""POET: Prefix-Oriented Equal-length Training (Xiao et al., arXiv 2506.09457).

For every pair, after chat templating, EOS handling and the max-length cuts, both responses are scored on
their first k = min(len(chosen), len(rejected)) response tokens. The shorter response keeps its EOS; the
longer one is scored as an unfinished prefix, with no EOS added. The prompt is never cut. The same k serves
the policy and the reference. The paper's ablation keeps k' = floor(r * k) tokens (r = 1 is the default).

Cutting token ids after EOS handling equals masking the tail under a causal model (the kept prefix never
attends to the tail), so poet-mlx truncates ids and saves the compute. These are pure functions on lengths
and token-id lists; nothing here touches a model.
"""

from __future__ import annotations

import math
from typing import Sequence


def poet_length(chosen_len: int, rejected_len: int, ratio: float = 1.0) -> int:
    """The number of leading response tokens POET scores in both responses of a pair.

    Args:
        chosen_len, rejected_len: response token counts after templating, EOS and length cuts (>= 1).
        ratio: the paper's ablation r in (0, 1]; the kept length is floor(r * k), at least 1 token.

    Returns:
        k' = max(1, floor(ratio * min(chosen_len, rejected_len))).
    """
    if chosen_len < 1 or rejected_len < 1:
        raise ValueError(f"responses must have at least one token, got {chosen_len} and {rejected_len}")
    if not 0 < ratio <= 1:
        raise ValueError(f"POET ratio must be in (0, 1], got {ratio}")
    k = min(chosen_len, rejected_len)
    # A small epsilon keeps floor(0.75 * 4) == 3 despite binary rounding of the product.
    return max(1, math.floor(ratio * k + 1e-9))


def scored_lengths(chosen_len: int, rejected_len: int, poet: bool, ratio: float = 1.0) -> tuple[int, int]:
    """(chosen, rejected) counts of scored response tokens: both k' under POET, else the full lengths."""
    if not poet:
        return chosen_len, rejected_len
    k = poet_length(chosen_len, rejected_len, ratio)
    return k, k


def truncate_pair(chosen_ids: Sequence[int], rejected_ids: Sequence[int], ratio: float = 1.0):
    """Apply POET to a pair of response token-id lists: both cut to their first k' tokens.

    Nothing is appended: a cut response has no EOS; the shorter one keeps its EOS when ratio == 1.
    """
    k = poet_length(len(chosen_ids), len(rejected_ids), ratio)
    return list(chosen_ids[:k]), list(rejected_ids[:k])
