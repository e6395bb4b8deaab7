"""The run folder: checkpoints written atomically, found again for `--resume`, and the metrics log.

Layout of `--adapter-path RUN`:

    RUN/adapter_config.json        mlx-lm's adapter config (+ our settings under "poet_mlx")
    RUN/adapters.safetensors       the latest adapters (mlx_lm.generate --adapter-path RUN loads them)
    RUN/metrics.jsonl              one JSON object per report, TRL metric names
    RUN/checkpoints/step-0000100/  adapters.safetensors, optimizer.safetensors, state.json, manifest.json
    RUN/checkpoints/latest         name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, its manifest last, then renamed into place; only
then does `latest` move (atomic replace). A kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import PoetError
from .fsutil import fsync_dir, save_safetensors_atomic, write_json_atomic, write_text_atomic

KEEP_CHECKPOINTS = 3
"""Older checkpoints are deleted once a newer one is complete (LoRA checkpoints are small, but runs are long)."""

RUN_MARKERS = ("adapter_config.json", "checkpoints", "metrics.jsonl")


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def holds_run(run: Path) -> bool:
    return any((Path(run) / m).exists() for m in RUN_MARKERS)


def prepare_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told how (resume or overwrite)."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise PoetError(f"--adapter-path {run} is a file; pass a folder")
    if resume:
        if latest_checkpoint(run) is None:
            raise PoetError(f"nothing to resume in {run}: no complete checkpoint under {checkpoint_dir(run)}")
        return
    if holds_run(run):
        if not overwrite:
            raise PoetError(f"{run} already holds a training run. Pass --resume to continue it, --overwrite "
                            "to start over there, or choose another --adapter-path")
        for name in RUN_MARKERS + ("adapters.safetensors",):
            target = run / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run.mkdir(parents=True, exist_ok=True)


def save_checkpoint(run: Path, step: int, adapters: dict, optimizer_state: dict, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it. Returns its folder."""
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_safetensors_atomic(tmp / "adapters.safetensors", adapters)
        save_safetensors_atomic(tmp / "optimizer.safetensors", optimizer_state)
        write_json_atomic(tmp / "state.json", state)
        write_json_atomic(tmp / "manifest.json", {"step": step, "files": sorted(p.name for p in tmp.iterdir())})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", name + "\n")
    _prune(root, keep=KEEP_CHECKPOINTS)
    return final


def _complete(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / f).is_file() for f in files)


def latest_checkpoint(run: Path) -> Optional[Path]:
    """The newest complete checkpoint: the one `latest` names, else the newest with a full manifest."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return None
    named = root / "latest"
    if named.is_file():
        candidate = root / named.read_text().strip()
        if _complete(candidate):
            return candidate
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(adapters, optimizer_state, state) of a complete checkpoint folder."""
    import mlx.core as mx

    try:
        adapters = mx.load(str(folder / "adapters.safetensors"))
        optimizer = mx.load(str(folder / "optimizer.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise PoetError(f"checkpoint {folder} is unreadable ({exc}); delete it to resume from an older one") from None
    return adapters, optimizer, state


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, run: Path, resume_step: Optional[int] = None):
        self.path = Path(run) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise PoetError(f"no metrics.jsonl in {run}: is it a poet-mlx run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
