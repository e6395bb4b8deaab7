"""Per-token and per-sequence log-probabilities from a causal LM's logits.

The log-softmax is never materialised: log p(y_t) = logit[y_t] - logsumexp(logits_t). The gradient is
written by hand (`d/dlogits = g * (onehot(y) - softmax)`, one elementwise expression that a compiled step
fuses into a single kernel), because MLX's automatic one keeps several (N, T, V) temporaries: measured at
V = 262k, a compiled training step held 5.4 GB beyond the logits and their gradient with the automatic
backward of a chunked form, and 1 MB with this one (`benchmarks/lossmem.py`).

Half-precision logits are upcast to float32 for the logsumexp in chunks of rows, at most `chunk_elements`
values at a time; float32 logits need no copy at all.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Upper bound on the half-precision logits upcast to float32 at once (64 MiB)."""


def _row_logsumexp(flat: mx.array, chunk_elements: int) -> mx.array:
    """(M, V) -> (M,) float32 logsumexp; half-precision rows are upcast `chunk_elements // V` at a time."""
    m, v = flat.shape
    if flat.dtype == mx.float32 or m * v <= chunk_elements:
        return mx.logsumexp(flat.astype(mx.float32), axis=-1)
    rows = max(1, chunk_elements // v)
    parts = []
    for s in range(0, m, rows):
        chunk = flat[s : s + rows]
        if parts:  # one chunk after the other, so that only one float32 copy is needed at a time
            chunk = mx.depends(chunk, parts[-1])
        parts.append(mx.logsumexp(chunk.astype(mx.float32), axis=-1))
    return mx.concatenate(parts)


@lru_cache(maxsize=None)
def _flat_token_logps(chunk_elements: int):
    """A custom function (M, V) logits, (M,) targets -> (M,) float32 log-probs, with a hand-written VJP."""

    @mx.custom_function
    def token_logps(flat, targets):
        target_logit = mx.take_along_axis(flat, targets[:, None], axis=-1)[:, 0].astype(mx.float32)
        return target_logit - _row_logsumexp(flat, chunk_elements)

    @token_logps.vjp
    def token_logps_vjp(primals, cotangent, output):
        flat, targets = primals
        g = cotangent.astype(mx.float32)[:, None]  # (M, 1)
        idx = targets[:, None]
        # logsumexp recovered from the forward's output: no second reduction over V.
        lse = mx.take_along_axis(flat, idx, axis=-1).astype(mx.float32) - output[:, None]  # (M, 1)
        onehot = mx.arange(flat.shape[1])[None, :] == idx  # (M, V) bool; fused away when compiled
        grad = (g * (onehot - mx.exp(flat.astype(mx.float32) - lse))).astype(flat.dtype)  # (M, V)
        return grad, mx.zeros_like(targets)

    return token_logps


def per_token_logps(logits: mx.array, targets: mx.array, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> mx.array:
    """Log-probability of each target token.

    Args:
        logits: (N, T, V) model outputs at positions 0..T-1 (any float dtype).
        targets: (N, T) int token ids; targets[:, t] is the token that follows position t.
        chunk_elements: bound on the half-precision elements upcast to float32 per chunk.

    Returns:
        (N, T) float32 log-probs.
    """
    n, t, v = logits.shape
    flat = _flat_token_logps(max(1, int(chunk_elements)))(logits.reshape(n * t, v), targets.reshape(n * t))
    return flat.reshape(n, t)


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


def token_entropy(logits, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Entropy (nats) of softmax(logits) at every position.

    Args:
        logits: (N, T, V) mx.array, any float dtype.

    Returns:
        (N, T) float32 mx.array: H = logsumexp(l) - sum_v softmax(l)_v * l_v.
    """
    n, t, v = logits.shape
    step = max(1, min(t, chunk_elements // max(1, n * v)))
    parts = []
    for s in range(0, t, step):
        chunk = logits[:, s : s + step].astype(mx.float32)  # (N, c, V)
        lse = mx.logsumexp(chunk, axis=-1, keepdims=True)  # (N, c, 1)
        parts.append(lse[..., 0] - (mx.exp(chunk - lse) * chunk).sum(axis=-1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
