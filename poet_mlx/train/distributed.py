"""Data parallelism over MLX's own distributed layer (`mx.distributed`, started by `mlx.launch`).

Every rank holds the whole model; each global batch is split into per-rank shards; gradients are averaged
with an all-reduce, so all ranks apply the same update and keep identical weights. Everything here is a
no-op on one process (`size == 1`), so the single-machine path pays nothing.

Shards may be unequal (the last batch of an epoch): gradients and metrics are weighted by each rank's
share of pairs, which makes the update exactly the single-process one for any split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import PoetError


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join the job `mlx.launch` started (a single-process World otherwise)."""
    group = mx.distributed.init()
    return World(group.rank(), group.size(), group)


def shard(indices: Sequence[int], world: World) -> list[int]:
    """This rank's contiguous share of a batch: sizes differ by at most one pair across ranks."""
    n, size, rank = len(indices), world.size, world.rank
    start = rank * n // size
    stop = (rank + 1) * n // size
    return list(indices[start:stop])


def all_sum(x: mx.array, world: World) -> mx.array:
    if not world.distributed:
        return x
    # The CPU stream: the ring backend runs there, and it keeps results identical across ranks.
    return mx.distributed.all_sum(x, group=world.group, stream=mx.cpu)


def weighted_average_tree(tree, weight: float, world: World):
    """sum_r weight_r * tree_r over ranks, where the weights sum to 1 (each rank's share of the pairs).

    All leaves travel in one flat float32 buffer: one all-reduce per call instead of one per leaf (a LoRA
    model has hundreds of leaves, and each ring all-reduce pays a network round trip).
    """
    if not world.distributed:
        return tree
    leaves = tree_flatten(tree)
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) * weight for _, v in leaves])
    flat = all_sum(flat, world)
    out, start = [], 0
    for key, v in leaves:
        out.append((key, flat[start : start + v.size].reshape(v.shape).astype(v.dtype)))
        start += v.size
    return tree_unflatten(out)


def broadcast_tree(tree, world: World):
    """Rank 0's values of a tree of arrays on every rank (others contribute zeros of the same shapes)."""
    if not world.distributed:
        return tree
    return tree_map(lambda a: all_sum(a if world.is_main else mx.zeros_like(a), world), tree)


def broadcast_json(obj, world: World):
    """Rank 0's JSON-serialisable object on every rank."""
    if not world.distributed:
        return obj
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8) if world.is_main else np.zeros(0, np.uint8)
    length = int(all_sum(mx.array([len(data)], mx.int32), world).item())
    buf = np.zeros(length, np.int32)
    if world.is_main:
        buf[:] = data
    out = np.asarray(all_sum(mx.array(buf), world)).astype(np.uint8).tobytes()
    return json.loads(out.decode())


def gather_ragged(local: dict[int, tuple[np.ndarray, np.ndarray]], lengths: Sequence[tuple[int, int]],
                  world: World) -> list[tuple[np.ndarray, np.ndarray]]:
    """Assemble per-pair (chosen, rejected) float32 arrays computed by different ranks, on every rank.

    Args:
        local: pair position -> arrays this rank computed.
        lengths: (len_chosen, len_rejected) of every pair, known to all ranks.
    """
    sizes = [n for pair in lengths for n in pair]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.zeros(int(offsets[-1]), np.float32)
    for i, (c, r) in local.items():
        flat[offsets[2 * i] : offsets[2 * i + 1]] = c
        flat[offsets[2 * i + 1] : offsets[2 * i + 2]] = r
    flat = np.asarray(all_sum(mx.array(flat), world))
    return [(flat[offsets[2 * i] : offsets[2 * i + 1]].copy(), flat[offsets[2 * i + 1] : offsets[2 * i + 2]].copy())
            for i in range(len(lengths))]


def check_same_everywhere(label: str, fingerprint: Callable[[], str], world: World) -> None:
    """Raise on every rank, naming the odd ones out, when ranks disagree on `fingerprint()`.

    The fingerprint is a callable so a single process never pays for it (hashing every token id).
    """
    if not world.distributed:
        return
    digest = np.frombuffer(hashlib.sha256(fingerprint().encode()).digest()[:8], dtype=np.uint8).astype(np.int32)
    table = np.zeros((world.size, digest.size), np.int32)
    table[world.rank] = digest
    table = np.asarray(all_sum(mx.array(table), world))
    differ = [r for r in range(world.size) if not np.array_equal(table[r], table[0])]
    if differ:
        raise PoetError(f"ranks {', '.join(map(str, differ))} disagree with rank 0 on the {label}; every machine "
                        "must run the same poet-mlx version, config and data (copy the data and model folders "
                        "to the same paths, or use the same hub ids)")


def check_batch_divides(batch_size: int, world: World) -> None:
    if world.distributed and batch_size % world.size:
        raise PoetError(f"--batch-size {batch_size} (the global batch) does not divide by the {world.size} ranks; "
                        f"use a multiple of {world.size}, e.g. {world.size * max(1, batch_size // world.size)}")
