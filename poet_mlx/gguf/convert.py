"""GGUF file -> mlx-lm model folder (config.json, model*.safetensors, tokenizer files), written atomically.

The folder is built in a temporary sibling and renamed into place, so a reader (or a crash) sees a complete
conversion or none. `gguf_cache_folder` converts a file once into poet-mlx's cache and reuses it after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings as _warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..fsutil import cache_root
from . import arch as _arch
from .reader import GGUFError, GGUFFile, GGUFWarning, file_fingerprint, open_gguf, sha256_file
from .tensors import GROUP_SIZE, Tensor, as_float32, concat_rows, read_tensor, type_name
from .tokenizer import eos_token_ids, tokenizer_files

CONVERTER_VERSION = "1"
"""Bump when the output of a conversion changes: cached conversions of older versions are redone."""

RECORD_KEY = "poet_mlx_gguf"
"""config.json key holding where the folder came from (`conversion_record`)."""

SHARD_BYTES = 2 << 30
"""Largest safetensors file written: bounds the memory a conversion holds at once."""

Progress = Callable[[int, int, str], None]
"""progress(done, total, tensor_name), called after each tensor."""




def _facts(gf: GGUFFile) -> _arch.Facts:
    tensors = gf.tensors()
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{gf.path.name} has no token_embd.weight tensor; it is not a complete language model")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml shape is (hidden, vocab)

    def floats(name: str):
        return np.asarray(as_float32(read_tensor(tensors[name]))).reshape(-1) if name in tensors else None

    return _arch.Facts(gf=gf, arch=gf.arch, tensor_names=list(tensors), vocab_size=vocab,
                       tied="output.weight" not in tensors, rope_freqs=floats("rope_freqs.weight"),
                       rope_long=floats("rope_factors_long.weight"), rope_short=floats("rope_factors_short.weight"))


def _is_matrix_weight(name: str, rt) -> bool:
    """Linear and Embedding weights (2-D `.weight`) are the ones MLX can hold quantized."""
    return name.endswith(".weight") and len(rt.shape) == 2


def convert_tensor(spec: _arch.ArchSpec, facts: _arch.Facts, rt) -> Tensor:
    """One GGUF tensor with llama.cpp's transforms undone (q/k permutation, Gemma's norm + 1)."""
    t = read_tensor(rt, keep_quantized=_is_matrix_weight(rt.name, rt))
    heads = _arch.permute_heads(spec, rt.name, facts)
    if heads is not None:
        perm = _arch.qk_permutation(t.shape[0], heads)
        t = t.map_rows(lambda a: np.ascontiguousarray(a[perm]))
    if _arch.shifts_norm(spec, rt.name):
        t = Tensor(as_float32(t) - np.float32(spec.norm_shift), t.source)
    return t


def _mx_arrays(name: str, t: Tensor) -> Dict[str, "object"]:
    """safetensors entries of one parameter: `name`, plus `.scales`/`.biases` next to a quantized weight."""
    import mlx.core as mx

    if t.bf16:
        return {name: mx.array(t.weight).view(mx.bfloat16)}
    if not t.quantized:
        return {name: mx.array(t.weight)}
    module = name[: -len(".weight")]
    return {name: mx.array(t.weight), f"{module}.scales": mx.array(t.scales), f"{module}.biases": mx.array(t.biases)}


class _ShardWriter:
    """Collects arrays and writes model-0000k.safetensors files of at most SHARD_BYTES each."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.size, self.files, self.index = folder, {}, 0, [], {}

    def add(self, arrays: dict) -> None:
        for key, a in arrays.items():
            if self.pending and self.size + a.nbytes > SHARD_BYTES:
                self.flush()
            self.pending[key], self.size = a, self.size + a.nbytes

    def flush(self) -> None:
        import mlx.core as mx

        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.folder / name), self.pending, metadata={"format": "mlx"})
        self.index.update(dict.fromkeys(self.pending, name))
        self.files.append(name)
        self.pending, self.size = {}, 0

    def finish(self) -> List[str]:
        """Write what is left; rename a single shard to model.safetensors, else write the index."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0], self.folder / "model.safetensors")
            self.files = ["model.safetensors"]
        else:
            total = sum((self.folder / f).stat().st_size for f in self.files)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.index.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            self.files.append("model.safetensors.index.json")
        return self.files


def _quant_entry(name: str, t: Tensor, quant: dict) -> None:
    module = name[: -len(".weight")]
    if t.quantized:
        quant[module] = {"group_size": GROUP_SIZE, "bits": t.bits, "mode": "affine"}
    elif name.endswith(".weight") and len(t.shape) == 2:
        quant[module] = False  # a float matrix (float in the file, or a dequantized K-quant)


def _kind(t: Tensor) -> str:
    if t.quantized:
        return "kept"
    return "float" if t.source in ("F32", "F16", "BF16") else "dequantized"


def _place(gf: GGUFFile, spec: _arch.ArchSpec, gname: str, t: Tensor, fused: dict):
    """(mlx name, tensor) to write for GGUF tensor `gname`, or None while a fused weight still lacks parts."""
    part = _arch.fused_parts(spec, gname, gf.tensors())
    if part is None:
        name = _arch.mlx_name(spec, gname)
        if name is None:
            raise GGUFError(f"{gf.path.name}: tensor '{gname}' has no place in mlx-lm's {spec.model_type} model "
                            f"(architecture '{gf.arch}'); this variant is not supported")
        return name, t
    name, index, count = part
    fused.setdefault(name, {})[index] = t
    if len(fused[name]) < count:
        return None
    return name, concat_rows([p for _, p in sorted(fused.pop(name).items())])


def write_weights(gf: GGUFFile, spec: _arch.ArchSpec, facts: _arch.Facts, folder: Path,
                  progress: Optional[Progress]) -> tuple:
    """Convert and save every tensor. Returns (files written, per-module quantization dict, tensor stats)."""
    tensors = gf.tensors()
    writer, quant, fused = _ShardWriter(folder), {}, {}
    stats = {"types": Counter(), "kept": Counter(), "dequantized": Counter(), "float": Counter()}
    for done, (gname, rt) in enumerate(tensors.items(), start=1):
        stats["types"][type_name(rt)] += 1
        if gname not in _arch.CONFIG_TENSORS:
            t = convert_tensor(spec, facts, rt)
            stats[_kind(t)][t.source] += 1
            if (placed := _place(gf, spec, gname, t, fused)) is not None:
                _quant_entry(placed[0], placed[1], quant)
                writer.add(_mx_arrays(*placed))
        if progress is not None:
            progress(done, len(tensors), gname)
    if fused:
        raise GGUFError(f"{gf.path.name}: incomplete fused tensors {sorted(fused)} (some parts are missing)")
    return writer.finish(), quant, stats


def quantization_config(quant: dict) -> Optional[dict]:
    """config.json "quantization": a per-module dict mlx-lm's `load_model` reads (its `class_predicate` looks
    each module path up: a dict of `to_quantized` arguments, or False), plus the top-level group_size/bits
    that `nn.quantize` requires (the most common setting; every quantized module is named explicitly)."""
    settings = [v for v in quant.values() if v]
    if not settings:
        return None
    bits = Counter(s["bits"] for s in settings).most_common(1)[0][0]
    return {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine", **quant}


def model_config(gf: GGUFFile, spec: _arch.ArchSpec, facts: _arch.Facts, vocab, quant: dict) -> dict:
    cfg = {"architectures": [spec.hf_class], **spec.config(facts)}
    eos = eos_token_ids(vocab)
    if "bos" in vocab.special:
        cfg["bos_token_id"] = vocab.special["bos"]
    if eos:
        cfg["eos_token_id"] = eos
    if (q := quantization_config(quant)) is not None:
        cfg["quantization"] = q
        cfg["quantization_config"] = q  # mlx-lm writes both; some tools read the second
    return cfg


def _record(gf: GGUFFile, stats: dict, files: List[str], vocab, warnings: List[str], sha256: str,
            fingerprint: str) -> dict:
    return {
        "converter_version": CONVERTER_VERSION,
        "source_file": gf.path.name,
        "source_size": gf.size,
        "source_sha256": sha256,
        "source_fingerprint": fingerprint,
        "architecture": gf.arch,
        "name": gf.get("general.name"),
        "tensor_types": dict(stats["types"]),
        "kept_quantized": dict(stats["kept"]),
        "dequantized_to_float32": dict(stats["dequantized"]),
        "tokenizer": {"model": vocab.model, "pre": vocab.pre},
        "files": files,
        "warnings": list(warnings),
    }


def _write_folder(gf: GGUFFile, folder: Path, progress: Optional[Progress], strict_tokenizer: bool,
                  fingerprint: str) -> List[str]:
    """Write a complete conversion into the (new, empty) `folder`; returns the warnings."""
    spec = _arch.spec_for(gf)
    facts = _facts(gf)
    warnings: List[str] = []
    config_probe = spec.config(facts)  # metadata errors surface before any weight is converted
    context = int(config_probe.get("max_position_embeddings", 4096))
    tok_files, vocab = tokenizer_files(gf, context, warnings, strict=strict_tokenizer)
    files, quant, stats = write_weights(gf, spec, facts, folder, progress)
    for name, text in tok_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    cfg = model_config(gf, spec, facts, vocab, quant)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    if "pad" in vocab.special:
        gen["pad_token_id"] = vocab.special["pad"]
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    files = files + list(tok_files) + ["generation_config.json", "config.json"]
    cfg[RECORD_KEY] = _record(gf, stats, files, vocab, warnings, sha256_file(gf.path), fingerprint)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")  # last: marks done
    return warnings


def _publish(tmp: Path, out_dir: Path) -> bool:
    """Rename the finished `tmp` to `out_dir`; False when `out_dir` exists and is not empty."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if out_dir.exists():
            return False
        raise
    return True


def _convert(gguf_path, out_dir: Path, progress, strict_tokenizer: bool, fingerprint: Optional[str]):
    """Convert into a temporary sibling of `out_dir`, then rename. Returns (published?, warnings)."""
    gf = open_gguf(gguf_path)
    _arch.spec_for(gf)  # unsupported architecture: fail before creating anything
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        found = _write_folder(gf, tmp, progress, strict_tokenizer, fingerprint or file_fingerprint(gf.path))
        return _publish(tmp, out_dir), found
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _emit(warnings: List[str], source: str) -> None:
    for w in warnings:
        _warnings.warn(f"{source}: {w}", GGUFWarning, stacklevel=3)


def convert_gguf(gguf_path, out_dir, *, progress: Optional[Progress] = None, strict_tokenizer: bool = False) -> Path:
    """Convert the GGUF file `gguf_path` into an mlx-lm model folder `out_dir`, which `mlx_lm.load` loads.

    The folder holds config.json (with a `poet_mlx_gguf` record: source name, size, sha256, tensor types),
    model.safetensors (or shards), tokenizer.json, tokenizer_config.json (with the chat template) and
    generation_config.json (end-of-generation ids). It is written atomically; `out_dir` must not exist or be
    empty. `progress(done, total, name)` is called after each tensor. Anything converted not exactly as
    llama.cpp runs it comes as a `GGUFWarning` (and in the record's "warnings"); with `strict_tokenizer`
    an unknown pre-tokenizer is a GGUFError instead. Errors are GGUFError (a PoetError), one line each.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFError(f"{out_dir} already exists; remove it or choose another output folder")
    published, found = _convert(gguf_path, out_dir, progress, strict_tokenizer, None)
    if not published:
        raise GGUFError(f"{out_dir} appeared while converting (another conversion?); remove it and retry")
    _emit(found, Path(gguf_path).name)
    return out_dir


def conversion_record(folder) -> Optional[dict]:
    """The `poet_mlx_gguf` record of a converted folder (see `convert_gguf`), or None if it has none."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = cfg.get(RECORD_KEY)
    return record if isinstance(record, dict) else None


def _complete(folder: Path, fingerprint: str) -> bool:
    record = conversion_record(folder)
    return (record is not None and record.get("converter_version") == CONVERTER_VERSION
            and record.get("source_fingerprint") == fingerprint
            and all((folder / f).is_file() for f in record.get("files", [])))


def cache_key(gguf_path, fingerprint: Optional[str] = None) -> str:
    """The cache folder name of a GGUF file: its stem (for people) and a hash of the converter version and
    the file's content fingerprint (`reader.file_fingerprint`: size and first and last 8 MiB)."""
    import hashlib

    path = Path(gguf_path)
    fingerprint = fingerprint or file_fingerprint(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60].strip("-.") or "model"
    digest = hashlib.sha256(f"{CONVERTER_VERSION}:{fingerprint}".encode()).hexdigest()[:16]
    return f"{stem}-{digest}"


def gguf_cache_folder(gguf_path, *, progress: Optional[Progress] = None) -> Path:
    """The mlx-lm folder converted from `gguf_path`, under `cache_root()/gguf/<key>` (see `cache_key`).

    Converts on first use; later calls reuse the complete conversion (a changed file or a new converter
    version gives a new key). Concurrent callers are safe: the first finished conversion wins. The
    conversion's warnings are re-emitted (GGUFWarning) on every call.
    """
    path = Path(gguf_path)
    if not path.is_file():
        open_gguf(path)  # the one-line error for a missing path or a folder
    fingerprint = file_fingerprint(path)
    folder = cache_root() / "gguf" / cache_key(path, fingerprint)
    if not _complete(folder, fingerprint):
        if folder.exists() and not _complete(folder, fingerprint):  # damaged (re-checked: a concurrent
            shutil.rmtree(folder, ignore_errors=True)                # conversion may just have finished)
        _convert(path, folder, progress, False, fingerprint)
        if not _complete(folder, fingerprint):
            raise GGUFError(f"the cached conversion in {folder} is incomplete; remove it and retry")
    _emit((conversion_record(folder) or {}).get("warnings", []), path.name)
    return folder
