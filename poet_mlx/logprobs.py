"""Per-token and per-sequence log-probabilities from a causal LM's logits.

The log-softmax is never materialised: log p(y_t) = logit[y_t] - logsumexp(logits_t). The gradient is
written by hand (`d/dlogits = g * (onehot(y) - softmax)`, one elementwise expression that a compiled step
fuses into a single kernel), because MLX's automatic one keeps several (N, T, V) temporaries: measured at
V = 262k, a compiled training step held 5.4 GB beyond the logits and their gradient with the automatic
backward of a chunked form, and 1 MB with this one (`benchmarks/lossmem.py`).

The logsumexp runs in chunks of rows, at most `chunk_elements` values at a time (its exp, and the float32
copy of half-precision logits, are per-chunk temporaries). A training step through a frozen head goes
further (`head_token_logps`): the head itself runs a block at a time, so the (R, V) logits never exist.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .backends.fast_layers import current_stream, on_stream

DEFAULT_CHUNK_ELEMENTS = 1 << 20
"""Logits handled at once by the chunked computations here and in `scoring.head_in_chunks` (4 MiB of float32).
MLX's evaluation runs up to ~10 ops ahead of the CPU (`backends.runahead`), so a few chunks' temporaries are
alive at once: the smaller the chunk, the less that costs. Measured on SmolLM2-135M (V = 49,152), DPO at 2 x 256,
2 BLAS threads: training peak 1.90 GB at 1 << 23, 1.71 at 1 << 22, 1.59 at 1 << 21, 1.52 at 1 << 20 (with
--grad-checkpoint 0.78 GB at 1 << 21, 0.72 at 1 << 20); step time the same within noise (4.3-4.9 s). With the
lean blocks (`backends.lean_lora`): 1.012 GB at 1 << 21, 0.977 at 1 << 20, steps 3.65-3.75 s and the reference
pass 7.5-7.6 s for both (alternating runs)."""


def logsumexp_rows(x: mx.array) -> mx.array:
    """(..., V) float -> (...,) logsumexp over the last axis, written with `mx.exp` so that under
    `mx.compile` the exp is a fused kernel (vectorized on Linux, `backends.jit`); `mx.logsumexp` is a
    prebuilt scalar kernel there (measured: head + log-probs of 2720 x 49152 logits, forward + backward,
    compiled: 10.5 s with it, 6.8 s written out)."""
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return (top + mx.log(mx.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def _row_logsumexp(flat: mx.array, chunk_elements: int) -> mx.array:
    """(M, V) -> (M,) float32 logsumexp, `chunk_elements // V` rows at a time: each chunk's exp (and, for
    half-precision logits, its float32 copy) is a temporary that the next chunk waits for, so a few chunks
    of them are alive at a time (as many as MLX runs ahead: `backends.runahead`), not a second (M, V) array."""
    m, v = flat.shape
    if m == 0:
        return mx.zeros((0,), mx.float32)
    rows = max(1, chunk_elements // v)
    parts = []
    for s in range(0, m, rows):
        chunk = flat[s : s + rows]
        if parts:
            chunk = mx.depends(chunk, parts[-1])
        parts.append(logsumexp_rows(chunk.astype(mx.float32)))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _flat_token_logps(chunk_elements: int):
    """A custom function (M, V) logits, (M,) targets -> (M,) float32 log-probs, with a hand-written VJP (run on
    the stream of the forward)."""
    return _flat_token_logps_on(chunk_elements, current_stream())


@lru_cache(maxsize=None)
def _flat_token_logps_on(chunk_elements: int, stream):
    @mx.custom_function
    def token_logps(flat, targets):
        target_logit = mx.take_along_axis(flat, targets[:, None], axis=-1)[:, 0].astype(mx.float32)
        return target_logit - _row_logsumexp(flat, chunk_elements)

    @token_logps.vjp
    @on_stream(stream)
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


def head_chunk_rows(head, hidden: mx.array, chunk_elements: Optional[int] = None) -> int:
    """Rows of `hidden` (R, D) per chunk, so that a chunk's `head` logits hold about `chunk_elements` values
    (default DEFAULT_CHUNK_ELEMENTS); at least 1. The head's width comes from a lazy call on one row that is
    never evaluated."""
    vocab = head(hidden[:1]).shape[-1]
    return max(1, int(chunk_elements or DEFAULT_CHUNK_ELEMENTS) // vocab)


def head_token_logps(head, hidden: mx.array, targets: mx.array, chunk_elements: Optional[int] = None) -> mx.array:
    """Log-probability of each target under `head(hidden)`, for a training step through a frozen head.

    The (R, V) logits never exist at once, in the forward or the backward: the forward computes each row's
    log-prob and already its gradient with respect to the hidden state, W_y - softmax @ W, a block at a time
    (a linear head: rows x vocabulary blocks with an online logsumexp, `blocked_head`; any other head: chunks
    of rows through the head's own VJP). The backward is then only `cotangent * that gradient`: the matmul
    FLOPs of backpropagating through the head, with (R, D) floats kept instead of the (R, V) logits and their
    gradient.

    Contract: no gradient reaches the head's own weights (frozen, as in LoRA training: `head.head_is_frozen`;
    a trainable head must use `per_token_logps(head(hidden))`), and the hidden-state gradient is computed
    even when no gradient is asked for, so scoring without a gradient uses `scoring.head_in_chunks` instead.

    Args:
        head: (M, D) -> (M, V) logits (`head.output_head`).
        hidden: (R, D) hidden states at the scored positions, any float dtype.
        targets: (R,) int token ids.
        chunk_elements: about how many logits a block holds (`blocked_head.vocab_block`; other heads:
            rows = chunk_elements // V, at least 1); default DEFAULT_CHUNK_ELEMENTS.

    Returns:
        (R,) float32 log-probs.
    """
    if hidden.shape[0] == 0:
        return mx.zeros((0,), mx.float32)
    from .blocked_head import head_stats, linear_head

    chunk = int(chunk_elements or DEFAULT_CHUNK_ELEMENTS)
    blocked = linear_head(head)
    if blocked is not None:
        def forward(h, y):
            out = head_stats(blocked, h, y, chunk, grad=True)
            return out["logps"], out["grad"]
    else:
        forward = _row_chunked_logps_and_grad(head, head_chunk_rows(head, hidden, chunk))

    @mx.custom_function
    def logps_and_grad(h, y):
        return forward(h, y)

    @logps_and_grad.vjp
    @on_stream(current_stream())
    def logps_and_grad_vjp(primals, cotangents, outputs):
        g = cotangents[0].astype(mx.float32)[:, None]  # (R, 1); the gradient output's cotangent is unused
        return (g * outputs[1]).astype(primals[0].dtype), mx.zeros_like(primals[1])

    return logps_and_grad(hidden, targets)[0]


def _row_chunked_logps_and_grad(head, rows: int):
    """(h (R, D), y (R,)) -> (log-probs (R,), their hidden-state gradients (R, D)) through any head callable,
    `rows` rows at a time: each chunk's logits, their logsumexp, and (onehot(y) - softmax) @ W through the
    head's own VJP. For heads that `blocked_head.linear_head` does not recognize."""

    def forward(h, y):
        parts, grads = [], []
        for s in range(0, h.shape[0], rows):
            h_c, y_c = h[s : s + rows], y[s : s + rows]
            if grads:  # each chunk waits for the previous one: not every chunk's (rows, V) temporaries at once
                h_c = mx.depends(h_c, grads[-1])
            logits = head(h_c).astype(mx.float32)  # (c, V)
            top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
            e = mx.exp(logits - top)  # one exp per logit, for the logsumexp and the softmax
            total = e.sum(axis=-1, keepdims=True)
            target = mx.take_along_axis(logits, y_c[:, None], axis=-1)
            parts.append((target - top - mx.log(total))[:, 0])
            onehot = mx.arange(logits.shape[-1])[None, :] == y_c[:, None]
            # After this chunk's log-probs: else MLX evaluates every chunk's log-probs first, keeping all
            # the chunks' logits alive for their gradients.
            d_logits = mx.depends((onehot - e / total).astype(h.dtype), parts[-1])  # d log p(y) / d logits
            grads.append(mx.vjp(head, [h_c], [d_logits])[1][0])  # (c, D)
        if len(parts) == 1:
            return parts[0], grads[0]
        return mx.concatenate(parts), mx.concatenate(grads)

    return forward


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
        lse = logsumexp_rows(chunk)[..., None]  # (N, c, 1)
        parts.append(lse[..., 0] - (mx.exp(chunk - lse) * chunk).sum(axis=-1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
