"""`backends.parallel_rows`: a batch's two row groups through the model side by side, one CPU stream each.

The split must change nothing but the time: the same log-probs, loss and gradients as the groups one after the
other (bit for bit here: the same kernels run, only on two threads), the trunk split only where a probe shows
the block-by-block loop computes the model's own trunk, and OpenBLAS's threads restored afterwards."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from poet_mlx.backends import blas, parallel_rows
from poet_mlx.batching import layout, make_batch, make_feed
from poet_mlx.blocked_head import LinearHead, head_stats
from poet_mlx.config import LossConfig
from poet_mlx.head import output_head
from poet_mlx.objective import batch_inputs, batch_objective, packed_targets
from test_feed import make_pairs, tiny_llama, with_lora

pytestmark = pytest.mark.skipif(not parallel_rows.wanted(), reason="Linux CPU with 2+ cores only")


def serial(monkeypatch):
    monkeypatch.setenv(parallel_rows.ENV_SWITCH, "serial")


def test_tie_changes_no_value_and_passes_gradients_through():
    a, b = mx.array([1.0, 2.0, 3.0]), mx.array([[4.0], [5.0]])
    ta, tb = parallel_rows.tie([a, b])
    assert mx.array_equal(ta, a) and mx.array_equal(tb, b)

    def f(a, b, tied):
        if tied:
            a, b = parallel_rows.tie([a, b])
        return (a * a).sum() + (3 * b).sum()

    for x, y in zip(mx.grad(f, argnums=(0, 1))(a, b, True), mx.grad(f, argnums=(0, 1))(a, b, False)):
        assert mx.array_equal(x, y)
    assert parallel_rows.tie([a]) == [a]


def test_the_trunk_is_split_where_the_loop_computes_it(monkeypatch):
    model = tiny_llama(False)
    trunk = parallel_rows.trunk(model)
    assert trunk is not None
    tokens = [mx.array(np.random.default_rng(0).integers(0, 97, (n, 9)), dtype=mx.int32) for n in (2, 3)]
    split = trunk(tokens, on_streams=True)
    for got, t in zip(split, tokens):
        assert mx.array_equal(got, model.model(t))
    serial(monkeypatch)
    assert parallel_rows.trunk(model) is None, "switched off"


def test_a_trunk_the_loop_does_not_reproduce_is_not_split():
    model = tiny_llama(False)
    base = type(model.model)

    class Scaled(base):  # gemma-like: the embeddings are scaled inside the trunk's own call
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return base.__call__(self, inputs, cache, self.embed_tokens(inputs) * 2.0)

    model.model.__class__ = Scaled
    assert parallel_rows.trunk(model) is None
    windowed = tiny_llama(False)
    windowed.model.sliding_window = 4  # a short probe would not see the window
    assert parallel_rows.trunk(windowed) is None


def objective(model, batch, frozen_head: bool, compiled: bool):
    """Loss, metrics and gradients of the batch, computed as the trainer's step computes them."""
    head, cfg = output_head(model), LossConfig("dpo")

    def loss_fn(m, *inputs):
        return batch_objective(m, *inputs, cfg, head, frozen_head)

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(*inputs):
        return value_and_grad(model, *inputs)

    if compiled:
        step = mx.compile(step, inputs=model.state, outputs=model.state)  # as the trainer does
    with parallel_rows.engaged(model, True):
        (loss, metrics), grads = step(*batch_inputs(batch))
        mx.eval(loss, metrics, grads)
    return loss, metrics, dict(tree_flatten(grads))


@pytest.mark.parametrize("frozen_head", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_loss_and_gradients_are_the_serial_ones(monkeypatch, frozen_head, compiled):
    pairs = make_pairs(seed=3)
    batch = make_batch(pairs, [0, 2, 4, 5], [layout(p, poet=True) for p in pairs])
    assert len(make_feed(batch).groups) == 2
    model = with_lora(tiny_llama(False))
    loss, metrics, grads = objective(model, batch, frozen_head, compiled)
    serial(monkeypatch)
    ref_loss, ref_metrics, ref_grads = objective(model, batch, frozen_head, compiled)
    assert mx.array_equal(loss, ref_loss)
    for name in ref_metrics:
        assert mx.array_equal(metrics[name], ref_metrics[name]), name
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in ref_grads.items():
        np.testing.assert_allclose(np.array(grads[name]), np.array(g), rtol=1e-6, atol=1e-7, err_msg=name)


def test_group_positions_list_the_flat_positions_targets():
    pairs = make_pairs(seed=4)
    batch = make_batch(pairs, [1, 3, 5], [layout(p, poet=False) for p in pairs])
    feed = make_feed(batch)
    grid = np.concatenate([g[:, 1:].reshape(-1) for g in feed.groups])  # the flat targets
    local = feed.group_positions
    assert [len(p) for p in local] != [len(feed.positions), 0] and sum(map(len, local)) == len(feed.positions)
    got = packed_targets(tuple(mx.array(g) for g in feed.groups), tuple(mx.array(p) for p in local))
    real = feed.rows >= 0  # the padding points at index 0 of the last group, not of the first
    np.testing.assert_array_equal(np.array(got)[real], grid[feed.positions][real])


def test_engaged_gives_each_stream_its_share_of_the_blas_threads_and_restores_them(monkeypatch):
    if not blas.STATUS.active:
        pytest.skip("MLX's GEMMs are not on OpenBLAS here")
    get = blas._OPENBLAS.scipy_openblas_get_num_threads
    monkeypatch.setattr(parallel_rows, "_cores", lambda: 4)
    before = get()
    with blas.gemm_threads(before):
        pass
    with parallel_rows.engaged(tiny_llama(False), True):
        assert get() == 2
    assert get() == before
    with parallel_rows.engaged(tiny_llama(False), False):
        assert get() == before, "one group: nothing runs side by side"


def test_the_blocked_head_keeps_one_vocabulary_block_alive_at_a_time():
    """Each block's target pick is chained too: with the wide evaluation tape `parallel_rows` sets, an unchained
    pick ran last and kept every block's (rows, block) scores alive."""
    rng = np.random.default_rng(0)
    rows, dim, vocab, block_elements = 256, 16, 32768, 1 << 15  # 512 blocks of 64 words, 64 KB of scores each
    w = mx.array(rng.normal(0, 0.1, (vocab, dim)).astype(np.float32))
    h = mx.array(rng.normal(0, 1, (rows, dim)).astype(np.float32))
    y = mx.array(rng.integers(0, vocab, rows).astype(np.int32))
    head = LinearHead(w, None, None)
    f = mx.compile(lambda h, y: head_stats(head, h, y, block_elements)["logps"])
    mx.eval(f(h, y))
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(f(h, y))
    assert mx.get_peak_memory() - base < 8 << 20  # all 512 blocks' scores: 32 MB


def test_the_tape_width_is_set_unless_the_user_set_it_and_peers_get_mlx_s_own(monkeypatch):
    name = parallel_rows.BFS_WIDTH[0]
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(parallel_rows._WIDTH_SET, raising=False)
    parallel_rows.set_tape_width()
    assert os.environ[name] == parallel_rows.BFS_WIDTH[1]
    assert name not in parallel_rows.outside_env(dict(os.environ))
    monkeypatch.setenv(name, "64")
    monkeypatch.delenv(parallel_rows._WIDTH_SET)
    parallel_rows.set_tape_width()
    assert os.environ[name] == "64" and parallel_rows.outside_env(dict(os.environ))[name] == "64"


def test_a_custom_vjp_runs_on_the_stream_of_its_forward():
    """MLX traces a custom VJP on whatever stream is current then: `fast_layers.on_stream` puts it back on the
    forward's, so a group's backward stays on its group's stream."""
    from poet_mlx.backends.fast_layers import current_stream, on_stream

    other = parallel_rows.streams(2)[1]
    seen = []

    def make(wrapped: bool):
        @mx.custom_function
        def f(x):
            return x * x

        def vjp(primals, cotangent, output):
            seen.append(current_stream())
            return 2 * primals[0] * cotangent

        f.vjp(on_stream(current_stream())(vjp) if wrapped else vjp)
        return f

    for wrapped in (True, False):
        with mx.stream(other):
            f = make(wrapped)
        mx.eval(mx.grad(lambda x: f(x).sum())(mx.array([1.0, 2.0])))
    assert seen == [other, mx.default_stream(mx.cpu)]


@pytest.mark.parametrize("model_type, extra, split", [
    ("llama", {}, True), ("qwen2", {}, True), ("qwen3", {"head_dim": 16, "rope_theta": 10000.0}, True),
    ("gemma", {"head_dim": 16}, False),  # gemma scales its embeddings inside its trunk: the probe says no
])
def test_which_architectures_are_split(model_type, extra, split):
    from test_lean_lora import model_of

    assert (parallel_rows.trunk(model_of(model_type, **extra)) is not None) == split
