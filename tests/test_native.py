"""poet-mlx's C++ kernels (`backends.native`, `kernels.cpp`): built and loaded on Linux; the attention gives the
same numbers as the MLX-op attention of `fast_layers` and as plain softmax attention with autodiff, and is
used by `causal_attention` and `lean_lora` for float32 only; the head gives float64 log-softmax's log-probs
and gradients, and is used by `blocked_head` for float32 heads without bias; a failed build leaves both on
MLX ops."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from poet_mlx.backends import Status, fast_layers, native

linux_cpu = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel is built on Linux only")


@pytest.fixture(scope="module")
def kernel():
    module = native.kernels()
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
    """Inputs that are not row-contiguous arrays of their own (an offset slice, a broadcast, a reversed view,
    a column layout) are read as their values; scores ~ +-1e4 stay finite (each row's maximum is subtracted
    before its exp)."""
    q, k, v, d_out = _inputs(1, 2, 3, 20, 8)
    want = kernel.forward(q, k, v, 8)[0]
    big_k = mx.concatenate([mx.zeros((1, 2, 1, 8)), k], axis=2)[:, :, 1:]  # same values at an offset
    v_col = mx.swapaxes(mx.contiguous(mx.swapaxes(v, 2, 3)), 2, 3)
    for kk, vv in ((big_k, v), (k, v_col), (k[:, :, ::-1][:, :, ::-1], v)):
        np.testing.assert_allclose(np.array(kernel.forward(q, kk, vv, 8)[0]), np.array(want), rtol=1e-6, atol=1e-6)
    v_row = mx.broadcast_to(v[:, :, :1], v.shape)  # stride 0 along T
    np.testing.assert_allclose(np.array(kernel.forward(q, k, v_row, 8)[0]),
                               np.array(kernel.forward(q, k, mx.contiguous(v_row), 8)[0]), rtol=1e-6, atol=1e-6)
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

    monkeypatch.setattr(fast_layers, "kernels", lambda: Counting())
    q = mx.random.normal((2, 6, 33, 8), key=mx.random.key(1))
    k, v = (mx.random.normal((2, 2, 33, 8), key=mx.random.key(i)) for i in (2, 3))
    w = mx.random.normal((2, 6, 33, 8), key=mx.random.key(4))
    value, grads = _model_attention_grads(q, k, v, w)
    assert calls == ["forward", "backward"]
    monkeypatch.setattr(fast_layers, "kernels", lambda: None)
    ops_value, ops_grads = _model_attention_grads(q, k, v, w)
    assert abs(value.item() - ops_value.item()) < 1e-4 * max(1.0, abs(ops_value.item()))
    for a, b in zip(grads, ops_grads):
        assert mx.abs(a - b).max().item() < 1e-5 * max(1.0, mx.abs(b).max().item())
    monkeypatch.setattr(fast_layers, "kernels", lambda: Counting())
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
        raise RuntimeError("compiling the kernels failed: no such compiler")

    monkeypatch.setattr(native, "_build", broken)
    assert native.kernels() is None
    assert not native.STATUS.active and "no such compiler" in native.STATUS.reason
    assert native.kernels() is None  # decided once, not retried on every layer


def test_switched_off(fresh_status, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "python")
    assert native.kernels() is None
    assert "disabled by POET_MLX_KERNELS=python" in native.STATUS.reason


@linux_cpu
def test_a_kernel_that_disagrees_is_not_used(kernel, fresh_status, monkeypatch):
    """The probe after loading compares with MLX ops: a wrong kernel (here, an attention output or a head
    gradient off by 1%) is refused."""

    class Wrong:
        def forward(self, *args):
            out, lse = kernel.forward(*args)
            return [out * 1.01, lse]

        backward, head = staticmethod(kernel.backward), staticmethod(kernel.head)

    class WrongHead:
        forward, backward = staticmethod(kernel.forward), staticmethod(kernel.backward)

        def head(self, *args):
            logps, grad = kernel.head(*args)
            return [logps, grad * 1.01]

    for wrong in (Wrong(), WrongHead()):
        monkeypatch.setattr(native, "_DECIDED", False)
        monkeypatch.setattr(native, "_load", lambda path: wrong)
        assert native.kernels() is None and "disagrees" in native.STATUS.reason


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
    monkeypatch.setattr(fast_layers, "kernels", lambda: calls.append(1))
    model, _ = load(str(tiny_model_dir))
    assert fast_layers.accelerate_layers(model) > 0 and calls


def _numpy_head(hidden, weight, targets):
    """log softmax(h W^T)[y] and its gradient W_y - sum_v p_v W_v, in float64."""
    h, w = np.array(hidden, dtype=np.float64), np.array(weight, dtype=np.float64)
    y = np.array(targets)
    s = h @ w.T
    top = s.max(1, keepdims=True)
    p = np.exp(s - top)
    z = p.sum(1, keepdims=True)
    logps = s[np.arange(len(y)), y] - (top + np.log(z))[:, 0]
    return logps, w[y] - (p / z) @ w


@linux_cpu
@pytest.mark.parametrize("m, d, v, rows, words", [(37, 16, 300, 5, 43), (8, 64, 1000, 512, 512), (1, 8, 3, 4, 1),
                                                   (20, 8, 64, 20, 64)])
def test_head_equals_float64_log_softmax(kernel, m, d, v, rows, words):
    """Row chunks and vocabulary blocks with short last ones, one word per block, one block in all; targets at the
    first and the last word; logits up to ~+-60 (a row's maximum moves across blocks)."""
    k = mx.random.split(mx.random.key(1), 3)
    hidden, weight = mx.random.normal((m, d), key=k[0]) * 2, mx.random.normal((v, d), key=k[1])
    targets = mx.random.randint(0, v, (m,), key=k[2])
    targets = mx.concatenate([mx.array([0, v - 1])[: min(m, 2)], targets[2:]])
    want_logps, want_grad = _numpy_head(hidden, weight, targets)
    logps, grad = kernel.head(hidden, weight, targets, True, rows, words)
    np.testing.assert_allclose(np.array(logps), want_logps, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=2e-5, atol=2e-5)
    (alone,) = kernel.head(hidden, weight, targets, False, rows, words)
    assert mx.array_equal(alone, logps).item()


@linux_cpu
def test_head_bad_shapes_are_refused(kernel):
    with pytest.raises(ValueError, match="want hidden"):
        kernel.head(mx.zeros((3, 4)), mx.zeros((5, 6)), mx.zeros((3,), mx.int32), False, 2, 2)


@linux_cpu
def test_head_stats_uses_the_kernel_for_float32_heads_without_bias_only(kernel, monkeypatch):
    from poet_mlx import blocked_head
    from poet_mlx.blocked_head import LinearHead, head_stats

    calls = []
    monkeypatch.setattr(native, "kernels", lambda: calls.append(1) or kernel)
    k = mx.random.split(mx.random.key(2), 3)
    hidden, weight = mx.random.normal((9, 8), key=k[0]), mx.random.normal((50, 8), key=k[1])
    targets = mx.random.randint(0, 50, (9,), key=k[2])
    ours = head_stats(LinearHead(weight), hidden, targets, 64, grad=True)
    assert len(calls) == 1
    monkeypatch.setattr(blocked_head, "_kernel_for", lambda head, hidden: None)
    ops = head_stats(LinearHead(weight), hidden, targets, 64, grad=True)
    for key in ("logps", "grad"):
        assert mx.abs(ours[key] - ops[key]).max().item() < 1e-5
    monkeypatch.undo()
    monkeypatch.setattr(native, "kernels", lambda: calls.append(1) or kernel)
    calls.clear()
    head_stats(LinearHead(weight, bias=mx.zeros((50,))), hidden, targets, 64)
    head_stats(LinearHead(weight), hidden, targets, 64, entropy=True)
    head_stats(LinearHead(weight.astype(mx.float16)), hidden.astype(mx.float16), targets, 64)
    assert calls == []


@linux_cpu
def test_head_target_outside_the_vocabulary_gives_nan_not_a_stray_read(kernel):
    hidden, weight = mx.ones((3, 4)), mx.ones((5, 4))
    logps, grad = kernel.head(hidden, weight, mx.array([1, -1, 5]), True, 2, 2)
    assert np.isfinite(np.array(logps[0])) and np.isnan(np.array(logps[1:])).all()
    assert np.isfinite(np.array(grad[0])).all() and np.isnan(np.array(grad[1:])).all()


@linux_cpu
def test_a_library_that_does_not_load_is_removed(tmp_path):
    """A truncated or foreign file in the cache is not loaded forever: the next process builds it again."""
    bad = tmp_path / "_poet_kernels.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(ImportError):
        native._load(bad)
    assert not bad.exists()
