"""`poet-mlx report RUN [--compare RUN2 ...]`: a run's curves as terminal charts and as a picture file.

The picture is a self-contained HTML page with inline SVG (default `RUN/report.html`; no server, no
JavaScript), or one SVG (`--output x.svg`), or a PNG (`--output x.png`, needs the `png` extra: cairosvg).
Every chart is a `charts.Chart` built from the runs' metrics.jsonl, so adding a chart is adding a function
that returns one (see `prefix_chart` for curves read from JSON files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from poet_mlx.cli.charts import Chart, Series
from poet_mlx.cli.common import add_output_flags, run_guarded
from poet_mlx.cli.formats import fmt, kv_line
from poet_mlx.cli.ui import final_and_best
from poet_mlx.errors import PoetError

# (metric in metrics.jsonl, chart title, y axis label, fixed y range); validation uses the eval_ name.
RUN_CHARTS = (
    ("loss", "Loss", "loss", None),
    ("rewards/margins", "Reward margin (chosen - rejected)", "rewards/margins", None),
    ("rewards/accuracies", "Reward accuracy (chosen reward > rejected)", "rewards/accuracies", (0.0, 1.0)),
)
CURVES, OPTIMIZER = "Training (solid) and validation (dashed) over steps", "Optimizer"
EXTRA_CHARTS = (
    ("grad_norm", "Gradient norm (before clipping)", "grad_norm", None),
    ("learning_rate", "Learning rate", "learning_rate", None),
)


@dataclass
class Run:
    """A run folder as the report sees it: its label, settings and metrics records."""

    path: Path
    label: str
    config: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    skipped_lines: int = 0

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if "loss" in r and not any(k.startswith("eval_") for k in r)]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if any(k.startswith("eval_") for k in r)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-mlx report", description=(
        "Charts of a training run (loss, reward margin, reward accuracy; training and validation) in the "
        "terminal and as a picture file; --compare overlays other runs (e.g. DPO vs DPO+POET)."))
    p.add_argument("run", metavar="RUN", help="A run folder (the --adapter-path of poet-mlx train).")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="More run folders to overlay.")
    p.add_argument("--output", help="Picture file: .html (default RUN/report.html), .svg, or .png (needs "
                   "pip install 'poet-mlx[png]').")
    p.add_argument("--prefix-curve", nargs="+", default=[], metavar="JSON", help="Also chart reward accuracy "
                   "against prefix length from these JSON files ({\"k\": [...], \"accuracy\": [...], "
                   "\"label\": ...}).")
    p.add_argument("--no-charts", action="store_true", help="Write the picture file; print no terminal charts.")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _report(args), debug=args.debug)


def _report(args) -> int:
    runs = label_runs([load_run(Path(p)) for p in [args.run, *args.compare]])
    curves = [c for path in args.prefix_curve for c in load_prefix_curves(Path(path))]
    sections = report_sections(runs, curves)
    output = Path(args.output) if args.output else runs[0].path / "report.html"
    write_picture(output, runs, sections)
    if args.quiet:
        return 0
    if args.plain:
        for run in runs:
            print(kv_line("run", {"label": run.label, "path": str(run.path), **final_values(run)}))
        print(kv_line("report", {"path": str(output)}))
        return 0
    terminal = [c for heading, charts in sections if heading != OPTIMIZER for c in charts]
    print_terminal(runs, terminal, output, show_charts=not args.no_charts)
    return 0


# -- runs -------------------------------------------------------------------------------------------------


def load_run(path: Path) -> Run:
    """Read a run folder's metrics.jsonl and saved settings. A broken line (a run being written, or cut
    by a crash) is skipped and counted rather than failing the report."""
    from poet_mlx.train.checkpoint import read_metrics

    if not path.is_dir():
        raise PoetError(f"run folder {path} not found; pass the --adapter-path of a poet-mlx train run")
    try:
        records = read_metrics(path)  # drops a torn line
    except ValueError as exc:
        raise PoetError(f"{path / 'metrics.jsonl'} has an unreadable line ({exc})") from None
    text = (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    skipped = sum(1 for line in text.splitlines() if line.strip()) - len(records)
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    config = saved_settings(path)
    return Run(path, run_label(config), config, records, skipped)


def saved_settings(path: Path) -> dict:
    """The flat settings under adapter_config.json's "poet_mlx" -> "config" ({} if absent or unreadable)."""
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())["poet_mlx"]["config"]
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_label(config: dict) -> str:
    """`dpo`, `dpo+poet`, `simpo+poet(r=0.5)`, ... from a run's settings; `run` if they are unknown."""
    if not config:
        return "run"
    label = str(config.get("loss", "dpo"))
    if config.get("poet"):
        ratio = config.get("poet_ratio", 1.0)
        label += "+poet" + (f"(r={ratio:g})" if isinstance(ratio, (int, float)) and ratio != 1.0 else "")
    return label


def label_runs(runs: list[Run]) -> list[Run]:
    """Make labels unique: runs sharing a label get their folder name, then their path, appended."""
    for attr in (lambda r: r.path.name, lambda r: str(r.path)):
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.label] = counts.get(r.label, 0) + 1
        for r in runs:
            if counts[r.label] > 1:
                r.label = f"{r.label} ({attr(r)})"
    return runs


def report_notes(runs: list[Run]) -> list[str]:
    """What the reader should know before reading the curves: the runs' warnings (records of metrics.jsonl
    with a "warning" key), and that POET's rewards are measured on cut pairs when runs are compared."""
    notes = [f"{r.label}, step {w.get('step')}: {w['warning']}" for r in runs for w in r.records if "warning" in w]
    if len({bool(r.config.get("poet")) for r in runs}) > 1:
        notes.append("POET runs log rewards and accuracies on pairs cut to equal length, the other runs on "
                     "whole responses: their training and validation metrics measure different things. Compare "
                     "them with `poet-mlx eval` on the same pairs.")
    return notes


def final_values(run: Run) -> dict:
    """The last value of each summary metric (for the plain lines and the runs table)."""
    return {name: last for name, (last, _), _ in final_and_best(run.records)}


# -- charts ----------------------------------------------------------------------------------------------


def metric_chart(runs: list[Run], name: str, title: str, y_label: str, y_range=None,
                 with_eval: bool = True) -> Chart:
    """One chart of `name` over steps: per run a solid training line and a dashed validation line
    (eval_`name`, with markers), in the run's color."""
    series = []
    for i, run in enumerate(runs):
        train = [r for r in run.train if name in r]
        if train:
            series.append(Series(f"{run.label} train", [r["step"] for r in train], [_num(r[name]) for r in train],
                                 color=i))
        evals = [r for r in run.evals if f"eval_{name}" in r] if with_eval else []
        if evals:
            series.append(Series(f"{run.label} validation", [r["step"] for r in evals],
                                 [_num(r[f"eval_{name}"]) for r in evals], color=i, dashed=True, markers=True))
    return Chart(title, "step", y_label, series, y_range=y_range)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def report_sections(runs: list[Run], curves: Optional[list[dict]] = None) -> list[tuple[str, list[Chart]]]:
    """The report's charts under their headings: loss, reward margin and reward accuracy (training and
    validation); gradient norm and learning rate; prefix curves when given. A new chart goes here."""
    sections = [(CURVES, [metric_chart(runs, *spec) for spec in RUN_CHARTS]),
                (OPTIMIZER, [metric_chart(runs, *spec, with_eval=False) for spec in EXTRA_CHARTS])]
    if curves:
        sections.append(("Prefix curves", [prefix_chart(curves)]))
    return sections


def load_prefix_curves(path: Path) -> list[dict]:
    """Prefix curves from a JSON file: one object {"k": [...], "accuracy": [...], "label": "..."} or a list
    of them (or {"curves": [...]}), as `poet-mlx eval --prefix-curve` writes them. The whole responses come
    as a "k" entry "full" or as {"full": {"accuracy": ...}}; they are drawn after the largest k. A null
    accuracy (no pair reaches that k) leaves a gap."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PoetError(f"cannot read prefix curve file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PoetError(f"{path} is not valid JSON ({exc}); pass the file written by poet-mlx eval "
                        "--prefix-curve") from None
    curves = data.get("curves", [data]) if isinstance(data, dict) else data
    if not isinstance(curves, list) or not all(isinstance(c, dict) and isinstance(c.get("k"), list)
                                               and isinstance(c.get("accuracy"), list) for c in curves):
        raise PoetError(f"{path}: expected {{\"k\": [...], \"accuracy\": [...]}} (or a list of them)")
    out = []
    for c in curves:
        k, acc = list(c["k"]), list(c["accuracy"])
        full = c.get("full")
        if isinstance(full, dict) and "accuracy" in full:  # poet_mlx.analysis.prefix.PrefixCurve.to_json()
            k, acc = k + ["full"], acc + [full["accuracy"]]
        out.append({"k": k, "accuracy": acc, "label": c.get("label") or path.stem})
    return out


def prefix_chart(curves: list[dict]) -> Chart:
    """Reward accuracy against prefix length k (log2 axis; "full" after the largest k)."""
    numeric = [k for c in curves for k in c["k"] if isinstance(k, (int, float)) and k > 0]
    top = max(numeric, default=1)
    full_at = 2 ** (math.floor(math.log2(top)) + 1)
    ticks = {}
    series = []
    for i, c in enumerate(curves):
        xs = [full_at if k == "full" else k for k in c["k"]]
        for k, x in zip(c["k"], xs):
            if isinstance(x, (int, float)) and x > 0:
                ticks[x] = "full" if k == "full" else f"{k:g}"
        series.append(Series(str(c["label"]), xs, [_num(a) for a in c["accuracy"]], color=i, markers=True))
    return Chart("Reward accuracy of the first k response tokens", "prefix length k (tokens)",
                 "rewards/accuracies", series, x_log=True, x_ticks=sorted(ticks.items()), y_range=(0.0, 1.0))


# -- outputs ---------------------------------------------------------------------------------------------


def runs_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Runs side by side (one column each): settings, then final and best numbers. Returns (header, rows)."""
    from poet_mlx.export.model_card import objective_fact

    header = ["", *[r.label for r in runs]]
    columns = []
    for run in runs:
        c = run.config
        ratio = c.get("poet_ratio", 1.0)
        poet = ("on" + (f", ratio {ratio:g}" if ratio != 1.0 else "")) if c.get("poet") else "off"
        final = {name: last for name, last, _ in final_and_best(run.records)}
        best = {name: best for name, _, best in final_and_best(run.records)}
        at = lambda d, k: f"{fmt(d[k][0])} (step {d[k][1]})" if k in d else "-"  # noqa: E731
        columns.append([str(run.path), str(c.get("model", "?")), objective_fact(c) if c.get("loss") else "?",
                        poet if c else "?", f"{c.get('fine_tune_type', '?')}, rank {c.get('rank', '?')}",
                        str(max((r["step"] for r in run.train), default=0)),
                        at(final, "loss"), at(final, "eval_loss"), at(best, "eval_loss"),
                        at(final, "eval_rewards/accuracies"), at(best, "eval_rewards/accuracies"),
                        at(final, "eval_rewards/margins")])
    names = ["folder", "model", "loss", "POET", "adapters", "steps", "final loss", "final eval_loss",
             "best eval_loss", "final eval_rewards/accuracies", "best eval_rewards/accuracies",
             "final eval_rewards/margins"]
    return header, [[name, *[col[i] for col in columns]] for i, name in enumerate(names)]


def write_picture(output: Path, runs: list[Run], sections: list[tuple[str, list[Chart]]]) -> None:
    """Write the page (.html), one SVG (.svg) or a PNG (.png) atomically."""
    from poet_mlx.cli import svg
    from poet_mlx.fsutil import atomic_path, write_text_atomic

    title = "poet-mlx report: " + " vs ".join(r.label for r in runs)
    charts = [c for _, group in sections for c in group]
    suffix = output.suffix.lower()
    if suffix in (".html", ".htm"):
        header, rows = runs_table(runs)
        made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        parts = [("Runs", svg.html_table(header, rows))]
        parts += [(heading, svg.charts_html(group)) for heading, group in sections]
        subtitle = f"{made}, from " + ", ".join(str(r.path / "metrics.jsonl") for r in runs)
        write_text_atomic(output, svg.html_page(title, subtitle, parts, report_notes(runs)))
    elif suffix == ".svg":
        write_text_atomic(output, svg.combined_svg(charts, title=title))
    elif suffix == ".png":
        try:
            import cairosvg
        except ImportError:
            raise PoetError(f"writing {output} needs cairosvg: pip install 'poet-mlx[png]' (or pass --output "
                            "report.html or report.svg, which need nothing extra)") from None
        with atomic_path(output, suffix=".png") as tmp:
            cairosvg.svg2png(bytestring=svg.combined_svg(charts, title=title).encode(), write_to=str(tmp))
    else:
        raise PoetError(f"--output {output}: unknown picture type '{output.suffix}'; use .html, .svg or .png")


def print_terminal(runs: list[Run], charts: list[Chart], output: Path, show_charts: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from poet_mlx.cli.charts import TERMINAL_COLORS, BrailleChart

    console = Console()
    header, rows = runs_table(runs)
    t = Table(title="runs", title_justify="left", title_style="bold")
    t.add_column("")
    for i, label in enumerate(header[1:]):
        t.add_column(Text(label, style=TERMINAL_COLORS[i % len(TERMINAL_COLORS)]), justify="right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    for note in report_notes(runs):
        console.print(Text(f"note: {note}", style="yellow"))
    for run in runs:
        if run.skipped_lines:
            console.print(Text(f"note: skipped {run.skipped_lines} unreadable line(s) in "
                               f"{run.path / 'metrics.jsonl'}", style="yellow"))
    if show_charts:
        for chart in charts:
            console.print()
            console.print(BrailleChart(chart, height=8, max_width=110))
    console.print()
    console.print(Text("picture: ", style="bold") + Text(str(output)), soft_wrap=True)
