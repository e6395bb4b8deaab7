"""LoRA-adapted transformer blocks whose backward keeps less: what is cheap to recompute is recomputed.

Autodiff of an adapted llama-style block keeps, per token, every array some backward step reads. Some of them
cost little to recompute: the normalized input of q/k/v and that of gate/up (read by their LoRA A gradients
only), SwiGLU's output (read by down_proj's LoRA), and the queries (a (T, H hd) array that the attention's
backward reads, one q projection to recompute). Inside `mx.compile` MLX kept still more. Measured on
SmolLM2-135M's shapes, LoRA r8 on all seven projections: 10.2K floats kept per token and adapted layer in a
compiled step (8.4K eager), 5.3K with the functions below; a DPO step at 2 x 256 peaked at 1.33 GB before
and 0.98 GB after (0.54 GB of it the float32 weights), its time unchanged or lower (4.0 -> 3.6-3.9 s), and
the 8 x 512 step at 6.0 -> 3.8 GB (`benchmarks/real.py`). Three custom functions:

- `norm_projections(norm, parts, x)`: `[p(norm(x)) for p in projections]` (k/v, q/k/v or gate/up), keeping
  x (which the norm's own backward needs anyway) and each LoRA's (T, r) `x A`; the backward recomputes
  norm(x).
- `query_attention(norm, part, attn, x, keys, values)`: causal attention (`fast_layers.attend_forward`) whose
  queries rope(q_proj(norm(x))) * scale are computed inside, so that its backward recomputes them.
- `swiglu_down(part, gate, up)`: `down(silu(gate) * up)`, keeping gate and up (SwiGLU's backward needs both)
  and the LoRA's `x A`; the backward recomputes silu(gate) * up.
Each backward makes its recomputation wait for the cotangent (`_after`): without that, `mx.compile` merged
it with the forward's identical expression and so kept the very values this module frees.

A projection is either an mlx-lm `LoRALinear` (no dropout in effect) over a frozen base, or a frozen linear
layer; the base's own VJP gives its input gradient, so float, quantized (`fast_quant`) and biased bases all
work. The forward runs the same operations as the modules themselves (values agree bit for bit); gradients
agree with autodiff to float32 rounding (`tests/test_lean_lora.py`).

`lean_blocks(model)` gives every block whose `__call__` is mlx-lm's llama block (the same bytecode: 22
classes in mlx-lm 0.32, llama, mistral, qwen2, qwen3, gemma and phi3 among them) a subclass that routes the
MLP through `norm_projections` and `swiglu_down` when the MLP is llama's (44 classes), and the attention
through `norm_projections` and `query_attention` when the attention is llama's (15 classes; qwen3's, with q/k
norms, keeps its own code, as do phi3's fused projections). Everything else takes the class's own code: a
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
    return mx.vjp(norm, [x], [dh])[1][0], grads


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
    def project_vjp(primals, cotangents, outputs):
        x, adapters = primals
        x = _after(x, cotangents[:n])
        return _project_backward(norm, parts, adapters, x, norm(x), list(outputs[n:]), list(cotangents[:n]))

    return list(project(x, _adapters(parts))[:n])


def query_attention(norm, part: tuple, attn, x, keys, values):
    """Causal attention (`fast_layers.attend_forward`) whose queries rope(part(norm(x))) * scale are computed
    inside, so that the backward recomputes them from x instead of keeping them: one (T, H hd) array less per
    layer, for one more q projection per token in the backward.

    Args:
        norm, part: as for `norm_projections` (part: the q projection); attn: the attention module (its
            n_heads, rope and scale); x: (B, T, D), the block's input; keys, values: (B, KV, T, hd), after RoPE.

    Returns:
        (B, T, H hd), the layout o_proj reads.
    """
    import mlx.core as mx

    b, t, _ = x.shape
    heads, kv = attn.n_heads, keys.shape[1]

    def queries(h, adapter):
        """(q (B, KV, g, T, hd) scaled, [its x A] or [], the projection before RoPE (B, H, T, hd))."""
        (y,), kept = _project([part], [adapter], h)
        pre = y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
        return (attn.rope(pre) * attn.scale).reshape(b, kv, heads // kv, t, -1), kept, pre

    @mx.custom_function
    def attention(x, adapter, keys, values):
        q, kept, _ = queries(norm(x), adapter)
        out, lse = fast_layers.attend_forward(q, keys, values)  # out: (B, T, KV, g, hd)
        return (out if out.dtype == q.dtype else out.astype(q.dtype), lse, *kept)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        x, adapter, keys, values = primals
        x = _after(x, cotangents[:1])
        h = norm(x)
        q, _, pre = queries(h, adapter)  # recomputed
        dq, dk, dv = fast_layers.attend_backward(q, keys, values, cotangents[0], outputs[0], outputs[1])
        d_pre = mx.vjp(attn.rope, [pre], [dq.reshape(b, heads, t, -1) * attn.scale])[1][0]  # (B, H, T, hd)
        dx, (d_adapter,) = _project_backward(norm, [part], [adapter], x, h, list(outputs[2:]),
                                             [d_pre.transpose(0, 2, 1, 3).reshape(b, t, -1)])
        return dx, d_adapter, dk, dv

    return attention(x, part[2] or [], keys, values)[0].reshape(b, t, -1)


def swiglu_down(part: tuple, gate, up):
    """down(silu(gate) * up), its backward recomputing silu(gate) * up instead of keeping it.

    Args:
        part: `_projection` of the down projection; gate, up: (B, T, I).

    Returns:
        (B, T, D).
    """
    import mlx.core as mx

    base, scale, _ = part

    @mx.custom_function
    def down(gate, up, adapter):
        y, xa = _apply(base, scale, adapter or None, _swiglu(gate, up))
        return (y,) if xa is None else (y, xa)

    @down.vjp
    def down_vjp(primals, cotangents, outputs):
        gate, up, adapter = primals
        gate, up = _after([gate, up], cotangents[:1])
        a = _swiglu(gate, up)  # recomputed
        da, grads = _input_grad(base, scale, adapter or None, a, outputs[1] if adapter else None, cotangents[0])
        d_gate, d_up = _swiglu_grads(gate, up, da)
        return d_gate, d_up, grads or []

    return down(gate, up, _adapters([part])[0])[0]


def _after(inputs, cotangents):
    """`inputs` made to wait for `cotangents`: a recomputation in a backward pass then runs there, and under
    `mx.compile` it is not merged with the forward's identical expression (which would keep that value alive
    from the forward pass on, the very array the recomputation is meant to free)."""
    import mlx.core as mx

    return mx.depends(inputs, list(cotangents))


def _swiglu(gate, up):
    """silu(gate) * up as `fast_layers._swiglu_fn` computes it (one fused kernel under `mx.compile`)."""
    import mlx.core as mx

    return gate / (1 + mx.exp(-gate)) * up


def _swiglu_grads(gate, up, d):
    """(d gate, d up) of silu(gate) * up for the cotangent d: with s = sigmoid(gate),
    d/dgate = up (s + silu (1 - s)), d/dup = silu."""
    import mlx.core as mx

    s = 1 / (1 + mx.exp(-gate))
    silu = gate * s
    return d * up * (s + silu * (1 - s)), d * silu


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


def _lean_mlp(block, h):
    """block.mlp(block.post_attention_layernorm(h)) through the two custom functions, or None where they do
    not apply."""
    mlp, norm = block.mlp, block.post_attention_layernorm
    if not _is_llama(mlp, "mlp") or not _frozen(norm):
        return None
    parts = _projections((mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if parts is None:
        return None
    gate, up = norm_projections(norm, parts[:2], h)
    return swiglu_down(parts[2], gate, up)


def _lean_attention(block, x, mask):
    """block.self_attn(block.input_layernorm(x), mask), with q/k/v through `norm_projections`, or with the
    queries inside `query_attention` where the attention is causal; the rest is mlx-lm's llama attention,
    line for line. None where neither applies."""
    attn, norm = block.self_attn, block.input_layernorm
    if not _is_llama(attn, "attention") or not _frozen(norm):
        return None
    parts = _projections((attn.q_proj, attn.k_proj, attn.v_proj))
    if parts is None:
        return None
    sdpa = type(attn).__call__.__globals__["scaled_dot_product_attention"]  # fast_layers' where it applies
    b, t, _ = x.shape
    if (sdpa is fast_layers._sdpa and isinstance(mask, str) and mask == "causal"
            and attn.n_heads % attn.n_kv_heads == 0):  # what `fast_layers._sdpa` gives `causal_attention`
        keys, values = norm_projections(norm, parts[1:], x)
        keys = attn.rope(keys.reshape(b, t, attn.n_kv_heads, -1).transpose(0, 2, 1, 3))  # (B, KV, T, hd)
        values = values.reshape(b, t, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return attn.o_proj(query_attention(norm, parts[0], attn, x, keys, values))
    queries, keys, values = norm_projections(norm, parts, x)
    queries = attn.rope(queries.reshape(b, t, attn.n_heads, -1).transpose(0, 2, 1, 3))  # (B, H, T, hd)
    keys = attn.rope(keys.reshape(b, t, attn.n_kv_heads, -1).transpose(0, 2, 1, 3))  # (B, KV, T, hd)
    values = values.reshape(b, t, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    out = sdpa(queries, keys, values, cache=None, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


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
