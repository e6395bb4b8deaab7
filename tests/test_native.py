"""poet-mlx's C++ attention kernel (`backends.native`, `attention_kernel.cpp`): built and loaded on Linux, the
same numbers as the MLX-op attention of `fast_layers` and as plain softmax attention with autodiff, used by
`causal_attention` and `lean_lora` for float32 only, and a failed build leaves attention on MLX ops."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from poet_mlx.backends import Status, fast_layers, native

linux_cpu = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel is built on Linux only")


@pytest.fixture(scope="module")
def kernel():
    module = native.attention_kernel()
    if module is None and sys.platform.startswith("linux"):
        pytest.fail(f"the attention kernel did not load on Linux: {native.STATUS.reason}")
    if module is None:
        pytest.skip(native.STATUS.reason)
    return module


def _inputs(b, kv, g, t, d, seed=0):
    """Pre-scaled grouped queries (B, KV, g, T, D), keys and values (B, KV, T, D), a cotangent of the
    token-major output (B, T, KV, g, D)."""
    k = mx.random.split(mx.random.key(seed), 4)
    return (mx.random.normal((b, kv, g, t, d), key=k[0]) * d ** -0.5, mx.random.normal((b, kv, t, d), key=k[1]),
            mx.random.normal((b, kv, t, d), key=k[2]), mx.random.normal((b, t, kv, g, d), key=k[3]))


def _numpy_attention(q, k, v):
    """Causal softmax attention in float64: out (B, T, KV, g, D) token-major and lse (B, KV, g, T)."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    t = q.shape[3]
    s = np.einsum("bkgtd,bksd->bkgts", q, k)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    top = s.max(-1, keepdims=True)
    e = np.exp(s - top)
    z = e.sum(-1, keepdims=True)
    out = np.einsum("bkgts,bksd->bkgtd", e / z, v)
    return out.transpose(0, 3, 1, 2, 4), (top + np.log(z))[..., 0]


SHAPES = [(2, 2, 3, 11, 8, 4), (1, 3, 3, 130, 64, 64), (2, 1, 1, 5, 16, 64), (1, 2, 2, 1, 8, 64),
          (1, 1, 4, 64, 8, 64), (1, 1, 2, 67, 8, 32)]
"""(B, KV, g, T, D, block): grouped and plain heads, T below, at and across block edges, one position."""


@linux_cpu
@pytest.mark.parametrize("b, kv, g, t, d, block", SHAPES)
def test_forward_equals_float64_attention_and_the_mlx_op_version(kernel, b, kv, g, t, d, block):
    q, k, v, _ = _inputs(b, kv, g, t, d)
    out, lse = kernel.forward(q, k, v, block)
    ref_out, ref_lse = _numpy_attention(q, k, v)
    assert out.shape == (b, t, kv, g, d) and lse.shape == (b, kv, g, t)
    assert out.dtype == lse.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), ref_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.array(lse), ref_lse, atol=2e-6, rtol=1e-6)
    ops_out, ops_lse = fast_layers.attend_forward(q, k, v, block)
    assert mx.abs(out - ops_out).max().item() < 1e-5 and mx.abs(lse - ops_lse).max().item() < 1e-5


@linux_cpu
@pytest.mark.parametrize("b, kv, g, t, d, block", SHAPES)
def test_backward_equals_autodiff_of_softmax_attention(kernel, b, kv, g, t, d, block):
    """dq, dk, dv against MLX's autodiff of softmax(q k^T + causal mask) v (an independent reference), and
    against the MLX-op backward."""
    q, k, v, d_out = _inputs(b, kv, g, t, d)
    out, lse = kernel.forward(q, k, v, block)
    grads = kernel.backward(q, k, v, d_out, out, lse, block)

    def plain(q, k, v):
        s = mx.einsum("bkgtd,bksd->bkgts", q, k)
        s = mx.where(mx.tril(mx.ones((t, t), mx.bool_)), s, -mx.inf)
        return mx.einsum("bkgts,bksd->btkgd", mx.softmax(s, axis=-1), v)

    _, ref = mx.vjp(plain, [q, k, v], [d_out])
    ops = fast_layers.attend_backward(q, k, v, d_out, out, lse, block)
    for name, ours, want, theirs in zip("qkv", grads, ref, ops):
        assert ours.shape == want.shape, name
        tol = 2e-5 * max(1.0, mx.abs(want).max().item())
        assert mx.abs(ours - want).max().item() < tol, name
        assert mx.abs(ours - theirs).max().item() < tol, name


@linux_cpu
def test_strided_inputs_and_extreme_scores(kernel):
    """Transposed (non-contiguous) inputs are read as their values; scores ~ +-1e4 stay finite (each row's
    maximum is subtracted before its exp)."""
    q, k, v, d_out = _inputs(1, 2, 3, 20, 8)
    k_t = mx.swapaxes(mx.swapaxes(k, 2, 3), 2, 3)  # same values, same strides: a no-op control
    assert mx.array_equal(kernel.forward(q, k_t, v, 8)[0], kernel.forward(q, k, v, 8)[0]).item()
    v_strided = mx.swapaxes(mx.contiguous(mx.swapaxes(v, 2, 3)), 2, 3)  # (B, KV, T, D) values, column layout
    np.testing.assert_allclose(np.array(kernel.forward(q, k, v_strided, 8)[0]),
                               np.array(kernel.forward(q, k, v, 8)[0]), rtol=1e-6, atol=1e-6)
    big = q * 3000.0
    out, lse = kernel.forward(big, k, v, 8)
    grads = kernel.backward(big, k, v, d_out, out, lse, 8)
    assert all(mx.all(mx.isfinite(x)).item() for x in (out, lse, *grads))
    np.testing.assert_allclose(np.array(out), _numpy_attention(big, k, v)[0], atol=1e-4, rtol=1e-4)


@linux_cpu
def test_bad_shapes_and_dtypes_are_refused(kernel):
    q, k, v, _ = _inputs(1, 2, 3, 10, 8)
    with pytest.raises(ValueError, match="want q"):
        kernel.forward(q, k[:, :, :9], v, 4)
    with pytest.raises(ValueError, match="float32"):
        kernel.forward(q.astype(mx.float16), k, v, 4)


@linux_cpu
def test_compiled_on_another_stream(kernel):
    """Inside `mx.compile` and on a second CPU stream (as `parallel_rows` runs it), the same numbers."""
    q, k, v, d_out = _inputs(2, 2, 3, 40, 8)
    want = kernel.forward(q, k, v, 16)
    with mx.stream(mx.new_stream(mx.cpu)):
        got = mx.compile(lambda q, k, v: kernel.forward(q, k, v, 16))(q, k, v)
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))


def _model_attention_grads(q, k, v, w):
    return mx.value_and_grad(lambda q, k, v: (fast_layers.causal_attention(q, k, v, 0.3) * w).sum(),
                             argnums=(0, 1, 2))(q, k, v)


@linux_cpu
def test_causal_attention_uses_the_kernel_for_float32_only(kernel, monkeypatch):
    """`causal_attention` (and so every accelerated model) calls the kernel for float32 arrays, forward and
    backward, and gets the MLX-op numbers; float16 arrays go to the MLX ops."""
    calls = []

    class Counting:
        def forward(self, *args):
            calls.append("forward")
            return kernel.forward(*args)

        def backward(self, *args):
            calls.append("backward")
            return kernel.backward(*args)

    monkeypatch.setattr(fast_layers, "attention_kernel", lambda: Counting())
    q = mx.random.normal((2, 6, 33, 8), key=mx.random.key(1))
    k, v = (mx.random.normal((2, 2, 33, 8), key=mx.random.key(i)) for i in (2, 3))
    w = mx.random.normal((2, 6, 33, 8), key=mx.random.key(4))
    value, grads = _model_attention_grads(q, k, v, w)
    assert calls == ["forward", "backward"]
    monkeypatch.setattr(fast_layers, "attention_kernel", lambda: None)
    ops_value, ops_grads = _model_attention_grads(q, k, v, w)
    assert abs(value.item() - ops_value.item()) < 1e-4 * max(1.0, abs(ops_value.item()))
    for a, b in zip(grads, ops_grads):
        assert mx.abs(a - b).max().item() < 1e-5 * max(1.0, mx.abs(b).max().item())
    monkeypatch.setattr(fast_layers, "attention_kernel", lambda: Counting())
    calls.clear()
    half = fast_layers.causal_attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), 0.3)
    assert calls == [] and half.dtype == mx.float16


@pytest.fixture
def fresh_status(monkeypatch):
    monkeypatch.setattr(native, "STATUS", Status())
    monkeypatch.setattr(native, "_MODULE", None)
    monkeypatch.setattr(native, "_DECIDED", False)


@linux_cpu
def test_a_failed_build_leaves_attention_on_mlx_ops(fresh_status, monkeypatch):
    def broken():
        raise RuntimeError("compiling the attention kernel failed: no such compiler")

    monkeypatch.setattr(native, "_build", broken)
    assert native.attention_kernel() is None
    assert not native.STATUS.active and "no such compiler" in native.STATUS.reason
    assert native.attention_kernel() is None  # decided once, not retried on every layer


def test_switched_off(fresh_status, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "python")
    assert native.attention_kernel() is None
    assert "disabled by POET_MLX_KERNELS=python" in native.STATUS.reason


@linux_cpu
def test_a_kernel_that_disagrees_is_not_used(kernel, fresh_status, monkeypatch):
    """The probe after loading compares with the MLX-op attention: a wrong kernel (here, one whose output
    is off by 1%) is refused."""

    class Wrong:
        def forward(self, *args):
            out, lse = kernel.forward(*args)
            return [out * 1.01, lse]

        backward = staticmethod(kernel.backward)

    monkeypatch.setattr(native, "_load", lambda path: Wrong())
    assert native.attention_kernel() is None and "disagrees" in native.STATUS.reason


@linux_cpu
def test_built_once_per_key(kernel):
    """A second build call finds the cached library and compiles nothing."""
    path = native._build()
    before = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == before


def test_accelerating_a_model_loads_the_kernel_up_front(tiny_model_dir, monkeypatch):
    """`accelerate_layers` (model loading) builds and probes the kernel, so that its first-use cost never lands
    inside a traced, timed training step."""
    from mlx_lm.utils import load

    calls = []
    monkeypatch.setattr(fast_layers, "wanted", lambda: True)
    monkeypatch.setattr(fast_layers, "attention_kernel", lambda: calls.append(1))
    model, _ = load(str(tiny_model_dir))
    assert fast_layers.accelerate_layers(model) > 0 and calls
