"""`poet-mlx eval`: held-out preference metrics, per pair (--output) and averaged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from poet_mlx.cli.args import add_config_flags, build_config
from poet_mlx.cli.common import add_output_flags, run_guarded
from poet_mlx.cli.ui import make_reporter, metrics_table

EVAL_SKIP = {"adapter_path", "resume", "overwrite", "epochs", "iters", "learning_rate", "optimizer",
             "weight_decay", "lr_schedule", "warmup_ratio", "max_grad_norm", "grad_accumulation_steps",
             "grad_checkpoint", "steps_per_report", "steps_per_eval", "save_every", "fine_tune_type",
             "num_layers", "rank", "scale", "dropout", "keys", "train_split", "max_valid_pairs", "skip_invalid"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx eval", description=(
        "Score held-out preference pairs: TRL's metrics (rewards/accuracies, rewards/margins, logps/...). "
        "With --adapter-path, the loss settings (loss, beta, POET) default to the run's own."))
    p.add_argument("-c", "--config", help="YAML file of settings.")
    # dest differs from the training setting `adapter_path` (the run folder to write): here it is read only.
    p.add_argument("--adapter-path", dest="run_path", help="A run folder with adapters (omit to score the base model).")
    p.add_argument("--output", help="Write one JSON object per pair, in input order, to this JSONL file.")
    add_config_flags(p, skip=EVAL_SKIP)
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _eval(args), debug=args.debug)


def _eval(args) -> int:
    from poet_mlx.fsutil import write_text_atomic
    from poet_mlx.pipeline import run_evaluation, saved_config

    if args.run_path:
        # Score the run the way it was trained unless told otherwise.
        saved = saved_config(Path(args.run_path))
        for key in ("loss", "beta", "gamma_beta_ratio", "label_smoothing", "sft_weight", "poet", "poet_ratio",
                    "max_length", "max_prompt_length", "chat_template", "system_prompt", "model"):
            if not hasattr(args, key) and saved.get(key) is not None:
                setattr(args, key, saved[key])
    cfg = build_config(args)
    with make_reporter(args.plain, args.quiet, title="poet-mlx eval") as reporter:
        means, rows = run_evaluation(cfg, args.run_path, reporter)
    if args.output:
        write_text_atomic(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    if not args.quiet:
        _print(means, cfg, args)
    return 0


def _print(means: dict, cfg, args) -> None:
    from rich.console import Console

    title = f"eval on {cfg.data.data}" + (f" with {args.run_path}" if args.run_path else " (base)")
    Console().print(metrics_table(means, title))
    if args.output:
        Console().print(f"per-pair results: {args.output}")
