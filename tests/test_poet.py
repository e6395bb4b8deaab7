"""POET equal-length cut: k = min(len_c, len_r) (ablation: floor(r * k), at least 1), by hand and vs numpy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poet_mlx.poet import poet_length, scored_lengths, truncate_pair

try:  # tests/ as a package or as a plain folder on sys.path
    from . import reference_numpy as ref
except ImportError:
    import reference_numpy as ref

EOS = 2


def test_equal_lengths_are_not_cut():
    """len 5 and 5 -> k = 5: both responses kept whole, EOS included."""
    c, r = [11, 12, 13, 14, EOS], [21, 22, 23, 24, EOS]
    assert poet_length(5, 5) == 5
    assert truncate_pair(c, r) == (c, r)
    assert scored_lengths(5, 5, poet=True) == (5, 5)


def test_one_token_response():
    """A one-token response (just EOS) against a 6-token one: k = 1, the longer keeps only its first token."""
    c, r = [EOS], [21, 22, 23, 24, 25, EOS]
    assert poet_length(1, 6) == 1 and poet_length(6, 1) == 1
    assert truncate_pair(c, r) == ([EOS], [21])
    assert truncate_pair(r, c) == ([21], [EOS])
    assert scored_lengths(1, 6, poet=True) == (1, 1)


def test_shorter_keeps_eos_longer_loses_tail_nothing_appended():
    """chosen 4 tokens (ends in EOS), rejected 6: k = 4. The chosen is unchanged, EOS kept; the rejected
    becomes its first 4 tokens, [31, 32, 33, 34], with no EOS appended."""
    chosen = [11, 12, 13, EOS]
    rejected = [31, 32, 33, 34, 35, EOS]
    c, r = truncate_pair(chosen, rejected)
    assert c == [11, 12, 13, EOS], "the shorter response must keep its EOS"
    assert r == [31, 32, 33, 34], "the longer response must be its plain prefix, nothing appended"
    assert EOS not in r
    # Symmetric when the chosen is the longer one.
    c2, r2 = truncate_pair(rejected, chosen)
    assert (c2, r2) == ([31, 32, 33, 34], [11, 12, 13, EOS])
    # Inputs untouched, outputs are fresh lists.
    assert chosen == [11, 12, 13, EOS] and rejected == [31, 32, 33, 34, 35, EOS]
    assert c is not chosen and isinstance(c, list) and isinstance(r, list)


def test_truncate_accepts_tuples_and_ranges():
    assert truncate_pair((1, 2, 3), range(10, 20)) == ([1, 2, 3], [10, 11, 12])


@pytest.mark.parametrize(
    "k, ratio, expected",
    [
        # k = 8: 2, 4, 6, 8 exactly.
        (8, 0.25, 2), (8, 0.5, 4), (8, 0.75, 6), (8, 1.0, 8),
        # k = 7: floor(1.75) = 1, floor(3.5) = 3, floor(5.25) = 5.
        (7, 0.25, 1), (7, 0.5, 3), (7, 0.75, 5), (7, 1.0, 7),
        # k = 4: floor(0.75 * 4) = 3 (not 2 through rounding).
        (4, 0.75, 3),
        # k = 10 with decimal ratios whose binary products are slightly off: 0.3 * 10 = 3, 0.7 * 10 = 7.
        (10, 0.3, 3), (10, 0.7, 7), (100, 0.29, 29),
        # Never 0: floor(0.25 * 1) = 0 -> 1, floor(0.25 * 3) = 0 -> 1, floor(0.5 * 1) = 0 -> 1.
        (1, 0.25, 1), (3, 0.25, 1), (1, 0.5, 1), (1, 0.75, 1),
    ],
)
def test_ratio_ablation_floor(k, ratio, expected):
    assert poet_length(k, k + 5, ratio) == expected
    assert poet_length(k + 5, k, ratio) == expected
    assert scored_lengths(k, k + 5, poet=True, ratio=ratio) == (expected, expected)
    c, r = truncate_pair(list(range(k)), list(range(100, 105 + k)), ratio)
    assert c == list(range(expected)) and r == list(range(100, 100 + expected))


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_invalid_ratio_raises(ratio):
    with pytest.raises(ValueError):
        poet_length(4, 6, ratio)
    with pytest.raises(ValueError):
        truncate_pair([1, 2, 3, 4], [1, 2, 3, 4, 5, 6], ratio)
    with pytest.raises(ValueError):
        scored_lengths(4, 6, poet=True, ratio=ratio)


@pytest.mark.parametrize("lengths", [(0, 5), (5, 0), (0, 0), (-1, 3)])
def test_empty_response_raises(lengths):
    with pytest.raises(ValueError):
        poet_length(*lengths)


def test_scored_lengths_without_poet_returns_full_lengths():
    assert scored_lengths(4, 9, poet=False) == (4, 9)
    assert scored_lengths(9, 4, poet=False) == (9, 4)
    assert scored_lengths(7, 7, poet=False, ratio=0.5) == (7, 7)  # the ratio only matters under POET
    assert scored_lengths(4, 9, poet=True) == (4, 4)


@settings(max_examples=300, deadline=None)
@given(
    chosen_len=st.integers(1, 5000),
    rejected_len=st.integers(1, 5000),
    ratio=st.one_of(
        st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        st.integers(1, 100).map(lambda i: i / 100),  # two-decimal ratios in (0, 1]
    ),
)
def test_poet_length_matches_reference(chosen_len, rejected_len, ratio):
    k = poet_length(chosen_len, rejected_len, ratio)
    assert k == ref.poet_k(chosen_len, rejected_len, ratio)
    assert 1 <= k <= min(chosen_len, rejected_len)


@settings(max_examples=100, deadline=None)
@given(
    chosen=st.lists(st.integers(0, 50_000), min_size=1, max_size=64),
    rejected=st.lists(st.integers(0, 50_000), min_size=1, max_size=64),
    ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
def test_truncate_pair_matches_reference(chosen, rejected, ratio):
    c, r = truncate_pair(chosen, rejected, ratio)
    assert (c, r) == ref.poet_cut(chosen, rejected, ratio)
    assert len(c) == len(r)
    assert chosen[: len(c)] == c and rejected[: len(r)] == r  # prefixes, nothing added


def test_poet_stats_count_pairs_whose_cut_prefixes_are_identical():
    """A pair whose shorter response is a prefix of the longer one has equal scored prefixes after POET's cut:
    its margin is 0 whatever the model (no signal). `--poet-ratio` makes more such pairs: here r = 0.5 keeps
    max(1, floor(0.5 * 4)) = 2 tokens, and the second pair's first 2 tokens agree."""
    import numpy as np

    from poet_mlx.batching import pair_set, poet_stats
    from poet_mlx.config import LossConfig
    from poet_mlx.data.tokenization import TokenizedPair

    a = lambda *v: np.asarray(v, np.int32)  # noqa: E731
    pairs = [TokenizedPair(a(1), a(5, 6, 7), a(5, 6, 7, 8, 9), 0),  # rejected = chosen + more: identical at k = 3
             TokenizedPair(a(1), a(5, 6, 7, 8), a(5, 6, 9, 9, 9), 1),  # differ at the 3rd token
             TokenizedPair(a(1), a(2, 3), a(4, 3), 2)]
    stats = lambda **kw: poet_stats([pair_set(pairs, LossConfig(**kw))])  # noqa: E731
    assert stats(poet=True)["pairs_identical_after_cut"] == 1
    assert stats(poet=True, poet_ratio=0.5)["pairs_identical_after_cut"] == 2
    assert stats(poet=False)["pairs_identical_after_cut"] == 0
