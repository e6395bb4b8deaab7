"""`poet-mlx train` as a library call: data -> tokens -> POET layouts -> reference -> trainer -> run folder.

`run_training` reports through a `Reporter` and returns the run summary (a plain dict), so the CLI, the demo
and tests drive it alike. Evaluation's counterpart is `analysis.evaluate.run_evaluation`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .. import __version__
from ..adapters import ADAPTER_CONFIG, adapter_config, attach_trainable, load_initial_adapter, lora_parameters
from ..batching import pair_set, poet_stats
from ..config import RunConfig
from ..data.splits import SplitData, read_split, tokenize_split
from ..data.tokenization import pad_id
from ..errors import PoetError
from ..export.peft_import import init_notes, init_settings, read_adapter
from ..fsutil import write_json_atomic
from ..models import load_model, model_facts
from ..reporting import Reporter
from .checkpoint import check_run_folder, discard_unfinished_start, prepare_run_folder, resume_command
from .reference import fill_reference


def run_training(cfg: RunConfig, reporter: Reporter | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train adapters as `cfg` says, into cfg.train.adapter_path. Returns the run summary."""
    from .distributed import check_batch_divides, init_world
    from .memory import memory_warning
    from .trainer import Trainer

    t, run = cfg.train, Path(cfg.train.adapter_path)
    world = init_world()
    # Data parallel (mlx.launch): rank 0 alone draws, logs and writes the run folder.
    reporter = (reporter or Reporter()) if world.is_main else Reporter()
    check_batch_divides(t.batch_size, world)
    init = read_adapter(cfg.lora.init_adapter) if cfg.lora.init_adapter else None  # fails before any loading
    model, tokenizer, path, train, valid = _load(cfg, reporter, world)
    cfg, params, n_layers, box = attach_start(cfg, model, init)
    lora = cfg.lora
    sets = {"train": pair_set(train.pairs, cfg.loss)}
    if valid is not None:
        sets["valid"] = pair_set(valid.pairs, cfg.loss)
    adapter_cfg = adapter_config(lora.fine_tune_type, n_layers, params, cfg.model.model,
                                 {"version": __version__, "config": cfg.to_flat()})
    early_warnings = [w for w in [memory_warning(model, path, cfg, sets["train"])] if w]
    for warning in early_warnings:
        reporter.warning(warning)
    if cfg.loss.needs_reference:
        fill_reference(sets, cfg, model, path, tokenizer, reporter, world)
    header = _header(cfg, model_facts(model, path), train, valid, poet_stats(sets.values()))
    notes = default_notes(cfg, n_layers)
    if init is not None:
        notes += init_notes(init, box, cfg.loss.needs_reference and not cfg.model.ref_model)
    header.update({"ranks": world.size, "num_layers": n_layers, "notes": notes})
    created = not run.exists()
    if world.is_main:
        for note in prepare_run_folder(run, t.resume, t.overwrite):
            early_warnings.append(note)
            reporter.warning(note)
    try:
        if world.is_main:
            write_json_atomic(run / ADAPTER_CONFIG, adapter_cfg)
        reporter.header(header)
        trainer = Trainer(model, cfg.loss, t, sets["train"], sets.get("valid"), run, adapter_cfg, reporter,
                          pad_id(tokenizer), should_stop, world)
        summary = trainer.fit(resume=t.resume)
    except BaseException:
        if not t.resume and world.is_main:  # a start that never reached a checkpoint leaves nothing behind
            discard_unfinished_start(run, created)
        raise
    summary.update({"header": header, "resume_command": resume_command(run),
                    "warnings": early_warnings + summary["warnings"]})
    reporter.done(summary)
    return summary


def attach_start(cfg: RunConfig, model, init=None) -> tuple:
    """Attach the run's trainable part to `model`: fresh adapters, or those of --init-adapter (`init`, read by
    `export.peft_import.read_adapter`), which then fix the layout. Returns (the settings as they now are, the
    LoRA parameters, the number of adapted layers, the init adapter's layout box or None)."""
    box = None
    if init is not None:  # --init-adapter fixes the layout; the saved settings then say what it is
        cfg, box = init_settings(cfg, init, model)
    lora = cfg.lora
    params = lora_parameters(lora.rank, lora.scale, lora.dropout, lora.keys)
    n_layers = attach_trainable(model, lora.fine_tune_type, lora.num_layers, params)
    if init is not None:
        load_initial_adapter(model, init.weights, box.held_at_zero)
    return cfg, params, n_layers, box


def default_notes(cfg: RunConfig, n_layers: int) -> list[str]:
    """What the run chose for the user where a setting was left unset (shown with the run's facts)."""
    notes = []
    if cfg.lora.num_layers is None:
        notes.append(f"adapting all {n_layers} layers (--num-layers not set)")
    if cfg.data.max_prompt_length is None:
        notes.append(f"max_prompt_length {cfg.data.resolved_max_prompt_length} = min(512, max_length // 2) "
                     "(--max-prompt-length not set)")
    return notes


def _load(cfg: RunConfig, reporter: Reporter, world) -> tuple:
    """(model, tokenizer, model path, train SplitData, valid SplitData or None), the model seeded for LoRA init.

    Everything the user can get wrong is checked before the model loads and before the run folder is
    touched: a failed start writes nothing, and --overwrite deletes the old run only once this one can start.
    """
    import mlx.core as mx

    from ..data.sources import check_source
    from ..models import resolve_model_path
    from .distributed import check_same_everywhere
    from .reference import pairs_digest

    t = cfg.train
    check_source(cfg.data)
    if Path(cfg.model.model).expanduser().exists():
        resolve_model_path(cfg.model.model)  # a local folder that is not a model: say so before reading data
    if world.is_main:
        check_run_folder(Path(t.adapter_path), t.resume, t.overwrite)
    rows = {split: read_split(cfg, split, reporter) for split in ("train", "valid")}
    if rows["train"] is None:
        raise PoetError(f"no training data found in {cfg.data.data}")
    reporter.phase("loading model", 0, None)
    model, tokenizer, path = load_model(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)
    reporter.phase("loading model", 1, 1)
    train = tokenize_split(cfg, *rows["train"], tokenizer, "train", reporter)
    valid = tokenize_split(cfg, *rows["valid"], tokenizer, "valid", reporter) if rows["valid"] else None
    check_same_everywhere("settings and data", lambda: json.dumps(cfg.to_flat(), sort_keys=True)
                          + pairs_digest(train.pairs) + (pairs_digest(valid.pairs) if valid else ""), world)
    mx.random.seed(t.seed)
    return model, tokenizer, path, train, valid


def _header(cfg: RunConfig, facts, train: SplitData, valid: Optional[SplitData], poet: dict) -> dict:
    ls, lo = cfg.loss, cfg.lora
    return {
        "model": cfg.model.model,
        "model_type": facts.model_type,
        "quantization": facts.quantization or "none",
        "total_params": facts.total_params,
        "trainable_params": facts.trainable_params,
        "loss": ls.loss,
        "beta": ls.resolved_beta,
        "gamma_beta_ratio": ls.gamma_beta_ratio if any("gamma_beta_ratio" in s.knobs for s in ls.specs) else None,
        "label_smoothing": ls.label_smoothing,
        **{k: getattr(ls, k) for k in ("loss_weights", "ld_alpha") if getattr(ls, k) is not None},
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


