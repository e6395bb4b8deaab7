"""`blocked_head`: log-probs, hidden-state gradients and entropies through a linear head in row chunks and
vocabulary blocks, against hand-computed numbers and against the plain (M, V) logits."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from poet_mlx import blocked_head
from poet_mlx.backends import fast_quant
from poet_mlx.blocked_head import LinearHead, head_stats, linear_head
from poet_mlx.logprobs import head_token_logps

V, D, R = 300, 64, 37


def test_hand_computed_one_word_per_block():
    """Logits 1, 2, 3 (W = [1, 2, 3], h = 1), one vocabulary word per block: log p(0) = 1 - log(e + e^2 +
    e^3), the gradient W_0 - sum p_v W_v, the entropy -sum p log p."""
    head = LinearHead(mx.array([[1.0], [2.0], [3.0]]))
    out = head_stats(head, mx.array([[1.0]]), mx.array([0]), chunk_elements=2, grad=True, entropy=True)
    assert blocked_head.vocab_block(head, 1, 2) == 1
    e = [math.exp(v) for v in (1, 2, 3)]
    p = [x / sum(e) for x in e]
    assert out["logps"].item() == pytest.approx(1 - math.log(sum(e)), rel=1e-6)
    assert out["grad"].item() == pytest.approx(1 - sum(pi * w for pi, w in zip(p, (1, 2, 3))), rel=1e-6)
    assert out["entropy"].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), rel=1e-6)


def _heads():
    """(name, head callable): float Linear with a bias, a tied float embedding, 4-bit ones (group 32)."""
    k = iter(mx.random.split(mx.random.key(3), 8))
    lin = nn.Linear(D, V, bias=True)
    lin.weight, lin.bias = mx.random.normal((V, D), key=next(k)) * 0.3, mx.random.normal((V,), key=next(k))
    emb = nn.Embedding(V, D)
    emb.weight = mx.random.normal((V, D), key=next(k)) * 0.3
    qlin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    qemb = nn.QuantizedEmbedding.from_embedding(emb, group_size=32, bits=4)
    return {"linear": lin, "embedding": emb.as_linear, "4-bit linear": qlin, "4-bit embedding": qemb.as_linear}


def _reference(head, hidden, targets):
    """(log-probs, hidden-state gradient of sum(w * log-probs), entropies) from the full (R, V) logits."""
    w = mx.arange(1, R + 1) / R

    def f(h):
        logp = nn.log_softmax(head(h).astype(mx.float32), axis=-1)
        return (mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0] * w).sum(), logp

    (_, logp), grad = mx.value_and_grad(f, argnums=0)(hidden)
    return mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], grad, -(mx.exp(logp) * logp).sum(-1), w


@pytest.mark.parametrize("path", ["kernel", "mlx-ops"])
@pytest.mark.parametrize("fast", [False, True], ids=["mlx-dequantize", "fast-quant"])
@pytest.mark.parametrize("name", list(_heads()))
def test_blocked_numbers_equal_the_full_logits(name, fast, path, monkeypatch):
    """Several row chunks (5 rows, the last short) and vocabulary blocks (40 words, the last short): the
    same log-probs, entropies and (through `head_token_logps`' VJP, compiled too) hidden-state gradients as
    the plain log-softmax of head(h); 4-bit heads with MLX's expansion and with `fast_quant`'s; the float head
    without bias through the C++ kernel where it loads (`backends.native`, 7 vocabulary blocks) and through
    MLX ops."""
    if fast and "4-bit" not in name:
        pytest.skip("fast_quant changes quantized heads only")
    if path == "mlx-ops":
        monkeypatch.setattr(blocked_head, "_kernel_for", lambda head, hidden: None)
    monkeypatch.setattr(blocked_head, "KERNEL_WORDS", 43)
    head = _heads()[name]
    if fast:
        monkeypatch.setattr(fast_quant, "wanted", lambda: True)
        owner = getattr(head, "__self__", head)
        assert fast_quant.accelerate_quantized(nn.Sequential(owner)) == 1
        head = owner.as_linear if owner is not head else owner
    lh = linear_head(head)
    assert lh is not None and (lh.expand is not None) == ("4-bit" in name)
    monkeypatch.setattr(blocked_head, "HEAD_ROWS", 5)
    hidden = mx.random.normal((R, D), key=mx.random.key(7))
    targets = mx.random.randint(0, V, (R,), key=mx.random.key(8))
    want_lp, want_grad, want_ent, w = _reference(head, hidden, targets)
    chunk = 2 * 5 * 40
    assert blocked_head.vocab_block(lh, 5, chunk) == 40
    out = head_stats(lh, hidden, targets, chunk, grad=True, entropy=True)
    np.testing.assert_allclose(np.array(out["logps"]), np.array(want_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(out["entropy"]), np.array(want_ent), rtol=1e-5, atol=1e-5)
    f = lambda x: (head_token_logps(head, x, targets, chunk_elements=chunk) * w).sum()  # noqa: E731
    for g in (mx.grad(f), mx.compile(mx.grad(f))):
        np.testing.assert_allclose(np.array(g(hidden)), np.array(want_grad), rtol=1e-4, atol=1e-5)


def test_quantized_head_is_expanded_one_block_at_a_time():
    """A 4-bit head's weight is expanded in (block, D) pieces (and the target rows once), never whole."""
    qlin = _heads()["4-bit linear"]
    base = linear_head(qlin)
    sizes = []

    def expand(w, scales, biases):
        sizes.append(w.shape[0])
        return base.expand(w, scales, biases)

    lh = LinearHead(base.weight, base.bias, base.scales, base.biases, expand)
    hidden = mx.random.normal((R, D), key=mx.random.key(1))
    targets = mx.random.randint(0, V, (R,), key=mx.random.key(2))
    mx.eval(head_stats(lh, hidden, targets, 2 * R * 64, grad=True))
    assert sizes == [64, 64, 64, 64, 44, R]  # five vocabulary blocks, then W at the targets


def test_bfloat16_head_gives_a_bfloat16_gradient_close_to_float32():
    lin = _heads()["linear"]
    half = nn.Linear(D, V, bias=True)
    half.weight, half.bias = lin.weight.astype(mx.bfloat16), lin.bias.astype(mx.bfloat16)
    hidden = mx.random.normal((R, D), key=mx.random.key(4))
    targets = mx.random.randint(0, V, (R,), key=mx.random.key(5))
    g16 = mx.grad(lambda x: head_token_logps(half, x, targets, 400).sum())(hidden.astype(mx.bfloat16))
    g32 = mx.grad(lambda x: head_token_logps(lin, x, targets, 400).sum())(hidden)
    assert g16.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(g16.astype(mx.float32)), np.array(g32), atol=0.05)


def test_only_plain_linear_heads_are_recognized():
    """LoRA-adapted heads, subclasses that compute something else, bare functions and non-affine 4-bit
    modes keep the row-chunked paths."""
    from mlx_lm.tuner.lora import LoRALinear

    lin = _heads()["linear"]

    class Scaled(nn.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    class Table(nn.Embedding):
        def as_linear(self, x):
            return super().as_linear(x) - 1

    assert linear_head(LoRALinear.from_base(lin, r=4)) is None
    assert linear_head(Scaled(D, V)) is None
    assert linear_head(Table(V, D).as_linear) is None
    assert linear_head(nn.Embedding(V, D).__call__) is None
    assert linear_head(lambda x: lin(x)) is None
    assert linear_head(nn.QuantizedLinear(D, V, group_size=32, bits=4, mode="mxfp4")) is None
    assert linear_head(lin).weight is lin.weight


def test_no_rows():
    lh = linear_head(_heads()["linear"])
    out = head_stats(lh, mx.zeros((0, D)), mx.zeros((0,), mx.int32), 1 << 20, grad=True, entropy=True)
    assert out["logps"].shape == (0,) and out["grad"].shape == (0, D) and out["entropy"].shape == (0,)
