"""DPO's reference log-probs: computed once, before training, with no second model in memory.

A fresh LoRA/DoRA model (B = 0) or a not-yet-trained full model equals its base, so the policy model itself
scores the reference before the first update. The per-token log-probs of every full response are kept (not
only sums): any POET cut k is then a prefix sum, and the prefix-level evaluation reuses them. They are cached
on disk, keyed by the model's files and the exact token ids, so a second run on the same data skips the pass.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..batching import layout, make_batch, sequential_batches
from ..data.tokenization import TokenizedPair
from ..fsutil import atomic_path

TokenLogps = list[tuple[np.ndarray, np.ndarray]]
"""Per pair: (chosen, rejected) float32 per-token log-probs over the full responses."""


def cache_dir() -> Path:
    return Path(os.environ.get("POET_MLX_CACHE", Path.home() / ".cache" / "poet-mlx")) / "reference"


def model_fingerprint(model_path: str | Path) -> str:
    """Identity of a model folder: config and the name, size and mtime of each weight file."""
    path = Path(model_path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """Identity of tokenized pairs: every token id, in order."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt, p.chosen, p.rejected):
            h.update(np.int64(len(ids)).tobytes())
            h.update(ids.tobytes())
    return h.hexdigest()


def cache_key(model_path: str | Path, pairs: Sequence[TokenizedPair]) -> str:
    return hashlib.sha256((model_fingerprint(model_path) + pairs_digest(pairs)).encode()).hexdigest()[:32]


def load_cached(key: str) -> Optional[TokenLogps]:
    path = cache_dir() / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            flat, offsets = z["logps"], z["offsets"]
    except (OSError, KeyError, ValueError):
        return None  # a damaged cache entry is recomputed, never trusted
    parts = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return list(zip(parts[0::2], parts[1::2]))


def save_cached(key: str, logps: TokenLogps) -> Path:
    flat_parts = [a for pair in logps for a in pair]
    offsets = np.cumsum([0] + [len(a) for a in flat_parts]).astype(np.int64)
    path = cache_dir() / f"{key}.npz"
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, logps=np.concatenate(flat_parts).astype(np.float32), offsets=offsets)
    return path


def compute_token_logps(model, pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int = 0,
                        progress: Callable[[int, int], None] | None = None) -> TokenLogps:
    """Per-token log-probs of every full response under `model` (no gradient, eval mode)."""
    import mlx.core as mx

    from ..batching import make_feed
    from ..head import output_head
    from ..objective import response_token_logps, splits_rows

    head, split = output_head(model), splits_rows(model)
    layouts = [layout(p, poet=False) for p in pairs]
    lengths = [lay.tokens for lay in layouts]
    out: list = [None] * len(pairs)
    done = 0
    for idx in sequential_batches(lengths, batch_size):
        feed = make_feed(make_batch(pairs, idx, layouts, pad_id=pad_id), split=split)
        packed = response_token_logps(model, tuple(mx.array(g) for g in feed.groups), mx.array(feed.positions), head)
        per_row = split_rows(np.asarray(packed.astype(mx.float32)), feed.rows, 2 * len(idx))
        for j, i in enumerate(idx):
            out[i] = (per_row[j], per_row[j + len(idx)])
        done += len(idx)
        if progress:
            progress(done, len(pairs))
    return out


def split_rows(packed: np.ndarray, rows: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Packed per-position values -> one array per row, in response order (a Feed lists each row's
    positions contiguously and in order; entries of row -1 are padding)."""
    return [packed[rows == r].copy() for r in range(n_rows)]


def reference_token_logps(model, model_path, pairs, batch_size, pad_id=0, progress=None,
                          use_cache: bool = True, world=None) -> tuple[TokenLogps, bool]:
    """Cached `compute_token_logps`. Returns (logps, reused_from_cache).

    In a distributed run (`world`), the cache counts only when every rank has it; otherwise each rank scores
    its share of the pairs, the shares are gathered so every rank holds all of them, and rank 0 alone writes
    the cache.
    """
    from .distributed import World, all_sum, gather_ragged

    world = world or World()
    key = cache_key(model_path, pairs)
    cached = load_cached(key) if use_cache else None
    cached = cached if cached is not None and len(cached) == len(pairs) else None
    if world.distributed:
        import mlx.core as mx

        everywhere = all_sum(mx.array([int(cached is not None)], mx.int32), world).item() == world.size
        cached = cached if everywhere else None
    if cached is not None:
        return cached, True
    if world.distributed:
        mine = list(range(world.rank, len(pairs), world.size))
        part = compute_token_logps(model, [pairs[i] for i in mine], batch_size, pad_id, progress)
        logps = gather_ragged(dict(zip(mine, part)), [(len(p.chosen), len(p.rejected)) for p in pairs], world)
    else:
        logps = compute_token_logps(model, pairs, batch_size, pad_id, progress)
    if use_cache and pairs and world.is_main:
        try:
            save_cached(key, logps)
        except OSError:
            pass  # a read-only or full cache folder costs a recomputation next time, nothing more
    return logps, False
