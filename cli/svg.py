"""Charts as SVG, and a self-contained HTML page of them: no server, no JavaScript, opens in any browser.

`chart_svg(Chart)` draws one line chart (title, axes with ticks and labels, one <path> per series, a legend);
`html_page` puts charts and tables on one page; `combined_svg` stacks charts into one SVG (for a .svg or PNG
file). Text is escaped; colors come from the Okabe-Ito palette, which stays readable for color-blind eyes.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

from poet_mlx.cli.charts import Chart, axis_scale, nice_ticks, tick_label

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
WIDTH, PLOT_HEIGHT = 520, 280
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 20, 36, 48
LEGEND_ROW = 18
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif"


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _num(v: float) -> str:
    return f"{v:.1f}"


def _legend_rows(chart: Chart, width: int) -> list[list[tuple[int, float]]]:
    """Series indices per legend row, with their x offsets, wrapped to `width` (about 6.5 px per char)."""
    rows: list[list[tuple[int, float]]] = [[]]
    x = 0.0
    for i, s in enumerate(chart.series):
        w = 34 + 6.5 * len(s.label) + 18
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((i, x))
        x += w
    return rows if rows[0] else []


def chart_svg(chart: Chart, width: int = WIDTH, plot_height: int = PLOT_HEIGHT) -> str:
    """One standalone <svg> element (valid XML) for `chart`.

    Each series is one <path class="series"> (gaps for non-finite values start a new subpath); sparse
    series also get <circle> markers. The legend sits under the x axis label.
    """
    x_lo, x_hi, y_lo, y_hi = chart.bounds()
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = width - MARGIN_RIGHT, MARGIN_TOP + plot_height
    legend = _legend_rows(chart, right - left)
    height = bottom + MARGIN_BOTTOM + LEGEND_ROW * len(legend) + 6
    fx = axis_scale(x_lo, x_hi, left, right, chart.x_log)
    fy = axis_scale(y_lo, y_hi, bottom, top, False)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(chart.title)}" style="{FONT}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="600" fill="#222">{escape(chart.title)}</text>']
    out += _grid_and_ticks(chart, fx, fy, (x_lo, x_hi, y_lo, y_hi), (left, top, right, bottom))
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
               'stroke="#888" stroke-width="1"/>')
    if not chart.has_data():
        out.append(f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle" '
                   'font-size="13" fill="#888">no data</text>')
    for s in chart.series:
        out += _series_svg(s, fx, fy, chart.x_log)
    out.append(f'<text class="x-label" x="{(left + right) / 2}" y="{bottom + 38}" text-anchor="middle" '
               f'font-size="13" fill="#222">{escape(chart.x_label)}</text>')
    cy = (top + bottom) / 2
    out.append(f'<text class="y-label" x="16" y="{cy}" text-anchor="middle" font-size="13" fill="#222" '
               f'transform="rotate(-90 16 {cy})">{escape(chart.y_label)}</text>')
    out += _legend_svg(chart, legend, left, bottom + MARGIN_BOTTOM + 4)
    out.append("</svg>")
    return "\n".join(out)


def _grid_and_ticks(chart: Chart, fx, fy, bounds, box) -> list[str]:
    x_lo, x_hi, y_lo, y_hi = bounds
    left, top, right, bottom = box
    out = []
    y_ticks = nice_ticks(y_lo, y_hi, 5)
    for t in y_ticks:
        y = fy(t)
        out.append(f'<line x1="{left}" y1="{_num(y)}" x2="{right}" y2="{_num(y)}" stroke="#e6e6e6"/>')
        out.append(f'<text x="{left - 6}" y="{_num(y + 4)}" text-anchor="end" font-size="11" fill="#444">'
                   f'{escape(tick_label(t, y_ticks))}</text>')
    if chart.x_ticks:
        x_ticks = [(v, lab) for v, lab in chart.x_ticks if x_lo <= v <= x_hi]
    else:
        values = nice_ticks(x_lo, x_hi, 7)
        x_ticks = [(v, tick_label(v, values)) for v in values]
    for v, lab in x_ticks:
        x = fx(v)
        out.append(f'<line x1="{_num(x)}" y1="{top}" x2="{_num(x)}" y2="{bottom}" stroke="#f0f0f0"/>')
        out.append(f'<line x1="{_num(x)}" y1="{bottom}" x2="{_num(x)}" y2="{bottom + 4}" stroke="#888"/>')
        out.append(f'<text x="{_num(x)}" y="{bottom + 17}" text-anchor="middle" font-size="11" fill="#444">'
                   f'{escape(lab)}</text>')
    return out


def _series_svg(s, fx, fy, x_log: bool) -> list[str]:
    """A <path> whose subpaths break at non-finite values, plus markers for sparse series."""
    parts, pen_down = [], False
    for x, y in zip(s.x, s.y):
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) and (not x_log or x > 0)
        if not ok:
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{_num(fx(x))} {_num(fy(y))}")
        pen_down = True
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    out = [f'<path class="series" data-label="{escape(s.label)}" d="{" ".join(parts) or "M0 0"}" fill="none" '
           f'stroke="{color(s.color)}" stroke-width="2" stroke-linejoin="round"{dash}/>']
    if s.markers or len(s.points()) == 1:
        for x, y in s.points():
            if not x_log or x > 0:
                out.append(f'<circle cx="{_num(fx(x))}" cy="{_num(fy(y))}" r="3" fill="{color(s.color)}"/>')
    return out


def _legend_svg(chart: Chart, rows, left: float, top: float) -> list[str]:
    out = ['<g class="legend">'] if rows else []
    for r, row in enumerate(rows):
        y = top + r * LEGEND_ROW
        for i, dx in row:
            s = chart.series[i]
            x = left + dx
            dash = ' stroke-dasharray="6 4"' if s.dashed else ""
            out.append(f'<line x1="{_num(x)}" y1="{_num(y)}" x2="{_num(x + 28)}" y2="{_num(y)}" '
                       f'stroke="{color(s.color)}" stroke-width="2.5"{dash}/>')
            out.append(f'<text x="{_num(x + 34)}" y="{_num(y + 4)}" font-size="12" fill="#222">'
                       f'{escape(s.label)}</text>')
    if rows:
        out.append("</g>")
    return out


def combined_svg(charts: Sequence[Chart], columns: int = 2, title: str = "") -> str:
    """All charts in one SVG, `columns` per row (for a .svg file or PNG conversion)."""
    cells = [chart_svg(c) for c in charts]
    heights = [int(c.split('height="', 1)[1].split('"', 1)[0]) for c in cells]
    head = 40 if title else 0
    row_heights = [max(heights[i:i + columns]) for i in range(0, len(cells), columns)]
    total_w, total_h = WIDTH * columns, head + sum(row_heights)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
           f'viewBox="0 0 {total_w} {total_h}" style="{FONT}">',
           f'<rect width="{total_w}" height="{total_h}" fill="white"/>']
    if title:
        out.append(f'<text x="16" y="28" font-size="18" font-weight="600" fill="#222">{escape(title)}</text>')
    y = head
    for r, row_h in enumerate(row_heights):
        for c, cell in enumerate(cells[r * columns:(r + 1) * columns]):
            # A nested <svg> with x/y places a whole chart; its own viewBox keeps its coordinates.
            out.append(cell.replace("<svg ", f'<svg x="{c * WIDTH}" y="{y}" ', 1))
        y += row_h
    out.append("</svg>")
    return "\n".join(out)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain HTML table; every cell is escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #666; font-size: 13px; margin-bottom: 16px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.charts svg { background: white; border: 1px solid #ddd; border-radius: 6px; }
table { border-collapse: collapse; font-size: 13px; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.note { background: #fff7e0; border-left: 4px solid #E69F00; padding: 6px 10px; font-size: 13px; max-width: 900px; }
"""


def html_page(title: str, subtitle: str, sections: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """A complete HTML document. `sections` are (heading, inner HTML) pairs, drawn in order; `notes` are
    plain-text remarks shown under the title."""
    body = "".join(f"<h2>{escape(h)}</h2>\n{inner}\n" for h, inner in sections)
    remarks = "".join(f'<p class="note">{escape(n)}</p>\n' for n in notes)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{escape(title)}</h1><div class=\"meta\">{escape(subtitle)}</div>\n{remarks}{body}</body></html>\n")


def charts_html(charts: Sequence[Chart]) -> str:
    return '<div class="charts">\n' + "\n".join(chart_svg(c) for c in charts) + "\n</div>"
