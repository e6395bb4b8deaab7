"""What the commands print: the reporter choice, the plain-line reporter and the end-of-run tables.

Two reporters implement `poet_mlx.reporting.Reporter`: `DashboardReporter` (cli/dashboard.py), a live rich
panel for terminals, and `PlainReporter`, one line per event for pipes and CI (its line format is
`cli/formats.py`; `parse_plain_line` reads a line back). Both are context managers, so a command reads
`with make_reporter(...) as reporter: run_training(cfg, reporter)`.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from poet_mlx.cli.formats import (  # noqa: F401  (parse_plain_line: the README's name)
    PHASE_PROGRESS_SECONDS,
    duration,
    fmt,
    kv_line,
    parse_plain_line,
    record_kind,
)
from poet_mlx.reporting import Reporter


class PlainReporter(Reporter):
    """One line per event, no control codes; `quiet` prints nothing (errors go to stderr elsewhere).

    Long phases print a start line, a progress line at most every `progress_seconds`, and a done line with
    their duration. `clock` is injectable for tests.
    """

    def __init__(self, stream=None, quiet: bool = False, progress_seconds: float = PHASE_PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.quiet = quiet
        self.progress_seconds = progress_seconds
        self.clock = clock
        self._phases: dict[str, tuple[float, float]] = {}  # name -> (started, last line printed)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _emit(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream or sys.stdout, flush=True)

    def phase(self, name, done=0, total=None, note=""):
        now = self.clock()
        finished = total is not None and done >= total
        if name not in self._phases:
            self._phases[name] = (now, now)
            if not finished:
                self._emit(kv_line("phase", {"name": name, "state": "start", "total": total, "note": note or None}))
                return
        started, last = self._phases[name]
        if finished:
            del self._phases[name]
            self._emit(kv_line("phase", {"name": name, "state": "done", "total": total,
                                         "seconds": round(now - started, 2), "note": note or None}))
        elif now - last >= self.progress_seconds:
            self._phases[name] = (started, now)
            self._emit(kv_line("phase", {"name": name, "state": "progress", "done": done, "total": total,
                                         "note": note or None}))

    def header(self, info):
        self._emit(kv_line("run", info))

    def log(self, record):
        self._emit(kv_line(record_kind(record), record))

    def checkpoint(self, step, path):
        self._emit(kv_line("checkpoint", {"step": step, "path": path}))

    def warning(self, message):
        self._emit(kv_line("warning", {"message": message}))

    def done(self, summary):
        flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        for prefix, ev in (("final", summary.get("last_eval") or {}), ("best", summary.get("best_eval") or {})):
            flat.update({f"{prefix}_{k}": v for k, v in ev.items() if k != "step"})
        self._emit(kv_line("done", flat))


def make_reporter(plain: bool, quiet: bool, title: str = "poet-mlx train", stop: Optional[Callable] = None):
    """The live dashboard on a terminal; plain lines when asked or when stdout is not a terminal (or a
    dumb one); nothing with `quiet`. `stop` (the Ctrl-C flag) lets the dashboard say it is stopping."""
    import os

    if quiet:
        return PlainReporter(quiet=True)
    if plain or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        return PlainReporter()
    from poet_mlx.cli.dashboard import DashboardReporter

    return DashboardReporter(title=title, stop=stop)


def __getattr__(name):
    # `from poet_mlx.cli.ui import DashboardReporter` keeps working without importing rich up front.
    if name == "DashboardReporter":
        from poet_mlx.cli.dashboard import DashboardReporter

        return DashboardReporter
    raise AttributeError(name)


# -- end-of-run tables -----------------------------------------------------------------------------------

SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
                   "eval_rewards/margins")
LOWER_IS_BETTER = ("loss", "eval_loss")


def final_and_best(records: list[dict], names=SUMMARY_METRICS) -> list[tuple[str, tuple, tuple]]:
    """Per metric: (name, (final value, its step), (best value, its step)) over a run's metrics records.

    Best is the lowest loss and the highest reward accuracy or margin; non-finite values are ignored.
    """
    rows = []
    for name in names:
        seen = [(r[name], r.get("step")) for r in records
                if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if not seen:
            continue
        pick = min if name in LOWER_IS_BETTER else max
        best = pick(seen, key=lambda vs: vs[0])
        rows.append((name, seen[-1], best))
    return rows


def next_commands(run: str, model: str, data: Optional[str] = None) -> list[str]:
    """Commands to copy after a run: look at it, chat with it, fuse it, export it, evaluate it."""
    q = shlex.quote
    cmds = [f"poet-mlx report {q(run)}",
            f"poet-mlx chat --model {q(model)} --adapter-path {q(run)}",
            f"poet-mlx fuse --model {q(model)} --adapter-path {q(run)} --save-path {q(run + '-fused')}",
            f"poet-mlx export --adapter-path {q(run)} --format peft --out {q(run + '-peft')}"]
    if data:
        cmds.append(f"poet-mlx eval --model {q(model)} --adapter-path {q(run)} --data {q(data)}")
    return cmds


def print_summary(summary: dict, console=None, wall_seconds: Optional[float] = None,
                  commands: bool = True) -> None:
    """End of run: final and best metrics, time, tokens, POET saving, memory, files, next commands, and the
    exact resume command when the run was stopped early."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from poet_mlx.errors import PoetError
    from poet_mlx.train.checkpoint import latest_checkpoint, read_metrics

    console = console or Console()
    run = summary["adapter_path"]
    header = summary.get("header") or {}
    try:
        records = read_metrics(Path(run))
    except (PoetError, OSError, ValueError):
        records = []
    steps = f"{summary['steps']}/{summary['total_steps']} steps"
    state = f"stopped at step {steps}" if summary.get("interrupted") else f"finished, {steps}"
    t = Table(title=f"run summary: {state}", title_justify="left", title_style="bold")
    t.add_column("metric")
    t.add_column("final", justify="right")
    t.add_column("best", justify="right")
    for name, (last, last_step), (best, best_step) in final_and_best(records):
        t.add_row(name, f"{fmt(last)} [dim](step {last_step})[/]", f"{fmt(best)} [dim](step {best_step})[/]")
    if not t.row_count:
        t.add_row("[dim](no metrics recorded)[/]", "", "")
    console.print(t)
    console.print(_facts_grid(summary, header, wall_seconds))
    for w in summary.get("warnings") or []:
        console.print(Text("warning: ", style="bold yellow") + Text(str(w)))
    files = [("adapters", f"{run}/adapters.safetensors"), ("config", f"{run}/adapter_config.json"),
             ("metrics", f"{run}/metrics.jsonl")]
    ckpt = latest_checkpoint(Path(run))
    if ckpt is not None:
        files.append(("checkpoint", str(ckpt)))
    console.print(Text("files:", style="bold"))
    for label, path in files:
        console.print(Text(f"  {label:<11}") + Text(path), soft_wrap=True)
    if summary.get("interrupted"):
        console.print(Text("Stopped early; the checkpoint above holds everything. Resume with:",
                           style="bold yellow"))
        console.print(Text(f"  {summary['resume_command']}", style="bold"), soft_wrap=True)
    if commands:
        console.print(Text("next:", style="bold"))
        for cmd in next_commands(run, header.get("model", "MODEL")):
            # soft_wrap: a long command stays one line, so it can be copied whole.
            console.print(Text(f"  {cmd}"), soft_wrap=True)


def _facts_grid(summary: dict, header: dict, wall_seconds: Optional[float]):
    """time, tokens and pairs seen, POET's cut, memory, adapter change: one labelled row each."""
    from rich.table import Table

    time_text = f"{duration(summary['train_seconds'])} in training steps (whole run)"
    if wall_seconds is not None:
        time_text += f"; this command took {duration(wall_seconds)}"
    seen = f"{fmt(summary['tokens_seen'])} tokens"
    if "scored_tokens" in summary:
        seen += f" ({fmt(summary['scored_tokens'])} scored by the loss)"
    facts = [("time", time_text), ("seen", f"{seen}, {fmt(summary.get('pairs_seen', 0))} pairs")]
    if header.get("poet"):
        facts.append(("POET", f"cut {header.get('pairs_cut_by_poet', '?')} pairs, saved "
                              f"{header.get('poet_token_saving', 0.0):.1%} of response tokens"))
    facts.append(("peak memory", f"{summary['peak_memory_gb']:.3g} GB"))
    if "adapter_change" in summary:
        facts.append(("adapter change", f"{fmt(summary['adapter_change'])} (distance of the adapters from "
                                         "their start; 0 means nothing was learned)"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for k, v in facts:
        grid.add_row(k, v)
    return grid


def metrics_table(means: dict, title: str, names: Optional[list] = None):
    """A two-column rich table of metric values (eval results, demo before/after rows)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", title_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in names or list(means):
        if k in means:
            t.add_row(k, fmt(means[k]))
    return t
