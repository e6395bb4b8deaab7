"""Will a run fit in memory? An estimate before training, and a check of the measured peak while it runs.

`memory_warning` is called by `train.run.run_training` before the reference pass; `peak_memory_warning` by the
trainer at each report, so every reporter (the dashboard, `--plain` lines, metrics.jsonl) gets the warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from ..config import RunConfig

ACTIVATIONS_PER_HIDDEN = 16
"""Values of width `hidden` a transformer layer keeps per token for its backward pass (norm inputs, q/k/v/o,
residuals, LoRA intermediates); a rough count, so the estimate is good to a factor of about 2."""
ACTIVATIONS_PER_FFN = 4
"""Values of width `intermediate_size` kept per token (gate, up, activation, product)."""
LOGIT_COPIES = 3
"""(R, V) float32 arrays alive at the peak of the loss (R: the batch's response tokens; the head runs there
only): logits, their gradient, one temporary."""
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "sgd": 0, "adafactor": 1, "lion": 1, "muon": 1}
FIT_FRACTION = 0.9
"""Warn when the estimate passes this share of the machine's memory (the OS and other programs need some)."""


@dataclasses.dataclass
class MemoryEstimate:
    """Peak training memory, in bytes, by part."""

    weights: int
    trainable: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits


def estimate_memory(weight_bytes: int, trainable_params: int, dims: dict, batch_size: int, seq_len: int,
                    grad_checkpoint: bool = False, optimizer: str = "adamw", accumulation: int = 1,
                    act_bytes: int = 2, response_len: Optional[int] = None) -> MemoryEstimate:
    """A rough peak-memory estimate of one training step.

    Args:
        weight_bytes: bytes of all model parameters as loaded (quantized weights count packed).
        trainable_params: number of trainable values (float32: the value, its gradient, optimizer slots,
            and an accumulation buffer when accumulation > 1).
        dims: hidden_size, num_hidden_layers, intermediate_size, vocab_size, num_attention_heads.
        batch_size: pairs per micro-batch B; a forward holds 2B sequences (chosen and rejected).
        seq_len: the longest padded sequence length T of the data.
        act_bytes: bytes per activation value (2 for bf16/fp16 models, 4 for float32).
        response_len: the longest response kept, in tokens (default seq_len): logits exist only there.
    """
    rows, t = 2 * batch_size, seq_len
    hidden, layers = dims["hidden_size"], dims["num_hidden_layers"]
    ffn, vocab, heads = dims["intermediate_size"], dims["vocab_size"], dims["num_attention_heads"]
    per_layer_token = (ACTIVATIONS_PER_HIDDEN * hidden + ACTIVATIONS_PER_FFN * ffn + heads * t) * act_bytes
    if grad_checkpoint:  # only each layer's input is kept; one layer is recomputed at a time
        activations = rows * t * (layers * hidden * act_bytes + per_layer_token)
    else:
        activations = rows * t * layers * per_layer_token
    slots = 2 + OPTIMIZER_SLOTS.get(optimizer, 2) + (1 if accumulation > 1 else 0)
    return MemoryEstimate(weights=int(weight_bytes), trainable=int(trainable_params) * 4 * slots,
                          activations=int(activations),
                          logits=int(rows * (response_len or t) * vocab * 4 * LOGIT_COPIES))


def total_memory() -> Optional[int]:
    """Memory the run can use, in bytes: Metal's recommended working set on a Mac, else physical RAM."""
    try:
        import mlx.core as mx

        info = mx.device_info()  # Metal reports its limits; the CPU backend does not
        for key in ("max_recommended_working_set_size", "memory_size"):
            if info.get(key):
                return int(info[key])
    except Exception:  # an older MLX without device_info, or no device information
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def model_dims(model_path: Path) -> Optional[dict]:
    """The sizes `estimate_memory` needs, from config.json (None when they are not all there)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = {**config, **config.get("text_config", {})}  # multimodal configs nest the language model
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    if not all(isinstance(config.get(k), int) for k in keys):
        return None
    return {k: config[k] for k in keys}


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def estimate_run_memory(model, model_path, cfg: RunConfig, train_set) -> Optional[tuple[MemoryEstimate, int]]:
    """(estimate, padded sequence length) of a prepared run: the model with its trainable part attached and
    the training PairSet. None when config.json lacks the sizes or there is no data."""
    from mlx.utils import tree_flatten

    from ..batching import PAD_MULTIPLE, round_up

    dims = model_dims(model_path)
    if dims is None or not len(train_set):
        return None
    params = tree_flatten(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in params)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    floats = Counter(v.dtype.size for _, v in params if "float" in str(v.dtype))
    act_bytes = floats.most_common(1)[0][0] if floats else 2  # the dtype most weights use
    longest = max(lay.prompt_len + max(lay.keep_chosen, lay.keep_rejected) for lay in train_set.layouts)
    seq_len = round_up(longest, PAD_MULTIPLE)
    response_len = max(max(lay.keep_chosen, lay.keep_rejected) for lay in train_set.layouts)
    t = cfg.train
    est = estimate_memory(weight_bytes, trainable, dims, t.batch_size, seq_len, t.grad_checkpoint, t.optimizer,
                          t.grad_accumulation_steps, act_bytes, response_len)
    return est, seq_len


def memory_warning(model, model_path, cfg: RunConfig, train_set, available: Optional[int] = None) -> Optional[str]:
    """A warning when the run's estimated peak memory passes FIT_FRACTION of the machine's; else None.

    `available`: memory in bytes (default: `total_memory()`).
    """
    available = available if available is not None else total_memory()
    found = estimate_run_memory(model, model_path, cfg, train_set)
    if found is None or not available:
        return None
    est, seq_len = found
    if est.total <= FIT_FRACTION * available:
        return None
    t = cfg.train
    fixes = "lower --batch-size or --max-length" + ("" if t.grad_checkpoint else ", or pass --grad-checkpoint")
    return (f"this run may not fit in memory: about {_size(est.total)} at its peak (weights {_size(est.weights)}, "
            f"adapters and optimizer {_size(est.trainable)}, activations {_size(est.activations)} and logits "
            f"{_size(est.logits)} for {2 * t.batch_size} sequences of up to {seq_len} tokens) against "
            f"{_size(available)} of memory; {fixes}")


def peak_memory_warning(peak_bytes: int, available: Optional[int] = None) -> Optional[str]:
    """A warning when a measured peak passes FIT_FRACTION of the machine's memory (`total_memory()` unless
    `available` is given, in bytes); else None."""
    available = available if available is not None else total_memory()
    if not available or peak_bytes <= FIT_FRACTION * available:
        return None
    return (f"peak memory {_size(peak_bytes)} is over {FIT_FRACTION:.0%} of the machine's {_size(available)}: "
            "lower --batch-size or --max-length, or add --grad-checkpoint")
