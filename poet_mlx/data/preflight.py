"""Checks before a run: will it fit in memory, and what does the data look like after the template and cuts?

`memory_warning` is called by `run_training` before the reference pass; `check_data` is the library side of
`poet-mlx data check DATA` (the CLI draws its result). Both only read: they never write or train.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import RunConfig
from ..errors import PoetError

# -- memory ------------------------------------------------------------------------------------------------

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


# -- data check --------------------------------------------------------------------------------------------

SHOWN_PROBLEMS = 5
TOKENIZER_FILES = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.py"]


def load_tokenizer(model: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The mlx-lm tokenizer of `model` (a local folder, or a hub id: only its tokenizer files are fetched)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    from ..models import HUB_ID, resolve_model_path

    local = Path(model).expanduser()
    if local.exists():
        path = resolve_model_path(model)
    elif HUB_ID.match(model):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, revision=revision, allow_patterns=TOKENIZER_FILES))
        except Exception as exc:  # offline, unknown or gated repo: all user-fixable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PoetError(f"could not get the tokenizer of '{model}' from the Hugging Face hub "
                            f"({type(exc).__name__}: {first}). Check the id and your network, or pass a local "
                            "model folder") from None
    else:
        raise PoetError(f"model not found: '{model}' is neither a local folder nor a Hugging Face hub id "
                        "(owner/name)")
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    try:
        return mlx_load_tokenizer(path, {"trust_remote_code": trust_remote_code}, eos_token_ids=eos)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PoetError(f"could not load the tokenizer in {path}: {first}") from None
NO_LIMIT = 1 << 40


def _stats(values: Sequence[float]) -> dict:
    if not len(values):
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def _chars(text) -> int:
    return len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def row_report(rows: list, load_report) -> dict:
    """Counts, duplicates and character lengths of one split's valid rows."""
    full = Counter(_key(r.prompt, r.chosen, r.rejected, r.system) for r in rows)
    prompts = Counter(_key(r.prompt, r.system) for r in rows)
    kinds = getattr(load_report, "problem_kinds", {}) or {}
    return {
        "format": load_report.format,
        "rows": load_report.rows_read,
        "valid_rows": len(rows),
        "invalid_rows": load_report.rows_skipped,
        "problem_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "problems": list(load_report.problems[:SHOWN_PROBLEMS]),
        "identical_pairs": sum(n for k, n in kinds.items() if "identical" in k),
        "duplicate_rows": sum(n - 1 for n in full.values()),
        "repeated_prompts": sum(n - 1 for n in prompts.values()),
        "notes": list(load_report.notes),
        "chars": {name: _stats([_chars(getattr(r, name)) for r in rows]) for name in ("prompt", "chosen", "rejected")},
    }


def token_report(rows: list, tokenizer, cfg: RunConfig) -> dict:
    """Token lengths after the chat template and EOS, what the length limits cut or drop, and what POET cuts.

    The rows are tokenized once without limits; the limits are then applied exactly as training applies
    them (`tokenization._cut`), so the counts match what `poet-mlx train` reports.
    """
    from ..poet import scored_lengths
    from .tokenization import TokenizeReport, _cut, tokenize_pairs, uses_chat_template

    d, ls = cfg.data, cfg.loss
    full, _ = tokenize_pairs(rows, tokenizer, NO_LIMIT, NO_LIMIT - 1, d.chat_template)
    limits = TokenizeReport(pairs_in=len(full))
    kept = []
    for p in full:
        cut = _cut(list(p.prompt), list(p.chosen), list(p.rejected), d.max_length, d.max_prompt_length, limits)
        if cut is not None:
            kept.append(cut)
    limits.pairs_out = len(kept)
    poet_cut, removed, response_tokens = 0, 0, 0
    for _, c, r in kept:
        sc, sr = scored_lengths(len(c), len(r), True, ls.poet_ratio)
        if sc < len(c) or sr < len(r):
            poet_cut += 1
        removed += len(c) - sc + len(r) - sr
        response_tokens += len(c) + len(r)
    return {
        "chat_template": uses_chat_template(tokenizer, d.chat_template),
        "tokens": {"prompt": _stats([len(p.prompt) for p in full]),
                   "chosen": _stats([len(p.chosen) for p in full]),
                   "rejected": _stats([len(p.rejected) for p in full]),
                   "pair": _stats([len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in full])},
        "limits": {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                   "prompts_cut": limits.prompts_cut, "pairs_with_responses_cut": limits.responses_cut,
                   "pairs_dropped": dict(limits.dropped), "pairs_kept": len(kept)},
        "poet": {"poet_ratio": ls.poet_ratio, "pairs_cut": poet_cut,
                 "mean_tokens_removed_per_cut_pair": removed / poet_cut if poet_cut else 0.0,
                 "response_tokens_removed": removed / response_tokens if response_tokens else 0.0},
    }


def check_data(cfg: RunConfig, tokenizer=None) -> dict:
    """The `poet-mlx data check` report of cfg.data (every split present), as a JSON-ready dict.

    Rows are read leniently (invalid rows are counted and listed, not fatal) so the report shows everything
    at once; `errors` lists what would stop `poet-mlx train` with these settings, `ok` is True when nothing
    would. Without a tokenizer only character lengths are reported.

    Raises:
        PoetError: the data source does not exist, is not reachable, or its train split has no valid row.
    """
    from .sources import SPLITS, check_source, load_split

    d = cfg.data
    check_source(d)
    lenient = dataclasses.replace(d, skip_invalid=True)
    report: dict = {"source": d.data, "splits": {}, "errors": [], "hints": []}
    for split in SPLITS:
        try:
            rows, load_report = load_split(lenient, split)
        except PoetError as exc:
            if split == "train":  # unreadable, unreachable or entirely invalid: nothing else to report
                raise
            report["splits"][split] = {"error": str(exc)}
            report["errors"].append(f"{split}: {exc}")
            continue
        if load_report.format == "none":
            continue
        info = row_report(rows, load_report)
        if info["invalid_rows"] and not d.skip_invalid:
            n = info["invalid_rows"]
            report["errors"].append(f"{split}: {n} invalid row{'s' if n != 1 else ''} of {info['rows']}; training "
                                    "stops on them: fix them, or pass --skip-invalid to drop them")
        if tokenizer is not None and rows:
            try:
                info.update(token_report(rows, tokenizer, cfg))
            except PoetError as exc:  # e.g. conversational rows and a tokenizer without a chat template
                report["errors"].append(f"{split}: {exc}")
            else:
                if not info["limits"]["pairs_kept"]:
                    report["errors"].append(
                        f"{split}: the length limits drop every pair; raise --max-length (now {d.max_length}) "
                        f"or --max-prompt-length (now {d.max_prompt_length})")
        report["splits"][split] = info
    if "train" not in report["splits"]:
        report["errors"].append(f"no train split in {d.data}")
    _hints(report, tokenizer is not None)
    report["ok"] = not report["errors"]
    return report


def _hints(report: dict, tokenized: bool) -> None:
    hints = report["hints"]
    for split, info in report["splits"].items():
        if info.get("duplicate_rows"):
            hints.append(f"{split}: {info['duplicate_rows']} rows repeat an earlier row exactly (they weigh double)")
        dropped = sum(info.get("limits", {}).get("pairs_dropped", {}).values())
        if dropped:
            hints.append(f"{split}: the length limits drop {dropped} pairs; raise --max-length to keep them")
        cut = info.get("limits", {}).get("pairs_with_responses_cut", 0)
        if cut:
            hints.append(f"{split}: {cut} pairs have a response cut by --max-length (their EOS is lost)")
    if not tokenized:
        hints.append("token lengths, length-limit cuts and POET cuts need the tokenizer: pass --model")
