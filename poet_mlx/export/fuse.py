"""Fuse a run's adapters into a standalone model with mlx-lm's own fuse (each LoRA/DoRA layer's `.fuse()`),
optionally dequantized, saved with mlx-lm's writers: the folder loads with `mlx_lm.load`, and when dequantized
with `transformers` too. Written like every export (`export.folders`), with a model card.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG
from ..errors import PoetError
from .folders import atomic_folder, check_output
from .model_card import model_card, read_run


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
