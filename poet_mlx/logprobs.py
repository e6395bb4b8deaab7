"""Per-token and per-sequence log-probabilities from a causal LM's logits.

The log-softmax is never materialised: log p(y_t) = logit[y_t] - logsumexp(logits_t), computed in chunks
over the sequence axis so the extra memory is (N, chunk, V) float32 at most, whatever V is (Gemma: 262k).
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Upper bound on N * chunk * V elements upcast to float32 at once (64 MiB)."""


def per_token_logps(logits: mx.array, targets: mx.array, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> mx.array:
    """Log-probability of each target token.

    Args:
        logits: (N, T, V) model outputs at positions 0..T-1 (any float dtype).
        targets: (N, T) int token ids; targets[:, t] is the token that follows position t.
        chunk_elements: bound on the elements upcast to float32 per chunk.

    Returns:
        (N, T) float32 log-probs.
    """
    n, t, v = logits.shape
    step = max(1, min(t, chunk_elements // max(1, n * v)))
    parts = []
    for s in range(0, t, step):
        chunk = logits[:, s : s + step].astype(mx.float32)  # (N, c, V)
        target_logit = mx.take_along_axis(chunk, targets[:, s : s + step, None], axis=-1)[..., 0]  # (N, c)
        parts.append(target_logit - mx.logsumexp(chunk, axis=-1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def span_mask(starts: mx.array, lengths: mx.array, width: int) -> mx.array:
    """(N, width) bool mask, true at target positions starts[i] <= t < starts[i] + lengths[i]."""
    pos = mx.arange(width)[None, :]
    return (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])


def sequence_logps(token_logps: mx.array, starts: mx.array, lengths: mx.array) -> mx.array:
    """Sum of token log-probs over each row's scored span.

    Args:
        token_logps: (N, T) from `per_token_logps`.
        starts: (N,) first scored target position (the prompt length minus one).
        lengths: (N,) number of scored tokens.

    Returns:
        (N,) float32 sums.
    """
    mask = span_mask(starts, lengths, token_logps.shape[1])
    return mx.where(mask, token_logps, 0.0).sum(axis=1)
