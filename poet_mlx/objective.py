"""The training objective on one batch: a forward over [chosen; rejected], then the preference loss.

Kept apart from the trainer so that training, evaluation and tests share exactly one definition.

The forward runs the model's trunk on the batch's row groups (`batching.Feed`), gathers the hidden states of
the response positions into one packed (R, D) array and applies the output head there only (`head.py`); with
no verified head it computes the full logits and gathers them at those positions (same numbers, more work).
Where `backends.parallel_rows` splits the trunk, the two groups run side by side, one CPU stream each, up to
the head's log-probs.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np

from .backends.parallel_rows import each_group
from .batching import PairBatch, make_feed
from .config import LossConfig
from .logprobs import head_token_logps, per_token_logps
from .losses import mixture
from .losses.pairwise import PairLogps


def model_token_logps(model, tokens: mx.array) -> mx.array:
    """(N, L) tokens -> (N, L-1) log-probs of tokens[:, 1:] under the model."""
    logits = model(tokens[:, :-1])  # (N, L-1, V)
    return per_token_logps(logits, tokens[:, 1:])


def group_hidden(model, groups, positions) -> tuple[list, list]:
    """Each group's trunk outputs at its response positions, and the stream each was computed on.

    The trunk runs each group's tokens[:, :-1]; with a trunk that `backends.parallel_rows` splits and two or more
    groups, group i runs on stream i (its gather too), else every group on the current stream (streams None).
    The model must have a verified head (`head.output_head`).

    Args:
        groups: tuple of (n_g, L_g) int32 token arrays (`batching.Feed.groups`).
        positions: tuple of (R_g,) int32 indices into each group's flattened (n_g, L_g - 1) target grid
            (`batching.Feed.group_positions`).

    Returns:
        ([(R_g, D) per group], [a stream per group] or None).
    """
    from .backends import parallel_rows

    inputs = [g[:, :-1] for g in groups]
    trunk = parallel_rows.trunk(model) if len(groups) > 1 else None
    if trunk is None:
        return [gather(model.model(x), p) for x, p in zip(inputs, positions)], None
    streams = parallel_rows.streams(len(groups))
    return each_group(streams, gather, trunk(inputs, on_streams=True), positions), streams


def gather(x: mx.array, positions: mx.array) -> mx.array:
    """(n, L, ...) -> (R, ...): the rows of x flattened over (n, L) at `positions` (R,)."""
    return x.reshape(-1, *x.shape[2:])[positions]


def packed_hidden(model, groups, positions) -> mx.array:
    """(R, D) trunk outputs at the packed response positions, the groups' in order (arguments as
    `group_hidden`)."""
    return mx.concatenate(group_hidden(model, groups, positions)[0])


def group_targets(groups, positions) -> list:
    """Each group's (R_g,) tokens that follow its response positions (arguments as `group_hidden`)."""
    return [gather(g[:, 1:], p) for g, p in zip(groups, positions)]


def packed_targets(groups, positions) -> mx.array:
    """(R,) the token that follows each packed response position (arguments as `group_hidden`)."""
    return mx.concatenate(group_targets(groups, positions))


def packed_logits(model, groups, positions, head=None) -> mx.array:
    """Logits at the packed response positions.

    Args:
        groups, positions: as `group_hidden`.
        head: the model's verified output head (`head.output_head`): only the R gathered hidden states go
            through it. None: the full forward, whose (n_g, L_g - 1, V) logits are gathered afterwards.

    Returns:
        (R, V) logits in the model's dtype.
    """
    if head is None:
        return mx.concatenate([gather(model(g[:, :-1]), p) for g, p in zip(groups, positions)])
    return head(packed_hidden(model, groups, positions))  # (R, V)


def response_token_logps(model, groups, positions, head=None, frozen_head: bool = False) -> mx.array:
    """(R,) float32 log-probs of the packed response targets (arguments as `packed_logits`).

    frozen_head: the head's weights get no gradient (`head.head_is_frozen`), so a training step computes the
    head a chunk of rows at a time (`logprobs.head_token_logps`), on each group's stream, and never holds the
    (R, V) logits.
    """
    if head is not None and frozen_head:
        hidden, streams = group_hidden(model, groups, positions)
        targets = group_targets(groups, positions)
        return mx.concatenate(each_group(streams, partial(head_token_logps, head), hidden, targets))
    targets = packed_targets(groups, positions)
    return per_token_logps(packed_logits(model, groups, positions, head)[None], targets[None])[0]


def row_sums(values: mx.array, rows: mx.array, offsets: mx.array, lengths: mx.array, shared: mx.array | None = None,
             alpha: float = 1.0) -> mx.array:
    """Per-row sums of packed values over each row's first lengths[i] response tokens; with `shared`, the
    tokens from offset shared[i] on count alpha times (LD-DPO's tail weighting).

    Args:
        values, rows, offsets: (R,) packed values, their row (-1 = padding) and place in the response.
        lengths: (N,) int32 tokens summed per row; shared: (N,) int32 or None.

    Returns:
        (N,) float32.
    """
    n = lengths.shape[0]
    inside = (rows[None, :] == mx.arange(n)[:, None]) & (offsets[None, :] < lengths[:, None])  # (N, R)
    weighted = values[None, :]
    if shared is not None:
        weighted = mx.where(offsets[None, :] < shared[:, None], weighted, alpha * weighted)  # (N, R)
    return mx.where(inside, weighted, 0.0).sum(axis=1)


def shared_lengths(score_lens: mx.array) -> mx.array:
    """(2B,) -> (2B,) the shorter response's length of each row's pair (LD-DPO's shared prefix)."""
    b = score_lens.shape[0] // 2
    shared = mx.minimum(score_lens[:b], score_lens[b:])
    return mx.concatenate([shared, shared])


def feeds_halves(model) -> bool:
    """Whether to feed a batch's rows in two halves (`batching.row_groups`): yes, except for a model whose
    layers expand their 4-bit weights on every call (`fast_quant`, Linux CPU), where a second forward
    means a second expansion of every weight (Qwen2.5-0.5B shapes, batch 1: 10.0 s per step in halves, 7.9 s in one group)."""
    from .backends.fast_quant import expands_weights

    return not expands_weights(model)


def batch_inputs(batch: PairBatch, halves: bool = True) -> tuple:
    """The arrays `batch_objective` takes after the model: (groups, positions, rows, offsets, score_lens,
    keep_lens, ref_logps), as MLX arrays; ref_logps are zeros when the batch has none (reference-free losses)."""
    feed = make_feed(batch, halves=halves)
    ref = batch.ref_logps if batch.ref_logps is not None else np.zeros(len(batch.starts), np.float32)
    return (tuple(mx.array(g) for g in feed.groups), tuple(mx.array(p) for p in feed.group_positions),
            mx.array(feed.rows), mx.array(feed.offsets), mx.array(batch.score_lens), mx.array(batch.keep_lens),
            mx.array(ref))


def metric_names(objective: LossConfig) -> list[str]:
    """The per-pair metrics `batch_objective` returns for these settings, in its order (TRL's names first)."""
    names = mixture.metric_names(objective.mixture)
    if objective.needs_reference:
        names += ["ref_logps/chosen", "ref_logps/rejected"]
    return names + ["num_tokens/chosen", "num_tokens/rejected"]


def batch_objective(model, groups, positions, rows, offsets, score_lens, keep_lens, ref_logps,
                    objective: LossConfig, head=None, frozen_head: bool = False):
    """Loss and per-pair metrics for one batch.

    Args:
        groups, positions, rows, offsets: the batch's `batching.Feed` (see `batch_inputs`).
        score_lens, keep_lens: (2B,) int32 (see `batching.PairBatch`), chosen rows then rejected rows.
        ref_logps: (2B,) float32 reference sums over the scored tokens (LD-weighted under ld_alpha; ignored by
            reference-free losses).
        head: the verified output head (`head.output_head(model)`), or None for the full forward.
        frozen_head: for a training step whose head gets no gradient (see `response_token_logps`).

    Returns:
        (scalar mean loss, dict of (B,) per-pair metrics with TRL names).
    """
    token_logps = response_token_logps(model, groups, positions, head, frozen_head)  # (R,)
    ld = objective.ld_alpha is not None
    shared = shared_lengths(score_lens) if ld else None
    logps = row_sums(token_logps, rows, offsets, score_lens, shared, objective.ld_alpha if ld else 1.0)  # (2B,)
    b = score_lens.shape[0] // 2
    counts = score_lens.astype(mx.float32)
    full = None
    if objective.needs_full_chosen:  # the NLL terms score the whole chosen response, unweighted
        full = row_sums(token_logps, rows, offsets, keep_lens)[:b]
    pairs = PairLogps(
        policy_chosen=logps[:b],
        policy_rejected=logps[b:],
        chosen_tokens=counts[:b],
        rejected_tokens=counts[b:],
        reference_chosen=ref_logps[:b],
        reference_rejected=ref_logps[b:],
        chosen_full=full,
        chosen_full_tokens=keep_lens[:b].astype(mx.float32) if full is not None else None,
    )
    losses, metrics = mixture.pair_objective(pairs, objective.mixture)
    if objective.needs_reference:
        metrics["ref_logps/chosen"] = pairs.reference_chosen
        metrics["ref_logps/rejected"] = pairs.reference_rejected
    metrics["num_tokens/chosen"] = pairs.chosen_tokens
    metrics["num_tokens/rejected"] = pairs.rejected_tokens
    return losses.mean(), metrics
