"""The model card (README.md) of a fused model or a PEFT export, from what a run folder records.

A run folder holds mlx-lm's adapter_config.json (our flat config under "poet_mlx"/"config") and metrics.jsonl;
plain mlx-lm adapter folders work too, with fewer facts. The card's front matter is what the Hugging Face hub
reads (base_model, library_name, tags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE
from ..errors import PoetError
from ..losses.registry import default_beta, spec, split_names, title_of
from ..models import HUB_ID


# -- the run folder -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about itself: mlx-lm's adapter config, our flat config, the metrics log."""

    path: Path
    adapter_config: dict
    config: dict
    metrics: list

    @property
    def fine_tune_type(self) -> str:
        return self.adapter_config.get("fine_tune_type", "lora")

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("model") or self.adapter_config.get("model")


def read_run(adapter_path: str | Path) -> RunInfo:
    """Read a run folder (ours, or plain mlx-lm adapters: then config and metrics are empty)."""
    path = Path(adapter_path).expanduser()
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file() or not (path / ADAPTER_FILE).is_file():
        raise PoetError(f"no adapters in {path}: expected {ADAPTER_CONFIG} and {ADAPTER_FILE} "
                        "(pass the --adapter-path of a finished or checkpointed run)")
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise PoetError(f"{cfg_file} is not valid JSON ({exc})") from None
    config = (adapter_cfg.get("poet_mlx") or {}).get("config") or {}
    metrics = []
    metrics_file = path / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-write: the card simply uses the records before it
    return RunInfo(path, adapter_cfg, config, metrics)


def final_metrics(metrics: list[dict]) -> tuple[dict, dict]:
    """(last validation record, last training record) of a metrics log; {} where there is none."""
    evals = [m for m in metrics if any(k.startswith("eval_") for k in m)]
    trains = [m for m in metrics if "loss" in m]
    return (evals[-1] if evals else {}), (trains[-1] if trains else {})


# -- model card -------------------------------------------------------------------------------------------------
CARD_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def objective_fact(c: dict) -> str:
    """"sigmoid bco_pair sft (weights 0.8, 0.2, 1), beta 0.1, ..." from a run's flat settings: the loss, beta,
    and each knob its losses read (`losses.registry`), where it differs from its default."""
    loss = c["loss"]
    names = split_names(loss)
    try:
        specs = [spec(n) for n in names]
    except KeyError:
        return str(loss)
    beta = c.get("beta") if c.get("beta") is not None else default_beta(specs)
    text = loss + (f" (weights {', '.join(_num(w) for w in c['loss_weights'])})" if c.get("loss_weights") else "")
    text += f", beta {_num(beta)}"
    knobs = [k for s in specs for k in s.knobs]
    if "gamma_beta_ratio" in knobs:
        ratio = c.get("gamma_beta_ratio", 0.5)
        text += f", gamma {_num(ratio * beta)} (gamma_beta_ratio {_num(ratio)})"
    defaults = {"label_smoothing": 0.0, "sft_weight": 0.0, "cpo_alpha": 1.0, "discopop_tau": 0.05}
    for knob, default in defaults.items():
        shown = c.get(knob, default) != default or knob == "cpo_alpha"  # CPO's NLL weight always matters
        if knob in knobs and shown:
            text += f", {knob} {_num(c.get(knob, default))}"
    if c.get("ld_alpha") is not None:
        text += f", ld_alpha {_num(c['ld_alpha'])} (LD-DPO)"
    return text


def training_facts(info: RunInfo) -> list[tuple[str, str]]:
    """(setting, value) rows describing how the run was trained, from its saved config."""
    c, a = info.config, info.adapter_config
    lora = a.get("lora_parameters") or {}
    rows = []
    loss = c.get("loss")
    if loss:
        rows.append(("objective", objective_fact(c)))
        poet = "no"
        if c.get("poet"):
            poet = "yes: both responses of a pair scored on their first k = min(len) tokens"
            if c.get("poet_ratio", 1.0) != 1.0:
                poet += f", keeping max(1, floor({_num(c['poet_ratio'])} * k))"
        rows.append(("POET", poet))
    adapters = f"{info.fine_tune_type}"
    if info.fine_tune_type != "full":
        adapters += (f", rank {lora.get('rank')}, scale {_num(lora.get('scale'))}, dropout "
                     f"{_num(lora.get('dropout', 0.0))}, keys {', '.join(lora.get('keys') or []) or 'all linear'}")
    rows.append(("adapters", f"{adapters}; last {a.get('num_layers')} layers"))
    if c.get("data"):
        split = f" ({c['data_config']})" if c.get("data_config") else ""
        rows.append(("data", f"{c['data']}{split}"))
    steps = max((m.get("step", 0) for m in info.metrics), default=None)
    if c.get("learning_rate") is not None:
        training = (f"{steps if steps is not None else '?'} steps, batch {c.get('batch_size')} x "
                    f"{c.get('grad_accumulation_steps', 1)} accumulation, {c.get('optimizer')} lr "
                    f"{_num(c.get('learning_rate'))} ({c.get('lr_schedule')}), seed {c.get('seed')}")
        rows.append(("training", training))
    version = (a.get("poet_mlx") or {}).get("version")
    if version:
        rows.append(("trained with", f"poet-mlx {version}"))
    return rows


def model_card(info: RunInfo, kind: str, base_model: str, dequantized: bool = False,
               quantization: Optional[dict] = None, name: str = "MODEL") -> str:
    """README.md for a fused model (`kind="fused"`) or a PEFT export (`kind="peft"`).

    YAML front matter the hub reads, the training facts, the final metrics of the run, and how to load it.
    """
    c = info.config
    tags = ["poet-mlx", *split_names(c.get("loss") or ""), "poet" if c.get("poet") else "", info.fine_tune_type]
    tags += ["peft"] if kind == "peft" else ["mlx"]
    library = "peft" if kind == "peft" else ("transformers" if dequantized else "mlx")
    front = ["---"]
    if HUB_ID.match(base_model or "") and not Path(base_model).expanduser().exists():
        front.append(f"base_model: {base_model}")
    front += [f"library_name: {library}", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in tags if t] + ["---", ""]
    method = title_of(c.get("loss"), c.get("loss_weights")) + (" + POET" if c.get("poet") else "")
    what = {"peft": "Hugging Face PEFT adapters", "fused": "a standalone model (adapters fused into the base)"}[kind]
    if kind == "fused":
        what += ", dequantized" if dequantized else (f", {quantization.get('bits')}-bit quantized like its base"
                                                     if quantization else "")
    lines = front + [f"# {name}", "", f"Aligned with {method} by poet-mlx from `{base_model}`: {what}.", "",
                     "## Training", "", "| setting | value |", "|---|---|", f"| base model | `{base_model}` |"]
    lines += [f"| {k} | {v} |" for k, v in training_facts(info)]
    lines += _metrics_section(info, bool(c.get("poet"))) + ["", "## Use", "", "```python",
                                                             f"# {name}: this folder, or its hub repo id once pushed"]
    if kind == "peft":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
                  f'model = PeftModel.from_pretrained(base, "{name}")']
    else:
        lines += ["from mlx_lm import load, generate", "", f'model, tokenizer = load("{name}")']
        if dequantized:
            lines += ["", "# or with transformers (the weights are plain Hugging Face safetensors)",
                      "from transformers import AutoModelForCausalLM",
                      f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    return "\n".join(lines + ["```", ""])


def _metrics_section(info: RunInfo, poet: bool) -> list[str]:
    last_eval, last_train = final_metrics(info.metrics)
    if not last_eval and not last_train:
        return []
    lines = ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    for record, prefix, label in ((last_eval, "eval_", "held-out"), (last_train, "", "train")):
        for k in CARD_METRICS:
            if prefix + k in record:
                lines.append(f"| {label} {k} (step {record.get('step')}) | {_num(record[prefix + k])} |")
    if poet:
        lines += ["", "Under POET, rewards and accuracies are measured on pairs cut to equal length: compare "
                  "them only with other POET runs."]
    return lines
