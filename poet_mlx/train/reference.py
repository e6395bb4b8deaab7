"""DPO's reference log-probs: computed once, before training, with no second model in memory.

A fresh LoRA/DoRA model (B = 0) or a not-yet-trained full model equals its base, so the policy model itself
scores the reference before the first update. The per-token log-probs of every full response are kept (not
only sums): any POET cut k is then a prefix sum, and the prefix-level evaluation reuses them. They are cached
on disk, keyed by the content of the model's files, the mlx / mlx-lm / poet-mlx versions and the exact token
ids, so a second run on the same data skips the pass.
"""

from __future__ import annotations

import gc
import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..adapters import adapters_disabled, has_adapters
from ..batching import TokenLogps
from ..config import RunConfig
from ..data.tokenization import TokenizedPair, pad_id
from ..errors import PoetError
from ..fsutil import atomic_path, cache_root
from ..models import load_model
from ..reporting import Reporter
from ..scoring import pair_token_logps

REFERENCE_BATCH = 8
"""Pairs per forward of the reference pass."""


def cache_dir() -> Path:
    return cache_root() / "reference"


def model_fingerprint(model_path: str | Path) -> str:
    """Identity of a model folder: its config and the full content of each weight file (a weight file changed
    in place, or copied over with its old size and mtime, gets a new key)."""
    path = Path(model_path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def software_versions() -> str:
    """mlx, mlx-lm and poet-mlx versions: a fix in how log-probs are computed (the head path, a kernel) must
    not reuse numbers cached before it."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "?"

    return f"mlx={of('mlx')} mlx-lm={of('mlx-lm')} poet-mlx={__version__}"


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """Identity of tokenized pairs: every token id, in order."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt, p.chosen, p.rejected):
            h.update(np.int64(len(ids)).tobytes())
            h.update(ids.tobytes())
    return h.hexdigest()


def cache_key(model_path: str | Path, pairs: Sequence[TokenizedPair], init_adapter: Optional[str] = None) -> str:
    """Model weights and config, software versions, the exact token ids, and the adapter the policy starts
    from (`--init-adapter`: then the reference is base + that adapter)."""
    parts = (model_fingerprint(model_path), software_versions(), pairs_digest(pairs))
    if init_adapter:
        from ..export.peft_import import adapter_fingerprint

        parts += (f"init_adapter={adapter_fingerprint(init_adapter)}",)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


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


def reference_token_logps(model, model_path, pairs, batch_size, pad_id=0, progress=None,
                          use_cache: bool = True, world=None, init_adapter=None) -> tuple[TokenLogps, bool]:
    """Cached `scoring.pair_token_logps` (log-probs only). Returns (logps, reused_from_cache).

    In a distributed run (`world`), the cache counts only when every rank has it; otherwise each rank scores
    its share of the pairs, the shares are gathered so every rank holds all of them, and rank 0 alone writes
    the cache.
    """
    from .distributed import World, all_sum, gather_ragged

    world = world or World()
    key = cache_key(model_path, pairs, init_adapter)
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
        part, _ = pair_token_logps(model, [pairs[i] for i in mine], batch_size, pad_id, progress=progress)
        logps = gather_ragged(dict(zip(mine, part)), [(len(p.chosen), len(p.rejected)) for p in pairs], world)
    else:
        logps, _ = pair_token_logps(model, pairs, batch_size, pad_id, progress=progress)
    if use_cache and pairs and world.is_main:
        try:
            save_cached(key, logps)
        except OSError:
            pass  # a read-only or full cache folder costs a recomputation next time, nothing more
    return logps, False


def fill_reference(sets, cfg: RunConfig, policy, policy_path, tokenizer, reporter: Reporter, world=None) -> None:
    """Reference per-token log-probs for every PairSet in `sets` (DPO family only).

    With no --ref-model the policy scores them now, before any update, when it still equals the base.
    """
    model, path = policy, policy_path
    if cfg.model.ref_model:
        reporter.phase("loading reference model", 0, None)
        model, ref_tok, path = load_model(cfg.model.ref_model, trust_remote_code=cfg.model.trust_remote_code)
        if ref_tok.vocab_size != tokenizer.vocab_size:
            raise PoetError(f"--ref-model {cfg.model.ref_model} has a different vocabulary "
                            f"({ref_tok.vocab_size} vs {tokenizer.vocab_size}); it must share the tokenizer")
        reporter.phase("loading reference model", 1, 1)
    # The policy scores base + --init-adapter only once that adapter is attached (train), not in eval
    init_adapter = cfg.lora.init_adapter if model is policy and has_adapters(policy) else None
    # Fresh adapters add exactly nothing (LoRA's B is zero): the base itself is scored, without the adapters'
    # compute (SmolLM2, 16 adapted layers, 16 pairs of 512 tokens, alternating runs: 28.8-29.9 -> 26.6-27.7 s,
    # the same first loss) and, for DoRA, without the rounding of its magnitude vector.
    base = model is policy and init_adapter is None
    was_training = getattr(model, "training", False)
    model.eval()
    with adapters_disabled(model) if base else nullcontext():
        for name, s in sets.items():
            label = f"reference log-probs ({name})"
            reporter.phase(label, 0, len(s))
            s.ref, reused = reference_token_logps(model, path, s.pairs, REFERENCE_BATCH, pad_id(tokenizer),
                                                  progress=lambda d, t: d < t and reporter.phase(label, d, t),
                                                  world=world, init_adapter=init_adapter)
            reporter.phase(label, len(s), len(s), note="reused from cache" if reused else "computed")
    if model is not policy:
        del model
        gc.collect()
    elif was_training:
        policy.train()
