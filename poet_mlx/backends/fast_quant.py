"""Quantized layers on MLX's CPU backend (Linux): dequantize, then one float32 GEMM on OpenBLAS.

On the CPU backend `mx.quantized_matmul` runs a scalar kernel: measured on 2 cores at 0.3 GFLOP/s with
bfloat16 inputs and 2 GFLOP/s with float32, where a float32 GEMM on OpenBLAS (`poet_mlx.backends.blas`) runs at ~95.
Dequantizing a weight costs O(out * in), the GEMM O(tokens * out * in), so for a training batch it is far
cheaper to expand the 4-bit weight to float32 on the fly and multiply (9-40x here; `benchmarks/bench.py`).
Inputs of a few rows (one generated token per reply) keep MLX's kernel (`NATIVE_BELOW_ROWS`); sampling expands
each weight once for the whole run instead (`expanded`).
The expanded weight is transient: the backward pass expands it again (a custom VJP) instead of keeping it, so
memory stays that of the 4-bit model plus one block of float32 weights at a time.

Outputs are float32 whatever the input dtype: MLX's CPU backend has no fast bfloat16 GEMM either, so keeping
the activations in float32 is both faster and more precise there. Nothing changes on Metal (macOS), where
the quantized kernels are fast; `POET_MLX_QUANT_MATMUL=native` keeps MLX's kernel on Linux too.

Only the affine mode (mlx-community's 2/3/4/6/8-bit models) is accelerated; other modes keep MLX's kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Optional

from . import on_linux_cpu, spans, switched_off

ENV_SWITCH = "POET_MLX_QUANT_MATMUL"


def wanted() -> bool:
    """True where the fast path applies: Linux, MLX's default device is the CPU, and not switched off."""
    return not switched_off(ENV_SWITCH, "native") and on_linux_cpu()


BLOCK_ELEMENTS = 1 << 23
"""Weight values expanded to float32 at once (32 MiB): a large matrix (a 152k-token output projection) is
expanded and multiplied in blocks of output rows, because `mx.dequantize` holds several full-size
temporaries (measured: 2 GB for Qwen2.5-0.5B's tied embedding in one piece)."""


def _blocks(n: int, k: int) -> list[tuple[int, int]]:
    return spans(n, max(1, BLOCK_ELEMENTS // max(1, k)))


def _unpack_affine(w, scales, biases, group_size: int, bits: int):
    """mx.dequantize's affine mode in elementwise ops: value = scale * q + bias, q the `bits`-bit fields of
    each uint32, lowest bits first. Shapes: w (n, in * bits / 32), scales and biases (n, in / group_size)."""
    import mlx.core as mx

    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (n, in / per_word, per_word)
    q = q.reshape(w.shape[0], -1, group_size).astype(mx.float32)
    values = q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return values.reshape(w.shape[0], -1)


@lru_cache(maxsize=None)
def affine_dequantizer(group_size: int, bits: int):
    """(w, scales, biases) -> the float32 (n, in) weight, as `mx.dequantize(..., mode="affine")` gives it
    from float32 scales and biases (to rounding: it may fuse the multiply-add). Half-precision scales are
    widened first, so the values are computed in float32 (MLX's kernel computes in the scales' dtype).

    For 2, 4 and 8 bits this is `_unpack_affine` compiled: one fused, vectorized kernel, 1.7-2.7x faster than
    `mx.dequantize`'s CPU kernel (measured on a 49152 x 576 matrix, 2 cores, 4 and 8 bits, groups 32 and 64:
    183 -> 79 ms at 4 bits, group 32). Widths that straddle words (3, 5, 6 bits) keep `mx.dequantize`.
    """
    import mlx.core as mx

    if 32 % bits:
        return lambda w, scales, biases: mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                                       group_size, bits, mode="affine", dtype=mx.float32)
    return mx.compile(partial(_unpack_affine, group_size=group_size, bits=bits))


@lru_cache(maxsize=None)
def dequantized_matmul(group_size: int, bits: int):
    """A function (x, w, scales, biases) -> x @ dequantize(w).T in float32, with a recomputing VJP.

    Shapes: x (..., in); w, scales, biases as from `mx.quantize` of an (out, in) matrix; result (..., out).
    Each block's expansion is tied (`mx.depends`) to the previous result, so MLX expands one block at a time,
    just before it is used, instead of all weights of the model up front; the backward pass expands again
    rather than keeping the forward's copies (and, tied to the cotangent, is not merged with them by
    `mx.compile`).
    """
    import mlx.core as mx

    unpack = affine_dequantizer(group_size, bits)

    def expand(w, scales, biases, s, e, after):
        return unpack(mx.depends(w[s:e], after), scales[s:e], biases[s:e])  # (e - s, in)

    @mx.custom_function
    def f(x, w, scales, biases):
        xf = x.astype(mx.float32)
        parts, after = [], x
        for s, e in _blocks(w.shape[0], x.shape[-1]):
            parts.append(xf @ expand(w, scales, biases, s, e, after).T)  # (..., e - s)
            after = parts[-1]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        g = cotangent.astype(mx.float32)
        dx, after = None, cotangent
        for s, e in _blocks(w.shape[0], x.shape[-1]):
            part = g[..., s:e] @ expand(w, scales, biases, s, e, after)  # (..., in)
            dx = part if dx is None else dx + part
            after = dx
        # The quantized weights are frozen: their cotangents are never evaluated.
        return dx.astype(x.dtype), mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return f


NATIVE_BELOW_ROWS = 3
"""Inputs with fewer rows (tokens) than this keep MLX's kernel: generating one token per reply, expanding the
whole weight costs more than the scalar product (measured on a 1536x576 4-bit matrix, group 32, 2 cores, with
the compiled expansion: 0.9-1.7 ms native vs 3.7-3.9 ms expanded for 1 row, about equal at 2-3 rows,
17-20 vs 2.0-2.7 ms for 16; with `mx.dequantize` the crossover was near 5 rows)."""


def _rows(x) -> int:
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def _linear_call(self, x):
    blocks = self.__dict__.get(_EXPANDED)
    if blocks is not None:
        y = _expanded_matmul(x, blocks)
    elif _rows(x) < NATIVE_BELOW_ROWS:
        return super(type(self), self).__call__(x)
    else:
        y = dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
    if "bias" in self:
        y = y + self["bias"]
    return y


def _embedding_as_linear(self, x):
    blocks = self.__dict__.get(_EXPANDED)
    if blocks is not None:
        return _expanded_matmul(x, blocks)
    if _rows(x) < NATIVE_BELOW_ROWS:
        return super(type(self), self).as_linear(x)
    return dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])


# -- weights expanded once, for sampling -------------------------------------------------------------------------

EXPAND_BUDGET_BYTES = 1 << 30
"""Float32 weights `expanded` keeps at most by default (1 GiB: all of a ~250M-parameter model, part of a larger
one), and never more than an eighth of the machine's memory (`expand_budget`)."""
_EXPANDED = "_poet_expanded"
"""The instance attribute (not an MLX parameter) holding a layer's expanded float32 row blocks."""


def _expanded_matmul(x, blocks: list):
    """x @ W.T in float32 from W's float32 row blocks: the GEMMs `dequantized_matmul` runs, so the same numbers."""
    import mlx.core as mx

    xf = x.astype(mx.float32)
    parts = [xf @ b.T for b in blocks]  # (..., rows of each block)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _in_features(module) -> int:
    return module["weight"].shape[1] * 32 // module.bits


def expand_budget() -> int:
    """The default budget of `expanded`: EXPAND_BUDGET_BYTES, at most an eighth of the physical memory."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return EXPAND_BUDGET_BYTES
    return min(EXPAND_BUDGET_BYTES, memory // 8)


@contextmanager
def expanded(model, budget_bytes: Optional[int] = None):
    """Within the block, the model's accelerated quantized layers multiply by float32 copies of their weights,
    expanded once on entry (as long as the copies fit `budget_bytes`, default `expand_budget()`, layer by
    layer in the model's order), instead of expanding them at every call; the copies are dropped on exit.
    For sampling, where every decoding step reads every weight: expanding them all at each step made 4-bit
    sampling at 16 rows 2.5x slower than float32. Every row count then takes this path, so a reply no longer
    depends on how many rows its batch had left (below `NATIVE_BELOW_ROWS` the layers used MLX's own kernel,
    which rounds otherwise). Yields the bytes kept; changes nothing where no layer is accelerated.
    """
    import mlx.core as mx

    budget_bytes = expand_budget() if budget_bytes is None else budget_bytes
    kept, used = [], 0
    try:
        for _, module in model.named_modules():
            if not getattr(module, "_poet_fast_quant", False) or _EXPANDED in module.__dict__:
                continue
            w, scales, biases = module["weight"], module["scales"], module["biases"]
            width = _in_features(module)
            size = 4 * w.shape[0] * width
            if used + size > budget_bytes:
                continue
            unpack = affine_dequantizer(module.group_size, module.bits)
            blocks = [unpack(w[s:e], scales[s:e], biases[s:e]) for s, e in _blocks(w.shape[0], width)]
            mx.eval(blocks)
            # object.__setattr__: an mx.array set the usual way would become a parameter of the module.
            object.__setattr__(module, _EXPANDED, blocks)
            kept.append(module)
            used += size
        yield used
    finally:
        for module in kept:
            object.__delattr__(module, _EXPANDED)


@lru_cache(maxsize=None)
def _fast_class(base: type) -> type:
    import mlx.nn as nn

    body = {"_poet_fast_quant": True}
    if issubclass(base, nn.QuantizedLinear):
        body["__call__"] = _linear_call
    else:
        body["as_linear"] = _embedding_as_linear
    return type(f"Fast{base.__name__}", (base,), body)


def expands_weights(model) -> bool:
    """True when some layer of `model` goes through `dequantized_matmul`, i.e. every call of the model
    expands its quantized weights again."""
    return any(getattr(m, "_poet_fast_quant", False) for _, m in model.named_modules())


def accelerate_quantized(model) -> int:
    """Route this model's affine-quantized Linear layers (and a tied quantized embedding's output
    projection) through `dequantized_matmul`. Returns how many layers changed; 0 where `wanted()` is False.

    Layers keep their parameters and names (a one-off subclass), so adapters, saving and fusing are
    unaffected, and other models in the process are untouched.
    """
    import mlx.nn as nn

    if not wanted():
        return 0
    changed = 0
    for _, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        if getattr(module, "_poet_fast_quant", False) or module.mode != "affine" or "biases" not in module:
            continue
        module.__class__ = _fast_class(type(module))
        changed += 1
    return changed
