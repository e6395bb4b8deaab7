"""Tokenized pairs -> padded model batches, with POET's cut and length-aware ordering.

A batch of B pairs is one (2B, L) token array: the B chosen sequences, then the B rejected ones, each
prompt + response (cut by POET) and right-padded to L, a multiple of `pad_multiple`. Batches are drawn from
windows of similar lengths, so padding stays small and the compiled step meets few distinct shapes.

The model is fed a `Feed` of the batch: its rows sorted by length and cut into two halves padded apart (a
chosen response and its rejected one often differ in length by 3x; on the benchmark's data this takes padding
from 0.31 to 0.20, and each half's backward pass holds half the temporaries), plus the packed list of
response positions, the only places where the vocabulary is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .data.tokenization import TokenizedPair
from .poet import scored_lengths

PAD_MULTIPLE = 32
PACK_MULTIPLE = 128
WINDOW_BATCHES = 64
"""Batches per sorting window: larger means less padding, smaller means more random batch mixes."""


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """How one pair is fed: response tokens kept in the sequences and response tokens scored."""

    prompt_len: int
    keep_chosen: int
    keep_rejected: int
    score_chosen: int
    score_rejected: int

    @property
    def tokens(self) -> int:
        return 2 * self.prompt_len + self.keep_chosen + self.keep_rejected


def layout(pair: TokenizedPair, poet: bool, ratio: float = 1.0, full_chosen: bool = False) -> Layout:
    """The POET cut of one pair. `full_chosen` keeps the whole chosen response (SimPO's SFT term needs it);
    only the first k tokens are still scored for the preference."""
    n_c, n_r = len(pair.chosen), len(pair.rejected)
    score_c, score_r = scored_lengths(n_c, n_r, poet, ratio)
    return Layout(len(pair.prompt), n_c if full_chosen else score_c, score_r, score_c, score_r)


TokenLogps = list[tuple[np.ndarray, np.ndarray]]
"""Per pair: (chosen, rejected) float32 per-token log-probs over the full responses (`scoring`)."""


def pad_rows(rows: Sequence[np.ndarray], pad_id: int = 0, pad_multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """1-D token rows -> (N, L) int32, right-padded with `pad_id` to L = the longest rounded up to
    `pad_multiple` (few distinct widths, so compiled steps are reused)."""
    tokens = np.full((len(rows), round_up(max(len(r) for r in rows), pad_multiple)), pad_id, dtype=np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r)] = r
    return tokens


@dataclass
class PairBatch:
    """Arrays for one forward over [chosen; rejected] (numpy; the trainer moves them to MLX).

    tokens: (2B, L) int32; starts: (2B,) target position of the first response token (prompt_len - 1);
    score_lens: (2B,) scored response tokens; keep_lens: (2B,) response tokens present in `tokens`;
    ref_logps: (2B,) reference log-prob sums over the scored tokens, or None; indices: (B,) pair positions.
    """

    tokens: np.ndarray
    starts: np.ndarray
    score_lens: np.ndarray
    keep_lens: np.ndarray
    ref_logps: Optional[np.ndarray]
    indices: np.ndarray

    @property
    def real_tokens(self) -> int:
        return int((self.starts + 1).sum() + self.keep_lens.sum())

    @property
    def scored_tokens(self) -> int:
        return int(self.score_lens.sum())


def reference_sum(token_logps: np.ndarray, n_score: int, shared: int, ld_alpha: Optional[float] = None) -> float:
    """The reference's sum over the first n_score tokens; under LD-DPO (ld_alpha) the tokens from `shared` (the
    shorter response's length) on count ld_alpha times, as the policy's do (`objective.row_sums`)."""
    if ld_alpha is None:
        return float(token_logps[:n_score].sum())
    return float(token_logps[: min(shared, n_score)].sum() + ld_alpha * token_logps[shared:n_score].sum())


def make_batch(pairs: Sequence[TokenizedPair], indices: Sequence[int], layouts: Sequence[Layout],
               ref_token_logps=None, pad_id: int = 0, pad_multiple: int = PAD_MULTIPLE,
               ld_alpha: Optional[float] = None) -> PairBatch:
    """Assemble the pairs at `indices` into a PairBatch.

    Args:
        ref_token_logps: per-pair (chosen, rejected) float32 arrays of the reference's per-token log-probs
            over the full responses, or None (reference-free losses). Sums are taken over the scored prefix
            (`reference_sum`, LD-weighted under ld_alpha).
    """
    rows, starts, score, keep, ref = [], [], [], [], []
    for side in ("chosen", "rejected"):
        for i in indices:
            p, lay = pairs[i], layouts[i]
            n_keep = lay.keep_chosen if side == "chosen" else lay.keep_rejected
            n_score = lay.score_chosen if side == "chosen" else lay.score_rejected
            rows.append(np.concatenate([p.prompt, getattr(p, side)[:n_keep]]))
            starts.append(lay.prompt_len - 1)
            score.append(n_score)
            keep.append(n_keep)
            if ref_token_logps is not None:
                shared = min(lay.score_chosen, lay.score_rejected)
                ref.append(reference_sum(ref_token_logps[i][0 if side == "chosen" else 1], n_score, shared, ld_alpha))
    return PairBatch(
        tokens=pad_rows(rows, pad_id, pad_multiple),
        starts=np.asarray(starts, np.int32),
        score_lens=np.asarray(score, np.int32),
        keep_lens=np.asarray(keep, np.int32),
        ref_logps=np.asarray(ref, np.float32) if ref_token_logps is not None else None,
        indices=np.asarray(indices, np.int64),
    )


@dataclass
class Feed:
    """What the forward of one PairBatch consumes.

    groups: (n_g, L_g) int32 token arrays: the batch's rows sorted by length, in two halves (`row_groups`);
    positions: (R,) int32 flat indices into the targets of all groups (each group's (n_g, L_g - 1) target
        grid, flattened, the grids concatenated in group order) of every kept response token, each group's
        padded to `packed_size` with the group's first index (`group_positions` splits them by group);
    rows: (R,) int32 the batch row (0..2B-1, chosen then rejected) of each position, -1 for padding;
    offsets: (R,) int32 each position's place in its response (0 = first response token).
    """

    groups: tuple
    positions: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray

    @property
    def fed_tokens(self) -> int:
        return int(sum(g.size for g in self.groups))

    @property
    def group_positions(self) -> tuple:
        """`positions` split by group, each index into its own group's (n_g, L_g - 1) target grid: one (R_g,)
        int32 array per group, which together list the same targets in the same order."""
        sizes = [g.shape[0] * (g.shape[1] - 1) for g in self.groups]
        bases = np.cumsum([0] + sizes)
        group = np.searchsorted(bases, self.positions, side="right") - 1  # padding points into its own group
        return tuple((self.positions[group == g] - bases[g]).astype(np.int32) for g in range(len(sizes)))


def packed_size(n: int) -> int:
    """n rounded up to a multiple of PACK_MULTIPLE, then of a quarter of its power of two: few distinct sizes
    (so compiled steps are reused), at most ~25% padding."""
    step = max(PACK_MULTIPLE, 1 << max(0, n.bit_length() - 3))
    return max(step, round_up(n, step))


def row_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """Rows (indices into `lengths`) sorted by length, in two halves (one group for a single row).

    Each half is padded to its own longest row, and the backward pass of a half holds half the temporaries:
    on the benchmark's tiny model (batch 4, length 256), a whole epoch took the same time as one (2B, L) array
    with a 9% lower peak. One row per group was leaner still (14%) but 25% slower over the epoch, every new
    combination of widths costing a retrace of the compiled step.
    """
    order = np.argsort(lengths, kind="stable")
    half = len(order) // 2
    return [order[:half], order[half:]] if half else [order]


def make_feed(batch: PairBatch, pad_multiple: int = PAD_MULTIPLE, halves: bool = True) -> Feed:
    """The Feed of `batch`; `halves=False` keeps all rows in one group (the plain (2B, L) array)."""
    return feed_rows(batch.tokens, batch.starts, batch.keep_lens, pad_multiple, halves)


def feed_rows(tokens: np.ndarray, starts: np.ndarray, keep_lens: np.ndarray, pad_multiple: int = PAD_MULTIPLE,
              halves: bool = True) -> Feed:
    """The Feed of right-padded rows.

    Args:
        tokens: (N, L) int32; starts: (N,) target position of each row's first response token;
        keep_lens: (N,) response tokens present in each row (the packed positions cover exactly these).
    """
    lengths = starts + 1 + keep_lens  # (N,) real tokens per row
    groups = row_groups(lengths) if halves else [np.arange(len(lengths))]
    arrays, positions, rows, offsets, base = [], [], [], [], 0
    for members in groups:
        width = round_up(int(lengths[members].max()), pad_multiple)
        arrays.append(np.ascontiguousarray(tokens[members, :width]))
        start = len(positions)
        for j, r in enumerate(members):
            n = int(keep_lens[r])
            positions.append(base + j * (width - 1) + int(starts[r]) + np.arange(n))
            rows.append(np.full(n, r))
            offsets.append(np.arange(n))
        # Each group's positions are padded on their own (to a few sizes: one compiled trace serves many
        # batches), pointing at the group's first target, so that each group's share is a contiguous slice.
        real = int(sum(len(p) for p in positions[start:]))
        pad = packed_size(real) - real
        positions.append(np.full(pad, base))
        rows.append(np.full(pad, -1))
        offsets.append(np.zeros(pad, np.int64))
        base += len(members) * (width - 1)
    return Feed(
        groups=tuple(arrays),
        positions=np.concatenate(positions).astype(np.int32),
        rows=np.concatenate(rows).astype(np.int32),
        offsets=np.concatenate(offsets).astype(np.int32),
    )


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of pair positions for one epoch: every pair exactly once, deterministic in (seed, epoch).

    Pairs are shuffled, sorted by length inside windows of WINDOW_BATCHES batches, cut into batches, and the
    batches shuffled again, so each batch holds similar lengths while the order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * WINDOW_BATCHES
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [list(map(int, chunk[b : b + batch_size])) for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_per_epoch(n_pairs: int, batch_size: int) -> int:
    """len(epoch_batches(...)) without building them: windows hold whole batches, so only the last is short."""
    return max(1, -(-n_pairs // batch_size))


def sequential_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: sorted by length (little padding), each pair once; callers restore input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def padding_fraction(batch: PairBatch, halves: bool = True) -> float:
    """Share of the tokens fed to the model (`make_feed`'s groups) that is padding."""
    return 1.0 - batch.real_tokens / make_feed(batch, halves=halves).fed_tokens


@dataclass
class PairSet:
    """Tokenized pairs with their POET layouts and (DPO) reference per-token log-probs."""

    pairs: Sequence[TokenizedPair]
    layouts: Sequence[Layout]
    ref: Optional[TokenLogps] = None
    ld_alpha: Optional[float] = None
    """LD-DPO's weight of the tokens beyond the shorter response (None: no weighting)."""

    def __len__(self):
        return len(self.pairs)

    def batch(self, indices, pad_id: int) -> PairBatch:
        return make_batch(self.pairs, indices, self.layouts, self.ref, pad_id=pad_id, ld_alpha=self.ld_alpha)


def pair_set(pairs: Sequence[TokenizedPair], loss) -> PairSet:
    """A PairSet of `pairs` with the POET layouts of `loss` (a `config.LossConfig`); reference filled in later."""
    layouts = [layout(p, loss.poet, loss.poet_ratio, loss.needs_full_chosen) for p in pairs]
    return PairSet(pairs, layouts, ld_alpha=getattr(loss, "ld_alpha", None))


def poet_stats(pair_sets) -> dict:
    """Response tokens per pair without and with the cut (what POET saves on this data), and the pairs whose
    scored prefixes are identical token for token (one response starts with the other): they carry no signal."""
    full = sum(len(p.chosen) + len(p.rejected) for s in pair_sets for p in s.pairs)
    kept = sum(lay.keep_chosen + lay.keep_rejected for s in pair_sets for lay in s.layouts)
    cut = sum(1 for s in pair_sets for p, lay in zip(s.pairs, s.layouts)
              if lay.keep_chosen < len(p.chosen) or lay.keep_rejected < len(p.rejected))
    # A pair whose scored prefixes are the same tokens has a margin of exactly 0 whatever the model: no signal.
    same = sum(1 for s in pair_sets for p, lay in zip(s.pairs, s.layouts) if lay.score_chosen == lay.score_rejected
               and np.array_equal(p.chosen[: lay.score_chosen], p.rejected[: lay.score_rejected]))
    n = max(1, sum(len(s) for s in pair_sets))
    return {"pairs_cut_by_poet": cut, "pairs_identical_after_cut": same, "response_tokens_per_pair": full / n,
            "scored_tokens_per_pair": kept / n, "poet_token_saving": 1.0 - kept / max(1, full)}
