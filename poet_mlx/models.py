"""Models through mlx-lm: a local folder, a GGUF file, a catalog name or a hub id -> (model, tokenizer, path), and
what the run header says about it. Adapters (attaching, saving, loading, switching off) are `adapters`.

A `.gguf` file (llama.cpp, Ollama, LM Studio) is converted once into an mlx-lm folder in poet-mlx's cache
(`gguf`); a catalog name such as `smollm2-135m-instruct` is fetched by `catalog`. Either way the rest of
poet-mlx, and mlx-lm's own tools, see an ordinary mlx-lm model folder (`path`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import PoetError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str, revision: Optional[str] = None) -> Path:
    """The mlx-lm folder of `model`: a local folder; a .gguf file, converted into the cache; a catalog name,
    fetched (`catalog`); or a hub id, downloaded if needed. PoetError otherwise."""
    local = Path(model).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise PoetError(f"--model {local} is a file but not a .gguf model; pass a model folder (config.json and "
                            "*.safetensors), a .gguf file or a Hugging Face hub id")
        from .gguf import gguf_cache_folder

        return gguf_cache_folder(local)
    if local.exists():
        if not (local / "config.json").is_file():
            raise PoetError(f"model folder {local} has no config.json: it is not an mlx-lm/Hugging Face model. "
                            "Point --model at the folder that holds config.json and *.safetensors")
        if not any(local.glob("*.safetensors")):
            raise PoetError(f"model folder {local} has no *.safetensors weights; convert it with "
                            "`mlx_lm.convert --hf-path ...` first")
        return local
    from . import catalog

    if catalog.is_catalog_name(model):
        return catalog.fetch(model).path
    if not HUB_ID.match(model):
        raise PoetError(f"model not found: '{model}' is neither a local folder, a .gguf file, a known model name "
                        f"({', '.join(sorted(catalog.CATALOG))}) nor a Hugging Face hub id (owner/name)")
    return catalog.download(model, revision)


def load_model(model: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """Load an mlx-lm model and tokenizer. Returns (model, tokenizer, path)."""
    from mlx_lm.utils import load

    path = resolve_model_path(model, revision)
    try:
        loaded, tokenizer = load(str(path), tokenizer_config={"trust_remote_code": trust_remote_code})
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        # RuntimeError: truncated/corrupt safetensors; TypeError: config.json lacks a required setting.
        reason = str(exc).rstrip(".")
        raise PoetError(f"mlx-lm could not load the model in {path}: {reason}. Check that the folder holds a "
                        "complete model (config.json, *.safetensors, tokenizer files); re-download it if not") from None
    from .backends.fast_layers import accelerate_layers
    from .backends.fast_quant import accelerate_quantized
    from .backends.lean_lora import lean_blocks
    from .backends.runahead import bound_run_ahead

    bound_run_ahead()  # only with POET_MLX_RUNAHEAD=bounded (Linux CPU): the lowest memory (runahead.py)
    accelerate_quantized(loaded)  # Linux CPU only: 4-bit layers via dequantize + OpenBLAS (fast_quant.py)
    accelerate_layers(loaded)  # Linux CPU only: attention and SwiGLU written for the CPU (fast_layers.py)
    lean_blocks(loaded)  # Linux CPU only: adapted blocks whose backward recomputes what is cheap (lean_lora.py)
    return loaded, tokenizer, path


@dataclass(frozen=True)
class ModelFacts:
    """What the dashboard and model card say about a model."""

    path: str
    model_type: str
    num_layers: int
    quantization: Optional[str]
    total_params: int
    trainable_params: int


def model_facts(model, path: Path) -> ModelFacts:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    config = json.loads((Path(path) / "config.json").read_text())
    quant = config.get("quantization") or config.get("quantization_config")
    qdesc = f"{quant.get('bits')}-bit (group {quant.get('group_size')})" if isinstance(quant, dict) and quant.get("bits") else None
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return ModelFacts(str(path), config.get("model_type", "?"), len(model.layers), qdesc,
                      int(get_total_parameters(model)), int(trainable))


