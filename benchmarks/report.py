"""Plain-text tables for the benchmark's results (the JSON file holds everything; these are the summaries)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Sequence

RESULT_TAG = "BENCH_RESULT "
"""Prefix of the one JSON line a benchmark child process prints with its result (read by sections.run_child)."""


def child_main(run: Callable[[dict], dict], argv=None) -> int:
    """Entry point of a benchmark child process: run(spec) on the JSON spec in argv[0], print the result."""
    spec = json.loads((argv or sys.argv[1:])[0])
    print(RESULT_TAG + json.dumps(run(spec)), flush=True)
    return 0


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], note: str = "") -> str:
    """A titled, column-aligned text table; `note` is printed under it."""
    body = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in body]
    if note:
        out.append(note)
    return "\n".join(out) + "\n"


def ratio(a, b):
    return a / b if a is not None and b else None


def max_rss_gb() -> float:
    """Peak resident memory of this process in GB: Linux's VmHWM (reset by exec, unlike ru_maxrss, which a
    child inherits from the parent that forked it), else ru_maxrss."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9
