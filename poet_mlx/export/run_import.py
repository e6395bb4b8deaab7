"""`poet-mlx import peft`: a Hugging Face PEFT LoRA/DoRA adapter written as an mlx-lm adapter folder (a run
folder without training), which `mlx_lm.load(model, adapter_path=RUN)`, `poet-mlx chat/eval/fuse/export` and
`poet-mlx train --init-adapter RUN` load. The mapping and what is refused: `export.peft_import`. Written like
every export (`export.folders`): never over a non-empty folder unless `force`, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import __version__
from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE, adapter_config, lora_parameters
from ..errors import PoetError
from .folders import atomic_folder, check_output
from .peft_import import AdapterBox, ImportedAdapter, adapter_box, check_fits, read_peft_adapter


@dataclass
class ImportResult:
    path: Path
    adapter: ImportedAdapter
    box: AdapterBox
    base_model: str
    warnings: list = field(default_factory=list)


def imported_config(adapter: ImportedAdapter, box: AdapterBox, base_model: str) -> dict:
    """adapter_config.json of an imported adapter: mlx-lm's keys, plus poet-mlx's flat settings and where it
    came from under "poet_mlx"."""
    from ..config import RunConfig

    kind = "dora" if adapter.dora else "lora"
    params = lora_parameters(adapter.rank, adapter.scale, adapter.dropout, box.keys)
    flat = RunConfig.from_flat({"model": base_model, "fine_tune_type": kind, "rank": adapter.rank,
                                "scale": adapter.scale, "dropout": adapter.dropout, "keys": box.keys,
                                "num_layers": box.num_layers}, source="import").to_flat()
    origin = {"format": adapter.kind, "path": str(adapter.source), "base_model_name_or_path": adapter.base_model,
              "modules": len(adapter.modules), "held_at_zero": box.held_at_zero}
    return adapter_config(kind, box.num_layers, params, base_model,
                          {"version": __version__, "config": flat, "imported_from": origin})


def import_peft(peft_dir: str | Path, out: str | Path, model: Optional[str] = None, force: bool = False,
                trust_remote_code: bool = False) -> ImportResult:
    """Write the PEFT adapter in `peft_dir` as an mlx-lm adapter folder `out` for the base `model` (default:
    the adapter's base_model_name_or_path). The model is loaded lazily, only to check that every adapted
    module exists with the adapter's sizes."""
    from mlx_lm.utils import load_model as mlx_load_model

    from ..fsutil import save_safetensors_atomic, write_json_atomic
    from ..models import resolve_model_path
    from .folders import base_quantization

    src = Path(peft_dir).expanduser()
    adapter = read_peft_adapter(src)
    base = model or adapter.base_model
    if not base:
        raise PoetError(f"{src} names no base model (base_model_name_or_path); pass --model")
    out = check_output(out, force, {"PEFT folder": src}, "--out")
    path = resolve_model_path(base)
    try:
        loaded, config = mlx_load_model(Path(path), lazy=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise PoetError(f"mlx-lm could not load the model in {path}: {str(exc).rstrip('.')}") from None
    check_fits(loaded, adapter)
    box = adapter_box(adapter.modules, len(loaded.layers))
    warnings = []
    quant = config.get("quantization") or base_quantization(str(path))[0]
    if quant:
        warnings.append(f"{base} is quantized ({quant.get('bits')}-bit) and PEFT adapters are usually trained on "
                        "the full-precision model: on this base the adapter gives close, not identical, outputs")
    with atomic_folder(out) as tmp:
        save_safetensors_atomic(tmp / ADAPTER_FILE, adapter.weights)
        write_json_atomic(tmp / ADAPTER_CONFIG, imported_config(adapter, box, base))
    return ImportResult(out, adapter, box, base, warnings)
