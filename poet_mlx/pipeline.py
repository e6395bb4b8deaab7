"""End-to-end jobs shared by the commands: data -> tokens -> POET layouts -> reference -> train / evaluate.

`run_training` and `run_evaluation` are the library entry points of `poet-mlx train` and `poet-mlx eval`;
they report through a `Reporter` and return plain dicts, so the CLI, the demo and tests drive them alike.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .batching import layout
from .checkpoint import prepare_run_folder
from .config import RunConfig
from .errors import PoetError
from .fsutil import write_json_atomic
from .models import ADAPTER_CONFIG, adapter_config, attach_trainable, load_adapters, load_model, lora_parameters, model_facts
from .objective import Objective
from .reporting import Reporter
from .tokenization import TokenizeReport, tokenize_pairs

REFERENCE_BATCH = 8


@dataclass
class SplitData:
    """One split after loading and tokenization, with what was cut or dropped."""

    pairs: list
    rows_read: int
    rows_skipped: int
    format: str
    tokenize: TokenizeReport
    notes: list


def load_pairs(cfg: RunConfig, tokenizer, split: str, reporter: Reporter) -> Optional[SplitData]:
    """Load and tokenize one split; None when a valid/test split does not exist."""
    from .data import load_split

    d = cfg.data
    reporter.phase(f"loading {split} data", 0, None)
    rows, load_report = load_split(d, split)
    reporter.phase(f"loading {split} data", 1, 1, note=f"{load_report.rows_read} rows ({load_report.format})")
    if not rows:
        return None
    if split == "valid" and d.max_valid_pairs:
        rows = rows[: d.max_valid_pairs]
    name = f"tokenizing {split}"
    pairs, tok = tokenize_pairs(rows, tokenizer, d.max_length, d.max_prompt_length, d.chat_template,
                                progress=lambda done, total: reporter.phase(name, done, total))
    if not pairs:
        reasons = "; ".join(f"{n} {why}" for why, n in tok.dropped.items())
        raise PoetError(f"all {len(rows)} {split} pairs were dropped by the length limits ({reasons}); raise "
                        f"--max-length (now {d.max_length}) or --max-prompt-length (now {d.max_prompt_length})")
    return SplitData(pairs, load_report.rows_read, load_report.rows_skipped, load_report.format, tok,
                     list(load_report.notes) + list(load_report.problems))


def pair_set(pairs, cfg: RunConfig, objective: Objective):
    """PairSet with POET layouts (reference filled in later)."""
    from .trainer import PairSet

    ls = cfg.loss
    layouts = [layout(p, ls.poet, ls.poet_ratio, objective.needs_full_chosen) for p in pairs]
    return PairSet(pairs, layouts)


def poet_stats(pair_sets) -> dict:
    """Response tokens per pair without and with the cut: what POET saves on this data."""
    full = sum(len(p.chosen) + len(p.rejected) for s in pair_sets for p in s.pairs)
    kept = sum(lay.keep_chosen + lay.keep_rejected for s in pair_sets for lay in s.layouts)
    cut = sum(1 for s in pair_sets for p, lay in zip(s.pairs, s.layouts)
              if lay.keep_chosen < len(p.chosen) or lay.keep_rejected < len(p.rejected))
    n = max(1, sum(len(s) for s in pair_sets))
    return {"pairs_cut_by_poet": cut, "response_tokens_per_pair": full / n,
            "scored_tokens_per_pair": kept / n, "poet_token_saving": 1.0 - kept / max(1, full)}


def fill_reference(sets, cfg: RunConfig, policy, policy_path, tokenizer, reporter: Reporter) -> None:
    """Reference per-token log-probs for every PairSet in `sets` (DPO family only).

    With no --ref-model the policy scores them now, before any update, when it still equals the base.
    """
    from .reference import reference_token_logps

    model, path = policy, policy_path
    if cfg.model.ref_model:
        reporter.phase("loading reference model", 0, None)
        model, ref_tok, path = load_model(cfg.model.ref_model, trust_remote_code=cfg.model.trust_remote_code)
        if ref_tok.vocab_size != tokenizer.vocab_size:
            raise PoetError(f"--ref-model {cfg.model.ref_model} has a different vocabulary "
                            f"({ref_tok.vocab_size} vs {tokenizer.vocab_size}); it must share the tokenizer")
        reporter.phase("loading reference model", 1, 1)
    was_training = getattr(model, "training", False)
    model.eval()
    for name, s in sets.items():
        label = f"reference log-probs ({name})"
        reporter.phase(label, 0, len(s))
        s.ref, reused = reference_token_logps(model, path, s.pairs, REFERENCE_BATCH, pad_id(tokenizer),
                                              progress=lambda d, t: d < t and reporter.phase(label, d, t))
        reporter.phase(label, len(s), len(s), note="reused from cache" if reused else "computed")
    if model is not policy:
        del model
        gc.collect()
    elif was_training:
        policy.train()


def pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else tokenizer.eos_token_id or 0)


def saved_config(run: Path) -> dict:
    """The flat config a run folder was started with."""
    path = Path(run) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())["poet_mlx"]["config"]
    except (OSError, ValueError, KeyError):
        raise PoetError(f"{path} is missing or has no poet_mlx settings: not a poet-mlx run folder") from None


def run_training(cfg: RunConfig, reporter: Reporter | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train adapters as `cfg` says, into cfg.train.adapter_path. Returns the run summary."""
    import mlx.core as mx

    from .trainer import Trainer

    from .data import check_source

    reporter = reporter or Reporter()
    t, run = cfg.train, Path(cfg.train.adapter_path)
    check_source(cfg.data)
    prepare_run_folder(run, t.resume, t.overwrite)
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    objective = Objective.from_config(cfg.loss)
    train = load_pairs(cfg, tokenizer, "train", reporter)
    if train is None:
        raise PoetError(f"no training data found in {cfg.data.data}")
    valid = load_pairs(cfg, tokenizer, "valid", reporter)
    mx.random.seed(t.seed)
    lora = cfg.lora
    params = lora_parameters(lora.rank, lora.scale, lora.dropout, lora.keys)
    n_layers = attach_trainable(model, lora.fine_tune_type, lora.num_layers, params)
    sets = {"train": pair_set(train.pairs, cfg, objective)}
    if valid is not None:
        sets["valid"] = pair_set(valid.pairs, cfg, objective)
    adapter_cfg = adapter_config(lora.fine_tune_type, n_layers, params, cfg.model.model,
                                 {"version": __version__, "config": cfg.to_flat()})
    write_json_atomic(run / ADAPTER_CONFIG, adapter_cfg)
    if objective.needs_reference:
        fill_reference(sets, cfg, model, path, tokenizer, reporter)
    facts = model_facts(model, path)
    header = _header(cfg, facts, objective, train, valid, poet_stats(sets.values()))
    reporter.header(header)
    trainer = Trainer(model, objective, t, sets["train"], sets.get("valid"), run, adapter_cfg, reporter,
                      pad_id(tokenizer), should_stop)
    summary = trainer.fit(resume=t.resume)
    summary.update({"header": header, "resume_command": resume_command(run)})
    reporter.done(summary)
    return summary


def resume_command(run: Path) -> str:
    return f"poet-mlx train --adapter-path {run} --resume"


def _header(cfg: RunConfig, facts, objective: Objective, train: SplitData, valid: Optional[SplitData],
            poet: dict) -> dict:
    ls, lo = cfg.loss, cfg.lora
    return {
        "model": cfg.model.model,
        "model_type": facts.model_type,
        "quantization": facts.quantization or "none",
        "total_params": facts.total_params,
        "trainable_params": facts.trainable_params,
        "loss": objective.loss,
        "beta": objective.beta,
        "gamma_beta_ratio": objective.gamma_beta_ratio if objective.loss == "simpo" else None,
        "label_smoothing": objective.label_smoothing,
        "poet": ls.poet,
        "poet_ratio": ls.poet_ratio,
        "fine_tune_type": lo.fine_tune_type,
        "rank": lo.rank,
        "num_layers": lo.num_layers,
        "keys": lo.keys or "all linear",
        "train_pairs": len(train.pairs),
        "valid_pairs": len(valid.pairs) if valid else 0,
        "data_format": train.format,
        "rows_skipped": train.rows_skipped + (valid.rows_skipped if valid else 0),
        "length_report": train.tokenize.summary(),
        "data_notes": train.notes,
        **poet,
    }


def eval_splits(data: str) -> tuple[str, ...]:
    """Which splits `poet-mlx eval --data X` reads: a file is scored whole; a folder's test split first."""
    path = Path(data).expanduser()
    if path.is_file():
        return ("train",)
    if path.is_dir():
        return ("test", "valid", "train")
    return ("valid",)


def run_evaluation(cfg: RunConfig, adapter_path: Optional[str], reporter: Reporter | None = None) -> tuple[dict, list]:
    """Held-out metrics of the base model, or of the base plus adapters.

    The reference (DPO family) is the base model with no adapters (or --ref-model); with --poet the pairs
    are cut exactly as in training. Returns (means, rows) where rows holds one dict per kept pair, in input
    order, with the TRL metric names and the row's `index` in its source.
    """
    from .evaluation import evaluate

    reporter = reporter or Reporter()
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    objective = Objective.from_config(cfg.loss)
    data = None
    for split in eval_splits(cfg.data.data):
        data = load_pairs(cfg, tokenizer, split, reporter)
        if data is not None:
            break
    if data is None:
        raise PoetError(f"no evaluation data in {cfg.data.data}")
    sets = {"eval": pair_set(data.pairs, cfg, objective)}
    if objective.needs_reference:
        fill_reference(sets, cfg, model, path, tokenizer, reporter)
    if adapter_path:
        load_adapters(model, adapter_path)
    s = sets["eval"]
    means, per_pair = evaluate(model, s, objective, cfg.train.batch_size, pad_id(tokenizer),
                               progress=lambda d, tot: reporter.phase("evaluating", d, tot))
    rows = []
    for i, p in enumerate(s.pairs):
        rows.append({"index": p.index, **{k: float(v[i]) for k, v in per_pair.items()}})
    means.update({"pairs": len(s), **poet_stats([s])})
    return means, rows
