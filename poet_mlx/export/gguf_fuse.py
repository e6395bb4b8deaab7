"""`poet-mlx fuse --format gguf`: the base GGUF file with the run's LoRA/DoRA adapters merged in, one file
llama.cpp, Ollama and LM Studio run without an adapter.

Written the way llama.cpp's own `llama-export-lora` merges: every metadata key (tokenizer, chat template,
architecture settings) and every tensor without an adapter is copied byte for byte, quantization included;
each adapted tensor becomes W + (alpha / r) * B A with W the base tensor dequantized (the values llama.cpp
computes with), stored as F16 (F32 where the base tensor was F32). DoRA, which llama.cpp's LoRA cannot
apply, merges too: m / ||W + s B A||_row * (W + s B A), mlx-lm's own `DoRALinear.fuse`.

mlx-lm has a GGUF writer of its own (`mlx_lm.fuse --export-gguf`: llama, mistral, mixtral; float16; a
SentencePiece-style vocabulary built from tokenizer.json). It is not used: its output for SmolLM2 (a byte-level
BPE vocabulary) did not load in llama.cpp (b0.3.36's vendored copy: "invalid gguf type for
tokenizer.ggml.token_type", written as uint32 where llama.cpp wants int32), and it has no merges, chat
template or pre-tokenizer. A run whose base is not a GGUF file merges onto a GGUF of the same model
(`--base-gguf`), or goes through `fuse --dequantize` and llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PoetError
from .gguf_lora import LoraPart, check_against_base, gguf_lora_parts, gguf_target, run_gguf_base

MOSTLY_F16 = 1
"""llama.cpp's LLAMA_FTYPE_MOSTLY_F16: what llama-export-lora writes as general.file_type."""


@dataclass
class GGUFFuseResult:
    path: Path
    base_gguf: Path
    merged: int
    warnings: list = field(default_factory=list)


def merged_weight(w: np.ndarray, part: LoraPart, scale: float) -> np.ndarray:
    """One merged GGUF weight.

    Args: w (out, in) float32, the base tensor in GGUF row order; part.a (r, in), part.b (out, r), DoRA
        part.m (out,); scale = alpha / r.
    Returns: (out, in) float32: W + scale * B A, and for DoRA each row scaled by m / its norm.
    """
    merged = w + scale * (part.b @ part.a)
    if part.m is not None:
        merged = merged * (part.m / np.linalg.norm(merged, axis=1))[:, None]
    return merged.astype(np.float32)


def fuse_gguf(adapter_path: str | Path, save_path: str | Path, base_gguf: Optional[str] = None,
              force: bool = False) -> GGUFFuseResult:
    """Write the base GGUF with the run's adapters merged to the file `save_path`."""
    import mlx.core as mx

    from ..adapters import ADAPTER_FILE
    from ..gguf import open_gguf
    from .folders import check_output_file
    from .model_card import read_run

    info = read_run(adapter_path)
    if info.fine_tune_type not in ("lora", "dora"):
        raise PoetError(f"{info.path} is a {info.fine_tune_type} run; merge LoRA/DoRA runs into a GGUF, or "
                        "write a full model with poet-mlx fuse --dequantize and convert it with llama.cpp's "
                        "convert_hf_to_gguf.py")
    config, gguf_file, warnings = run_gguf_base(info, base_gguf)
    if gguf_file is None:
        raise PoetError(f"the run's base {info.base_model} is not a .gguf file: pass --base-gguf FILE (a GGUF of "
                        "the same model) to merge into, or fuse --dequantize and convert that folder with "
                        "llama.cpp's convert_hf_to_gguf.py (mlx-lm's own GGUF writer makes files llama.cpp "
                        "refuses)")
    warnings = [w for w in warnings if not w.startswith("not checked")]
    out = check_output_file(save_path, force, {"adapter folder": info.path}, "--save-path")
    if out.resolve() == gguf_file.resolve():
        raise PoetError(f"--save-path {out} is the base GGUF itself; choose another file")
    target = gguf_target(config, gguf_file)
    parts = gguf_lora_parts(mx.load(str(info.path / ADAPTER_FILE)), target)
    check_against_base(parts, target)
    scale = float((info.adapter_config.get("lora_parameters") or {})["scale"])
    write_merged(open_gguf(gguf_file), parts, scale, out)
    return GGUFFuseResult(out, gguf_file, len(parts), warnings)


def _out_type(tensor_type):
    import gguf

    F32 = gguf.GGMLQuantizationType.F32
    return (F32, np.float32) if tensor_type == F32 else (gguf.GGMLQuantizationType.F16, np.float16)


def write_merged(gf, parts: dict, scale: float, out: Path) -> None:
    """Copy `gf` (a poet_mlx.gguf GGUFFile) to `out` atomically, merging `parts` into their tensors. Streams one
    tensor at a time (a merged tensor is dequantized, merged and written, then dropped)."""
    import gguf

    from ..fsutil import atomic_path
    from ..gguf.tensors import as_float32, read_tensor

    reader = gf.reader
    with atomic_path(out, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), gf.arch)
        if gf.get("general.alignment"):
            w.data_alignment = int(gf.get("general.alignment"))
        _copy_metadata(reader, w, f16=any(_out_type(t.tensor_type)[1] == np.float16
                                          for t in reader.tensors if t.name in parts))
        for t in reader.tensors:
            if t.name in parts:
                raw, dtype = _out_type(t.tensor_type)
                shape = tuple(int(d) for d in reversed(list(t.shape)))
                w.add_tensor_info(t.name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize, raw)
            else:
                w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in parts:
                base = as_float32(read_tensor(t, keep_quantized=False))
                w.write_tensor_data(merged_weight(base, parts[t.name], scale).astype(_out_type(t.tensor_type)[1]))
            else:
                w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        w.close()


def _copy_metadata(reader, w, f16: bool) -> None:
    """Every key but the ones the writer sets itself (GGUF.*, general.architecture); general.file_type says
    "mostly F16" once merged tensors are F16, as llama-export-lora writes it."""
    import gguf

    for fld in reader.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
            continue
        value = fld.contents()
        if fld.name == gguf.Keys.General.FILE_TYPE and f16:
            value = MOSTLY_F16
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(fld.name, value, fld.types[0], sub_type=sub)
