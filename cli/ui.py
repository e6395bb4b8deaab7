"""Reporters that draw: a live rich dashboard for terminals and a plain line mode for pipes and CI.

Both implement `poet_mlx.reporting.Reporter`. Plain lines read `KIND key=value key=value ...` with the
metric names of metrics.jsonl, so they parse line by line.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Any

from poet_mlx.reporting import Reporter

SPARK = "▁▂▃▄▅▆▇█"
LIVE_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "learning_rate", "grad_norm", "tokens_per_second", "pairs_per_second", "peak_memory_gb",
                "adapter_change")


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def sparkline(values, width: int = 40) -> str:
    """Unicode bars of the last `width` values, scaled to their range."""
    vals = [v for v in list(values)[-width:] if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


def kv_line(kind: str, record: dict) -> str:
    parts = [kind]
    for k, v in record.items():
        if isinstance(v, (list, dict)):
            continue
        text = fmt(v) if not isinstance(v, str) else v.replace(" ", "_")
        parts.append(f"{k}={text.replace(',', '')}")
    return " ".join(parts)


class PlainReporter(Reporter):
    """One line per event, no control codes; `quiet` keeps warnings only (errors go to stderr anyway)."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.quiet = quiet

    def _emit(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    def phase(self, name, done=0, total=None, note=""):
        if done == 0 or (total is not None and done >= total):
            state = "start" if done == 0 and (total is None or total > 0) and not note else "done"
            self._emit(kv_line("phase", {"name": name, "state": state, "total": total, "note": note or None}))

    def header(self, info):
        self._emit(kv_line("run", info))

    def log(self, record):
        kind = "eval" if any(k.startswith("eval_") for k in record) else "train"
        self._emit(kv_line(kind, record))

    def checkpoint(self, step, path):
        self._emit(kv_line("checkpoint", {"step": step, "path": path}))

    def warning(self, message):
        print(kv_line("warning", {"message": message}), file=self.stream, flush=True)

    def done(self, summary):
        flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        for prefix, ev in (("final", summary.get("last_eval") or {}), ("best", summary.get("best_eval") or {})):
            flat.update({f"{prefix}_{k}": v for k, v in ev.items() if k != "step"})
        self._emit(kv_line("done", flat))


class DashboardReporter(Reporter):
    """A live rich dashboard: header, progress, metrics, sparklines, validation, events."""

    def __init__(self, console=None, title: str = "poet-mlx train"):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        self.title = title
        self.info: dict = {}
        self.phase_text = "starting"
        self.latest: dict = {}
        self.history = {"loss": deque(maxlen=200), "rewards/accuracies": deque(maxlen=200)}
        self.evals: list[dict] = []
        self.events: deque = deque(maxlen=4)
        self.warnings: deque = deque(maxlen=3)
        self.step_no, self.total = 0, 0
        self.started = time.monotonic()
        self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.update(self.render())
        self.live.__exit__(*exc)

    def _refresh(self):
        self.live.update(self.render())

    # -- Reporter ---------------------------------------------------------------------------------------
    def phase(self, name, done=0, total=None, note=""):
        count = f" {done}/{total}" if total else ""
        self.phase_text = f"{name}{count}" + (f" ({note})" if note else "")
        self._refresh()

    def header(self, info):
        self.info = info
        self._refresh()

    def step(self, step, total, metrics):
        self.step_no, self.total = step, total
        self.latest.update(metrics)
        for k in self.history:
            if k in metrics:
                self.history[k].append(metrics[k])
        self.phase_text = "training"
        self._refresh()

    def log(self, record):
        if any(k.startswith("eval_") for k in record):
            self.evals.append(record)
        else:
            self.latest.update({k: v for k, v in record.items() if k in ("adapter_change", "peak_memory_gb")})
        self._refresh()

    def checkpoint(self, step, path):
        self.events.append(f"step {step}: checkpoint saved to {path}")
        self._refresh()

    def warning(self, message):
        self.warnings.append(message)
        self._refresh()

    def done(self, summary):
        self.phase_text = "interrupted" if summary.get("interrupted") else "finished"
        self._refresh()

    # -- drawing ----------------------------------------------------------------------------------------
    def render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        parts = [self._header_panel(), self._progress_line()]
        metrics = Table(show_header=True, header_style="bold", expand=False, box=None, padding=(0, 2))
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for k in LIVE_METRICS:
            if k in self.latest:
                metrics.add_row(k, fmt(self.latest[k]))
        charts = Table.grid(padding=(0, 1))
        charts.add_column(style="dim")
        charts.add_column()
        for k, values in self.history.items():
            if values:
                charts.add_row(k, f"[cyan]{sparkline(values)}[/] {fmt(values[-1])}")
        body = Table.grid(padding=(0, 3), expand=False)
        body.add_column()
        body.add_column()
        body.add_row(metrics, charts)
        parts.append(body)
        if self.evals:
            parts.append(self._eval_table())
        for e in self.events:
            parts.append(f"[green]•[/] {e}")
        for w in self.warnings:
            parts.append(f"[bold yellow]warning:[/] {w}")
        return Panel(Group(*parts), title=self.title, border_style="blue")

    def _header_panel(self):
        from rich.table import Table

        i = self.info
        grid = Table.grid(padding=(0, 2))
        for _ in range(4):
            grid.add_column()
        if not i:
            grid.add_row("[dim]preparing...[/]", "", "", "")
            return grid
        loss = f"{i['loss']} beta={fmt(i['beta'])}" + (
            f" gamma/beta={fmt(i['gamma_beta_ratio'])}" if i.get("gamma_beta_ratio") is not None else "")
        poet = f"on (ratio {fmt(i['poet_ratio'])})" if i.get("poet") else "off"
        grid.add_row("[bold]model[/]", str(i["model"]), "[bold]quantization[/]", str(i["quantization"]))
        grid.add_row("[bold]params[/]", f"{fmt(i['trainable_params'])} trainable / {fmt(i['total_params'])}",
                     "[bold]loss[/]", loss)
        grid.add_row("[bold]POET[/]", poet, "[bold]adapters[/]",
                     f"{i['fine_tune_type']} r={i['rank']} layers={i['num_layers']} {i['keys']}")
        grid.add_row("[bold]data[/]", f"{i['train_pairs']} train / {i['valid_pairs']} valid ({i['data_format']})",
                     "[bold]cut/dropped[/]", str(i["length_report"]))
        return grid

    def _progress_line(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        eta = ""
        if self.step_no and self.total:
            per = self.latest.get("step_seconds", 0.0)
            eta = f"ETA {_duration(per * (self.total - self.step_no))}"
        row = Table.grid(padding=(0, 1))
        row.add_column(width=30)
        row.add_column()
        row.add_column()
        bar = ProgressBar(total=max(1, self.total), completed=self.step_no, width=30)
        row.add_row(bar, f"step {self.step_no}/{self.total}  elapsed {_duration(elapsed)}  {eta}",
                    f"[dim]{self.phase_text}[/]")
        return row

    def _eval_table(self):
        from rich.table import Table

        t = Table(title="validation", title_justify="left", box=None, padding=(0, 2))
        cols = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        t.add_column("step", justify="right")
        for c in cols:
            t.add_column(c, justify="right")
        for r in self.evals[-3:]:
            t.add_row(str(r["step"]), *[fmt(r.get(c)) for c in cols])
        return t


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def make_reporter(plain: bool, quiet: bool, title: str = "poet-mlx train"):
    """The dashboard on a terminal; plain lines otherwise (or when asked); quiet prints nothing."""
    if quiet:
        return PlainReporter(quiet=True)
    if plain or not sys.stdout.isatty():
        return PlainReporter()
    return DashboardReporter(title=title)


def print_summary(summary: dict, console=None) -> None:
    """End-of-run table: final and best metrics, time, tokens, POET saving, memory, files, next commands."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="run summary", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("steps", f"{summary['steps']}/{summary['total_steps']}")
    t.add_row("train time", _duration(summary["train_seconds"]))
    t.add_row("tokens seen", fmt(summary["tokens_seen"]))
    header = summary.get("header", {})
    if header.get("poet"):
        t.add_row("POET token saving", f"{header.get('poet_token_saving', 0):.1%}")
    t.add_row("peak memory (GB)", fmt(summary["peak_memory_gb"]))
    for label, ev in (("final", summary.get("last_eval")), ("best", summary.get("best_eval"))):
        for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            if ev and k in ev:
                t.add_row(f"{label} {k} (step {ev['step']})", fmt(ev[k]))
    console.print(t)
    run = summary["adapter_path"]
    model = header.get("model", "MODEL")
    if summary.get("interrupted"):
        console.print(f"[yellow]stopped early; checkpoint saved.[/] Resume with:\n  {summary['resume_command']}")
    console.print(f"adapters: {run}/adapters.safetensors, metrics: {run}/metrics.jsonl")
    console.print("next:\n"
                  f"  poet-mlx eval --model {model} --adapter-path {run} --data HELDOUT.jsonl\n"
                  f"  mlx_lm.generate --model {model} --adapter-path {run} --prompt \"Hello\"\n"
                  f"  mlx_lm.fuse --model {model} --adapter-path {run} --save-path {run}-fused")
