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
    add_analysis_flags(p)
    add_config_flags(p, skip=EVAL_SKIP)
    add_output_flags(p)
    return p


def add_analysis_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("reward-generation gap (see POET.md)")
    a.add_argument("--compare", nargs="+", metavar="RUN", default=[], help="More run folders to score on the "
                   "same data with their own adapters, side by side (e.g. DPO vs DPO+POET).")
    a.add_argument("--prefix-curve", action="store_true", help="Implicit-reward accuracy and margin of the chosen "
                   "vs the rejected prefix at k = 1, 2, 4, ..., 256 response tokens and full; written to "
                   "RUN/prefix_curve.json for each run.")
    a.add_argument("--curve-output", metavar="FILE", help="Also write every curve and entropy profile of this "
                   "eval to one JSON file (the only place a base model's curve is saved).")
    a.add_argument("--entropy", action="store_true", help="Next-token entropy by response position, before "
                   "(adapters off) and after training; written to RUN/entropy.json.")
    a.add_argument("--generate", type=int, default=0, metavar="N", help="Sample replies for the first N held-out "
                   "prompts from the base (adapters off) and each run, judge them, report the win rate.")
    a.add_argument("--judge", metavar="SPEC", help="Judge for --generate: module:function (f(prompt, reply) -> "
                   "float, higher = better), path/to/file.py:function, or implicit:RUN.")
    a.add_argument("--max-tokens", type=int, default=256, help="Longest generated reply (default: 256).")
    a.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature; 0 is greedy (default: "
                   "1.0, the policy's own distribution). The sampling seed is --seed.")
    a.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (default: 1.0, off).")
    a.add_argument("--samples", metavar="FILE", help="JSONL of the generated replies and their scores (default: "
                   "RUN/samples.jsonl).")


def generation_options(args):
    """GenerationOptions from the flags, or None without --generate; PoetError for an incomplete request."""
    from poet_mlx.analysis.generations import GenerationOptions
    from poet_mlx.analysis.judges import JUDGE_HELP
    from poet_mlx.errors import PoetError

    if args.judge and not args.generate:
        raise PoetError("--judge scores generated replies: add --generate N (how many held-out prompts)")
    if not args.generate:
        return None
    if args.generate < 0 or args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise PoetError("--generate must be >= 1, --max-tokens >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if not args.judge:
        raise PoetError(f"--generate needs a judge. {JUDGE_HELP}")
    return GenerationOptions(args.generate, args.judge, args.max_tokens, args.temperature, args.top_p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _eval(args), debug=args.debug)


def _eval(args) -> int:
    from dataclasses import fields

    from poet_mlx.analysis.evaluate import run_evaluation
    from poet_mlx.config import LossConfig
    from poet_mlx.fsutil import write_text_atomic
    from poet_mlx.train.checkpoint import saved_config

    generation = generation_options(args)
    first_run = args.run_path or (args.compare[0] if args.compare else None)
    if first_run:
        # Score the run the way it was trained unless told otherwise.
        saved = saved_config(Path(first_run))
        # The loss and its knobs go together: a --loss given here takes none of the run's knobs.
        # --poet asked here replaces the run's LD-DPO weighting (the two exclude each other).
        loss_keys = [f.name for f in fields(LossConfig) if f.name not in ("poet", "poet_ratio")
                     and not (f.name == "ld_alpha" and hasattr(args, "poet"))]
        keys = (loss_keys if not hasattr(args, "loss") else []) + [
            "poet", "poet_ratio", "max_length", "max_prompt_length", "chat_template", "system_prompt",
            "assistant_header", "model"]
        for key in keys:
            if not hasattr(args, key) and saved.get(key) is not None:
                setattr(args, key, saved[key])
    cfg = build_config(args)
    if generation is not None:
        generation.seed = cfg.train.seed
    with make_reporter(args.plain, args.quiet, title="poet-mlx eval") as reporter:
        result = run_evaluation(cfg, args.run_path, reporter, compare=args.compare, prefix_curve=args.prefix_curve,
                                entropy=args.entropy, generation=generation)
    means, rows = result
    if args.output:
        write_text_atomic(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    written = _write_analyses(result, args, first_run)
    if not args.quiet:
        _print(means, cfg, args) if len(result.runs) == 1 else _print_runs(result, cfg)
        _print_analyses(result)
        for path in written:
            print(f"wrote {path}")
    return 0


def _write_analyses(result, args, first_run) -> list[str]:
    """Curve/entropy JSON into each run folder (and --curve-output), samples JSONL; returns the paths."""
    from poet_mlx.analysis.generations import samples_jsonl
    from poet_mlx.fsutil import write_json_atomic, write_text_atomic

    written = []
    for curve in result.curves:
        if curve.meta.get("run"):
            written.append(str(Path(curve.meta["run"]) / "prefix_curve.json"))
            write_json_atomic(written[-1], curve.to_json())
    base = next((e for e in result.entropy if e["label"] == "base"), None)
    runs = dict(zip(result.runs, [*([args.run_path] if args.run_path else []), *args.compare]))
    for profile in result.entropy:
        if profile["label"] in runs:
            written.append(str(Path(runs[profile["label"]]) / "entropy.json"))
            write_json_atomic(written[-1], {"before": base, "after": profile})
    if args.curve_output and (result.curves or result.entropy):
        write_json_atomic(args.curve_output, {"curves": [c.to_json() for c in result.curves],
                                              "entropy": result.entropy})
        written.append(args.curve_output)
    if result.samples:
        path = args.samples or str(Path(first_run) / "samples.jsonl")
        write_text_atomic(path, samples_jsonl(result.samples))
        written.append(path)
    return written


def _print(means: dict, cfg, args) -> None:
    from rich.console import Console

    title = f"eval on {cfg.data.data}" + (f" with {args.run_path}" if args.run_path else " (base)")
    Console().print(metrics_table(means, title))
    if args.output:
        Console().print(f"per-pair results: {args.output}")


def _print_runs(result, cfg) -> None:
    """Side-by-side metrics of several runs on the same pairs."""
    from rich.console import Console
    from rich.table import Table

    from poet_mlx.cli.formats import fmt

    t = Table(title=f"eval on {cfg.data.data}", title_justify="left", title_style="bold")
    t.add_column("metric")
    for label in result.runs:
        t.add_column(label, justify="right")
    names = [k for k in next(iter(result.runs.values()))]
    for k in names:
        t.add_row(k, *[fmt(m.get(k)) for m in result.runs.values()])
    Console().print(t)


BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value, width: int = 12) -> str:
    """A unicode bar of `value` in [0, 1] (eighth-block resolution), padded to `width`."""
    if value is None:
        return " " * width
    eighths = round(max(0.0, min(1.0, value)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[part] if part else "")).ljust(width)


def prefix_table(curves):
    """Rows k = 1, 2, ..., full: pairs, and per model the accuracy as a bar, the value and the mean margin."""
    from rich.table import Table

    from poet_mlx.cli.formats import fmt

    t = Table(title="implicit reward by prefix length k: does the model prefer the chosen reply's first k "
              "tokens?", title_justify="left", title_style="bold")
    t.add_column("k", justify="right")
    t.add_column("pairs", justify="right")
    for c in curves:
        t.add_column(f"{c.label} accuracy")
        t.add_column("margin", justify="right")
    points = [(str(k), i) for i, k in enumerate(curves[0].k) if any(c.pairs[i] for c in curves)]
    for name, i in points + [("full", None)]:
        cells = [name, str(curves[0].pairs[i] if i is not None else curves[0].full["pairs"])]
        for c in curves:
            acc = c.accuracy[i] if i is not None else c.full["accuracy"]
            margin = c.margin[i] if i is not None else c.full["margin"]
            cells += [f"{acc:.2f} [cyan]{bar(acc)}[/]" if acc is not None else "-", fmt(margin)]
        t.add_row(*cells)
    return t


def entropy_table(profiles, positions=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
    """Mean next-token entropy (nats) at response positions, per model, over chosen replies."""
    from rich.table import Table

    t = Table(title="next-token entropy by response position (nats, chosen replies, teacher-forced)",
              title_justify="left", title_style="bold")
    t.add_column("position", justify="right")
    t.add_column("replies", justify="right")
    for p in profiles:
        t.add_column(p["label"], justify="right")
    for pos in positions:
        if pos > len(profiles[0]["position"]) or not profiles[0]["chosen_count"][pos - 1]:
            continue
        t.add_row(str(pos), str(profiles[0]["chosen_count"][pos - 1]),
                  *[f"{p['chosen'][pos - 1]:.3f}" if p["chosen"][pos - 1] is not None else "-" for p in profiles])
    return t


def win_table(result):
    """Per run: win rate over the base with its interval, wins/ties/losses, mean judge scores."""
    from rich.table import Table

    t = Table(title=f"generations judged by {result.judge}: each run vs the base, same seed per prompt",
              title_justify="left", title_style="bold")
    for col in ("run", "win rate", "95% CI", "W/T/L", "score", "base score"):
        t.add_column(col, justify="left" if col == "run" else "right")
    base = [s.score for s in result.samples if s.model == "base"]
    for label, w in result.win_rates.items():
        mine = [s.score for s in result.samples if s.model == label]
        t.add_row(label, f"{w.rate:.3f}", f"{w.low:.3f}-{w.high:.3f}", f"{w.wins}/{w.ties}/{w.losses}",
                  f"{sum(mine) / len(mine):.3f}", f"{sum(base) / len(base):.3f}")
    return t


def _print_analyses(result) -> None:
    from rich.console import Console

    c = Console()
    if result.curves:
        c.print(prefix_table(result.curves))
        c.print("A pair counts at k when both replies have at least k tokens; full = each reply whole. "
                "Accuracy: share of pairs whose chosen prefix gets the higher implicit reward (ties count as "
                "wrong, as in TRL).")
    if result.entropy:
        c.print(entropy_table(result.entropy))
    if result.win_rates:
        c.print(win_table(result))
        c.print("Win rate = (wins + ties/2) / prompts; Wilson 95% interval (conservative with ties).")
