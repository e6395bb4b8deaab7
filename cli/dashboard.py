"""The live training dashboard: a rich panel redrawn a few times a second while the run reports.

Layout, top to bottom: run facts (model, quantization, parameters, loss, POET, adapters, data); the phases
before training (each with its progress and note, e.g. "reused from cache") or, once training runs, the
step bar with epoch, elapsed and ETA; live metrics next to charts of loss and reward accuracy over the whole
run; validation results; checkpoint events; warnings. Narrow terminals (< 120 columns) stack the sections.

The reporter methods only update state under a lock; drawing happens in rich's refresh thread through
`__rich__`, so the clock and the Ctrl-C notice move even during a long step.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from typing import Callable, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from poet_mlx.cli.charts import History, block_chart, sparkline
from poet_mlx.cli.formats import duration, fmt, record_kind
from poet_mlx.reporting import Reporter

LIVE_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "learning_rate", "grad_norm", "tokens_per_second", "pairs_per_second", "peak_memory_gb",
                "adapter_change")
CHARTED = ("loss", "rewards/accuracies")
RECENT = 20  # steps averaged in the "last 20" column and for the ETA
WIDE = 120  # columns from which metrics and charts sit side by side
REFRESH_PER_SECOND = 2
"""A frame costs about 10-20 ms of Python (rich tables); two a second keep the dashboard to a few percent of
one core, which matters when training shares 2 cores with it."""


def _hide_control_echo():
    """Stop the terminal from echoing Ctrl-C as "^C" while the dashboard is drawn: the two characters
    would shift the live area by a line and leave a stray copy of its top border. Returns what to restore."""
    try:
        import sys
        import termios

        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return None
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHOCTL
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        return fd, saved
    except (ImportError, AttributeError, OSError, ValueError):  # no termios (Windows), no tty, no stdin
        return None


def _restore_echo(state) -> None:
    if state is not None:
        import termios

        try:
            termios.tcsetattr(state[0], termios.TCSANOW, state[1])
        except OSError:
            pass


class DashboardReporter(Reporter):
    """A live rich dashboard. Use as a context manager around the run; `stop` is the Ctrl-C flag."""

    def __init__(self, console: Optional[Console] = None, title: str = "poet-mlx train",
                 stop: Optional[Callable[[], bool]] = None, clock: Callable[[], float] = time.monotonic,
                 refresh_per_second: float = REFRESH_PER_SECOND):
        self.console = console or Console()
        self.title, self.stop, self.clock = title, stop, clock
        self.lock = threading.RLock()
        self.started = clock()
        self.info: dict = {}
        self.phases: dict[str, dict] = {}  # name -> done, total, note, started, ended
        self.current_phase: Optional[str] = None
        self.last_phase_end = self.started
        self.latest: dict = {}
        self.recent: dict[str, deque] = {k: deque(maxlen=RECENT) for k in LIVE_METRICS}
        self.history = {k: History() for k in CHARTED}
        self.evals: list[dict] = []
        self.events: deque = deque(maxlen=3)
        self.warnings: list[str] = []
        self.step_no = self.total = 0
        self.first_step: Optional[tuple[int, float]] = None  # (step, time) of the first step seen
        self.epoch_at_log, self.pairs_since_log = None, 0.0
        self.final: Optional[dict] = None
        self.live = Live(self, console=self.console, refresh_per_second=refresh_per_second, transient=False)

    def __enter__(self):
        self._echo = _hide_control_echo()
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.live.refresh()
            self.live.__exit__(*exc)
        finally:
            _restore_echo(self._echo)
        return False

    # -- Reporter ---------------------------------------------------------------------------------------
    def phase(self, name, done=0, total=None, note=""):
        with self.lock:
            now = self.clock()
            # A phase first heard of mid-way (tokenizing reports progress only) began when the last one ended.
            p = self.phases.setdefault(name, {"started": now if done == 0 else self.last_phase_end})
            if p.get("ended") is not None and done < (total or 1):  # a phase that runs again (validation)
                p.update(started=now, ended=None)
            p.update(done=done, total=total, note=note)
            finished = total is not None and done >= total
            p["ended"] = now if finished else None
            if finished:
                self.last_phase_end = now
            self.current_phase = None if finished else name

    def header(self, info):
        with self.lock:
            self.info = dict(info)

    def step(self, step, total, metrics):
        with self.lock:
            now = self.clock()
            if self.first_step is None:
                self.first_step = (step - 1, now - metrics.get("step_seconds", 0.0))
            self.step_no, self.total = step, total
            self.latest.update(metrics)
            for k, v in metrics.items():
                if k in self.recent:
                    self.recent[k].append(v)
            for k, h in self.history.items():
                if k in metrics:
                    h.append(metrics[k])
            self.pairs_since_log += metrics.get("pairs_per_second", 0.0) * metrics.get("step_seconds", 0.0)
            loss = metrics.get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                self._warn(f"non-finite loss ({loss}) at step {step}")

    def log(self, record):
        with self.lock:
            kind = record_kind(record)
            if kind == "eval":
                self.evals.append(record)
            elif kind == "warning":
                self._warn(str(record["warning"]))
            else:
                self.latest.update({k: v for k, v in record.items()
                                    if k in ("adapter_change", "peak_memory_gb", "tokens_seen", "epoch")})
                self.epoch_at_log, self.pairs_since_log = record.get("epoch"), 0.0

    def checkpoint(self, step, path):
        with self.lock:
            self.events.append((self.clock(), f"checkpoint saved at step {step}: {path}"))

    def warning(self, message):
        with self.lock:
            self._warn(message)

    def done(self, summary):
        with self.lock:
            self.final = summary
            self.current_phase = None

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


    # -- drawing ----------------------------------------------------------------------------------------
    def __rich__(self):
        with self.lock:
            return self.render()

    def render(self, width: Optional[int] = None):
        """The whole dashboard as one renderable (a Panel); `width` defaults to the console's."""
        width = width or self.console.width
        parts = [self._header_grid(), Text("")] if self.info else []
        parts.append(self._training_progress(width) if self.step_no else self._phase_table())
        notice = self._activity_line()
        if notice is not None:
            parts.append(notice)
        if self.step_no:
            parts.append(Text(""))
            parts.append(self._metrics_and_charts(width))
        if self.evals:
            parts += [Text(""), self._eval_table()]
        for t, e in self.events:
            parts.append(Text.assemble(("✓ ", "green"), (e, ""), (f"  ({duration(t - self.started)})", "dim")))
        for w in self.warnings[-3:]:
            parts.append(Text.assemble(("warning: ", "bold yellow"), w))
        return Panel(Group(*parts), title=f"[bold]{self.title}[/]", border_style=self._border(), width=width)

    def _border(self) -> str:
        if self.final is not None:
            return "yellow" if self.final.get("interrupted") else "green"
        return "red" if self.warnings else "blue"

    def _header_grid(self):
        i = self.info
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        loss = f"{i.get('loss')}  beta={fmt(i.get('beta'))}"
        if i.get("gamma_beta_ratio") is not None:
            loss += f"  gamma/beta={fmt(i['gamma_beta_ratio'])}"
        if i.get("label_smoothing"):
            loss += f"  label_smoothing={fmt(i['label_smoothing'])}"
        poet = "off"
        if i.get("poet"):
            poet = (f"on, ratio {fmt(i.get('poet_ratio'))}: cuts {i.get('pairs_cut_by_poet', '?')} pairs, "
                    f"saves {i.get('poet_token_saving', 0.0):.0%} of response tokens")
        keys = i.get("keys")
        keys = ", ".join(keys) if isinstance(keys, (list, tuple)) else str(keys)
        rows = [("model", f"{i.get('model')}  [{i.get('model_type', '?')}, quantization {i.get('quantization')}]"),
                ("parameters", f"{fmt(i.get('trainable_params'))} trainable of {fmt(i.get('total_params'))}"),
                ("loss", loss), ("POET", poet),
                ("adapters", f"{i.get('fine_tune_type')} rank {i.get('rank')}, last {i.get('num_layers')} layers, "
                             f"targets {keys}"),
                ("data", f"{i.get('train_pairs')} train / {i.get('valid_pairs')} valid pairs "
                         f"({i.get('data_format')})" + (f", {i['rows_skipped']} rows skipped"
                                                        if i.get("rows_skipped") else "")),
                ("lengths", str(i.get("length_report", "")))]
        rows += [("note", str(n)) for n in i.get("notes") or []]
        for k, v in rows:
            grid.add_row(k, Text(v))
        return grid

    def _phase_table(self):
        """Before training: every phase so far, done ones with their note and time, the current one with a bar."""
        t = Table.grid(padding=(0, 2))
        t.add_column(width=2)
        t.add_column(no_wrap=True)
        t.add_column()
        now = self.clock()
        for name, p in self.phases.items():
            if p.get("ended") is not None:
                note = f"{p['note']}, " if p.get("note") else ""
                t.add_row(Text("✓", style="green"), name, Text(f"{note}{p['ended'] - p['started']:.1f} s", style="dim"))
            else:
                t.add_row(Text("…", style="cyan"), name, self._phase_progress(p, now))
        if not self.phases:
            t.add_row(Text("…", style="cyan"), "starting", "")
        return t

    def _phase_progress(self, p: dict, now: float):
        elapsed = duration(now - p["started"])
        if not p.get("total"):
            return Text(f"{elapsed}", style="dim")
        row = Table.grid(padding=(0, 1))
        row.add_column(width=24)
        row.add_column()
        row.add_row(ProgressBar(total=p["total"], completed=p.get("done", 0), width=24),
                    Text(f"{p.get('done', 0)}/{p['total']}  {elapsed}", style="dim"))
        return row

    def _training_progress(self, width: int):
        now = self.clock()
        total = max(1, self.total)
        bar = 30 if width >= WIDE else 12
        row = Table.grid(padding=(0, 2))
        row.add_column(width=bar)
        row.add_column()
        epoch = self._epoch()
        text = f"step {self.step_no}/{self.total} {self.step_no / total:.0%}"
        if epoch is not None:
            text += f"  epoch {epoch:.2f}"
        text += f"  elapsed {duration(now - self.started)}  ETA {self._eta(now)}"
        row.add_row(ProgressBar(total=total, completed=self.step_no, width=bar), Text(text))
        return row

    def _activity_line(self):
        """What is happening right now besides stepping (validation, saving), and the Ctrl-C notice."""
        if self.final is not None:
            if self.final.get("interrupted"):
                return Text(f"stopped at step {self.final['steps']}; checkpoint saved", style="bold yellow")
            return Text(f"finished {self.final['steps']} steps", style="bold green")
        if self.stop is not None and self.stop():
            return Text("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits "
                        "without saving)", style="bold yellow")
        if self.step_no and self.current_phase:
            p = self.phases[self.current_phase]
            count = f" {p.get('done', 0)}/{p['total']}" if p.get("total") else ""
            return Text(f"{self.current_phase}{count}", style="cyan")
        return None

    def _epoch(self) -> Optional[float]:
        train_pairs = self.info.get("train_pairs")
        if self.epoch_at_log is not None:
            extra = self.pairs_since_log / train_pairs if train_pairs else 0.0
            return self.epoch_at_log + extra
        if train_pairs and self.first_step is not None and self.first_step[0] == 0:
            # Before the first report of a run that started at step 0: the pairs seen so far.
            return self.pairs_since_log / train_pairs
        return None

    def _eta(self, now: float) -> str:
        """Remaining steps at the wall-clock pace since the first step (validation and saving included)."""
        if self.first_step is None or self.step_no >= self.total:
            return "-"
        first, t0 = self.first_step
        done = self.step_no - first
        if done < 1:
            return "-"
        return duration((now - t0) / done * (self.total - self.step_no))

    def _metrics_and_charts(self, width: int):
        wide = width >= WIDE
        metrics = self._metrics_table() if wide else self._metrics_compact()
        chart_width = max(10, (width - 60) if wide else width - 16)
        charts = Table.grid(padding=(0, 1))
        charts.add_column(no_wrap=True)
        for k in CHARTED:
            h = self.history[k]
            if not h.values:
                continue
            y_range = (0.0, 1.0) if k == "rewards/accuracies" else None
            first = self.first_step[0] + 1 if self.first_step else 1  # a resumed run starts later
            charts.add_row(Text.assemble((f"{k} ", "bold"), (f"over steps {first}..{self.step_no} ", "dim"),
                                         (f"now {fmt(h.values[-1])}", "")))
            if wide:
                finite = [v for v in h.values if math.isfinite(v)]
                lo, hi = y_range or (min(finite, default=0.0), max(finite, default=0.0))
                labels = [fmt(hi), "", fmt(lo)]
                gutter = max(len(x) for x in labels)
                for label, line in zip(labels, block_chart(h.values, chart_width - gutter - 2, 3, y_range)):
                    charts.add_row(Text.assemble((f"{label:>{gutter}} ", "dim"), ("│", "dim"), (line, "cyan")))
            else:
                charts.add_row(Text(sparkline(h.values, chart_width), style="cyan"))
        grid = Table.grid(padding=(0, 4))
        if wide:
            grid.add_row(metrics, charts)
        else:
            grid.add_row(metrics)
            grid.add_row(charts)
        return grid

    def _metrics_table(self):
        """metric | last step | mean of the last RECENT steps."""
        t = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
        t.add_column("metric", no_wrap=True)
        t.add_column("last step", justify="right")
        t.add_column(f"last {RECENT}", justify="right")
        for k in LIVE_METRICS:
            if k in self.latest:
                recent = [v for v in self.recent[k] if math.isfinite(v)]
                t.add_row(k, fmt(self.latest[k]), fmt(sum(recent) / len(recent)) if recent else "")
        return t

    def _metrics_compact(self):
        """Narrow terminals: the last-step values in two column pairs, half as many rows."""
        names = [k for k in LIVE_METRICS if k in self.latest]
        half = (len(names) + 1) // 2
        t = Table.grid(padding=(0, 1))
        for justify in ("left", "right", "left", "right"):
            t.add_column(justify=justify, no_wrap=True)
        for a, b in zip(names[:half], names[half:] + [None]):
            right = (f"  {b}", fmt(self.latest[b])) if b else ("", "")
            t.add_row(a, fmt(self.latest[a]), *right)
        return t

    def _eval_table(self):
        cols = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        t = Table(title="validation", title_justify="left", title_style="bold", box=None, padding=(0, 1),
                  header_style="bold", show_edge=False)
        t.add_column("step", justify="right")
        for c in cols:
            t.add_column(c, justify="right")
        for r in self.evals[-3:]:
            t.add_row(str(r.get("step")), *[fmt(r.get(c)) for c in cols])
        return t
