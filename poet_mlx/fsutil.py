"""Files: atomic writes (a reader, or a crash, sees the old file or the new one, never half of one) and the
cache folder."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """poet-mlx's cache folder: $POET_MLX_CACHE, else ~/.cache/poet-mlx (reference log-probs, the BLAS shim,
    converted models)."""
    return Path(os.environ.get("POET_MLX_CACHE", Path.home() / ".cache" / "poet-mlx"))


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically, on error it is removed.

    `suffix` keeps an extension some writers insist on (mx.save_safetensors appends ".safetensors").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_safetensors_atomic(path: str | Path, arrays: dict, metadata: dict | None = None) -> None:
    import mlx.core as mx

    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
