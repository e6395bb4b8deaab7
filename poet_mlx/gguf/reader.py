"""Open a GGUF file and read its metadata, with one-line errors for files that are not GGUF or are damaged.

`gguf.GGUFReader` (gguf-py, from llama.cpp) does the parsing; it memory-maps the file, so opening a 4 GB
model costs no memory until tensors are read. This module only adds the checks a user needs spelled out:
not a GGUF file, truncated or corrupt, a split (multi-file) model, and typed access to metadata keys.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import PoetError

GGUF_MAGIC = b"GGUF"

FINGERPRINT_BYTES = 8 << 20
"""Bytes read from each end of a file for its cheap fingerprint (see `file_fingerprint`)."""


class GGUFError(PoetError):
    """A GGUF file poet-mlx cannot use: the message names the file, what is wrong and what to do."""


class GGUFWarning(UserWarning):
    """Something converted, but not exactly as llama.cpp would run it (e.g. an unknown pre-tokenizer)."""


# What a damaged header makes gguf-py's parser raise: short reads become reshape/index errors, garbage
# lengths overflow or fail to decode.
_PARSE_ERRORS = (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError, struct.error, EOFError,
                 TypeError, MemoryError)


@dataclass
class GGUFFile:
    """A parsed GGUF file: `reader` is the gguf-py reader (tensors are lazy memory-mapped views)."""

    path: Path
    reader: Any  # gguf.GGUFReader
    size: int
    _tensors: Optional[Dict[str, Any]] = field(default=None, repr=False)

    @property
    def arch(self) -> str:
        return str(self.get("general.architecture", ""))

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (a Python scalar, str or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:  # a string that is not UTF-8: keep what can be read
            return _contents_lossy(field)
        except _PARSE_ERRORS as exc:
            raise GGUFError(f"{self.path.name}: metadata key '{key}' is corrupt ({exc}); "
                            "re-download the file") from None

    def require(self, key: str) -> Any:
        """The value of metadata `key`; a GGUFError naming the key when it is missing."""
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path.name}: metadata key '{key}' is missing; the file is incomplete or was "
                            "written by a converter poet-mlx does not know")
        return value

    def strings(self, key: str) -> Optional[list]:
        """A string-array metadata value decoded leniently (invalid UTF-8 becomes U+FFFD), or None."""
        field = self.reader.fields.get(key)
        if field is None:
            return None
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]

    def tensors(self) -> Dict[str, Any]:
        """Tensor name -> gguf ReaderTensor, in file order (built once)."""
        if self._tensors is None:
            self._tensors = {t.name: t for t in self.reader.tensors}
        return self._tensors


def _contents_lossy(field) -> Any:
    parts = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return parts if len(parts) != 1 else parts[0]


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except IsADirectoryError:
        raise GGUFError(f"{path} is a folder, not a GGUF file; pass the .gguf file inside it") from None
    except FileNotFoundError:
        raise GGUFError(f"{path} does not exist; check the path of the .gguf file") from None
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] != GGUF_MAGIC:
        what = "it is empty" if not head else f"it starts with {head[:4]!r}, not b'GGUF'"
        raise GGUFError(f"{path.name} is not a GGUF file ({what}); pass a .gguf model file (llama.cpp, "
                        "Ollama, LM Studio)")
    if len(head) < 8:
        raise GGUFError(f"{path.name}: truncated GGUF file ({len(head)} bytes); re-download it")


def _check_extent(gf: GGUFFile) -> None:
    """Every tensor's bytes must lie inside the file: a cut-short download fails here, by name."""
    for t in gf.reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > gf.size:
            raise GGUFError(f"{gf.path.name}: truncated GGUF file (tensor '{t.name}' ends at byte {end}, the file "
                            f"has {gf.size}); re-download it")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the GGUF header of `path` (metadata and tensor index; no tensor data is read).

    Raises GGUFError (one line) for: a missing file, not a GGUF file, a truncated or corrupt header or
    tensor table, a split model (several .gguf parts).
    """
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package (llama.cpp's gguf-py): "
                        "pip install 'gguf>=0.19'") from None

    path = Path(path)
    _check_magic(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path, "r")
    except _PARSE_ERRORS as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFError(f"{path.name}: truncated or corrupt GGUF file ({detail[:160]}); re-download it") from None
    gf = GGUFFile(path=path, reader=reader, size=size)
    _check_extent(gf)
    splits = gf.get("split.count", 1) or 1
    if int(splits) > 1:
        raise GGUFError(f"{path.name} is part {int(gf.get('split.no', 0)) + 1} of a {int(splits)}-part split GGUF; "
                        "merge the parts first (llama.cpp: `llama-gguf-split --merge FIRST.gguf OUT.gguf`)")
    return gf


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint: sha256 of the file size and its first and last `FINGERPRINT_BYTES`.

    The head holds the whole GGUF header (architecture, tokenizer, every tensor's name, type and offset) and
    the first tensors; the tail the last tensors. Two different model files of equal size sharing both ends
    byte for byte do not occur in practice, and this reads 16 MiB instead of the whole file (seconds for a
    7B model). `sha256_file` gives the full hash, recorded in the converted config.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"gguf-fingerprint-v1:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """The sha256 of the whole file, hex (streamed; ~1 s per GB here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
