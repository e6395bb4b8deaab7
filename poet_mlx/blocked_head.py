"""Log-probs through a linear output head in blocks of the vocabulary, with an online logsumexp.

A head `x @ W.T (+ b)` (the `lm_head`, or a tied embedding's `as_linear`; float or affine-quantized) is
applied to up to HEAD_ROWS rows at a time, and for those rows one block of vocabulary rows W[v0:v1] at a
time, keeping per row the running maximum m, the normalizer Z = sum exp(l - m) and, when asked, the
unnormalized softmax-weighted sums G = sum exp(l - m) W_v (the hidden-state gradient) and
E = sum exp(l - m) l (the entropy); each new block rescales them by exp(m_old - m_new), as FlashAttention
does with its output. At the end, with lse = m + log Z:

    log p(y) = l_y - lse,   d log p(y) / dh = W_y - G / Z,   H = lse - E / Z.

Why blocks of the vocabulary and not only of rows: a head over few rows is a GEMM that repacks all of W
(V x D) for little work. Row chunks small enough that their (rows, V) logits stay small (42 rows of SmolLM2's
49,152 at 2 million logits) ran the head at 81-90 GFLOP/s on 2 cores, where 512 rows in blocks of 2,048 words
run at 135-139 (4,096 rows with the gradient, float32: 5.6 -> 3.4 s; 512 rows: 0.72 -> 0.42 s, peak the same
within 10 MB; `benchmarks/real.py` for whole steps). A quantized head is expanded one block at a time (never
the whole float32 matrix), so QLoRA's head costs one block of float32 weights.

`linear_head(head)` recognizes such heads; anything else (a LoRA-adapted head, an unknown module) keeps the
row-chunked paths of `logprobs.head_token_logps` and `scoring.head_in_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .backends import spans

HEAD_ROWS = 512
"""Rows of hidden states per pass over the vocabulary (256-1,024 measured alike on SmolLM2, 2 cores)."""
KERNEL_WORDS = 512
"""Vocabulary rows per block in the C++ kernel: a block's scores (HEAD_ROWS x 512 floats, 1 MB) stay in cache.
SmolLM2's head over 2,048 rows, one thread, with the gradient: 1.46 s at 256 words, 1.39 at 512, 1.45 at 1,024
(this module's MLX ops, compiled: 1.65 s); without: 0.75, 0.75, 0.72 s (MLX ops 0.83)."""


@dataclass(frozen=True)
class LinearHead:
    """A head computing `x @ weight.T (+ bias)`: (M, D) -> (M, V).

    weight is (V, D) float, or, with `expand` set, the packed affine-quantized weight whose `scales` and
    `biases` (V, D / group) `expand(weight, scales, biases)` turns into float rows.
    """

    weight: mx.array
    bias: Optional[mx.array] = None
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    expand: Optional[Callable] = None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def rows(self, start: int, stop: int, after=None) -> mx.array:
        """Float weight rows [start, stop): (stop - start, D); a quantized block is expanded after `after`."""
        w = self.weight[start:stop]
        if self.expand is None:
            return w
        if after is not None:
            w = mx.depends(w, after)  # expand each block just before its use, not all of them up front
        return self.expand(w, self.scales[start:stop], self.biases[start:stop])

    def gather(self, ids: mx.array) -> mx.array:
        """Float weight rows at `ids` (N,): (N, D)."""
        if self.expand is None:
            return self.weight[ids]
        return self.expand(self.weight[ids], self.scales[ids], self.biases[ids])


def linear_head(head) -> Optional[LinearHead]:
    """The LinearHead that `head` computes, for an `nn.Linear` / affine `nn.QuantizedLinear` used as it is,
    or the bound `as_linear` of an `nn.Embedding` / affine `nn.QuantizedEmbedding` (also as
    `backends.fast_quant` changes them); None for anything else."""
    import mlx.nn as nn

    from .backends import fast_quant

    owner = getattr(head, "__self__", None)
    if owner is not None:  # a tied embedding's bound `as_linear`
        if (not isinstance(owner, (nn.Embedding, nn.QuantizedEmbedding))
                or getattr(head, "__func__", None) is not type(owner).as_linear):
            return None
        calls = (nn.Embedding.as_linear, nn.QuantizedEmbedding.as_linear, fast_quant._embedding_as_linear)
        module, method = owner, type(owner).as_linear
    else:
        calls = (nn.Linear.__call__, nn.QuantizedLinear.__call__, fast_quant._linear_call)
        module, method = head, getattr(type(head), "__call__", None)
    if method not in calls:  # a subclass that computes something else
        return None
    bias = module["bias"] if "bias" in module else None
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return LinearHead(module.weight, bias)
    if getattr(module, "mode", "affine") != "affine" or "biases" not in module:
        return None
    return LinearHead(module["weight"], bias, module["scales"], module["biases"], _expander(module))


def _expander(module) -> Callable:
    """(w, scales, biases) -> float rows: the compiled float32 expansion where `fast_quant` runs this module's
    matmuls, else `mx.dequantize` (the scales' dtype, as MLX's quantized kernels compute)."""
    from .backends import fast_quant

    group, bits = module.group_size, module.bits
    if getattr(module, "_poet_fast_quant", False):
        return fast_quant.affine_dequantizer(group, bits)
    return lambda w, scales, biases: mx.dequantize(w, scales, biases, group, bits)


def vocab_block(head: LinearHead, rows: int, chunk_elements: int) -> int:
    """Vocabulary rows per block: a block's scores and their exp, two (rows, block) float32 arrays, hold
    about `chunk_elements` values together."""
    return max(1, min(head.vocab, chunk_elements // (2 * max(1, rows))))


def head_stats(head: LinearHead, hidden: mx.array, targets: mx.array, chunk_elements: int,
               grad: bool = False, entropy: bool = False) -> dict:
    """log p(target) of each row under softmax(head(hidden)), and on request its hidden-state gradient and
    the entropy, without the (R, V) logits (see the module docstring). No autodiff runs through this.

    Args:
        hidden: (R, D) float; targets: (R,) int token ids in [0, V).
        chunk_elements: logits alive per block, about (`vocab_block`).

    Returns:
        {"logps": (R,) float32, "grad": (R, D) float32 if grad, "entropy": (R,) float32 if entropy}.
    """
    if hidden.shape[0] == 0:
        empty = mx.zeros((0,), mx.float32)
        return {"logps": empty, **({"grad": mx.zeros(hidden.shape, mx.float32)} if grad else {}),
                **({"entropy": empty} if entropy else {})}
    kernel = None if entropy else _kernel_for(head, hidden)
    if kernel is not None:
        out = kernel.head(hidden, head.weight, targets, grad, HEAD_ROWS, KERNEL_WORDS)
        return {"logps": out[0], **({"grad": out[1]} if grad else {})}
    rows = min(HEAD_ROWS, hidden.shape[0])
    parts: list[dict] = []
    for s, e in spans(hidden.shape[0], rows):
        h = hidden[s:e]
        if parts:  # one row chunk after another: not every chunk's blocks at once
            h = mx.depends(h, list(parts[-1].values()))
        parts.append(_row_chunk(head, h, targets[s:e], vocab_block(head, rows, chunk_elements), grad, entropy))
    if len(parts) == 1:
        return parts[0]
    return {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]}


def _kernel_for(head: LinearHead, hidden: mx.array):
    """poet-mlx's C++ head kernel (`backends.native`) for a float32 head without bias on float32 rows, where it
    is loaded; else None."""
    float32 = hidden.dtype == mx.float32 and head.weight.dtype == mx.float32
    if head.expand is not None or head.bias is not None or not float32:
        return None
    from .backends.native import kernels

    return kernels()


def _row_chunk(head: LinearHead, h, y, block: int, grad: bool, entropy: bool) -> dict:
    """`head_stats` of up to HEAD_ROWS rows h (M, D), one vocabulary block after another.

    Each block's scores are computed vocabulary-major, (b, M): the maxima and sums over a block's words are
    then reductions over the leading axis with the rows contiguous, which MLX's CPU backend runs 3-5x faster
    than over the last axis (512 x 1024 scores: max 0.50 -> 0.10 ms, sum 0.25 -> 0.07 ms). SmolLM2's head
    over 3,200 rows on one OpenBLAS thread: 1.62 -> 1.48 s, 3.0 -> 2.55 s with the gradient."""
    m = z = g = ent = target = None  # m, z, ent: (1, M) running values; g: (M, D)
    for v0, v1 in spans(head.vocab, block):
        # This block's scores wait for all the previous block's results, the target logit included: else that
        # pick may run last (MLX's evaluation tape is breadth-first up to a width, `parallel_rows` widens it),
        # keeping every block's scores alive (SmolLM2, DPO 2 x 256: 83 MB more at the peak).
        last = [a for a in (z, g, ent, target) if a is not None]
        x = mx.depends(h, last) if last else h
        w = head.rows(v0, v1, after=last or None)  # (b, D)
        scores = w @ x.T  # (b, M)
        if head.bias is not None:
            scores = scores + head.bias[v0:v1, None]
        scores = scores.astype(mx.float32)
        inside = (y >= v0) & (y < v1)
        picked = mx.take_along_axis(scores, mx.clip(y - v0, 0, v1 - v0 - 1)[None, :], axis=0)[0]
        target = mx.where(inside, picked, 0.0 if target is None else target)
        top = scores.max(axis=0, keepdims=True)  # (1, M)
        new_m = top if m is None else mx.maximum(m, top)
        p = mx.exp(scores - new_m)  # (b, M)
        rescale = None if m is None else mx.exp(m - new_m)  # (1, M)

        def update(old, new, factor):
            return new if old is None else old * factor + new

        z = update(z, p.sum(axis=0, keepdims=True), rescale)
        if grad:
            g = update(g, (p.T.astype(w.dtype) @ w).astype(mx.float32), None if rescale is None else rescale.T)
        if entropy:
            ent = update(ent, (p * scores).sum(axis=0, keepdims=True), rescale)
        m = new_m
    lse = (m + mx.log(z))[0]
    out = {"logps": target - lse}
    if grad:
        out["grad"] = head.gather(y).astype(mx.float32) - g / z.T
    if entropy:
        out["entropy"] = lse - (ent / z)[0]
    return out
