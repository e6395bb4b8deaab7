"""`poet-mlx data check DATA`: a preflight report of a preference dataset (exit 0 when training would accept
it, 2 when not)."""

from __future__ import annotations

import argparse
import json
import sys

from poet_mlx.cli.args import add_config_flags, given_flags
from poet_mlx.cli.common import EXIT_USER_ERROR, add_output_flags, one_line, run_guarded
from poet_mlx.cli.formats import fmt

MODEL_FLAGS_SKIP = ("ref_model",)
LOSS_FLAGS_KEEP = ("poet_ratio",)
"""The only loss setting that changes what the data check reports (what POET cuts); the rest would be
accepted and ignored."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx data", description="Preference data tools.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("check", prog="poet-mlx data check", help="Preflight report of a dataset.", description=(
        "Read a preference dataset the way `poet-mlx train` would and report: format, counts, invalid rows, "
        "duplicates, identical pairs, lengths (characters; tokens after the chat template with --model), what "
        "the length limits cut or drop and what POET cuts. Exit code 0 when training would accept the data, "
        "2 when not."))
    c.add_argument("data", metavar="DATA", help="A .jsonl/.json/.parquet file, a folder with train/valid/test "
                   "files, or a Hugging Face dataset id.")
    c.add_argument("--json", action="store_true", help="Print the report as JSON instead of tables.")
    add_config_flags(c, groups=("model",), skip=MODEL_FLAGS_SKIP)
    add_config_flags(c, groups=("data",), skip=("data",))
    add_config_flags(c, groups=("loss",), skip=_loss_flags_skip())
    add_output_flags(c)
    return p


def _loss_flags_skip() -> tuple:
    from dataclasses import fields

    from poet_mlx.config import LossConfig

    return tuple(f.name for f in fields(LossConfig) if f.name not in LOSS_FLAGS_KEEP)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _check(args), debug=args.debug)


def _check(args) -> int:
    from poet_mlx.config import RunConfig, validate
    from poet_mlx.data.check import check_data

    flags = given_flags(args, groups=("model", "data", "loss"))
    cfg = RunConfig.from_flat({**flags, "data": args.data}, source="command line")
    has_model = bool(cfg.model.model)
    if not has_model:
        cfg.model.model = "-"  # only the data settings matter here; `validate` wants some model
    validate(cfg)
    tokenizer = load_tokenizer(cfg) if has_model else None
    report = check_data(cfg, tokenizer)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print_report(report)
    for error in report["errors"]:
        print(f"error: {one_line(error)}", file=sys.stderr)
    return 0 if report["ok"] else EXIT_USER_ERROR


def load_tokenizer(cfg):
    """The tokenizer of cfg.model.model, without loading the weights."""
    from poet_mlx.data.check import load_tokenizer as load

    return load(cfg.model.model, cfg.model.revision, cfg.model.trust_remote_code)


def _stat_row(name: str, s: dict) -> list[str]:
    return [name] + ([fmt(s[k]) for k in ("min", "median", "p95", "max")] if s else ["-"] * 4)


def print_report(report: dict, console=None) -> None:
    """Rich tables: one summary per split, length statistics, cuts, problems, then the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for split, info in report["splits"].items():
        if "error" in info:
            console.print(f"[bold red]{split}[/]: {info['error']}")
            continue
        t = Table(title=f"{split} split of {report['source']} ({info['format']})", title_justify="left")
        t.add_column("")
        t.add_column("value", justify="right")
        for key in ("rows", "valid_rows", "invalid_rows", "identical_pairs", "duplicate_rows", "repeated_prompts"):
            t.add_row(key.replace("_", " "), fmt(info[key]))
        limits, poet = info.get("limits"), info.get("poet")
        if limits:
            t.add_row("prompts cut to max_prompt_length", fmt(limits["prompts_cut"]))
            t.add_row("pairs with a response cut to max_length", fmt(limits["pairs_with_responses_cut"]))
            for why, n in limits["pairs_dropped"].items():
                t.add_row(f"dropped: {why}", fmt(n))
            t.add_row("pairs kept", fmt(limits["pairs_kept"]))
        if poet:
            t.add_row(f"pairs POET cuts (ratio {fmt(poet['poet_ratio'])})", fmt(poet["pairs_cut"]))
            t.add_row("tokens POET removes per cut pair", fmt(poet["mean_tokens_removed_per_cut_pair"]))
            t.add_row("share of response tokens POET removes", f"{poet['response_tokens_removed']:.1%}")
        console.print(t)
        lengths = Table(title="lengths", title_justify="left", box=None, padding=(0, 2))
        for col in ("", "min", "median", "p95", "max"):
            lengths.add_column(col, justify="right" if col else "left")
        for name, s in info["chars"].items():
            lengths.add_row(*_stat_row(f"{name} (characters)", s))
        for name, s in info.get("tokens", {}).items():
            lengths.add_row(*_stat_row(f"{name} (tokens)", s))
        console.print(lengths)
        if info["problem_kinds"]:
            console.print("problems: " + "; ".join(f"{n} x {k}" for k, n in info["problem_kinds"].items()))
            for p in info["problems"]:
                console.print(f"  - {p}", soft_wrap=True, markup=False)
    for hint in report["hints"]:
        console.print(f"[yellow]note:[/] {hint}", soft_wrap=True)
    console.print("[bold green]ok[/]: training would accept this data" if report["ok"]
                  else f"[bold red]not ok[/]: {len(report['errors'])} problem(s) would stop training (below)")
