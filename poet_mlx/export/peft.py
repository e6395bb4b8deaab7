"""Export a run's adapters to Hugging Face PEFT: adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained` loads, with a model card (README.md). Written like every export
(`export.folders`): never into the run folder, never over a non-empty folder unless `force`, atomically.

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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE
from ..errors import PoetError
from ..models import HUB_ID
from .folders import atomic_folder, base_quantization, check_output, original_base
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
    pattern: Optional[str] = None  # a regex of the exact module paths when no names x layers product fits


def peft_state_dict(adapters: dict, dora: bool) -> tuple[dict, PeftLayout]:
    """Map mlx-lm adapter arrays to PEFT's state dict and find the layout PEFT's config must describe.

    Args:
        adapters: mlx-lm names -> arrays: `<path>.lora_a` (in, r), `<path>.lora_b` (r, out) and, for DoRA,
            `<path>.m` (out,).
        dora: whether the run is DoRA (then every module must have its `m`).
    Returns:
        ({"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r),
          "...lora_magnitude_vector": (out,)}, PeftLayout).
    Modules that are not the same leaf names in every adapted layer (an imported adapter's own layout) get a
    `pattern`: PEFT's regex form of target_modules, matching exactly the adapted module paths.
    Raises PoetError for what PEFT's LoRA config cannot express: full fine-tuning weights, mixture-of-experts
    (switch) layers, embedding LoRA, or modules outside numbered layers.
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
    if len(ranks) != 1:
        raise PoetError(f"the adapters have several ranks {sorted(ranks)}; expected one")
    first = next(iter(layouts.values()))
    leaves = sorted({p.rpartition(".")[2] for p in first})
    if any(v != first for v in layouts.values()) or len(leaves) != len(first):
        # names x layers would adapt modules that were not trained: name each module instead
        pattern = "|".join(re.escape(p) for p in sorted(modules))
        return out, PeftLayout(sorted({p.rpartition(".")[2] for p in modules}), sorted(layouts), ranks.pop(), dora,
                               pattern)
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
        # PEFT full-matches a string target_modules against module paths, and then takes no layer filter
        "target_modules": layout.pattern or layout.target_modules,
        "layers_to_transform": None if layout.pattern else layout.layers,
        "layers_pattern": None if layout.pattern else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


# -- facts about the base model -------------------------------------------------------------------------------


# -- output folders ---------------------------------------------------------------------------------------------


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


