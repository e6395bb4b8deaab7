"""Attention and SwiGLU of mlx-lm models, written for MLX's CPU backend (Linux).

On the CPU `mx.fast.scaled_dot_product_attention` falls back to plain ops: it repeats the key/value heads
for grouped-query attention, computes the whole (T, T) score matrix, masked half included, and normalizes
it with `mx.softmax`, whose prebuilt kernel runs a scalar exp (~16 ns per element here). At 16 rows of 512
tokens that is 38M exps per layer, more than half of SmolLM2-135M's forward. `causal_attention` computes
the same numbers another way:
- grouped-query heads as one matmul per key/value head (queries of a group stacked), no repeat;
- the queries in blocks of BLOCK: block i sees keys [0, end of block i) only, so the masked upper
  triangle is mostly never computed (10/16 of the scores at T = 512, BLOCK = 128);
- exp(s - max) as one fused elementwise kernel (`jit` builds it vectorized), and the normalizer from the
  value matmul itself: [V | 1] gives the output and the row sums together, so the (T, T) matrix is never
  summed or divided.
SwiGLU's `silu(g) * x` uses `mx.sigmoid`, whose output the backward pass keeps, so MLX runs it as its scalar
prebuilt kernel even inside `mx.compile`; `g / (1 + exp(-g)) * x` fuses into one vectorized kernel.

Measured on 2 cores, 16 x 512 tokens, SmolLM2's 9/3 heads: attention forward + backward 1,045 ms ->
450 ms; see `benchmarks/real.py` for whole steps. Both agree with the originals to float32 rounding
(attention ~1e-6, `tests/test_fast_layers.py`).

`accelerate_layers(model)` gives each attention or MLP module whose class calls mlx-lm's
`scaled_dot_product_attention` or `swiglu` a subclass that calls these instead (the class's own `__call__`
code, with those two names rebound), so any architecture built on them (llama, qwen2/3, mistral, ...) is
covered, and everything else is left as it is. Calls with a KV cache (generation), an explicit mask or
attention sinks go to mlx-lm's function unchanged. Off switch: `POET_MLX_LAYERS=native`; nothing changes on
macOS or on a GPU.
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache

from . import switched_off

ENV_SWITCH = "POET_MLX_LAYERS"
BLOCK = 128
"""Query rows per attention block (64-128 measured best at T = 512 on 2 cores)."""


def wanted() -> bool:
    """True on Linux with MLX's default device the CPU, unless switched off."""
    if not sys.platform.startswith("linux"):
        return False
    if switched_off(ENV_SWITCH, "native"):
        return False
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def causal_attention(queries, keys, values, scale: float, block: int = BLOCK):
    """softmax(q k^T * scale + causal mask) v, in query blocks.

    Args:
        queries: (B, H, T, D); keys, values: (B, KV, T, D) with H a multiple of KV (grouped-query heads).

    Returns:
        (B, H, T, D), in the queries' dtype.
    """
    import mlx.core as mx

    b, h, t, d = queries.shape
    kv = keys.shape[1]
    g = h // kv
    q = (queries * scale).reshape(b, kv, g, t, d)  # the g query heads of each key/value head together
    v1 = mx.concatenate([values, mx.ones((b, kv, t, 1), values.dtype)], axis=-1)  # (B, KV, T, D + 1)
    outs = []
    for s in range(0, t, block):
        e = min(t, s + block)
        n = e - s
        qb = q[:, :, :, s:e].reshape(b, kv, g * n, d)
        scores = (qb @ keys[:, :, :e].swapaxes(-1, -2)).reshape(b, kv, g, n, e)  # keys up to the block's end
        causal = mx.arange(e)[None, :] <= mx.arange(s, e)[:, None]  # (n, e)
        scores = mx.where(causal, scores, -mx.inf)
        top = mx.stop_gradient(scores.max(axis=-1, keepdims=True))
        weights = mx.exp(scores - top).reshape(b, kv, g * n, e)
        o = weights @ v1[:, :, :e]  # (B, KV, g n, D + 1): unnormalized output and the row sums
        outs.append((o[..., :d] / o[..., d:]).reshape(b, kv, g, n, d))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(b, h, t, d).astype(queries.dtype)


def _sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, through `causal_attention` where it applies."""
    from mlx_lm.models.base import scaled_dot_product_attention

    if (cache is None and sinks is None and isinstance(mask, str) and mask == "causal"
            and queries.shape[2] == keys.shape[2] and queries.shape[1] % keys.shape[1] == 0):
        return causal_attention(queries, keys, values, scale)
    return scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _swiglu(gate, x):
    """silu(gate) * x with the sigmoid written through `mx.exp` (one fused kernel)."""
    import mlx.core as mx

    return gate / (1 + mx.exp(-gate)) * x


def _replacements() -> dict:
    """{global name: (mlx-lm's function, ours)} rebound in the classes `accelerate_layers` changes."""
    from mlx_lm.models import activations, base

    return {"scaled_dot_product_attention": (base.scaled_dot_product_attention, _sdpa),
            "swiglu": (activations.swiglu, _swiglu)}


@lru_cache(maxsize=None)
def _fast_class(base: type, names: tuple) -> type:
    fn = base.__call__
    new_globals = dict(fn.__globals__)
    table = _replacements()
    for name in names:
        new_globals[name] = table[name][1]
    call = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    call.__kwdefaults__ = fn.__kwdefaults__
    return type(f"Fast{base.__name__}", (base,), {"__call__": call, "_poet_fast_layer": names})


def accelerate_layers(model) -> int:
    """Route the model's attention and SwiGLU through this module (see the docstring). Returns how many
    modules changed; 0 where `wanted()` is False. Parameters, names and state dicts are unchanged."""
    if not wanted():
        return 0
    table = _replacements()
    changed = 0
    for _, module in model.named_modules():
        cls = type(module)
        if getattr(cls, "_poet_fast_layer", None):
            continue
        fn = getattr(cls, "__call__", None)
        names = tuple(n for n, (orig, _) in table.items()
                      if getattr(fn, "__globals__", {}).get(n) is orig and n in fn.__code__.co_names)
        if names:
            module.__class__ = _fast_class(cls, names)
            changed += 1
    return changed
