"""Per-token log-probs (and entropies) of whole responses under a model, with no gradient.

One function serves every caller that scores given text: DPO's reference pass (`train.reference`), the
prefix curves and entropy profiles of `poet-mlx eval` (`analysis.evaluate`) and the implicit judge
(`analysis.judges`). Sequences are batched by length, fed through the same `batching` feed and
`objective.packed_logits` as training (so the numbers are the ones the loss sees), and handed back one
array per response, in input order.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np

from .batching import TokenLogps, feed_rows, pad_rows
from .data.tokenization import TokenizedPair

Progress = Optional[Callable[[int, int], None]]


def score_sequences(model, sequences: Sequence[tuple[np.ndarray, np.ndarray]], batch_rows: int, pad_id: int = 0,
                    entropy: bool = False, progress: Progress = None
                    ) -> tuple[list[np.ndarray], Optional[list[np.ndarray]]]:
    """Log-probs of every response token given its prompt, in eval mode.

    Args:
        sequences: N (prompt ids, response ids) pairs of 1-D int arrays; the prompt has >= 1 token.
        batch_rows: sequences per forward; they are sorted by length first, so a batch pads little.
        entropy: also return the next-token entropy (nats) at each response position.
        progress: called as progress(done, N) after each batch.

    Returns:
        (logps, entropies): N float32 arrays of len(response) values each (entropies None unless asked).
    """
    import mlx.core as mx

    from .backends.parallel_rows import engaged
    from .head import output_head
    from .objective import feeds_halves

    was_training = getattr(model, "training", False)
    model.eval()
    head, halves = output_head(model), feeds_halves(model)
    score = _scorer(model, head, entropy)

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    logps: list = [None] * len(sequences)
    ents: list = [None] * len(sequences) if entropy else None
    with engaged(model, halves):  # OpenBLAS threads per stream where the groups run side by side
        for b in range(0, len(order), batch_rows):
            idx = order[b : b + batch_rows]
            tokens = pad_rows([np.concatenate([sequences[i][0], sequences[i][1]]) for i in idx], pad_id)
            starts = np.asarray([len(sequences[i][0]) - 1 for i in idx], np.int32)
            keep = np.asarray([len(sequences[i][1]) for i in idx], np.int32)
            feed = feed_rows(tokens, starts, keep, halves=halves)
            groups = tuple(mx.array(g) for g in feed.groups)
            lp, *rest = score(groups, tuple(mx.array(p) for p in feed.group_positions))
            ent = rest[0] if entropy else None
            mx.eval([a for a in (lp, ent) if a is not None])
            for j, per_row in enumerate(unpack_rows(np.asarray(lp), feed.rows, len(idx))):
                logps[idx[j]] = per_row
            if entropy:
                for j, per_row in enumerate(unpack_rows(np.asarray(ent), feed.rows, len(idx))):
                    ents[idx[j]] = per_row
            if progress:
                progress(min(b + batch_rows, len(order)), len(order))
    model.train(was_training)
    return logps, ents


def _scorer(model, head, entropy: bool):
    """The compiled (groups, positions) -> (log-probs,) or (log-probs, entropies) of `score_sequences`, each
    (R,): the model's state is its input, so later weights are seen; MLX fuses the elementwise ops, which on the
    Linux CPU backend is what makes them vectorized (`backends.jit`); one trace per shape."""
    import mlx.core as mx

    from .logprobs import per_token_logps, token_entropy
    from .backends.parallel_rows import each_group
    from .objective import group_hidden, group_targets, packed_logits, packed_targets

    def values(logits, targets):  # (M, V), (M,) -> (log-probs,) or (log-probs, entropies), (M,) each
        lp = per_token_logps(logits[None], targets[None])[0]
        return (lp, token_entropy(logits[None])[0]) if entropy else (lp,)

    @partial(mx.compile, inputs=model.state)
    def score(groups, positions):
        if head is None:
            return values(packed_logits(model, groups, positions), packed_targets(groups, positions))
        hidden, streams = group_hidden(model, groups, positions)  # each group on its own stream where split
        targets = group_targets(groups, positions)
        parts = each_group(streams, lambda h, t: head_values(head, h, t, values, entropy), hidden, targets)
        return tuple(mx.concatenate(column) for column in zip(*parts))  # (R,) each

    return score


def pair_token_logps(model, pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int = 0,
                     entropy: bool = False, progress: Progress = None
                     ) -> tuple[TokenLogps, Optional[TokenLogps]]:
    """`score_sequences` of both full responses of every pair (no POET cut), regrouped per pair.

    Args:
        batch_size: pairs per forward (2 * batch_size sequences).
        progress: called as progress(pairs done, pairs).

    Returns:
        (logps, entropies): per pair (chosen, rejected) float32 arrays; entropies None unless asked.
    """
    sequences = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    report = (lambda d, t: progress(d // 2, t // 2)) if progress else None
    logps, ents = score_sequences(model, sequences, 2 * batch_size, pad_id, entropy, report)

    def regroup(values):
        return None if values is None else list(zip(values[0::2], values[1::2]))

    return regroup(logps), regroup(ents)


def head_values(head, hidden, targets, values, entropy: bool) -> tuple:
    """(log-probs,) or (log-probs, entropies), each (R,), of `targets` (R,) under `head(hidden)` (R, D): in
    vocabulary blocks for a linear head (`blocked_head`), else `head_in_chunks` with `values`."""
    from . import logprobs
    from .blocked_head import head_stats, linear_head

    blocked = linear_head(head)
    if blocked is None:
        return head_in_chunks(head, hidden, targets, values)
    out = head_stats(blocked, hidden, targets, logprobs.DEFAULT_CHUNK_ELEMENTS, entropy=entropy)
    return (out["logps"], out["entropy"]) if entropy else (out["logps"],)


def head_in_chunks(head, hidden, targets, values, chunk_elements: Optional[int] = None) -> tuple:
    """`values(head(hidden), targets)` computed `chunk_elements // V` rows at a time, each chunk waiting for
    the previous one, so that without a gradient a few chunks of (rows, V) logits are alive at a time (as many
    as MLX runs ahead: `backends.runahead`) instead of all R rows of them. For heads that
    `blocked_head.linear_head` does not recognize (a linear head runs in vocabulary blocks instead).

    Args:
        hidden: (R, D); targets: (R,); values: (M, V) logits, (M,) targets -> tuple of (M,) arrays.

    Returns:
        values' tuple, each (R,), concatenated over the chunks.
    """
    import mlx.core as mx

    from .logprobs import head_chunk_rows

    if hidden.shape[0] == 0:
        return values(head(hidden), targets)
    rows = head_chunk_rows(head, hidden, chunk_elements)
    parts: list = []
    for s in range(0, hidden.shape[0], rows):
        h = hidden[s : s + rows]
        if parts:
            h = mx.depends(h, list(parts[-1]))  # all of them: one left for later would keep its logits alive
        parts.append(values(head(h), targets[s : s + rows]))
    return tuple(mx.concatenate(col) if len(parts) > 1 else col[0] for col in zip(*parts))


def unpack_rows(packed: np.ndarray, rows: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Packed per-position values -> one float32 array per row, in response order (a Feed lists each row's
    positions contiguously and in order; entries of row -1 are padding)."""
    return [packed[rows == r].astype(np.float32) for r in range(n_rows)]
