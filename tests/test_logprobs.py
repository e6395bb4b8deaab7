"""Token and sequence log-probs: against a float64 numpy log-softmax, chunk invariance, hand cases."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from poet_mlx.logprobs import per_token_logps, sequence_logps, span_mask
from poet_mlx.poet import scored_lengths

try:  # tests/ as a package or as a plain folder on sys.path
    from . import reference_numpy as ref
except ImportError:
    import reference_numpy as ref


def random_logits(shape, dtype, seed, scale=3.0, offset=0.0):
    """Random logits in `dtype` plus their exact float64 values (after rounding to `dtype`)."""
    rng = np.random.default_rng(seed)
    logits = mx.array((rng.normal(0, scale, shape) + offset).astype(np.float32)).astype(dtype)
    exact = np.array(logits.astype(mx.float32)).astype(np.float64)  # float32 holds f16/bf16 exactly
    return logits, exact


def random_targets(n, t, v, seed, dtype=mx.int32):
    return mx.array(np.random.default_rng(seed + 1).integers(0, v, (n, t))).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 5000), (3, 33, 257), (1, 1, 2), (4, 16, 1031)])
def test_per_token_logps_matches_numpy(dtype, shape):
    n, t, v = shape
    logits, exact = random_logits(shape, dtype, seed=v + t)
    targets = random_targets(n, t, v, seed=v)
    got = per_token_logps(logits, targets)
    assert got.shape == (n, t) and got.dtype == mx.float32, "log-probs come back (N, T) float32 for any input dtype"
    expected = ref.token_logps(exact, np.array(targets))
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_dtype", [mx.int32, mx.uint32, mx.int64])
def test_per_token_logps_target_dtypes(target_dtype):
    logits, exact = random_logits((2, 5, 300), mx.float32, seed=1)
    targets = random_targets(2, 5, 300, seed=1, dtype=target_dtype)
    expected = ref.token_logps(exact, np.array(targets).astype(np.int64))
    np.testing.assert_allclose(np.array(per_token_logps(logits, targets)), expected, rtol=1e-5, atol=1e-5)


def test_per_token_logps_large_logits_are_stable():
    """Logits around 1e3 (and a peaked row) must not overflow: the max is subtracted inside logsumexp."""
    logits, exact = random_logits((2, 6, 800), mx.float32, seed=4, scale=20.0, offset=1000.0)
    targets = random_targets(2, 6, 800, seed=4)
    got = np.array(per_token_logps(logits, targets))
    assert np.all(np.isfinite(got)) and np.all(got <= 1e-4)
    # Both terms are ~1e3 in float32 (ulp 6e-5): allow their rounding.
    np.testing.assert_allclose(got, ref.token_logps(exact, np.array(targets)), rtol=1e-5, atol=3e-4)


def test_per_token_logps_probabilities_sum_to_one():
    """Scoring every vocabulary entry at one position gives probabilities summing to 1."""
    v = 4097
    logits, _ = random_logits((1, 1, v), mx.bfloat16, seed=8)
    every = mx.broadcast_to(logits, (v, 1, v))
    targets = mx.arange(v)[:, None]
    lp = np.array(per_token_logps(every, targets)).astype(np.float64)
    assert abs(np.exp(lp).sum() - 1.0) < 1e-4


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [0, 1, 2, 3, 5, 7, 100])
def test_chunking_is_exact(dtype, rows_per_chunk):
    """Any chunk size, even one position per chunk (and a ragged last chunk), gives bit-identical log-probs.

    rows_per_chunk = 0 passes chunk_elements = 1, below one row: it must still make progress (1 position)."""
    n, t, v = 3, 23, 611
    logits, _ = random_logits((n, t, v), dtype, seed=rows_per_chunk)
    targets = random_targets(n, t, v, seed=rows_per_chunk)
    whole = np.array(per_token_logps(logits, targets, chunk_elements=1 << 30))
    chunked = np.array(per_token_logps(logits, targets, chunk_elements=max(1, rows_per_chunk * n * v)))
    np.testing.assert_array_equal(chunked, whole)


def test_default_chunking_on_a_large_vocabulary_matches_single_chunk():
    """V = 5000 with the default bound exercised through a bound smaller than the input (4 chunks)."""
    n, t, v = 2, 16, 5000
    logits, exact = random_logits((n, t, v), mx.float16, seed=3)
    targets = random_targets(n, t, v, seed=3)
    chunked = per_token_logps(logits, targets, chunk_elements=n * 4 * v)
    np.testing.assert_array_equal(np.array(chunked), np.array(per_token_logps(logits, targets)))
    np.testing.assert_allclose(np.array(chunked), ref.token_logps(exact, np.array(targets)), rtol=1e-5, atol=1e-5)


def test_span_mask_hand_case():
    """width 5; (start, length) = (0, 3), (2, 1), (1, 0), (4, 1)."""
    mask = span_mask(mx.array([0, 2, 1, 4]), mx.array([3, 1, 0, 1]), 5)
    assert mask.dtype == mx.bool_
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(np.array(mask), expected)


def test_sequence_logps_hand_case():
    """Row 0: positions 1..2 -> -2 + -3 = -5. Row 1: positions 0..2 -> -0.5 - 0.25 - 0.125 = -0.875.
    Row 2: empty span -> 0. Values outside the span (-inf, a huge number) must not leak in."""
    inf = float("inf")
    token_logps = mx.array(
        [
            [-inf, -2.0, -3.0, -inf],
            [-0.5, -0.25, -0.125, -1e30],
            [-1.0, -1.0, -1.0, -1.0],
        ]
    )
    out = sequence_logps(token_logps, mx.array([1, 0, 2]), mx.array([2, 3, 0]))
    assert out.shape == (3,) and out.dtype == mx.float32
    np.testing.assert_array_equal(np.array(out), [-5.0, -0.875, 0.0])


def test_sequence_logps_matches_reference_with_poet_spans():
    """Full path: logits -> token log-probs -> sums over each row's POET-cut response span, vs numpy."""
    rng = np.random.default_rng(12)
    t, v = 40, 97
    prompt_len = [5, 9]
    chosen_len, rejected_len = [20, 7], [11, 30]
    rows_len = []  # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    for lc, lr in zip(chosen_len, rejected_len):
        rows_len.append(scored_lengths(lc, lr, poet=True))
    lengths = [rows_len[0][0], rows_len[1][0], rows_len[0][1], rows_len[1][1]]
    assert lengths == [11, 7, 11, 7]
    starts = [prompt_len[0] - 1, prompt_len[1] - 1] * 2
    logits, exact = random_logits((4, t, v), mx.float32, seed=12)
    targets = mx.array(rng.integers(0, v, (4, t))).astype(mx.int32)
    got = sequence_logps(per_token_logps(logits, targets), mx.array(starts), mx.array(lengths))
    expected = ref.span_sums(ref.token_logps(exact, np.array(targets)), starts, lengths)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-4)


def test_logsumexp_rows_equals_mlx_and_is_stable():
    """The exp-written logsumexp (what the compiled step fuses) against mx.logsumexp, with huge and -inf
    logits, chunked and not."""
    from poet_mlx.logprobs import _row_logsumexp, logsumexp_rows

    x = mx.random.normal((7, 300), key=mx.random.key(0)) * 20
    x = mx.concatenate([x, mx.array([[1e30] + [0.0] * 299]), mx.array([[-mx.inf] * 299 + [3.0]])])
    ref = mx.logsumexp(x, axis=-1)
    assert mx.allclose(logsumexp_rows(x), ref, rtol=1e-6, atol=1e-5).item()
    for chunk in (300, 301 * 3, 10 ** 6):  # one row per chunk, three rows, everything at once
        assert mx.allclose(_row_logsumexp(x, chunk), ref, rtol=1e-6, atol=1e-5).item()
    half = _row_logsumexp(x[:7].astype(mx.float16), 600)
    assert half.dtype == mx.float32
    assert mx.allclose(half, mx.logsumexp(x[:7].astype(mx.float16).astype(mx.float32), axis=-1), atol=1e-4).item()


def test_no_rows_gives_no_log_probs():
    """A batch with nothing to score (0 rows) gives empty results on every path, not an error."""
    from poet_mlx.logprobs import head_token_logps
    from poet_mlx.scoring import head_in_chunks

    w = mx.random.normal((11, 4), key=mx.random.key(0))
    head = lambda x: x @ w.T  # noqa: E731
    h, t = mx.zeros((0, 4)), mx.zeros((0,), mx.int32)
    assert per_token_logps(mx.zeros((1, 0, 11)), mx.zeros((1, 0), mx.int32)).shape == (1, 0)
    assert head_token_logps(head, h, t).shape == (0,)
    assert mx.grad(lambda x: head_token_logps(head, x, t).sum())(h).shape == (0, 4)
    lp, = head_in_chunks(head, h, t, lambda logits, y: (per_token_logps(logits[None], y[None])[0],))
    assert lp.shape == (0,)
