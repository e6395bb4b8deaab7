"""The CPU rewrites of `poet_mlx.backends`: blocked causal attention and SwiGLU (`fast_layers`), the JIT
compiler flags (`jit`) and glibc's malloc setting (`alloc`): same numbers as mlx-lm's, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from poet_mlx.backends import alloc, fast_layers, jit


def _qkv(b, h, kv, t, d, seed=0):
    keys = [mx.random.key(seed + i) for i in range(3)]
    return (mx.random.normal((b, h, t, d), key=keys[0]), mx.random.normal((b, kv, t, d), key=keys[1]),
            mx.random.normal((b, kv, t, d), key=keys[2]))


@pytest.mark.parametrize("path", ["kernel", "mlx-ops"])
@pytest.mark.parametrize("h, kv, t, block", [(4, 2, 37, 16), (3, 3, 64, 64), (6, 1, 130, 128), (2, 1, 5, 128)])
def test_causal_attention_equals_mlx_sdpa_values_and_gradients(h, kv, t, block, path, monkeypatch):
    """Through the C++ kernel where it loads (`native`; `block` is then its own) and through the MLX ops."""
    if path == "mlx-ops":
        monkeypatch.setattr(fast_layers, "kernels", lambda: None)
    q, k, v = _qkv(2, h, kv, t, 8)
    scale = 8 ** -0.5
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    out = fast_layers.causal_attention(q, k, v, scale, block)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert mx.abs(out - ref).max().item() < 1e-5
    w = mx.random.normal(ref.shape, key=mx.random.key(9))

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    g_ref = mx.grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")),
                    argnums=(0, 1, 2))(q, k, v)
    g_out = mx.grad(loss(lambda q, k, v: fast_layers.causal_attention(q, k, v, scale, block)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref):
        assert mx.abs(a - b).max().item() < 1e-4 * max(1.0, mx.abs(b).max().item())


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("h, kv", [(4, 2), (3, 3), (6, 1)])
def test_decode_attention_equals_mlx_sdpa(h, kv, mask_kind):
    """One new token per row against a cache of 11 (left padding masked per row, as mlx-lm's batch cache
    does): MLX's numbers, with grouped query heads and without."""
    q, _, _ = _qkv(3, h, kv, 1, 8)
    _, k, v = _qkv(3, h, kv, 11, 8, seed=5)
    keep = mx.arange(11)[None, None, None, :] >= mx.array([0, 3, 7])[:, None, None, None]  # (3, 1, 1, 11)
    mask = {"none": None, "bool": keep, "additive": mx.where(keep, 0.0, -1e9)}[mask_kind]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    out = fast_layers.decode_attention(q, k, v, 0.3, mask)
    assert out.shape == ref.shape == (3, h, 1, 8) and out.dtype == ref.dtype
    assert mx.abs(out - ref).max().item() < 1e-5


def test_swiglu_equals_mlx_lm():
    from mlx_lm.models.activations import swiglu

    g = mx.random.normal((3, 50), key=mx.random.key(1)) * 30  # saturated values too
    x = mx.random.normal((3, 50), key=mx.random.key(2))
    assert mx.abs(fast_layers._swiglu(g, x) - swiglu(g, x)).max().item() < 1e-5
    assert mx.all(mx.isfinite(fast_layers._swiglu(mx.array([-1e4, 1e4]), mx.array([1.0, 1.0])))).item()


@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_gradients_equal_autodiff_of_mlx_lm(compiled):
    """The custom backward (sigmoid recomputed from g) against autodiff of mlx-lm's silu(g) * x, saturated
    gates included; at +-1e4 the gradients stay finite (1 and 0 for g, silu(g) for x)."""
    from mlx_lm.models.activations import swiglu

    g = mx.random.normal((3, 50), key=mx.random.key(1)) * 8
    x = mx.random.normal((3, 50), key=mx.random.key(2))
    w = mx.random.normal((3, 50), key=mx.random.key(3))

    def grads(f):
        fn = mx.grad(lambda g, x: (f(g, x) * w).sum(), argnums=(0, 1))
        return (mx.compile(fn) if compiled else fn)(g, x)

    for ours, ref in zip(grads(fast_layers._swiglu), grads(swiglu)):
        assert mx.abs(ours - ref).max().item() < 1e-5 * max(1.0, mx.abs(ref).max().item())
    dg, dx = mx.grad(lambda g, x: fast_layers._swiglu(g, x).sum(), argnums=(0, 1))(
        mx.array([-1e4, 1e4]), mx.array([1.0, 1.0]))
    assert dg.tolist() == [0.0, 1.0] and dx.tolist() == [0.0, 1e4]


def test_swiglu_keeps_its_dtype():
    g, x = mx.ones((2, 4), mx.bfloat16), mx.ones((2, 4), mx.bfloat16)
    out, dg = mx.value_and_grad(lambda g: fast_layers._swiglu(g, x).astype(mx.float32).sum())(g)
    assert out.dtype == mx.float32 and dg.dtype == mx.bfloat16


def test_accelerated_model_gives_the_same_logits_and_generation(tiny_model_dir, monkeypatch):
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    model, tok = load(str(tiny_model_dir))
    tokens = mx.array([[1, 5, 9, 14, 3, 7, 7, 2, 11, 4]])
    before = model(tokens)
    reply = generate(model, tok, prompt=[1, 5, 9], max_tokens=6)
    monkeypatch.setattr(fast_layers, "wanted", lambda: True)
    changed = fast_layers.accelerate_layers(model)
    assert changed == 2 * len(model.layers)  # one attention and one MLP per layer
    assert fast_layers.accelerate_layers(model) == 0  # idempotent
    assert type(model.layers[0].self_attn).__name__.startswith("Fast")
    assert mx.abs(model(tokens) - before).max().item() < 1e-4
    assert generate(model, tok, prompt=[1, 5, 9], max_tokens=6) == reply  # KV-cache calls: decode_attention
    from mlx.utils import tree_flatten

    fresh, _ = load(str(tiny_model_dir))
    assert {k for k, _ in tree_flatten(model.parameters())} == {k for k, _ in tree_flatten(fresh.parameters())}


def test_accelerate_layers_is_off_where_not_wanted(tiny_model_dir, monkeypatch):
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model_dir))
    monkeypatch.setenv(fast_layers.ENV_SWITCH, "native")
    assert fast_layers.accelerate_layers(model) == 0


def test_jit_and_malloc_settings_report_what_they_did():
    import sys

    assert isinstance(jit.STATUS.reason, str) and isinstance(alloc.STATUS, str)
    if sys.platform.startswith("linux") and jit.STATUS.active:
        # The wrapper passes MLX's own arguments through to the real compiler, with the flags first.
        import os
        from pathlib import Path

        wrapper = Path(jit.STATUS.where) / "bin" / "g++"
        assert wrapper.is_file() and os.access(wrapper, os.X_OK)
        assert all(f in wrapper.read_text() for f in jit.FLAGS)
        # A compiled, fused elementwise kernel runs (built with the flags) and gives MLX's numbers.
        x = mx.array(np.linspace(-30, 30, 1001, dtype=np.float32))
        fused = mx.compile(lambda a: a / (1 + mx.exp(-a)) * 2.0)(x)
        assert np.allclose(np.array(fused), np.array(nn.silu(x) * 2.0), rtol=1e-5, atol=1e-6)


def _child_jit(env: dict) -> list:
    """[folder or None, the g++ found on PATH] as a fresh Python with `env` sees them after importing poet_mlx."""
    import json
    import subprocess
    import sys

    code = ("import json, shutil, poet_mlx, mlx.core; from poet_mlx.backends import jit; "
            "print(json.dumps([jit.STATUS.where, shutil.which('g++')]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_child_process_shares_the_kernel_folder_or_leaves_it():
    """A poet-mlx child adopts its parent's kernel folder (it would otherwise take the parent's g++ wrapper
    for the compiler and build every kernel again in a folder of its own); `outside_env` gives a child the
    PATH and TMPDIR from before the set-up, so its MLX builds kernels as it would anywhere else."""
    import os
    import sys
    from pathlib import Path

    if not (sys.platform.startswith("linux") and jit.STATUS.active):
        pytest.skip("the JIT set-up is Linux-only and active here only with g++")
    wrapper = str(Path(jit.STATUS.where) / "bin" / "g++")
    assert _child_jit(dict(os.environ)) == [jit.STATUS.where, wrapper]
    outside = jit.outside_env({**os.environ, jit.ENV_SWITCH: "default"})
    assert jit.INHERITED not in outside and wrapper.rsplit("/", 1)[0] not in outside["PATH"].split(os.pathsep)
    assert outside.get("TMPDIR") != os.environ["TMPDIR"]
    folder, compiler = _child_jit(outside)
    assert folder is None and compiler != wrapper


def test_run_ahead_bound_only_on_request(monkeypatch):
    import sys

    from poet_mlx.backends import runahead

    before = mx.set_memory_limit(1 << 40)
    try:
        monkeypatch.delenv(runahead.ENV_SWITCH, raising=False)
        assert runahead.bound_run_ahead().startswith("MLX's default")
        assert mx.set_memory_limit(1 << 40) == 1 << 40  # left as it was
        monkeypatch.setenv(runahead.ENV_SWITCH, "bounded")
        status = runahead.bound_run_ahead()
        if sys.platform.startswith("linux") and mx.default_device() == mx.cpu:
            assert status.startswith("bounded") and mx.set_memory_limit(1 << 40) == 0
            # Nothing fails above the limit: evaluation only waits for queued work.
            y = (mx.ones((512, 512)) @ mx.ones((512, 512))).sum()
            assert y.item() == 512.0 ** 3
        else:
            assert not status.startswith("bounded")
    finally:
        mx.set_memory_limit(before)


def test_swiglu_backward_recomputes_rather_than_keeping_the_forwards_exp():
    """Under mx.compile a backward that recomputes exp(-g) from g itself is merged with the forward's identical
    exp(-g), which is then kept from the forward on: one (T, I) array per layer. Measured on this stack of 6
    MLPs: peak 20.25 such arrays that way, 15.25 with the recomputation made to wait for the cotangent
    (a SmolLM2 DPO step at 2 x 256 with POET_MLX_LEAN=autodiff: 1.28 -> 1.185 GB)."""

    @mx.custom_function
    def merged(gate, x):
        return fast_layers.swiglu_value(gate, x)

    @merged.vjp
    def merged_vjp(primals, cotangent, output):
        return fast_layers.swiglu_grads(*primals, cotangent)

    layers, t, d, i = 6, 1024, 128, 1024
    ws = [[mx.random.normal(s, key=mx.random.key(3 * j + k)) * 0.05 for k, s in enumerate(((d, i), (d, i), (i, d)))]
          for j in range(layers)]
    x = mx.random.normal((t, d), key=mx.random.key(99))
    mx.eval(ws, x)

    def peak(swiglu) -> float:
        def loss(x):
            h = x
            for w1, w2, w3 in ws:
                h = h + swiglu(h @ w1, h @ w2) @ w3
            return (h * h).sum()

        step = mx.compile(mx.value_and_grad(loss))
        mx.eval(step(x))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(step(x))
        return (mx.get_peak_memory() - base) / (t * i * 4)

    limit = mx.set_memory_limit(0)  # no run-ahead: the peak does not depend on thread timing
    try:
        ours, kept = peak(fast_layers._swiglu), peak(merged)
    finally:
        mx.set_memory_limit(limit)
    assert ours <= kept - 3, (ours, kept)
