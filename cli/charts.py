"""Charts as data (`Chart`, `Series`) and their terminal drawings: sparklines, block bars, braille lines.

A chart is a title, axis labels and a list of series; the same `Chart` is drawn in the terminal here and as
SVG by `cli/svg.py`, so a new chart (say reward accuracy against prefix length) is one function that builds
a `Chart`. Pure functions, no I/O; rich is imported only by `BrailleChart`'s drawing method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

SPARK = "▁▂▃▄▅▆▇█"
BLOCKS = " ▁▂▃▄▅▆▇█"  # index = eighths of a cell filled
TERMINAL_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_white", "bright_black")


@dataclass
class Series:
    """One line of a chart: points (x[i], y[i]); non-finite y values leave a gap.

    `color` indexes the palette (runs keep their color across charts); `dashed` marks a second kind of
    the same run (validation next to training); `markers` draws a dot at each point (sparse series).
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: int = 0
    dashed: bool = False
    markers: bool = False

    def points(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in zip(self.x, self.y) if _finite(a) and _finite(b)]


@dataclass
class Chart:
    """A line chart: `x_log` puts x on a log2 scale; `x_ticks` (value, label) pairs replace the automatic
    ticks (e.g. prefix lengths 1, 2, 4, ... and "full")."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    x_log: bool = False
    x_ticks: Optional[list[tuple[float, str]]] = None
    y_range: Optional[tuple[float, float]] = None  # fixed y limits (accuracies: 0..1)

    def has_data(self) -> bool:
        return any(s.points() for s in self.series)

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_lo, x_hi, y_lo, y_hi) over all finite points, widened so that no span is zero."""
        pts = [p for s in self.series for p in s.points()]
        if self.x_log:
            pts = [(x, y) for x, y in pts if x > 0]
        if not pts:
            return 0.0, 1.0, 0.0, 1.0
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x_lo, x_hi = widen(min(xs), max(xs))
        y_lo, y_hi = self.y_range if self.y_range else nice_range(*widen(min(ys), max(ys)))
        return x_lo, x_hi, y_lo, y_hi


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def widen(lo: float, hi: float) -> tuple[float, float]:
    """A range of non-zero span around [lo, hi] (a constant series gets +-10% or +-0.5)."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 0.5
    return lo - pad, hi + pad


def nice_step(lo: float, hi: float, count: int = 5) -> float:
    """A round spacing (1, 2 or 5 times a power of ten) that cuts [lo, hi] into about count - 1 parts."""
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    # The candidate whose tick count comes closest to `count` (ties: the wider spacing).
    return min((m * mag for m in (10, 5, 2, 1)), key=lambda step: abs((hi - lo) / step + 1 - count))


def nice_range(lo: float, hi: float, count: int = 5) -> tuple[float, float]:
    """[lo, hi] widened outwards to multiples of its nice step, so the axis ends on labelled ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return lo, hi
    step = nice_step(lo, hi, count)
    # A value a hair past a tick (float noise, e.g. a margin of -2e-7) does not add a whole step.
    return math.floor(lo / step + 1e-3) * step, math.ceil(hi / step - 1e-3) * step


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi], about `count` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = nice_step(lo, hi, count)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def tick_label(value: float, ticks: Sequence[float] = ()) -> str:
    """Short label for a tick, with as many decimals as the tick spacing needs."""
    if value == 0:
        return "0"
    spacing = min((abs(b - a) for a, b in zip(ticks, ticks[1:])), default=abs(value))
    if abs(value) >= 1e5 or spacing < 1e-4:
        return f"{value:.2g}"
    # The fewest decimals that write the spacing exactly (0.25 needs 2, 0.2 needs 1, 5 needs 0).
    decimals = next(d for d in range(7) if abs(round(spacing, d) - spacing) <= spacing * 1e-6 or d == 6)
    return f"{value:.{decimals}f}"


def downsample(values: Sequence[float], width: int) -> list[float]:
    """At most `width` values: bucket means over the whole sequence (non-finite values skipped).

    Returns a list of length min(len(values), width); an all-non-finite bucket gives nan.
    """
    n = len(values)
    if n <= width:
        return [float(v) for v in values]
    out = []
    for i in range(width):
        bucket = [v for v in values[i * n // width:(i + 1) * n // width] if _finite(v)]
        out.append(sum(bucket) / len(bucket) if bucket else math.nan)
    return out


class History:
    """Per-step values of one metric over the whole run in bounded memory: past `cap` values, neighbours
    are averaged pairwise (each kept value then stands for twice as many steps)."""

    def __init__(self, cap: int = 2048):
        self.cap, self.values, self.stride, self._pending = cap, [], 1, []

    def append(self, value: float) -> None:
        self._pending.append(value)
        if len(self._pending) < self.stride:
            return
        finite = [v for v in self._pending if math.isfinite(v)]
        self.values.append(sum(finite) / len(finite) if finite else math.nan)
        self._pending = []
        if len(self.values) >= self.cap:
            self.values = [_mean2(a, b) for a, b in zip(self.values[::2], self.values[1::2])]
            self.stride *= 2


def _mean2(a: float, b: float) -> float:
    vals = [v for v in (a, b) if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """One line of ▁..█ over the whole of `values` (downsampled to `width`), scaled to their range."""
    vals = downsample(list(values), width)
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    top = len(SPARK) - 1
    return "".join(SPARK[min(top, int((v - lo) / span * top + 0.5))] if math.isfinite(v) else " " for v in vals)


def block_chart(values: Sequence[float], width: int, height: int,
                y_range: Optional[tuple[float, float]] = None) -> list[str]:
    """Vertical bars in eighth-blocks, `height` rows by up to `width` columns, top row first.

    The whole sequence is downsampled to `width` columns; the lowest value still shows one eighth so a
    column is never blank. Returns `height` strings of equal length.
    """
    vals = downsample(list(values), width)
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return [""] * height
    lo, hi = y_range if y_range else (min(finite), max(finite))
    span = hi - lo or 1.0
    levels = height * 8
    heights = [max(1, min(levels, round((v - lo) / span * (levels - 1)) + 1)) if math.isfinite(v) else 0
               for v in vals]
    rows = []
    for r in range(height - 1, -1, -1):  # top row first
        rows.append("".join(BLOCKS[max(0, min(8, h - r * 8))] for h in heights))
    return rows


# -- braille line charts (terminal report) ---------------------------------------------------------------

_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] bit of a braille cell


class BrailleCanvas:
    """A grid of `width` x `height` braille cells = (2*width) x (4*height) dots; each cell keeps the color
    of the last series drawn into it (overlaps show the later run)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.color = [[-1] * width for _ in range(height)]

    def dot(self, x: int, y: int, color: int) -> None:
        """Set dot (x, y), y counted from the top, if it is on the canvas."""
        if 0 <= x < 2 * self.width and 0 <= y < 4 * self.height:
            row, col = y // 4, x // 2
            self.bits[row][col] |= _DOT[y % 4][x % 2]
            self.color[row][col] = color

    def line(self, x0: int, y0: int, x1: int, y1: int, color: int) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)

    def rows(self) -> list[list[tuple[str, int]]]:
        """Cells as (character, color index or -1) per row, top row first."""
        return [[(chr(0x2800 + b), c) for b, c in zip(bits, colors)]
                for bits, colors in zip(self.bits, self.color)]


def plot_series(chart: Chart, width: int, height: int) -> BrailleCanvas:
    """Draw every series of `chart` onto a canvas of `width` x `height` cells (lines between points)."""
    canvas = BrailleCanvas(width, height)
    x_lo, x_hi, y_lo, y_hi = chart.bounds()
    fx = axis_scale(x_lo, x_hi, 0, 2 * width - 1, chart.x_log)
    fy = axis_scale(y_lo, y_hi, 4 * height - 1, 0, False)
    for s in chart.series:
        prev = None  # a non-finite value breaks the line, as in the SVG
        for x, y in zip(s.x, s.y):
            if not (_finite(x) and _finite(y)) or (chart.x_log and x <= 0):
                prev = None
                continue
            here = (round(fx(x)), round(fy(y)))
            if prev is not None:
                canvas.line(*prev, *here, s.color)
            if s.markers or len(s.points()) == 1:
                canvas.dot(*here, s.color)
            prev = here
    return canvas


def axis_scale(lo: float, hi: float, out_lo: float, out_hi: float, log: bool):
    """Linear (or log2) map from [lo, hi] onto [out_lo, out_hi]."""
    if log:
        lo, hi = math.log2(max(lo, 1e-12)), math.log2(max(hi, 1e-12))
    span = (hi - lo) or 1.0

    def f(v: float) -> float:
        v = math.log2(max(v, 1e-12)) if log else v
        return out_lo + (v - lo) / span * (out_hi - out_lo)

    return f


class BrailleChart:
    """A rich renderable: title, y ticks, braille plot area, x ticks and label, legend. Fits its width."""

    def __init__(self, chart: Chart, height: int = 10, max_width: int = 100):
        self.chart, self.height, self.max_width = chart, height, max_width

    def __rich_console__(self, console, options):
        from rich.text import Text

        chart = self.chart
        x_lo, x_hi, y_lo, y_hi = chart.bounds()
        y_ticks = nice_ticks(y_lo, y_hi, 5)
        labels = [tick_label(t, y_ticks) for t in y_ticks]
        gutter = max(len(s) for s in labels) + 1
        width = max(10, min(self.max_width, options.max_width) - gutter - 1)
        yield Text(f"{chart.title}", style="bold")
        if not chart.has_data():
            yield Text("  (no data)", style="dim")
            return
        canvas = plot_series(chart, width, self.height)
        fy = axis_scale(y_lo, y_hi, self.height - 1, 0, False)
        tick_rows = {min(self.height - 1, max(0, round(fy(t)))): lab for t, lab in zip(y_ticks, labels)}
        for r, cells in enumerate(canvas.rows()):
            line = Text(f"{tick_rows.get(r, ''):>{gutter - 1}} ", style="dim")
            line.append("┤" if r in tick_rows else "│", style="dim")
            for ch, color in cells:
                line.append(ch, style=TERMINAL_COLORS[color % len(TERMINAL_COLORS)] if color >= 0 else None)
            yield line
        yield Text(" " * gutter + "└" + "─" * width, style="dim")
        yield Text(" " * (gutter + 1) + _x_axis_text(chart, x_lo, x_hi, width), style="dim")
        yield from _legend_lines(chart, gutter + 1, min(self.max_width, options.max_width))


def _x_axis_text(chart: Chart, x_lo: float, x_hi: float, width: int) -> str:
    """Tick labels placed under their columns (where they do not collide)."""
    if chart.x_ticks:
        ticks = chart.x_ticks
    else:
        values = nice_ticks(x_lo, x_hi, max(2, width // 14))
        ticks = [(v, tick_label(v, values)) for v in values]
    fx = axis_scale(x_lo, x_hi, 0, width - 1, chart.x_log)
    row = [" "] * width
    for value, label in ticks:
        col = round(fx(value))
        start = min(max(0, col - len(label) // 2), width - len(label))
        if start >= 0 and all(c == " " for c in row[max(0, start - 1):start + len(label) + 1]):
            row[start:start + len(label)] = label
    return "".join(row).rstrip()


def _legend_lines(chart: Chart, indent: int, width: int) -> list:
    """Legend entries (line sample in the series' color, then its label), wrapped between entries."""
    from rich.text import Text

    entries = []
    for s in chart.series:
        entry = Text("┄┄ " if s.dashed else "━━ ", style=TERMINAL_COLORS[s.color % len(TERMINAL_COLORS)])
        entries.append(entry + Text(f"{s.label}   "))
    entries.append(Text(f"(x: {chart.x_label}, y: {chart.y_label})", style="dim"))
    lines = [Text(" " * indent)]
    for entry in entries:
        if lines[-1].cell_len > indent and lines[-1].cell_len + entry.cell_len > width:
            lines.append(Text(" " * indent))
        lines[-1].append_text(entry)
    return lines
