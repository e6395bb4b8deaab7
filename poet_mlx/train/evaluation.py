"""Held-out preference metrics: the training objective without gradients, per pair and averaged."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..backends.parallel_rows import engaged
from ..batching import sequential_batches
from ..config import LossConfig
from ..head import output_head
from ..objective import batch_inputs, batch_objective, feeds_halves
from .distributed import World, all_sum


def evaluate(model, pair_set, objective: LossConfig, batch_size: int, pad_id: int = 0,
             progress: Optional[Callable[[int, int], None]] = None, world: World | None = None) -> tuple[dict, dict]:
    """Score every pair of `pair_set` (a trainer.PairSet) with the model in eval mode.

    In a distributed run each rank scores every size-th batch and the per-pair columns are summed across
    ranks, so every rank returns the full result.

    Returns:
        (means, per_pair): means maps TRL metric names to floats (averaged over pairs); per_pair maps the
        same names to (N,) float64 arrays in the order of `pair_set.pairs`.
    """
    world = world or World()
    model.eval()
    head, halves = output_head(model), feeds_halves(model)  # the probe's verdict is kept on the model
    n = len(pair_set)
    per_pair: dict[str, np.ndarray] = {}
    lengths = [lay.tokens for lay in pair_set.layouts]
    batches = sequential_batches(lengths, batch_size)
    mine = batches[world.rank :: world.size] if world.distributed else batches
    if world.distributed and not mine and batches:
        mine = [batches[0][:1]]  # score one pair, recorded as zeros below, to learn the metric names
        n_real = 0
    else:
        n_real = len(mine)
    done = 0
    for j, idx in enumerate(mine):
        with engaged(model, halves):  # OpenBLAS threads per stream, where the groups run side by side
            _, metrics = batch_objective(model, *batch_inputs(pair_set.batch(idx, pad_id), halves), objective, head)
            mx.eval(metrics)
        for name, values in metrics.items():
            column = per_pair.setdefault(name, np.zeros(n, np.float64))
            if j < n_real:
                column[idx] = np.asarray(values, dtype=np.float64)
        done += len(idx)
        if progress:
            progress(min(n, done * world.size), n)
    if world.distributed:
        names = sorted(per_pair)
        table = np.asarray(all_sum(mx.array(np.stack([per_pair[k] for k in names]).astype(np.float32)), world))
        per_pair = {k: table[i].astype(np.float64) for i, k in enumerate(names)}
    means = {name: float(col.mean()) for name, col in per_pair.items()} if n else {}
    return means, per_pair
