"""The run folder: checkpoints written atomically, found again for `--resume`, and the metrics log.

Layout of `--adapter-path RUN`:

    RUN/adapter_config.json        mlx-lm's adapter config (+ our settings under "poet_mlx")
    RUN/adapters.safetensors       the latest adapters (mlx_lm.generate --adapter-path RUN loads them)
    RUN/metrics.jsonl              one JSON object per report, TRL metric names
    RUN/checkpoints/step-0000100/  adapters.safetensors, optimizer.safetensors, state.json, manifest.json
    RUN/checkpoints/latest         name of the newest complete checkpoint (a hint; see latest_checkpoint)

A checkpoint is written into a hidden temporary folder, its manifest (file names and sizes) last, then
renamed into place; only then does `latest` move. A kill at any moment, even inside a save, leaves every
earlier checkpoint intact; the temporary leftovers of a killed save are removed by the next save.

A folder "holds a run" once it has adapters or a checkpoint. A start that died before its first checkpoint
(adapter_config.json and metrics.jsonl only) holds nothing worth keeping: the next start replaces it.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from ..adapters import ADAPTER_CONFIG
from ..errors import PoetError
from ..fsutil import fsync_dir, save_safetensors_atomic, write_json_atomic, write_text_atomic

KEEP_CHECKPOINTS = 3
"""Older checkpoints are deleted once a newer one is complete (LoRA checkpoints are small, but runs are long)."""

RUN_MARKERS = ("adapter_config.json", "checkpoints", "metrics.jsonl")
ADAPTERS = "adapters.safetensors"
TEST_SAVE_DELAY = "POET_MLX_TEST_SAVE_DELAY"
"""Test-only: seconds to sleep after each file of a checkpoint, so a test can kill a process inside a save."""


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def resume_command(run: Path) -> str:
    return f"poet-mlx train --adapter-path {shlex.quote(str(run))} --resume"


def holds_run(run: Path) -> bool:
    """Whether `run` holds work worth keeping: adapters, or a (possibly incomplete) checkpoint folder."""
    run = Path(run)
    return (run / ADAPTERS).exists() or any(checkpoint_dir(run).glob("step-*"))


def _leftovers(run: Path) -> list[Path]:
    """Files of a start that never reached a checkpoint (only meaningful when not holds_run)."""
    return [Path(run) / m for m in RUN_MARKERS if (Path(run) / m).exists()]


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told how (resume or overwrite). Writes nothing."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise PoetError(f"--adapter-path {run} is a file; pass a folder")
    if resume:
        if latest_checkpoint(run) is None:
            why = ("the run stopped before its first checkpoint; start it again without --resume"
                   if run.is_dir() and not holds_run(run) else
                   f"no complete checkpoint under {checkpoint_dir(run)}")
            raise PoetError(f"nothing to resume in {run}: {why}")
        return
    if holds_run(run) and not overwrite:
        raise PoetError(f"{run} already holds a training run. Pass --resume to continue it, --overwrite "
                        "to start over there, or choose another --adapter-path")


def prepare_run_folder(run: Path, resume: bool, overwrite: bool) -> list[str]:
    """Check (as check_run_folder), then clear what a new run replaces and create the folder.

    Call it once everything that can fail on the user's input (data, model) has loaded, so that a failed
    start neither half-writes the folder nor, with --overwrite, deletes the previous run for nothing.

    Returns:
        Notes for the user (e.g. leftovers of an unfinished start were replaced).
    """
    run = Path(run)
    check_run_folder(run, resume, overwrite)
    notes = []
    if not resume:
        replaced = holds_run(run)
        old = _leftovers(run) + ([run / ADAPTERS] if (run / ADAPTERS).exists() else [])
        for target in old:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        if old and not replaced:
            notes.append(f"{run} held the files of a start that never reached a checkpoint; they were replaced")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PoetError(f"cannot create the run folder {run}: {exc.strerror or exc}; choose another "
                        "--adapter-path") from None
    return notes


def discard_unfinished_start(run: Path, created: bool) -> None:
    """After a failed new run: remove what it wrote if it never completed a checkpoint.

    `created`: whether this run created the folder (then an emptied folder is removed too).
    """
    run = Path(run)
    if not run.is_dir() or holds_run(run):
        return
    for target in _leftovers(run):
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    if created and not any(run.iterdir()):
        run.rmdir()


# ---------------------------------------------------------------------------------------------- save


def all_finite(arrays: dict) -> list[str]:
    """Names of the arrays in `arrays` that hold NaN or inf (empty when all are finite)."""
    import mlx.core as mx

    checks = {k: mx.isfinite(v).all() for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.inexact)}
    mx.eval(list(checks.values()))
    return [k for k, ok in checks.items() if not ok.item()]


def _clean_temporaries(run: Path) -> None:
    """Remove what a killed save left: hidden checkpoint folders and atomic-write temporaries."""
    root = checkpoint_dir(run)
    for tmp in list(root.glob(".tmp-step-*")) + list(root.glob(".old-step-*")):
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in (Path(run), root):
        for tmp in folder.glob(".*.tmp*"):  # fsutil.atomic_path names: .NAME.XXXX.tmp[.suffix]
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _test_delay() -> None:
    delay = os.environ.get(TEST_SAVE_DELAY)
    if delay:
        time.sleep(float(delay))


def save_checkpoint(run: Path, step: int, adapters: dict, optimizer_state: dict, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it. Returns its folder.

    Raises:
        PoetError: the adapters or optimizer state hold NaN/inf (nothing is written); the disk is full or
            not writable (the previous checkpoints are kept, the partial one removed).
    """
    bad = all_finite(adapters) + all_finite(optimizer_state)
    if bad:
        raise PoetError(f"refusing to save checkpoint step {step}: NaN/inf in {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; {_last_good(run)}")
    root = checkpoint_dir(run)
    name = f"step-{step:07d}"
    final, tmp, old = root / name, root / f".tmp-{name}", root / f".old-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_temporaries(run)
        tmp.mkdir()
        save_safetensors_atomic(tmp / "adapters.safetensors", adapters)
        _test_delay()
        save_safetensors_atomic(tmp / "optimizer.safetensors", optimizer_state)
        _test_delay()
        write_json_atomic(tmp / "state.json", state)
        _test_delay()
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        write_json_atomic(tmp / "manifest.json", {"step": step, "files": sizes})
        if final.exists():  # re-saving a step: swap, so a kill in between still leaves one complete copy
            final.rename(old)
        tmp.rename(final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        write_text_atomic(root / "latest", name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(exc, f"checkpoint step {step}", run) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep=KEEP_CHECKPOINTS)
    return final


def _last_good(run: Path) -> str:
    last = latest_checkpoint(run)
    if last is None:
        return "there is no earlier checkpoint"
    return f"the last good checkpoint is {last} (resume with: {resume_command(run)})"


def write_error(exc: OSError, what: str, run: Path) -> PoetError:
    """A PoetError for a failed write in the run folder: disk full, read-only, permissions."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"the disk is full (no space left on the device of {run})"
        fix = "free some space"
    else:
        cause = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        fix = "make the folder writable or choose another --adapter-path"
    return PoetError(f"could not write {what}: {cause}; nothing partial was kept and {_last_good(run)}. "
                     f"To continue, {fix}")


def _manifest_files(folder: Path) -> Optional[dict]:
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else {f: None for f in files}  # older manifests: names only


def _complete(folder: Path) -> bool:
    """Every file the manifest lists is there, with the size it had when written."""
    files = _manifest_files(folder)
    if not files:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    return True


def latest_checkpoint(run: Path) -> Optional[Path]:
    """The newest complete checkpoint (by step), whatever `latest` says: a kill between a checkpoint's
    rename and the `latest` update, or a pruned or partial folder named there, must not lose or break it."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(adapters, optimizer_state, state) of a complete checkpoint folder."""
    import mlx.core as mx

    try:
        adapters = mx.load(str(folder / "adapters.safetensors"))
        optimizer = mx.load(str(folder / "optimizer.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as exc:
        raise PoetError(f"checkpoint {folder} is unreadable ({exc}); delete it to resume from an older one") from None
    return adapters, optimizer, state


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- metrics


def _parse_lines(text: str) -> list[dict]:
    """JSON records of a metrics log; a torn line (a kill during an append) is dropped."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, run: Path, resume_step: Optional[int] = None):
        self.run = Path(run)
        self.path = self.run / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [r for r in _parse_lines(self.path.read_text(encoding="utf-8", errors="replace"))
                    if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(exc, f"the metrics log {self.path}", self.run) from exc


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise PoetError(f"no metrics.jsonl in {run}: is it a poet-mlx run folder?")
    return _parse_lines(path.read_text(encoding="utf-8", errors="replace"))


def saved_config(run: Path) -> dict:
    """The flat config a run folder was started with."""
    path = Path(run) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())["poet_mlx"]["config"]
    except (OSError, ValueError, KeyError):
        raise PoetError(f"{path} is missing or has no poet_mlx settings: not a poet-mlx run folder") from None
