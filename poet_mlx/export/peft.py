"""Take a trained run elsewhere: fuse its adapters into a standalone model, or export them to Hugging Face PEFT.

- `fuse_run`: mlx-lm's own fuse (each LoRA/DoRA layer's `.fuse()`), optionally dequantized, saved with mlx-lm's
  writers; the folder loads with `mlx_lm.load`, and when dequantized with `transformers` too.
- `export_peft`: adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.
- Both write a model card (README.md) with the training facts of the run, never write into the run folder,
  refuse a non-empty output folder unless `force`, and build the output in a temporary folder next to it that
  is renamed into place only when complete.

The PEFT mapping (mlx-lm's LoRALinear computes y = W x + scale * (x @ lora_a) @ lora_b; PEFT's Linear
computes y = W x + (lora_alpha / r) * lora_B(lora_A(x))):

    base_model.model.<path>.lora_A.weight       = lora_a.T   (r, in)
    base_model.model.<path>.lora_B.weight       = lora_b.T   (out, r)
    base_model.model.<path>.lora_magnitude_vector = m        (out,)   DoRA only
    lora_alpha = scale * r, use_rslora = false

mlx-lm's DoRA (m / ||W + scale B^T A^T||_row applied to the LoRA output) is PEFT's DoRA with the same norm, so
`m` maps one to one. Module paths are mlx-lm's, which equal transformers' for the usual text models (llama,
mistral, qwen2/3, gemma); the PEFT round-trip test checks it on a llama.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE
from ..errors import PoetError
from ..models import HUB_ID
from .model_card import RunInfo, model_card, read_run

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# -- PEFT mapping (pure) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftLayout:
    """Where the adapters sit: the leaf module names and the numbered transformer layers they are in."""

    target_modules: list
    layers: list
    rank: int
    dora: bool


def peft_state_dict(adapters: dict, dora: bool) -> tuple[dict, PeftLayout]:
    """Map mlx-lm adapter arrays to PEFT's state dict and find the layout PEFT's config must describe.

    Args:
        adapters: mlx-lm names -> arrays: `<path>.lora_a` (in, r), `<path>.lora_b` (r, out) and, for DoRA,
            `<path>.m` (out,).
        dora: whether the run is DoRA (then every module must have its `m`).
    Returns:
        ({"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r),
          "...lora_magnitude_vector": (out,)}, PeftLayout).
    Raises PoetError for what PEFT's LoRA config cannot express: full fine-tuning weights, mixture-of-experts
    (switch) layers, embedding LoRA, modules outside numbered layers, or a layout that differs between layers.
    """
    modules: dict[str, dict] = {}
    for name, array in adapters.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m") or not path:
            raise PoetError(f"'{name}' is not a LoRA/DoRA weight: PEFT's LoRA format holds adapters only, not "
                            "fully fine-tuned weights. Use `poet-mlx fuse --dequantize` for a full Hugging Face model")
        modules.setdefault(path, {})[leaf] = array
    if not modules:
        raise PoetError("the adapter file holds no weights")
    out, layouts, ranks = {}, {}, set()
    for path, w in sorted(modules.items()):
        _check_module(path, w, dora)
        found = LAYER_INDEX.search(path)
        if not found:
            raise PoetError(f"adapted module '{path}' is not inside a numbered transformer layer; PEFT's "
                            "layers_to_transform cannot express it. Fuse instead: poet-mlx fuse --dequantize")
        # (r, in) and (out, r): PEFT stores nn.Linear weights, mlx-lm stores the matrices x is multiplied by.
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = w["lora_a"].T
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = w["lora_b"].T
        if dora:
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = w["m"]
        ranks.add(w["lora_a"].shape[1])
        layouts.setdefault(int(found.group(1)), set()).add(path[found.end():])
    first = next(iter(layouts.values()))
    if any(v != first for v in layouts.values()):
        raise PoetError("the adapted modules differ between layers; PEFT's target_modules + "
                        "layers_to_transform cannot express that. Fuse instead: poet-mlx fuse --dequantize")
    if len(ranks) != 1:
        raise PoetError(f"the adapters have several ranks {sorted(ranks)}; expected one")
    leaves = sorted({p.rpartition(".")[2] for p in first})
    if len(leaves) != len(first):
        raise PoetError(f"adapted modules {sorted(first)} share leaf names; PEFT's target_modules would match "
                        "more modules than were trained")
    return out, PeftLayout(leaves, sorted(layouts), ranks.pop(), dora)


def _check_module(path: str, w: dict, dora: bool) -> None:
    if "lora_a" not in w or "lora_b" not in w:
        raise PoetError(f"module '{path}' lacks lora_a or lora_b: the adapter file is incomplete")
    if w["lora_a"].ndim != 2 or w["lora_b"].ndim != 2:
        raise PoetError(f"module '{path}' has {w['lora_a'].ndim}-D LoRA weights: mixture-of-experts (switch) "
                        "layers have no PEFT LoRA equivalent. Fuse instead: poet-mlx fuse --dequantize")
    if "embed" in path.rpartition(".")[2]:
        raise PoetError(f"module '{path}' is an embedding: mlx-lm's embedding LoRA is not exported (PEFT "
                        "stores it differently). Fuse instead: poet-mlx fuse --dequantize")
    if w["lora_a"].shape[1] != w["lora_b"].shape[0]:
        raise PoetError(f"module '{path}': lora_a {tuple(w['lora_a'].shape)} and lora_b "
                        f"{tuple(w['lora_b'].shape)} do not chain")
    if dora and "m" not in w:
        raise PoetError(f"DoRA module '{path}' has no magnitude vector 'm'")


def peft_config(layout: PeftLayout, scale: float, dropout: float, base_model: str,
                revision: Optional[str] = None) -> dict:
    """PEFT's adapter_config.json for `layout`. lora_alpha = scale * r makes PEFT's alpha / r equal our scale."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": layout.rank,
        "lora_alpha": scale * layout.rank,
        "lora_dropout": dropout,
        "use_rslora": False,
        "use_dora": layout.dora,
        "target_modules": layout.target_modules,
        "layers_to_transform": layout.layers,
        "layers_pattern": "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


# -- facts about the base model -------------------------------------------------------------------------------
def _base_file(model: str, name: str) -> Optional[Path]:
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
    cfg = _base_file(model, "config.json")
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
    card = _base_file(model, "README.md")
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


# -- output folders ---------------------------------------------------------------------------------------------
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


# -- PEFT export ------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    config: dict
    tensors: int
    warnings: list = field(default_factory=list)


def export_peft(adapter_path: str | Path, out: str | Path, base_model_id: Optional[str] = None,
                force: bool = False) -> ExportResult:
    """Write the run's adapters in PEFT's format (plus a model card) into `out`.

    Returns the written config and the warnings the user should read (quantized base, local base path).
    """
    import mlx.core as mx

    from ..fsutil import save_safetensors_atomic, write_json_atomic, write_text_atomic

    info = read_run(adapter_path)
    if info.fine_tune_type == "full":
        raise PoetError(f"{info.path} is a full fine-tuning run: PEFT holds adapters only. Build a full Hugging "
                        f"Face model instead: poet-mlx fuse --adapter-path {info.path} --save-path DIR --dequantize")
    if info.fine_tune_type not in ("lora", "dora"):
        raise PoetError(f"unknown fine_tune_type '{info.fine_tune_type}' in {info.path / ADAPTER_CONFIG}")
    if base_model_id is not None and not HUB_ID.match(base_model_id):
        raise PoetError(f"--base-model-id '{base_model_id}' is not a Hugging Face model id (owner/name)")
    out = check_output(out, force, {"adapter folder": info.path}, "--out")
    lora = info.adapter_config.get("lora_parameters") or {}
    if "scale" not in lora:
        raise PoetError(f"{info.path / ADAPTER_CONFIG} has no lora_parameters.scale; cannot compute lora_alpha")
    tensors, layout = peft_state_dict(mx.load(str(info.path / ADAPTER_FILE)), info.fine_tune_type == "dora")
    if lora.get("rank") not in (None, layout.rank):
        raise PoetError(f"{info.path}: adapter_config says rank {lora['rank']} but the weights have rank {layout.rank}")

    base, warnings = _peft_base(info, base_model_id)
    config = peft_config(layout, float(lora["scale"]), float(lora.get("dropout", 0.0)), base,
                         info.config.get("revision"))
    with atomic_folder(out) as tmp:
        # PEFT reads any safetensors; "pt" is what torch-written files say, so tools that check it are content.
        save_safetensors_atomic(tmp / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        write_json_atomic(tmp / PEFT_CONFIG, config)
        write_text_atomic(tmp / "README.md", model_card(info, kind="peft", base_model=base, name=out.name))
    return ExportResult(out, config, len(tensors), warnings)


def _peft_base(info: RunInfo, base_model_id: Optional[str]) -> tuple[str, list]:
    """The base_model_name_or_path to write, and the warnings about it (quantized base, local path)."""
    model = info.base_model
    if not model and not base_model_id:
        raise PoetError(f"{info.path / ADAPTER_CONFIG} names no base model; pass --base-model-id owner/name")
    warnings = []
    if model:
        quant, known = base_quantization(model)
        fuse_hint = (f"for an exact Hugging Face model, fuse into dequantized weights instead: poet-mlx fuse "
                     f"--adapter-path {info.path} --save-path DIR --dequantize")
        if quant:
            warnings.append(f"the adapters were trained on {model}, a {quant.get('bits')}-bit quantized model: "
                            f"they are exact only on that base; on the full-precision model PEFT loads they "
                            f"give close but not identical outputs. {fuse_hint[0].upper()}{fuse_hint[1:]}")
        elif not known:
            warnings.append(f"could not read the config of the base {model} on this machine to check whether it "
                            f"is quantized; if it is, the adapters are exact only on it ({fuse_hint})")
        if base_model_id is None and quant:
            original = original_base(model)
            if original:
                warnings.append(f"base_model_name_or_path is {original}, the model {model} was converted from "
                                "(from its model card); pass --base-model-id to choose another")
                return original, warnings
            warnings.append(f"base_model_name_or_path is {model}, which transformers cannot load (MLX-quantized); "
                            "pass --base-model-id with the original model's id")
            return model, warnings
    if base_model_id:
        return base_model_id, warnings
    if not HUB_ID.match(model) or Path(model).expanduser().exists():
        warnings.append(f"base_model_name_or_path is the local path {model}; pass --base-model-id owner/name "
                        "so that others can load the adapters")
    return model, warnings


# -- fuse -------------------------------------------------------------------------------------------------------
@dataclass
class FuseResult:
    path: Path
    base_model: str
    fused_modules: int
    dequantized: bool
    quantization: Optional[dict]
    warnings: list = field(default_factory=list)


def fuse_run(adapter_path: str | Path, save_path: str | Path, model: Optional[str] = None,
             dequantize: bool = False, force: bool = False, trust_remote_code: bool = False) -> FuseResult:
    """Fuse the run's adapters into its base model and save a standalone model folder with a model card.

    Uses mlx-lm's pieces: each adapter layer's `.fuse(dequantize=...)` (a quantized base stays quantized
    unless `dequantize`: the fused weight W + scale * B^T A^T is re-quantized, so it differs from the adapter
    model by one rounding of the weights), `dequantize_model` for the layers without adapters, and
    `save_model`/`save_config`/`tokenizer.save_pretrained` for the files.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load_config, save_config, save_model

    from ..adapters import load_adapters
    from ..fsutil import write_text_atomic
    from ..models import load_model

    info = read_run(adapter_path)
    base = model or info.base_model
    if not base:
        raise PoetError(f"{info.path / ADAPTER_CONFIG} names no base model; pass --model")
    protect = {"adapter folder": info.path}
    local = Path(base).expanduser()
    if local.is_dir():
        protect["base model folder"] = local
    out = check_output(save_path, force, protect, "--save-path")

    revision = None if model else info.config.get("revision")  # the run's revision belongs to the run's model
    loaded, tokenizer, path = load_model(base, revision, trust_remote_code)
    config = load_config(Path(path))
    quant = config.get("quantization")
    load_adapters(loaded, info.path)
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in loaded.named_modules() if hasattr(m, "fuse")]
    if fused:
        loaded.update_modules(tree_unflatten(fused))
    if dequantize:
        loaded = dequantize_model(loaded)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    warnings = []
    if not fused and info.fine_tune_type != "full":
        warnings.append("no adapter layer was found to fuse; the output equals the base model")

    with atomic_folder(out) as tmp:
        save_model(tmp, loaded, donate_model=False)
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        for pattern in ("*.py", "generation_config.json"):  # custom code and generation defaults travel along
            for f in Path(path).glob(pattern):
                shutil.copy(f, tmp / f.name)
        write_text_atomic(tmp / "README.md", model_card(info, kind="fused", base_model=base, dequantized=dequantize,
                                                        quantization=None if dequantize else quant, name=out.name))
    return FuseResult(out, base, len(fused), dequantize, None if dequantize else quant, warnings)
