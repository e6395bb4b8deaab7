"""Export a run's LoRA adapters as a llama.cpp LoRA GGUF (what llama.cpp's convert_lora_to_gguf.py writes), for
`llama-cli -m base.gguf --lora adapter.gguf`, an Ollama Modelfile `ADAPTER` line or LM Studio, on top of the
user's base GGUF.

The format, from llama.cpp's src/llama-adapter.cpp and llama-graph.cpp (build_lora_mm):
- metadata: general.architecture (the base's), general.type = "adapter", adapter.type = "lora",
  adapter.lora.alpha (float32). llama.cpp computes y = W x + (alpha / r) * B (A x), r = B's first ggml dim.
- tensors `<base tensor name>.lora_a` and `.lora_b` per adapted base tensor ("blk.3.attn_q.weight.lora_a"):
  numpy (r, in) and (out, r), i.e. ggml ne (in, r) and (r, out); llama.cpp checks ne[0] of the base tensor
  against A's and ne[1] against B's.

So, with mlx-lm's y = W x + scale * (x @ lora_a) @ lora_b:  A = lora_a.T (r, in), B = lora_b.T (out, r),
alpha = scale * r. llama.cpp's converter permutes the rows of llama-family q/k weights (`LlamaModel.permute`);
B's rows (the outputs) are permuted the same way. Phi-3 GGUFs hold q/k/v (and gate/up) fused, as mlx-lm does;
a base GGUF that stores them apart gets one (A, B-rows) pair per part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PoetError
from ..gguf.arch import ARCHITECTURES, ArchSpec
from .peft import LAYER_INDEX

MODEL_TYPES = {spec.model_type: arch for arch, spec in ARCHITECTURES.items()} | {"mistral": "llama"}
"""mlx-lm model_type -> GGUF general.architecture (llama.cpp's converter writes Mistral as llama)."""


@dataclass(frozen=True)
class GGUFTarget:
    """The base GGUF an adapter is written for: its architecture, head layout and (when known) tensor shapes."""

    arch: str
    spec: ArchSpec
    n_head: int
    n_head_kv: int
    head_dim: int
    base_shapes: Optional[dict] = None  # GGUF tensor name -> ggml ne (in, out), from the base file
    base_gguf: Optional[Path] = None


@dataclass(frozen=True)
class LoraPart:
    """One adapted GGUF tensor: A (r, in), B (out, r) in GGUF row order, DoRA magnitude m (out,) or None."""

    a: np.ndarray
    b: np.ndarray
    m: Optional[np.ndarray] = None


# -- mlx-lm -> GGUF (pure) ----------------------------------------------------------------------------------------
def llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` on the first axis (Hugging Face rotate-half -> interleaved RoPE rows).

    rows: (out, ...) with out = n_head * head_dim. Returns the same shape, rows reordered within each head."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _gguf_stems(spec: ArchSpec) -> dict:
    """mlx-lm stem -> GGUF stem of every linear layer ("self_attn.q_proj" -> "attn_q")."""
    return {mlx: gguf for gguf, mlx in spec.layer_names.items() if "norm" not in gguf}


def _split_rows(target: GGUFTarget, layer: str, stem: str, out: int) -> list:
    """[(GGUF stem, first row, last row)]: one entry, or the parts of a fused Phi-3 weight the base keeps apart."""
    parts = target.spec.fuse.get(stem)
    gguf_stem = _gguf_stems(target.spec)[stem]
    if not parts or target.base_shapes is None or f"blk.{layer}.{parts[0]}.weight" not in target.base_shapes:
        return [(gguf_stem, 0, out)]
    if len(parts) == 3:
        q, kv = target.n_head * target.head_dim, target.n_head_kv * target.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [out // 2, out // 2]
    bounds = np.cumsum([0] + sizes)
    return [(p, int(bounds[i]), int(bounds[i + 1])) for i, p in enumerate(parts)]


def gguf_lora_parts(adapters: dict, target: GGUFTarget) -> dict:
    """mlx-lm adapter arrays -> {GGUF base tensor name: LoraPart}.

    Args:
        adapters: `<path>.lora_a` (in, r), `<path>.lora_b` (r, out), DoRA `<path>.m` (out,), numpy or mx.
    Raises PoetError for what llama.cpp's LoRA cannot hold: modules outside the numbered layers, embeddings,
    mixture-of-experts layers, modules the architecture has no GGUF tensor for.
    """
    modules: dict = {}
    for name, array in adapters.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise PoetError(f"'{name}' is not a LoRA weight: a llama.cpp LoRA GGUF holds adapters only. Fuse "
                            "instead: poet-mlx fuse --format gguf")
        modules.setdefault(path, {})[leaf] = np.asarray(array, dtype=np.float32)
    stems, out = _gguf_stems(target.spec), {}
    for path, w in sorted(modules.items()):
        found = LAYER_INDEX.search(path)
        stem = path[found.end():] if found else None
        if stem not in stems or w["lora_a"].ndim != 2:
            raise PoetError(f"adapted module '{path}' has no llama.cpp LoRA tensor in the {target.arch} GGUF "
                            "layout (only linear layers inside the transformer blocks map). Fuse instead: "
                            "poet-mlx fuse --format gguf")
        a, b, m = w["lora_a"].T, w["lora_b"].T, w.get("m")  # (r, in), (out, r), (out,)
        heads = _permute_heads(target, stem)
        if heads:
            b, m = llama_permute(b, heads), (None if m is None else llama_permute(m, heads))
        for gguf_stem, lo, hi in _split_rows(target, found.group(1), stem, b.shape[0]):
            out[f"blk.{found.group(1)}.{gguf_stem}.weight"] = LoraPart(
                np.ascontiguousarray(a), np.ascontiguousarray(b[lo:hi]), None if m is None else m[lo:hi])
    return out


def _permute_heads(target: GGUFTarget, stem: str) -> Optional[int]:
    if not target.spec.permute_qk:
        return None
    return {"self_attn.q_proj": target.n_head, "self_attn.k_proj": target.n_head_kv}.get(stem)


def check_against_base(parts: dict, target: GGUFTarget) -> None:
    """The checks llama.cpp makes when it loads the adapter, made now: every tensor exists in the base GGUF
    with ne (in, out) matching A's in and B's out."""
    if target.base_shapes is None:
        return
    for name, p in parts.items():
        ne = target.base_shapes.get(name)
        if ne is None:
            raise PoetError(f"the base GGUF {target.base_gguf} has no tensor '{name}' for the adapter; it is "
                            "not the model the run trained (pass the right one with --base-gguf)")
        if (ne[0], ne[1]) != (p.a.shape[1], p.b.shape[0]):
            raise PoetError(f"base GGUF tensor '{name}' is {ne[0]} -> {ne[1]} but the adapter maps {p.a.shape[1]}"
                            f" -> {p.b.shape[0]}: {target.base_gguf} is another model; pass the right --base-gguf")


# -- the base model ---------------------------------------------------------------------------------------------------
def _one(value) -> int:
    """A GGUF head count: an int, or a per-layer list that must be uniform."""
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:
        raise PoetError(f"the base GGUF's head counts vary per layer ({sorted(values)}); not supported")
    return int(values.pop())


def gguf_target(config: Optional[dict], base_gguf: Optional[Path]) -> GGUFTarget:
    """The GGUF layout to write for: from the base GGUF file when known (its architecture, head counts and
    tensor shapes), else from the mlx-lm config.json of the base (a GGUF conversion's record names its
    architecture). Both given: they must agree."""
    from ..gguf import open_gguf
    from ..gguf.convert import RECORD_KEY

    arch = None
    if config is not None:
        record = config.get(RECORD_KEY) or {}
        arch = record.get("architecture") or MODEL_TYPES.get(config.get("model_type", ""))
        if arch not in ARCHITECTURES:
            raise PoetError(f"model type '{config.get('model_type')}' has no llama.cpp GGUF layout poet-mlx knows "
                            f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    if base_gguf is None:
        if config is None:
            raise PoetError("cannot read the base model's config.json on this machine; pass --base-gguf FILE")
        heads = int(config["num_attention_heads"])
        return GGUFTarget(arch, ARCHITECTURES[arch], heads, int(config.get("num_key_value_heads") or heads),
                          int(config.get("head_dim") or config["hidden_size"] // heads))
    gf = open_gguf(base_gguf)
    if gf.arch not in ARCHITECTURES or (arch is not None and gf.arch != arch):
        raise PoetError(f"--base-gguf {base_gguf} is a '{gf.arch}' model but the run's base is '{arch}'" if arch else
                        f"--base-gguf {base_gguf}: architecture '{gf.arch}' is not supported "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    heads = _one(gf.require(f"{gf.arch}.attention.head_count"))
    kv = _one(gf.get(f"{gf.arch}.attention.head_count_kv", heads))
    head_dim = int(gf.get(f"{gf.arch}.attention.key_length", _one(gf.require(f"{gf.arch}.embedding_length")) // heads))
    shapes = {name: tuple(int(d) for d in t.shape) for name, t in gf.tensors().items()}
    return GGUFTarget(gf.arch, ARCHITECTURES[gf.arch], heads, kv, head_dim, shapes, Path(base_gguf))


@dataclass
class GGUFExportResult:
    path: Path
    arch: str
    tensors: int
    alpha: float
    rank: int
    checked_against: Optional[Path]
    warnings: list = field(default_factory=list)


def write_lora_gguf(path: Path, parts: dict, arch: str, alpha: float, name: str) -> None:
    """Write the LoRA GGUF atomically: float32 tensors `<name>.lora_a` (r, in) and `<name>.lora_b` (out, r)."""
    import gguf

    from ..fsutil import atomic_path

    with atomic_path(path, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(name)
        for tensor, p in parts.items():
            w.add_tensor(f"{tensor}.lora_a", p.a.astype(np.float32))
            w.add_tensor(f"{tensor}.lora_b", p.b.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


# -- the export -------------------------------------------------------------------------------------------------------
def run_gguf_base(info, base_gguf: Optional[str]) -> tuple:
    """(config.json of the run's base or None, the base GGUF file or None, warnings) for a run folder.

    A run trained on a .gguf file has its base GGUF; `base_gguf` (--base-gguf) overrides it or gives one to
    a run trained on another format."""
    from .folders import base_file

    model = info.base_model
    local = Path(model).expanduser() if model else None
    trained_on = local if local is not None and local.is_file() and local.suffix.lower() == ".gguf" else None
    gguf_file = Path(base_gguf).expanduser() if base_gguf else trained_on
    config, warnings = None, []
    if model and trained_on is None:
        found = base_file(model, "config.json")
        config = json.loads(found.read_text()) if found is not None else None
    if gguf_file is None:
        warnings.append("not checked against a base GGUF (the run's base is not a .gguf file): pass --base-gguf "
                        "FILE to check tensor names and shapes now rather than when llama.cpp loads it")
    elif trained_on is None or gguf_file.resolve() != trained_on.resolve():
        warnings.append(f"the adapter was trained on {model}; on {gguf_file} it is exact only if that GGUF holds "
                        "the same weights (another quantization gives close, not identical, outputs)")
    return config, gguf_file, warnings


def export_gguf_lora(adapter_path: str | Path, out: str | Path, base_gguf: Optional[str] = None,
                     force: bool = False) -> GGUFExportResult:
    """Write the run's LoRA adapters as a llama.cpp LoRA GGUF file `out` (float32 tensors)."""
    import mlx.core as mx

    from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE
    from .folders import check_output_file
    from .model_card import read_run

    info = read_run(adapter_path)
    if info.fine_tune_type != "lora":
        raise PoetError(f"{info.path} is a {info.fine_tune_type} run: llama.cpp's LoRA GGUF holds LoRA adapters "
                        "only (no DoRA magnitudes, no full weights). Merge it instead: poet-mlx fuse --adapter-path "
                        f"{info.path} --format gguf --save-path merged.gguf")
    lora = info.adapter_config.get("lora_parameters") or {}
    if "scale" not in lora:
        raise PoetError(f"{info.path / ADAPTER_CONFIG} has no lora_parameters.scale; cannot compute alpha")
    out = check_output_file(out, force, {"adapter folder": info.path}, "--out")
    config, gguf_file, warnings = run_gguf_base(info, base_gguf)
    target = gguf_target(config, gguf_file)
    parts = gguf_lora_parts(mx.load(str(info.path / ADAPTER_FILE)), target)
    check_against_base(parts, target)
    rank = next(iter(parts.values())).a.shape[0]
    alpha = float(lora["scale"]) * rank
    write_lora_gguf(out, parts, target.arch, alpha, f"{info.path.name} (poet-mlx LoRA)")
    return GGUFExportResult(out, target.arch, 2 * len(parts), alpha, rank, gguf_file, warnings)
