"""Attention and SwiGLU of mlx-lm models, written for MLX's CPU backend (Linux).

On the CPU `mx.fast.scaled_dot_product_attention` falls back to plain ops: it repeats the key/value heads
for grouped-query attention, computes the whole (T, T) score matrix, masked half included, and normalizes
it with `mx.softmax`, whose prebuilt kernel runs a scalar exp (~16 ns per element here). At 16 rows of 512
tokens that is 38M exps per layer, more than half of SmolLM2-135M's forward. `causal_attention` computes
the same numbers another way:
- grouped-query heads as one matmul per key/value head (queries of a group stacked), no repeat;
- the queries in blocks of BLOCK: block i sees keys [0, end of block i) only, so the masked upper
  triangle is mostly never computed (10/16 of the scores at T = 512, BLOCK = 128);
- exp(s - max) as one fused elementwise kernel (`jit` builds it vectorized), the row maxima over scores laid
  out key-major (a reduction MLX runs 3x faster than over the last axis), and the normalizer from the value
  matmul itself: [V | 1] gives the output and the row sums together, so the (T, T) matrix is never summed
  or divided;
- a backward that recomputes each block's softmax from the queries, keys and the rows' logsumexp (a custom
  VJP, as in FlashAttention) instead of keeping every block's softmax weights, about a (T, T) array per
  head and row (at 16 x 512 tokens, SmolLM2: 94 MB a layer, 2.8 GB a step), with the rows' logsumexps and
  the rowsum(dO * O) terms folded into its matmuls (`attend_backward`);
- the output written token-major, (B, T, H, D), the layout o_proj reads: the model's transpose and reshape
  then copy nothing, and o_proj's LoRA keeps the attention's own output for its backward instead of a
  second copy (a DPO step's peak at 2 x 256: 1.36 -> 1.33 GB; attention forward + backward alone the same,
  4 x 256: 106 vs 110 ms, 16 x 512: 1,330 vs 1,324 ms).
SwiGLU's `silu(g) * x` uses `mx.sigmoid`, whose output the backward pass keeps, so MLX runs it as its scalar
prebuilt kernel even inside `mx.compile`; `g / (1 + exp(-g)) * x` fuses into one vectorized kernel, and a
custom backward that recomputes the sigmoid keeps only g and x (a DPO step's peak at 2 x 256: 1.56 -> 1.36 GB).

Measured on 2 cores, 16 x 512 tokens, SmolLM2's 9/3 heads: attention forward + backward 1,045 ms ->
450 ms (an AMD EPYC; on 2026-12-07, an Intel Xeon, forward 143 -> 117 ms and backward 300 -> 216 ms a
layer with the key-major maxima and the folded backward); the recomputing backward then lowered a DPO
step's peak at 2 x 256 from 1.66 to 1.53 GB, time unchanged (7.9-8.5 s against 7.9-8.0 s, alternating
runs); see `benchmarks/real.py` for whole steps.
Both agree with the originals to float32 rounding (attention ~1e-6, `tests/test_fast_layers.py`).

Where poet-mlx's C++ kernel loads (`native`, Linux, float32 arrays), `attend` and `attend_grads` run the same
computation as two MLX primitives that keep each query block's scores in the cache (at 8 x 480, SmolLM2's
heads, one thread, both compiled: forward 63 -> 27 ms, backward 120 -> 51 ms a layer; the 8 x 512 DPO step
18.6 -> 15.7 s). `attend_forward` and `attend_backward` are the MLX-op version, used otherwise.

`accelerate_layers(model)` gives each attention or MLP module whose class calls mlx-lm's
`scaled_dot_product_attention` or `swiglu` a subclass that calls these instead (the class's own `__call__`
code, with those two names rebound), so any architecture built on them (llama, qwen2/3, mistral, ...) is
covered, and everything else is left as it is; it also builds and loads the C++ kernels then. Generating
one token per row with a (float) KV cache goes through `decode_attention`; other calls with a cache (a
prompt's prefill), an explicit mask or attention sinks go to mlx-lm's function unchanged. Off switch:
`POET_MLX_LAYERS=native`; nothing changes on macOS or on a GPU.
"""

from __future__ import annotations

import types
from functools import lru_cache

from . import on_linux_cpu, spans, switched_off
from .native import kernels

ENV_SWITCH = "POET_MLX_LAYERS"
BLOCK = 128
"""Query rows per attention block (64-128 measured best at T = 512 on 2 cores)."""
NATIVE_BLOCK = 32
"""Query positions per block in the C++ kernel (`native`). SmolLM2's heads, one thread, forward + backward:
8 x 480 72 ms at 32, 75 at 16, 76 at 64, 79 at 128; 4 x 256 11.0 ms at 32, 11.3 at 16, 11.6 at 64."""


def wanted() -> bool:
    """True on Linux with MLX's default device the CPU, unless switched off."""
    return not switched_off(ENV_SWITCH, "native") and on_linux_cpu()


def causal_attention(queries, keys, values, scale: float, block: int = BLOCK):
    """softmax(q k^T * scale + causal mask) v, in query blocks, with a recomputing backward.

    Args:
        queries: (B, H, T, D); keys, values: (B, KV, T, D) with H a multiple of KV (grouped-query heads).

    Returns:
        (B, H, T, D), in the queries' dtype: a transposed view of a row-contiguous (B, T, H, D) array, so the
        model's `transpose(0, 2, 1, 3).reshape(B, T, H * D)` before o_proj copies nothing (and o_proj's
        LoRA keeps no second copy of the output for its backward).
    """
    b, h, t, d = queries.shape
    kv = keys.shape[1]
    q = (queries * scale).reshape(b, kv, h // kv, t, d)  # the g query heads of each key/value head together
    out = _attend(block)(q, keys, values)[0]  # (B, T, KV, g, D)
    return out.reshape(b, t, h, d).swapaxes(1, 2).astype(queries.dtype)


def _diagonal_mask(n: int, key_major: bool = False):
    """The causal mask of a block's n queries against its own n keys, True where visible: (n queries, n keys),
    or (n keys, 1, n queries) with `key_major` (to broadcast over a (keys, g, queries) view)."""
    import mlx.core as mx

    i = mx.arange(n)
    return i[:, None, None] <= i[None, None, :] if key_major else i[None, :] <= i[:, None]


def _sum(parts: list):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _kernel_for(*arrays):
    """poet-mlx's C++ attention kernel (`native`) where it is loaded and all `arrays` are float32, else None."""
    import mlx.core as mx

    if any(x.dtype != mx.float32 for x in arrays):
        return None
    return kernels()


def attend(q, keys, values, block: int = BLOCK):
    """(out, lse) of `attend_forward`, computed by poet-mlx's C++ kernel (`native`, blocks of NATIVE_BLOCK
    queries) where it is loaded and the arrays are float32, else by `attend_forward` itself. Shapes as there."""
    kernel = _kernel_for(q, keys, values)
    if kernel is not None:
        return tuple(kernel.forward(q, keys, values, NATIVE_BLOCK))
    return attend_forward(q, keys, values, block)


def attend_grads(q, keys, values, d_out, out, lse, block: int = BLOCK):
    """(dq, dkeys, dvalues) of `attend_backward`, by the C++ kernel where `attend` would use it."""
    kernel = _kernel_for(q, keys, values, d_out, out, lse)
    if kernel is not None:
        return tuple(kernel.backward(q, keys, values, d_out, out, lse, NATIVE_BLOCK))
    return attend_backward(q, keys, values, d_out, out, lse, block)


def _attend(block: int):
    """A custom function (q, keys, values) -> (out, lse): `attend` with `attend_grads` as its VJP."""
    return _attend_on(block, current_stream())


@lru_cache(maxsize=None)
def _attend_on(block: int, stream):
    import mlx.core as mx

    @mx.custom_function
    def attend_fn(q, keys, values):
        return attend(q, keys, values, block)

    @attend_fn.vjp
    @on_stream(stream)
    def attend_vjp(primals, cotangents, outputs):
        # outputs[1] (lse) is an internal output: its cotangent is unused.
        return attend_grads(*primals, cotangents[0], *outputs, block)

    return attend_fn


def attend_forward(q, keys, values, block: int = BLOCK):
    """Blocked causal attention of pre-scaled queries q (B, KV, g, T, D) over keys, values (B, KV, T, D).

    Each query block's scores are computed key-major, (keys, queries): the row maximum is then a reduction
    over the key axis with the queries contiguous, which MLX's CPU backend runs about 3x faster than over the
    last axis (16 x 512 tokens, SmolLM2's heads: a layer's forward 137-147 -> 122-125 ms); the value matmul
    reads the exponentials transposed at no cost.

    Returns:
        out (B, T, KV, g, D), token-major (the layout the output projection reads), and lse (B, KV, g, T), the
        logsumexp of each row's scores, which `attend_backward` needs.
    """
    import mlx.core as mx

    b, kv, g, t, d = q.shape
    v1 = mx.concatenate([values, mx.ones((b, kv, t, 1), values.dtype)], axis=-1)  # (B, KV, T, D + 1)
    outs, lses = [], []
    for s, e in spans(t, block):
        n = e - s
        qt = q[:, :, :, s:e].reshape(b, kv, g * n, d).swapaxes(-1, -2)  # (B, KV, D, g n)
        # Keys before the block are all visible: only the block's own keys are masked.
        diag = (keys[:, :, s:e] @ qt).reshape(b, kv, n, g, n)
        diag = mx.where(_diagonal_mask(n, key_major=True), diag, -mx.inf).reshape(b, kv, n, g * n)
        top = diag.max(axis=-2, keepdims=True)  # (B, KV, 1, g n)
        if s:
            past = keys[:, :, :s] @ qt  # (B, KV, s, g n)
            top = mx.maximum(top, past.max(axis=-2, keepdims=True))
            o = (mx.exp(past - top).swapaxes(-1, -2) @ v1[:, :, :s]
                 + mx.exp(diag - top).swapaxes(-1, -2) @ v1[:, :, s:e])
        else:
            o = mx.exp(diag - top).swapaxes(-1, -2) @ v1[:, :, s:e]  # (B, KV, g n, D + 1): output, row sums
        outs.append((o[..., :d] / o[..., d:]).reshape(b, kv, g, n, d).transpose(0, 3, 1, 2, 4))
        lses.append((top.swapaxes(-1, -2) + mx.log(o[..., d:])).reshape(b, kv, g, n))
    if len(outs) == 1:
        return mx.contiguous(outs[0]), lses[0]
    return mx.concatenate(outs, axis=1), mx.concatenate(lses, axis=3)


def attend_backward(q, keys, values, d_out, out, lse, block: int = BLOCK):
    """The gradients (dq, dkeys, dvalues) of `attend_forward` for the cotangent d_out of its output, from its
    inputs and outputs (shapes as there).

    Recomputes each block's softmax from the queries, keys and `lse` (as FlashAttention does) instead of
    keeping it: the forward saves (T, D)-sized arrays only, where autodiff kept every block's (g n, e) weights
    (16 x 512 tokens, SmolLM2: 94 MB a layer). Per block, with P the softmax and dO the output's cotangent:
    dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dq = dS K, dK += dS^T q. Blocks run one after
    another (`mx.depends`): one block's (g n, e) temporaries at a time.

    Written for MLX's CPU kernels (16 x 512 tokens, SmolLM2's heads: 285 -> 215 ms a layer):
    - the per-row terms ride inside the matmuls, [q, -lse] [K, 1]^T = S - lse and [dO, -delta] [V, 1]^T =
      dP - delta, so no elementwise op broadcasts a (rows, 1) array: MLX runs those as strided kernels that
      GCC cannot vectorize;
    - the exp of the visible keys is `exp(x * one)`, not `exp(x)`: `mx.compile` runs a lone exp as MLX's
      prebuilt scalar kernel (~11 ns an element here), two ops fuse into a vectorized one (~1 ns);
    - only the block's own keys are masked, and each key block's gradients are summed from slices, without
      padding every block's to T rows.
    """
    import mlx.core as mx

    d_out, out = (x.transpose(0, 2, 3, 1, 4) for x in (d_out, out))  # (B, KV, g, T, D) views
    keys, values = after_cotangents([keys, values], [d_out])  # else a wide tape may build [K, 1] etc. up front
    b, kv, g, t, d = q.shape
    delta, one = (d_out * out).sum(axis=-1), mx.array(1.0, keys.dtype)  # (B, KV, g, T): rowsum(dO * O)
    ones = mx.ones((b, kv, t, 1), keys.dtype)
    k1, v1 = mx.concatenate([keys, ones], axis=-1), mx.concatenate([values, ones], axis=-1)  # (B, KV, T, D + 1)
    blocks = spans(t, block)
    dk_parts, dv_parts = [[] for _ in blocks], [[] for _ in blocks]  # per key block
    dqs, after = [], d_out
    for i, (s, e) in enumerate(blocks):
        n = e - s

        def rows(x):
            return x[:, :, :, s:e].reshape(b, kv, g * n, -1)  # (B, KV, g n, ...)

        qb, do = rows(mx.depends(q, after)), rows(d_out)  # (B, KV, g n, D)
        qa = mx.concatenate([qb, -rows(lse[..., None])], axis=-1)  # (B, KV, g n, D + 1)
        da = mx.concatenate([do, -rows(delta[..., None])], axis=-1)
        p = (qa @ k1[:, :, s:e].swapaxes(-1, -2)).reshape(b, kv, g, n, n)
        p = mx.exp(mx.where(_diagonal_mask(n), p, -mx.inf)).reshape(b, kv, g * n, n)  # masked -> 0
        ds = p * (da @ v1[:, :, s:e].swapaxes(-1, -2))  # (B, KV, g n, n)
        dq = ds @ keys[:, :, s:e]
        dk_parts[i].append(ds.swapaxes(-1, -2) @ qb)
        dv_parts[i].append(p.swapaxes(-1, -2) @ do)
        if s:  # the keys before the block, all visible
            p = mx.exp((qa @ k1[:, :, :s].swapaxes(-1, -2)) * one)  # (B, KV, g n, s)
            ds = p * (da @ v1[:, :, :s].swapaxes(-1, -2))
            dq = dq + ds @ keys[:, :, :s]
            dk, dv = ds.swapaxes(-1, -2) @ qb, p.swapaxes(-1, -2) @ do  # (B, KV, s, D)
            for j, (ks, ke) in enumerate(blocks[:i]):
                dk_parts[j].append(dk[:, :, ks:ke])
                dv_parts[j].append(dv[:, :, ks:ke])
        dqs.append(dq.reshape(b, kv, g, n, d))
        after = dqs[-1]
    dq = dqs[0] if len(dqs) == 1 else mx.concatenate(dqs, axis=3)
    dk = mx.concatenate([_sum(parts) for parts in dk_parts], axis=2)
    dv = mx.concatenate([_sum(parts) for parts in dv_parts], axis=2)
    return dq, dk.astype(keys.dtype), dv.astype(values.dtype)


def decode_attention(queries, keys, values, scale: float, mask=None):
    """softmax(q k^T * scale, masked) v for one new token per row against a KV cache, with the g query heads
    of each key/value head as one matmul: MLX's CPU fallback repeats the cached keys and values for every
    query head first, a (B, H, L, D) copy of each per layer and token.

    Args:
        queries: (B, H, 1, D); keys, values: (B, KV, L, D), H a multiple of KV.
        mask: None, or a boolean (keep) or additive array that broadcasts to (B, H, 1, L).

    Returns:
        (B, H, 1, D), in the queries' dtype.
    """
    import mlx.core as mx

    b, h, _, d = queries.shape
    kv, n = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv, h // kv, d)
    scores = q @ keys.swapaxes(-1, -2)  # (B, KV, g, L)
    if mask is not None:
        m = mx.broadcast_to(mask, (b, h, 1, n)).reshape(b, kv, h // kv, n)
        scores = mx.where(m, scores, -mx.inf) if m.dtype == mx.bool_ else scores + m
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(values.dtype)
    return (weights @ values).reshape(b, h, 1, d).astype(queries.dtype)


def _sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, through `causal_attention` or `decode_attention` where they
    apply."""
    import mlx.core as mx
    from mlx_lm.models.base import scaled_dot_product_attention

    grouped = queries.shape[1] % keys.shape[1] == 0
    if (cache is None and sinks is None and isinstance(mask, str) and mask == "causal"
            and queries.shape[2] == keys.shape[2] and grouped):
        return causal_attention(queries, keys, values, scale)
    if (cache is not None and not hasattr(cache, "bits") and sinks is None and queries.shape[2] == 1 and grouped
            and (mask is None or isinstance(mask, mx.array))):
        return decode_attention(queries, keys, values, scale, mask)
    return scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _swiglu(gate, x):
    """silu(gate) * x: `_swiglu_fn`'s custom function (same value as mlx-lm's, leaner backward)."""
    return _swiglu_fn(current_stream())(gate, x)


@lru_cache(maxsize=None)
def _swiglu_fn(stream):
    """silu(g) * x with the sigmoid written through `mx.exp` (one fused, vectorized kernel) and a backward
    that recomputes the sigmoid from g: autodiff of g / (1 + exp(-g)) * x keeps exp(-g), 1 + exp(-g) and
    silu(g) for the backward besides g and x, three arrays of the MLP's width per token and layer.

    Measured (SmolLM2-135M fp32, DPO 2 x 256, 16 adapted layers, alternating runs): peak 1.56 -> 1.36 GB,
    step unchanged (5.5-5.6 vs 5.3-5.5 s); with --grad-checkpoint 0.758 -> 0.746 GB. The recomputation waits
    for the cotangent: 1.28 -> 1.185 GB with POET_MLX_LEAN=autodiff (where `lean_lora` takes the MLP, it
    does not run).
    """
    import mlx.core as mx

    @mx.custom_function
    def swiglu(gate, x):
        return swiglu_value(gate, x)

    @swiglu.vjp
    @on_stream(stream)
    def swiglu_vjp(primals, cotangent, output):
        gate, x = after_cotangents(list(primals), [cotangent])  # the recomputed exp(-g) is not the forward's
        return swiglu_grads(gate, x, cotangent)

    return swiglu


def current_stream():
    """The stream operations go to now (the default stream of the default device, or the one a `with
    mx.stream(...)` block set)."""
    import mlx.core as mx

    return mx.default_stream(mx.default_device())


def on_stream(stream):
    """Decorator for a custom function's VJP: run it on `stream`, which the forward ran on. MLX runs a custom
    VJP's Python code on whatever stream is current when the backward is traced, so without this the backward
    of a forward on another stream (`parallel_rows`) would all land on the default one."""
    import functools

    import mlx.core as mx

    def wrap(vjp):
        @functools.wraps(vjp)
        def run(*args):
            with mx.stream(stream):
                return vjp(*args)

        return run

    return wrap


def after_cotangents(inputs, cotangents):
    """`inputs` made to wait for `cotangents`: a recomputation in a backward pass then runs there, and under
    `mx.compile` it is not merged with the forward's identical expression (which would keep that value alive
    from the forward pass on, the very array the recomputation is meant to free)."""
    import mlx.core as mx

    return mx.depends(inputs, list(cotangents))


def swiglu_value(gate, x):
    """silu(gate) * x written through `mx.exp`: one fused kernel under `mx.compile` (`jit` vectorizes it)."""
    import mlx.core as mx

    return gate / (1 + mx.exp(-gate)) * x


def swiglu_grads(gate, x, d):
    """(d gate, d x) of silu(gate) * x for the cotangent d: with s = sigmoid(gate),
    d/dgate = x (s + silu (1 - s)), d/dx = silu."""
    import mlx.core as mx

    s = 1 / (1 + mx.exp(-gate))
    silu = gate * s
    return d * x * (s + silu * (1 - s)), d * silu


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
            if "scaled_dot_product_attention" in names:
                kernels()  # built (once per machine) and probed now, not inside a traced step
    return changed
