"""Adapters in: a Hugging Face PEFT LoRA/DoRA folder (or an mlx-lm adapter folder) read into mlx-lm's adapter
arrays, for `poet-mlx import peft` and `poet-mlx train --init-adapter` (SFT first, then DPO from there).

The inverse of `export.peft` (PEFT computes y = W x + s * lora_B(lora_A(x)), s = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; mlx-lm's LoRALinear y = W x + scale * (x @ lora_a) @ lora_b):

    <path>.lora_a = base_model.model.<path>.lora_A.weight.T    (in, r)
    <path>.lora_b = base_model.model.<path>.lora_B.weight.T    (r, out)
    <path>.m      = base_model.model.<path>.lora_magnitude_vector  (out,)   DoRA only
    scale = s

The tensors in the file are the truth about which modules are adapted (`target_modules`, `layers_to_transform`
and `exclude_modules` only chose them); what mlx-lm's format cannot hold is refused, one line each: other PEFT
methods, `bias` != "none", LoRA biases, `modules_to_save`, embedding LoRA, `fan_in_fan_out`, aLoRA, and
`rank_pattern`/`alpha_pattern` that give the modules different ranks or scales.

mlx-lm's format adapts the same `keys` in each of the last `num_layers` layers (`adapter_box`). An adapter
covering another set (SFT on layers 0-11 only, or q_proj in some layers and v_proj in others) is attached on
the smallest such box that holds it; the box's other layers are "held at zero": lora_b = 0, so they add
exactly nothing, and frozen, so training never moves them and they are never saved. mlx_lm.load attaches the
same box and finds no weights for them, so it too leaves their lora_b at zero: the same model everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE
from ..errors import PoetError
from .peft import LAYER_INDEX, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS

_PEFT_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m",
                "lora_magnitude_vector.weight": "m"}
_REFUSED_CONFIG = {  # PEFT setting -> (the value that maps, what another value does)
    "bias": ("none", "trains the base model's biases (mlx-lm's adapter format holds LoRA weights only)"),
    "lora_bias": (False, "adds a bias to lora_B (mlx-lm's LoRA layers have none)"),
    "fan_in_fan_out": (False, "is for GPT-2 style Conv1D layers, which mlx-lm's models do not have"),
    "modules_to_save": (None, "stores fully trained copies of whole modules; merge the adapter into the base "
                              "(PeftModel.merge_and_unload) and train on that model instead"),
    "layer_replication": (None, "duplicates layers of the base model"),
    "alora_invocation_tokens": (None, "is an activated LoRA (applied only after its invocation tokens)"),
    "trainable_token_indices": (None, "trains embedding rows (mlx-lm's adapter format holds LoRA weights only)"),
    "target_parameters": (None, "adapts raw parameters (mixture-of-experts weights), not linear modules"),
}


@dataclass(frozen=True)
class ImportedAdapter:
    """An adapter read from disk, in mlx-lm's terms.

    weights: mlx-lm names -> float32 mx arrays: `<path>.lora_a` (in, r), `<path>.lora_b` (r, out), DoRA
        `<path>.m` (out,); `path` as in mlx-lm's model ("model.layers.3.self_attn.q_proj").
    """

    source: Path
    kind: str  # "peft" or "mlx-lm"
    weights: dict
    rank: int
    scale: float
    dora: bool
    dropout: float
    base_model: Optional[str]

    @property
    def modules(self) -> list:
        return sorted({name.rpartition(".")[0] for name in self.weights})


@dataclass(frozen=True)
class AdapterBox:
    """What mlx-lm's adapter_config.json can say: the last `num_layers` layers, the same `keys` in each;
    `held_at_zero`: the box's module paths the adapter does not cover."""

    num_layers: int
    keys: list
    held_at_zero: list = field(default_factory=list)


# -- PEFT -> mlx-lm (pure) ----------------------------------------------------------------------------------------
def peft_to_mlx(tensors: dict) -> dict:
    """PEFT state dict -> mlx-lm adapter arrays (the inverse of `export.peft.peft_state_dict`).

    Args: {"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r),
        "...lora_magnitude_vector": (out,)}.
    Returns: {"<path>.lora_a": (in, r), "<path>.lora_b": (r, out), "<path>.m": (out,)}.
    """
    out = {}
    for name, array in tensors.items():
        leaf = next((k for k in _PEFT_LEAVES if name.endswith("." + k)), None)
        if leaf is None or not name.startswith(PEFT_PREFIX):
            hint = (" (an embedding LoRA: not imported)" if "lora_embedding" in name else
                    " (a LoRA bias: not supported)" if name.endswith("lora_B.bias") else "")
            raise PoetError(f"PEFT tensor '{name}' is not a LoRA/DoRA weight of a linear module{hint}; poet-mlx "
                            "imports lora_A, lora_B and lora_magnitude_vector only")
        path = name[len(PEFT_PREFIX): -len(leaf) - 1]
        mine = _PEFT_LEAVES[leaf]
        if f"{path}.{mine}" in out:
            raise PoetError(f"PEFT tensor '{name}' appears twice (as '{leaf}' and another spelling)")
        out[f"{path}.{mine}"] = array.T if mine != "m" else array
    return out


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def peft_rank_and_scale(config: dict, modules: list, ranks: dict) -> tuple[int, float]:
    """The one (rank, scale) every module shares, from r, lora_alpha, use_rslora and the patterns.

    `ranks`: module path -> the rank its tensors have. Raises PoetError when modules differ (mlx-lm's
    format has one rank and one scale) or a tensor's rank disagrees with the config's.
    """
    seen = set()
    for path in modules:
        r = int(_pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
        if ranks[path] != r:
            raise PoetError(f"PEFT module '{path}' has rank {ranks[path]} tensors but its config says r = {r}")
        seen.add((r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r))
    if len(seen) != 1:
        raise PoetError(f"the PEFT adapter's rank_pattern/alpha_pattern give its modules different (rank, "
                        f"scale) pairs {sorted(seen)}; mlx-lm's adapter format has one rank and one scale")
    return seen.pop()


def check_peft_config(config: dict, where: Path) -> None:
    """Refuse the PEFT settings mlx-lm's adapters cannot express (see `_REFUSED_CONFIG`)."""
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise PoetError(f"{where}: peft_type is {config.get('peft_type')!r}; poet-mlx imports LoRA and DoRA "
                        "adapters (peft_type LORA) only")
    for key, (fine, why) in _REFUSED_CONFIG.items():
        value = config.get(key, fine)
        if value != fine and not (fine is None and not value):
            raise PoetError(f"{where}: cannot import an adapter with {key} = {value!r}: it {why}")


def read_peft_adapter(folder: Path) -> ImportedAdapter:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    import mlx.core as mx

    where = folder / PEFT_CONFIG
    config = _read_json(where)
    check_peft_config(config, where)
    if not (folder / PEFT_WEIGHTS).is_file():
        raise PoetError(f"{folder} has no {PEFT_WEIGHTS}" + (" (only adapter_model.bin: load it in PEFT and "
                        "save_pretrained with safe_serialization=True)" if (folder / "adapter_model.bin").exists()
                        else ""))
    weights = {k: v.astype(mx.float32) for k, v in peft_to_mlx(mx.load(str(folder / PEFT_WEIGHTS))).items()}
    dora = bool(config.get("use_dora"))
    ranks = _check_modules(weights, dora, folder)
    rank, scale = peft_rank_and_scale(config, sorted(ranks), ranks)
    return ImportedAdapter(folder, "peft", weights, rank, scale, dora, float(config.get("lora_dropout") or 0.0),
                           config.get("base_model_name_or_path"))


def _check_modules(weights: dict, dora: bool, folder: Path) -> dict:
    """Every module has lora_a and lora_b that chain (and m for DoRA). Returns module path -> rank."""
    if not weights:
        raise PoetError(f"{folder}: the adapter file holds no LoRA weights")
    modules: dict = {}
    for name, array in weights.items():
        path, _, leaf = name.rpartition(".")
        modules.setdefault(path, {})[leaf] = array
    for path, w in modules.items():
        if "lora_a" not in w or "lora_b" not in w or (dora and "m" not in w) or ("m" in w and not dora):
            raise PoetError(f"{folder}: module '{path}' has {sorted(w)}; expected lora_a, lora_b"
                            f"{' and m (use_dora is true)' if dora else ' (use_dora is false)'}")
        if w["lora_a"].ndim != 2 or w["lora_a"].shape[1] != w["lora_b"].shape[0]:
            raise PoetError(f"{folder}: module '{path}': lora_A and lora_B do not chain "
                            f"({tuple(w['lora_a'].shape)} then {tuple(w['lora_b'].shape)})")
    return {path: int(w["lora_a"].shape[1]) for path, w in modules.items()}


def read_mlx_adapter(folder: Path) -> ImportedAdapter:
    """Read an mlx-lm adapter folder (a poet-mlx run, an import, or mlx_lm.lora's output)."""
    import mlx.core as mx

    config = _read_json(folder / ADAPTER_CONFIG)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise PoetError(f"{folder} holds a {kind!r} fine-tuning run, not LoRA/DoRA adapters; fuse it into a "
                        "model folder (poet-mlx fuse) and pass that as --model instead")
    lora = config.get("lora_parameters") or {}
    if "scale" not in lora:
        raise PoetError(f"{folder / ADAPTER_CONFIG} has no lora_parameters.scale")
    weights = {k: v.astype(mx.float32) for k, v in mx.load(str(folder / ADAPTER_FILE)).items()}
    ranks = _check_modules(weights, kind == "dora", folder)
    if len(set(ranks.values())) != 1:
        raise PoetError(f"{folder}: the adapters have several ranks {sorted(set(ranks.values()))}")
    base = ((config.get("poet_mlx") or {}).get("config") or {}).get("model") or config.get("model")
    return ImportedAdapter(folder, "mlx-lm", weights, next(iter(ranks.values())), float(lora["scale"]),
                           kind == "dora", float(lora.get("dropout", 0.0)), base)


def read_adapter(path: str | Path) -> ImportedAdapter:
    """A PEFT folder or an mlx-lm adapter folder, whichever `path` is."""
    folder = Path(path).expanduser()
    if (folder / ADAPTER_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file():
        return read_mlx_adapter(folder)
    if (folder / PEFT_CONFIG).is_file():
        return read_peft_adapter(folder)
    raise PoetError(f"no adapter in {folder}: expected a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or an "
                    f"mlx-lm adapter folder ({ADAPTER_CONFIG} + {ADAPTER_FILE})")


def adapter_fingerprint(path: str | Path) -> str:
    """Identity of an adapter folder's content (its config and weight files): part of the reference cache key
    of a run that starts from it."""
    folder = Path(path).expanduser()
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_FILE, PEFT_WEIGHTS):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except OSError:
        raise PoetError(f"cannot read {path}") from None
    except ValueError as exc:
        raise PoetError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PoetError(f"{path} is not a JSON object")
    return value


# -- the adapter on a model ------------------------------------------------------------------------------------------
def adapter_box(modules: list, total_layers: int) -> AdapterBox:
    """The smallest "last N layers x keys" layout (mlx-lm's adapter_config) that holds `modules`.

    Args: module paths "model.layers.<i>.<key>"; the model's number of layers.
    Returns: AdapterBox(N = total - min i, the keys, the box's paths not in `modules`).
    """
    layers: dict = {}
    prefixes = set()
    for path in modules:
        found = LAYER_INDEX.search(path)
        if not found:
            raise PoetError(f"adapted module '{path}' is not inside the model's numbered layers; poet-mlx imports "
                            "adapters on transformer-layer modules only")
        prefixes.add(path[: found.start()])
        layers.setdefault(int(found.group(1)), set()).add(path[found.end():])
    if len(prefixes) != 1:
        raise PoetError(f"the adapter adapts layers of several stacks {sorted(prefixes)}; poet-mlx imports "
                        "adapters on one stack of transformer layers")
    prefix = prefixes.pop()
    keys = sorted(set().union(*layers.values()))
    first = min(layers)
    if max(layers) >= total_layers:
        raise PoetError(f"the adapter adapts layer {max(layers)} but the model has {total_layers} layers "
                        f"(0 to {total_layers - 1}): it was made for another model")
    box = [f"{prefix}{'.' if prefix else ''}layers.{i}.{k}" for i in range(first, total_layers) for k in keys]
    held = sorted(set(box) - set(modules))
    return AdapterBox(total_layers - first, keys, held)


def check_fits(model, adapter: ImportedAdapter) -> None:
    """Every adapted module exists in `model` as a linear layer with the adapter's in/out sizes."""
    import mlx.nn as nn

    found = dict(model.named_modules())
    for path in adapter.modules:
        module = found.get(path)
        if module is None:
            raise PoetError(f"{adapter.source}: the adapter targets '{path}', which this model does not have; it "
                            "was made for another model (or another naming of it); pass its base with --model")
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise PoetError(f"{adapter.source}: the adapter targets '{path}', a {type(module).__name__} in this "
                            "model; poet-mlx imports LoRA on linear layers only")
        out_dim, packed = module.weight.shape
        in_dim = packed * 32 // module.bits if isinstance(module, nn.QuantizedLinear) else packed
        a, b = adapter.weights[f"{path}.lora_a"], adapter.weights[f"{path}.lora_b"]
        if (a.shape[0], b.shape[1]) != (in_dim, out_dim):
            raise PoetError(f"{adapter.source}: module '{path}' maps {a.shape[0]} -> {b.shape[1]} features but "
                            f"the model's layer maps {in_dim} -> {out_dim}: the adapter was made for another model")


def init_settings(cfg, adapter: ImportedAdapter, model) -> tuple:
    """The run settings with the adapter's layout (fine_tune_type, rank, scale, keys, num_layers), and its box.

    A setting the user changed from its default to something else than the adapter's is an error: the
    adapter fixes the layout. Dropout stays the run's own (a training choice, not part of the function).
    """
    from ..config import LoRAConfig

    check_fits(model, adapter)
    box = adapter_box(adapter.modules, len(model.layers))
    wanted = {"fine_tune_type": "dora" if adapter.dora else "lora", "rank": adapter.rank, "scale": adapter.scale,
              "keys": box.keys, "num_layers": box.num_layers}
    default = LoRAConfig()
    for key, value in wanted.items():
        given = getattr(cfg.lora, key)
        same = sorted(given) == value if key == "keys" and given else given == value
        if given != getattr(default, key) and not same and not (key == "num_layers" and given == -1
                                                                and box.num_layers == len(model.layers)):
            raise PoetError(f"--{key.replace('_', '-')} {given} differs from the init adapter's {value} "
                            f"({adapter.source}); the adapter fixes it: drop --{key.replace('_', '-')}")
    lora = dataclasses.replace(cfg.lora, **wanted)
    return dataclasses.replace(cfg, lora=lora), box


def init_notes(adapter: ImportedAdapter, box: AdapterBox, has_reference: bool) -> list:
    """What the run header says about a run that starts from `adapter`."""
    kind = "DoRA" if adapter.dora else "LoRA"
    notes = [f"starting from the {adapter.kind} {kind} adapter {adapter.source} ({len(adapter.modules)} modules, "
             f"rank {adapter.rank}, scale {adapter.scale:g})"]
    if box.held_at_zero:
        notes.append(f"{len(box.held_at_zero)} modules of the last {box.num_layers} layers x {len(box.keys)} keys "
                     "are not in the adapter: held at zero (frozen, lora_b = 0), as mlx-lm loads them")
    if has_reference:
        notes.append("reference = the policy at the start (base + the init adapter), scored before the first update")
    return notes
