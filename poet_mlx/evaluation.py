"""Held-out preference metrics: the training objective without gradients, per pair and averaged."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .batching import sequential_batches
from .objective import Objective, batch_objective


def evaluate(model, pair_set, objective: Objective, batch_size: int, pad_id: int = 0,
             progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict, dict]:
    """Score every pair of `pair_set` (a trainer.PairSet) with the model in eval mode.

    Returns:
        (means, per_pair): means maps TRL metric names to floats (averaged over pairs); per_pair maps the
        same names to (N,) float64 arrays in the order of `pair_set.pairs`.
    """
    model.eval()
    n = len(pair_set)
    per_pair: dict[str, np.ndarray] = {}
    lengths = [lay.tokens for lay in pair_set.layouts]
    done = 0
    for idx in sequential_batches(lengths, batch_size):
        b = pair_set.batch(idx, pad_id)
        ref = b.ref_logps if b.ref_logps is not None else np.zeros(len(b.starts), np.float32)
        _, metrics = batch_objective(model, mx.array(b.tokens), mx.array(b.starts), mx.array(b.score_lens),
                                     mx.array(b.keep_lens), mx.array(ref), objective)
        mx.eval(metrics)
        for name, values in metrics.items():
            column = per_pair.setdefault(name, np.zeros(n, np.float64))
            column[idx] = np.asarray(values, dtype=np.float64)
        done += len(idx)
        if progress:
            progress(done, n)
    means = {name: float(col.mean()) for name, col in per_pair.items()} if n else {}
    return means, per_pair
