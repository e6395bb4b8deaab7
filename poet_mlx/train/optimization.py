"""Optimizer, learning-rate schedule and step count of a run (pure functions of the TrainConfig)."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..batching import batches_per_epoch
from ..config import TrainConfig


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    """Optimizer steps of the run: --iters, else --epochs passes of micro-batches over the accumulation."""
    if cfg.iters:
        return cfg.iters
    batches = batches_per_epoch(num_pairs, cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * batches / cfg.grad_accumulation_steps))


def lr_schedule(peak: float, steps: int, warmup_ratio: float, kind: str) -> Callable:
    """Linear warmup (first update at peak / (w + 1), not 0) then cosine/linear decay to 0, or constant."""
    warmup = int(round(warmup_ratio * steps))
    decay_steps = max(1, steps - warmup)

    def schedule(step):
        step = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(step, mx.float32)
        warm = peak * (step + 1) / (warmup + 1)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = peak * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif kind == "linear":
            decayed = peak * (1.0 - progress)
        else:
            decayed = mx.array(peak, mx.float32)
        return mx.where(step < warmup, warm, decayed)

    return schedule


def build_optimizer(cfg: TrainConfig, steps: int):
    lr = lr_schedule(cfg.learning_rate, steps, cfg.warmup_ratio, cfg.lr_schedule)
    kinds = {
        "adamw": lambda: optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay),
        "adam": lambda: optim.Adam(learning_rate=lr),
        "sgd": lambda: optim.SGD(learning_rate=lr),
        "adafactor": lambda: optim.Adafactor(learning_rate=lr),
        "lion": lambda: optim.Lion(learning_rate=lr, weight_decay=cfg.weight_decay),
        "muon": lambda: optim.Muon(learning_rate=lr),
    }
    return kinds[cfg.optimizer]()


def tree_norm(tree) -> mx.array:
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(tree)))
