"""Adapters through mlx-lm: LoRA/DoRA/full attached to a model, switched off, saved and loaded.

Adapters are saved in mlx-lm's format (`adapters.safetensors` + `adapter_config.json` with
`fine_tune_type`, `num_layers`, `lora_parameters`), so `mlx_lm.generate --adapter-path` and `mlx_lm.fuse`
load them too. poet-mlx adds its own settings under the `poet_mlx` key, which mlx-lm ignores.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import PoetError
from .fsutil import save_safetensors_atomic, write_json_atomic

ADAPTER_FILE = "adapters.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def lora_parameters(rank: int, scale: float, dropout: float, keys) -> dict:
    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys:
        params["keys"] = list(keys)
    return params


def attach_trainable(model, fine_tune_type: str, num_layers: Optional[int], lora_params: dict) -> int:
    """Freeze the model, then make the adapted part trainable (the last `num_layers`; None or -1: all). Returns
    the number of adapted layers.

    LoRA/DoRA layers come from mlx-lm (`linear_to_lora_layers`); their init draws from mx.random, so seed it
    first for a reproducible run.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    total = len(model.layers)
    num_layers = -1 if num_layers is None else num_layers
    if num_layers > total:
        raise PoetError(f"num_layers is {num_layers} but the model has only {total} layers; "
                        f"pass --num-layers {total} (or -1 for all)")
    n = total if num_layers == -1 else num_layers
    model.freeze()
    if fine_tune_type == "full":
        for layer in model.layers[total - n :]:
            layer.unfreeze()
        return n
    try:
        linear_to_lora_layers(model, n, lora_params, use_dora=fine_tune_type == "dora")
    except ValueError as exc:
        raise PoetError(f"cannot attach {fine_tune_type} adapters: {exc}") from None
    if not any(True for _ in _trainable_leaves(model)):
        keys = lora_params.get("keys")
        raise PoetError(f"no layer matched the target modules {keys}; list module names inside a layer, "
                        "e.g. self_attn.q_proj self_attn.v_proj")
    return n


def load_initial_adapter(model, weights: dict, held_at_zero=()) -> None:
    """Start the attached adapters from `weights` (mlx-lm names -> arrays, e.g. an imported PEFT adapter).

    The adapter layers in `held_at_zero` (module paths the box of `attach_trainable` holds but the adapter
    does not cover) get lora_b = 0, so they add exactly nothing, and are frozen: never trained, never saved.
    Raises PoetError for a weight the attached layers do not have or whose shape differs.
    """
    import mlx.core as mx

    params = trainable_weights(model)
    for name, array in weights.items():
        if name not in params:
            raise PoetError(f"the initial adapter has '{name}', which the attached adapters lack; check the "
                            "adapter's target modules against --keys / --num-layers")
        if tuple(array.shape) != tuple(params[name].shape):
            raise PoetError(f"the initial adapter's '{name}' is {tuple(array.shape)} but the attached layer "
                            f"holds {tuple(params[name].shape)}")
    model.load_weights(list(weights.items()), strict=False)
    modules = dict(model.named_modules())
    for path in held_at_zero:
        layer = modules[path]
        layer.lora_b = mx.zeros_like(layer.lora_b)
        layer.freeze()
    mx.eval(model.parameters())


def enable_grad_checkpoint(model) -> None:
    """Recompute each transformer layer's activations in the backward pass (less memory, ~30% more time).

    Only this model's layers change: each gets a one-off subclass whose __call__ goes through
    `mx.checkpoint`, so parameter names (and adapter files) stay as they are, and other models in the
    process are untouched (mlx-lm's helper patches the layer class itself). The last layer is left alone:
    its backward pass starts right after its forward, so recomputing it would cost time and save nothing
    (measured on the benchmark's 4-layer model: 9% of the training time, and a 3% lower peak).
    """
    import mlx.core as mx

    for layer in model.layers[:-1]:
        base = type(layer)
        if getattr(base, "_poet_checkpointed", False):
            continue

        def checkpointed(self, *args, __base=base, **kwargs):
            def inner(params, *a, **kw):
                self.update(params)
                return __base.__call__(self, *a, **kw)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(f"Checkpointed{base.__name__}", (base,),
                               {"__call__": checkpointed, "_poet_checkpointed": True})


def _adapter_layers(model) -> list[tuple[str, object, object]]:
    """(name, adapter module, wrapped base module) for every mlx-lm LoRA/DoRA layer in `model`."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    out = []
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASwitchLinear, DoRALinear)):
            out.append((name, module, module.linear))
        elif isinstance(module, (LoRAEmbedding, DoRAEmbedding)):
            out.append((name, module, module.embedding))
    return out


def has_adapters(model) -> bool:
    """Whether LoRA/DoRA layers are attached to `model` (what a reference computed by it includes)."""
    return bool(_adapter_layers(model))


@contextmanager
def adapters_disabled(model):
    """Run `model` as its base inside the block: adapter layers are swapped for the modules they wrap.

    Exact for LoRA and DoRA alike (zeroing a DoRA scale would still apply its magnitude vector). The
    adapters are put back on exit, even after an exception. A model without adapters is left as it is.
    """
    from mlx.utils import tree_unflatten

    layers = _adapter_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(name, base) for name, _, base in layers]))
    try:
        yield model
    finally:
        if layers:
            model.update_modules(tree_unflatten([(name, adapter) for name, adapter, _ in layers]))


def _trainable_leaves(model):
    from mlx.utils import tree_flatten

    return (k for k, _ in tree_flatten(model.trainable_parameters()))


def trainable_weights(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(fine_tune_type: str, num_layers: int, lora_params: dict, base_model: str,
                   poet_mlx: dict) -> dict:
    """adapter_config.json content in mlx-lm's format, plus our settings under `poet_mlx`."""
    return {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_params,
        "model": base_model,
        "poet_mlx": poet_mlx,
    }


def save_adapters(folder: Path, model, config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json atomically (weights first, config last)."""
    folder = Path(folder)
    save_safetensors_atomic(folder / ADAPTER_FILE, trainable_weights(model))
    write_json_atomic(folder / ADAPTER_CONFIG, config)


def load_adapters(model, adapter_path: str | Path):
    """Apply saved adapters (ours or mlx-lm's) to a freshly loaded model."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    path = Path(adapter_path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_FILE).is_file():
        raise PoetError(f"no adapters in {path}: expected {ADAPTER_CONFIG} and {ADAPTER_FILE} "
                        "(the --adapter-path of a finished or checkpointed run)")
    try:
        return mlx_load_adapters(model, str(path))
    except ValueError as exc:
        raise PoetError(f"adapters in {path} do not fit this model: {exc}") from None
