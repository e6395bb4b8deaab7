"""LoRA-adapted transformer blocks whose backward keeps less: what is cheap to recompute is recomputed.

Autodiff of an adapted llama-style block keeps, per token, every array some backward step reads. Some of them
cost little to recompute: the normalized input of q/k/v and that of gate/up (read by their LoRA A gradients
only), SwiGLU's output (read by down_proj's LoRA), and the queries (a (T, H hd) array that the attention's
backward reads, one q projection to recompute). Inside `mx.compile` MLX kept still more. Measured on
SmolLM2-135M's shapes, LoRA r8 on all seven projections: 10.2K floats kept per token and adapted layer in a
compiled step (8.4K eager), 5.3K with the functions below; a DPO step at 2 x 256 peaked at 1.28 GB before
(1.185 once `fast_layers`' SwiGLU backward stopped keeping its forward's exp) and 0.98 GB after (0.54 GB of
it the float32 weights) for ~7% more time (3.58 vs 3.33 s, alternating runs), the 8 x 512 step at 6.0 -> 3.8
GB (`benchmarks/real.py`). Three custom functions:

- `projected_attention(norm, parts, attn, x)`: the attention up to o_proj (q/k/v projections, RoPE, the blocked
  causal attention of `fast_layers`), keeping x (which the norm's own backward needs anyway), the keys,
  values, output, row logsumexps and each LoRA's (T, r) `x A`; the backward recomputes norm(x) and the
  queries.
- `swiglu_mlp(norm, parts, x)`: `down(silu(gate(norm(x))) * up(norm(x)))`, keeping x, gate and up (SwiGLU's
  backward needs both) and the LoRAs' `x A`; the backward recomputes norm(x) and silu(gate) * up.
- `norm_projections(norm, parts, x)`: `[p(norm(x)) for p in projections]`, for an attention with another
  mask than the causal one: keeps x and the `x A`'s, recomputes norm(x).
Each backward makes its recomputation wait for the cotangent (`fast_layers.after_cotangents`): without that,
`mx.compile` merged it with the forward's identical expression and so kept the very values this module frees.

A projection is either an mlx-lm `LoRALinear` (no dropout in effect) over a frozen base, or a frozen linear
layer; the base's own VJP gives its input gradient, so float, quantized (`fast_quant`) and biased bases all
work. The forward runs the same operations as the modules themselves (values agree bit for bit); gradients
agree with autodiff to float32 rounding (`tests/test_lean_lora.py`).

`lean_blocks(model)` gives every block whose `__call__` is mlx-lm's llama block (the same bytecode: 22
classes in mlx-lm 0.32, llama, mistral, qwen2, qwen3, gemma and phi3 among them) a subclass that routes the
MLP through `swiglu_mlp` when the MLP is llama's (44 classes), and the attention through `projected_attention`
(with another mask, `norm_projections`) when the attention is llama's (15 classes; qwen3's, with q/k norms,
keeps its own code, as do phi3's fused projections). Everything else takes the class's own code: a
call with a KV cache, a block without LoRA, DoRA, LoRA dropout in effect, a trainable base or norm (full
fine-tuning). Linux CPU only, like `fast_layers` (off with `POET_MLX_LAYERS=native`);
`POET_MLX_LEAN=autodiff` switches off this part alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

from . import fast_layers, switched_off

ENV_SWITCH = "POET_MLX_LEAN"


def wanted() -> bool:
    """Where `fast_layers` applies (Linux, MLX on the CPU, not switched off), unless POET_MLX_LEAN=autodiff."""
    return not switched_off(ENV_SWITCH, "autodiff") and fast_layers.wanted()


# -- one projection: a frozen linear base and an optional LoRA --------------------------------------------------

def _frozen(module) -> bool:
    from mlx.utils import tree_flatten

    return not tree_flatten(module.trainable_parameters())


def _projection(module) -> Optional[tuple]:
    """(base, scale, adapter) of a projection: adapter the LoRA's [A (in, r), B (r, out)] or None for a
    frozen linear layer; None when the lean path does not apply (DoRA, dropout in effect, a trainable base)."""
    from mlx_lm.tuner.lora import LoRALinear

    if type(module) is LoRALinear:  # exactly: DoRALinear and other subclasses compute something else
        dropout = getattr(module.dropout, "_p_1", 1.0)
        if dropout != 1.0 and module.dropout.training or not _frozen(module.linear):
            return None
        return module.linear, module.scale, [module.lora_a, module.lora_b]
    if hasattr(module, "weight") and _frozen(module):
        return module, 0.0, None
    return None


def _projections(modules) -> Optional[list]:
    parts = [_projection(m) for m in modules]
    return None if any(p is None for p in parts) else parts


def _apply(base, scale, adapter, x):
    """What `LoRALinear.__call__` computes (no dropout): base(x) + scale (x A) B, and x A (T, r) for the
    backward (None without an adapter)."""
    y = base(x)
    if adapter is None:
        return y, None
    xa = x @ adapter[0]
    return y + (scale * (xa @ adapter[1])).astype(x.dtype), xa


def _input_grad(base, scale, adapter, x, xa, dy):
    """The gradient of `_apply`'s output with respect to x, and the adapter's [dA, dB] (None without one).

    x: (..., in) the input, xa: (..., r) its x A, dy: (..., out) the output's cotangent.
    """
    import mlx.core as mx

    dx = mx.vjp(base, [x], [dy])[1][0]  # the frozen base's input gradient (dy W for a linear layer)
    if adapter is None:
        return dx, None
    a, b = adapter
    dz = scale * dy.astype(b.dtype)  # (..., out): the cotangent of (x A) B
    dxa = dz @ b.T  # (..., r)
    d_b = xa.reshape(-1, xa.shape[-1]).T @ dz.reshape(-1, dz.shape[-1])  # (r, out)
    d_a = x.reshape(-1, x.shape[-1]).T.astype(a.dtype) @ dxa.reshape(-1, dxa.shape[-1])  # (in, r)
    return dx + (dxa @ a.T).astype(dx.dtype), [d_a.astype(a.dtype), d_b.astype(b.dtype)]


# -- the custom functions ---------------------------------------------------------------------------------------

def _project(parts: list, adapters: list, h) -> tuple[list, list]:
    """Each projection of h: (outputs (..., out_i), the x A (..., r) of each adapted one, in order)."""
    outs, kept = [], []
    for (base, scale, _), adapter in zip(parts, adapters):
        y, xa = _apply(base, scale, adapter or None, h)
        outs.append(y)
        if xa is not None:
            kept.append(xa)
    return outs, kept


def _project_backward(norm, parts: list, adapters: list, x, h, kept: list, dys: list) -> tuple:
    """(dx, [each adapter's [dA, dB], or []]) of `_project(parts, adapters, norm(x))` for the cotangents dys;
    h is norm(x), recomputed by the caller."""
    import mlx.core as mx

    xas = iter(kept)
    dh, grads = None, []
    for (base, scale, _), adapter, dy in zip(parts, adapters, dys):
        d, g = _input_grad(base, scale, adapter or None, h, next(xas) if adapter else None, dy)
        grads.append(g or [])
        dh = d if dh is None else dh + d
    # The input gradient waits for the adapters' gradients: they are then computed as soon as they can be, not
    # at the end of the backward with every layer's inputs to them kept alive (MLX's evaluation tape is built
    # breadth-first, and `parallel_rows` widens it: a step's peak 3.6 -> 6.5 GB without this).
    return mx.depends(mx.vjp(norm, [x], [dh])[1][0], [g for pair in grads for g in pair]), grads


def _adapters(parts: list) -> list:
    """The custom functions' adapter argument: each projection's [A, B], or [] (no adapter)."""
    return [p[2] or [] for p in parts]


def norm_projections(norm, parts: list, x) -> list:
    """[p(norm(x)) for each projection p], its backward recomputing norm(x) instead of keeping it.

    Args:
        norm: a frozen normalization module; parts: `_projection` of each projection; x: (B, T, D).

    Returns:
        The projections' outputs, (B, T, out_i) each.
    """
    import mlx.core as mx

    n = len(parts)

    @mx.custom_function
    def project(x, adapters):
        outs, kept = _project(parts, adapters, norm(x))
        return tuple(outs) + tuple(kept)  # the x A's: internal outputs, kept for the backward

    @project.vjp
    @fast_layers.on_stream(fast_layers.current_stream())
    def project_vjp(primals, cotangents, outputs):
        x, adapters = primals
        x = fast_layers.after_cotangents(x, cotangents[:n])
        return _project_backward(norm, parts, adapters, x, norm(x), list(outputs[n:]), list(cotangents[:n]))

    return list(project(x, _adapters(parts))[:n])


def _split_heads(y, n: int):
    """(B, T, n hd) -> (B, n, T, hd)."""
    b, t, _ = y.shape
    return y.reshape(b, t, n, -1).transpose(0, 2, 1, 3)


def _merge_heads(y):
    """(B, n, T, hd) -> (B, T, n hd)."""
    b, _, t, _ = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, t, -1)


def projected_attention(norm, parts: list, attn, x):
    """mlx-lm's llama attention up to o_proj, on norm(x) with a causal mask: the q/k/v projections `parts`,
    RoPE and the blocked causal attention (`fast_layers.attend`) in one custom function, whose backward
    recomputes norm(x) and the queries (one q projection more per token) instead of keeping them, and runs
    the norm's backward once for q, k and v.

    Args:
        norm: the frozen input norm; parts: `_projection` of q_proj, k_proj, v_proj; attn: the attention
            module (its n_heads, n_kv_heads, rope and scale); x: (B, T, D), the block's input.

    Returns:
        (B, T, H hd), the layout o_proj reads.
    """
    import mlx.core as mx

    b, t, _ = x.shape
    heads, kv = attn.n_heads, attn.n_kv_heads

    def scaled_queries(q):
        """(B, T, H hd) projections -> rope(q) * scale as (B, KV, g, T, hd), the g query heads of each key/value
        head together; and q as (B, H, T, hd)."""
        q = _split_heads(q, heads)
        return (attn.rope(q) * attn.scale).reshape(b, kv, heads // kv, t, -1), q

    @mx.custom_function
    def attention(x, adapters):
        (q, k, v), kept = _project(parts, adapters, norm(x))
        keys, values = attn.rope(_split_heads(k, kv)), _split_heads(v, kv)  # (B, KV, T, hd)
        out, lse = fast_layers.attend(scaled_queries(q)[0], keys, values)  # out: (B, T, KV, g, hd)
        return (out, lse, keys, values, *kept)  # all but out internal, kept for the backward

    @attention.vjp
    @fast_layers.on_stream(fast_layers.current_stream())
    def attention_vjp(primals, cotangents, outputs):
        x, adapters = primals
        out, lse, keys, values = outputs[:4]
        x = fast_layers.after_cotangents(x, cotangents[:1])
        h = norm(x)  # recomputed, and the queries from it
        base, scale, _ = parts[0]
        q, q_heads = scaled_queries(_apply(base, scale, adapters[0] or None, h)[0])
        dq, dk, dv = fast_layers.attend_grads(q, keys, values, cotangents[0], out, lse)
        # RoPE is linear: its VJP needs the input's shape only (the keys stand in for the projections).
        dq = mx.vjp(attn.rope, [q_heads], [dq.reshape(b, heads, t, -1) * attn.scale])[1][0]
        dk = mx.vjp(attn.rope, [keys], [dk])[1][0]
        return _project_backward(norm, parts, adapters, x, h, list(outputs[4:]),
                                 [_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)])

    return attention(x, _adapters(parts))[0].reshape(b, t, -1)  # the projections' dtype, as mlx-lm's


def swiglu_mlp(norm, parts: list, x):
    """mlx-lm's llama MLP on norm(x), down(silu(gate) * up), in one custom function that keeps x, gate and up
    (SwiGLU's backward needs both) and the LoRAs' x A; the backward recomputes norm(x) and silu(gate) * up.

    Args:
        norm: the frozen post-attention norm; parts: `_projection` of gate_proj, up_proj, down_proj;
            x: (B, T, D).

    Returns:
        (B, T, D).
    """
    import mlx.core as mx

    base, scale, _ = parts[2]

    @mx.custom_function
    def mlp(x, adapters):
        (gate, up), kept = _project(parts[:2], adapters[:2], norm(x))
        y, xa = _apply(base, scale, adapters[2] or None, fast_layers.swiglu_value(gate, up))
        return (y, gate, up, *kept, *([] if xa is None else [xa]))  # all but y internal, kept for the backward

    @mlp.vjp
    @fast_layers.on_stream(fast_layers.current_stream())
    def mlp_vjp(primals, cotangents, outputs):
        x, adapters = primals
        kept = list(outputs[3:])
        xa = kept.pop() if adapters[2] else None
        gate, up = fast_layers.after_cotangents(list(outputs[1:3]), cotangents[:1])
        a = fast_layers.swiglu_value(gate, up)  # recomputed
        da, d_down = _input_grad(base, scale, adapters[2] or None, a, xa, cotangents[0])
        d_gate, d_up = fast_layers.swiglu_grads(gate, up, da)
        x = fast_layers.after_cotangents(x, [d_gate, d_up])
        dx, grads = _project_backward(norm, parts[:2], adapters[:2], x, norm(x), kept, [d_gate, d_up])
        return mx.depends(dx, d_down or []), grads + [d_down or []]  # as in `_project_backward`

    return mlp(x, _adapters(parts))[0]


# -- the block -------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _llama_codes() -> dict:
    """{"block" | "attention" | "mlp": the code of mlx-lm's llama class's `__call__`}."""
    from mlx_lm.models import llama

    return {"block": llama.TransformerBlock.__call__.__code__, "attention": llama.Attention.__call__.__code__,
            "mlp": llama.MLP.__call__.__code__}


def _same_code(fn, code) -> bool:
    c = getattr(fn, "__code__", None)
    return c is not None and all(getattr(c, a) == getattr(code, a)
                                 for a in ("co_code", "co_names", "co_consts", "co_varnames"))


def _is_llama(module, kind: str) -> bool:
    return _same_code(getattr(type(module), "__call__", None), _llama_codes()[kind])


def _lean_parts(module, norm, kind: str, names: tuple) -> Optional[list]:
    """`_projection` of each of the module's projections `names`, where the module's class is llama's `kind`
    and its norm is frozen; else None."""
    if not _is_llama(module, kind) or not _frozen(norm):
        return None
    return _projections(tuple(getattr(module, n) for n in names))


def _lean_mlp(block, h):
    """block.mlp(block.post_attention_layernorm(h)) through `swiglu_mlp`, or None where it does not apply."""
    norm = block.post_attention_layernorm
    parts = _lean_parts(block.mlp, norm, "mlp", ("gate_proj", "up_proj", "down_proj"))
    return None if parts is None else swiglu_mlp(norm, parts, h)


def _lean_attention(block, x, mask):
    """block.self_attn(block.input_layernorm(x), mask): through `projected_attention` where the attention is
    causal, else with q/k/v through `norm_projections` and the rest mlx-lm's llama attention, line for line.
    None where neither applies."""
    attn, norm = block.self_attn, block.input_layernorm
    parts = _lean_parts(attn, norm, "attention", ("q_proj", "k_proj", "v_proj"))
    if parts is None:
        return None
    sdpa = type(attn).__call__.__globals__["scaled_dot_product_attention"]  # fast_layers' where it applies
    if (sdpa is fast_layers._sdpa and isinstance(mask, str) and mask == "causal"
            and attn.n_heads % attn.n_kv_heads == 0):  # what `fast_layers._sdpa` gives `causal_attention`
        return attn.o_proj(projected_attention(norm, parts, attn, x))
    queries, keys, values = norm_projections(norm, parts, x)
    queries = attn.rope(_split_heads(queries, attn.n_heads))  # (B, H, T, hd)
    keys = attn.rope(_split_heads(keys, attn.n_kv_heads))  # (B, KV, T, hd)
    out = sdpa(queries, keys, _split_heads(values, attn.n_kv_heads), cache=None, scale=attn.scale, mask=mask)
    return attn.o_proj(_merge_heads(out))


def _adapted(block) -> bool:
    from mlx_lm.tuner.lora import LoRALinear

    return any(type(m) is LoRALinear for _, m in block.named_modules())


def _lean_call(self, x, mask=None, cache=None):
    """mlx-lm's llama block, with the lean attention and MLP where they apply (see the module docstring)."""
    if cache is not None or not _adapted(self):
        return self._poet_lean_base.__call__(self, x, mask, cache)
    r = _lean_attention(self, x, mask)
    if r is None:
        r = self.self_attn(self.input_layernorm(x), mask, cache)
    h = x + r
    r = _lean_mlp(self, h)
    if r is None:
        r = self.mlp(self.post_attention_layernorm(h))
    return h + r


@lru_cache(maxsize=None)
def _lean_class(base: type) -> type:
    # The base is named, not found in the MRO: `adapters.enable_grad_checkpoint` subclasses this class again.
    return type(f"Lean{base.__name__}", (base,), {"__call__": _lean_call, "_poet_lean_base": base})


def lean_blocks(model) -> int:
    """Give each llama-style block of `model` the lean backward (see the module docstring). Returns how many
    blocks changed; 0 where `wanted()` is False. Parameters, names and state dicts are unchanged."""
    if not wanted():
        return 0
    changed = 0
    for _, module in model.named_modules():
        cls = type(module)
        if not hasattr(cls, "_poet_lean_base") and _is_llama(module, "block"):
            module.__class__ = _lean_class(cls)
            changed += 1
    return changed
