"""What every export shares: the base model a run names (its files, quantization, original hub id), and the
output folder rules: never into the run folder, never over a non-empty folder unless `force`, built in a
temporary folder next to it and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..errors import PoetError
from ..models import HUB_ID


def base_file(model: str, name: str) -> Optional[Path]:
    """A file of the base model if it is on this machine (local folder or hub cache); never downloads."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    if not HUB_ID.match(model):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, name)
    except Exception:  # a malformed cache is no reason to fail an export
        return None
    return Path(found) if isinstance(found, str) else None


def base_quantization(model: str) -> tuple[Optional[dict], bool]:
    """(mlx quantization settings or None, whether the base's config.json could be read at all)."""
    cfg = base_file(model, "config.json")
    if cfg is None:
        return None, False
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None, False
    quant = config.get("quantization") or config.get("quantization_config")
    return (quant if isinstance(quant, dict) and quant.get("bits") else None), True


def original_base(model: str) -> Optional[str]:
    """The `base_model` an mlx-community conversion names in its model card front matter, if available."""
    card = base_file(model, "README.md")
    if card is None:
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    base = meta.get("base_model") if isinstance(meta, dict) else None
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    return base if isinstance(base, str) and HUB_ID.match(base) else None


def _inside(a: Path, b: Path) -> bool:
    """Whether `a` is `b` or lies under it (resolved paths)."""
    return a == b or b in a.parents


def check_output(out: str | Path, force: bool, protect: dict[str, Path], flag: str) -> Path:
    """Refuse an output folder that is a file, non-empty (without force), or overlaps a protected folder.

    `protect` maps a description ("adapter folder") to a folder that must neither receive files nor be
    replaced by --force (which would delete it if it lay inside the output).
    """
    out = Path(out).expanduser()
    target = out.resolve()
    for what, folder in protect.items():
        folder = Path(folder).expanduser().resolve()
        if _inside(target, folder) or _inside(folder, target):
            raise PoetError(f"{flag} {out} overlaps the {what} {folder}; poet-mlx never writes there. "
                            f"Choose a {flag} outside it")
    if out.exists() and not out.is_dir():
        raise PoetError(f"{flag} {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PoetError(f"{flag} {out} exists and is not empty; pass --force to replace it, or choose "
                        "another folder")
    return out


def check_output_file(out: str | Path, force: bool, protect: dict[str, Path], flag: str) -> Path:
    """Refuse an output file that is a folder, exists (without force), or lies inside a protected folder;
    the file itself is then written atomically (`fsutil.atomic_path`)."""
    out = Path(out).expanduser()
    for what, folder in protect.items():
        folder = Path(folder).expanduser().resolve()
        if _inside(out.resolve(), folder):
            raise PoetError(f"{flag} {out} is inside the {what} {folder}; poet-mlx never writes there. "
                            f"Choose a {flag} outside it")
    if out.is_dir():
        raise PoetError(f"{flag} {out} is a folder; pass a file name such as {out / 'adapter.gguf'}")
    if out.exists() and not force:
        raise PoetError(f"{flag} {out} exists; pass --force to replace it, or choose another file")
    return out


@contextmanager
def atomic_folder(out: Path):
    """Yield a temporary folder next to `out`; on success it replaces `out` (a rename), on error it vanishes.

    Readers never see a half-written `out`. Replacing (--force) moves the old folder aside first, into a
    hidden `.{name}.old-*` folder that is deleted after the swap; a crash in between leaves it there.
    """
    from ..fsutil import fsync_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); a model folder is an ordinary, readable folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # fsutil's atomic writes leave files private (0600) like mkstemp
            if f.is_file():
                os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
