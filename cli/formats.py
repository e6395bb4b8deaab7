"""Numbers and records as text: `fmt`, `duration`, and the plain line format of `--plain` and CI logs.

Plain lines (logfmt): `KIND key=value key=value ...`, one event per line, no control codes.
KIND is one of phase, run, train, eval, checkpoint, warning, done (and report, from `poet-mlx report`).
A phase has state=start, progress (at most every PHASE_PROGRESS_SECONDS) or done (with its seconds). Keys
are the metric names of metrics.jsonl (loss, rewards/margins, ...). A value holding a space, a quote or an
`=`, or an empty one, is written as a JSON string in double quotes (`note="reused from cache"`); lists of
plain values are joined by commas; absent (None) values are left out. `parse_plain_line` reads a line back.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

PLAIN_KINDS = ("phase", "run", "train", "eval", "checkpoint", "warning", "done", "report")
_PAIR = r'[^\s="]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]*)'
PLAIN_LINE = re.compile(rf"^(?P<kind>[a-z]+)(?P<pairs>(?: {_PAIR})*)$")
"""A plain line: KIND, then ` key=value` pairs; a value is bare (no space or quote) or a JSON string."""
PHASE_PROGRESS_SECONDS = 15.0
"""Plain mode repeats a long phase's progress at most this often (a CI log shows it is alive)."""


def fmt(value: Any) -> str:
    """A number for people: 4 significant digits, scientific when tiny or huge, thousands separators."""
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


def duration(seconds: float) -> str:
    """`m:ss` or `h:mm:ss`."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# -- the plain line format -------------------------------------------------------------------------------


def plain_value(value: Any) -> Optional[str]:
    """The text of one value in a plain line, or None to leave the key out (None, dicts, nested lists)."""
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (str, int, float)) for v in value):
            return None
        value = ",".join(plain_value(v) if not isinstance(v, str) else v for v in value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return fmt(value)
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=\\' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def kv_line(kind: str, record: dict) -> str:
    """`KIND key=value ...` (see the module docstring)."""
    parts = [kind]
    for k, v in record.items():
        text = plain_value(v)
        if text is not None:
            parts.append(f"{k}={text}")
    return " ".join(parts)


def parse_plain_line(line: str) -> tuple[str, dict[str, str]]:
    """(kind, {key: value text}) of a plain line; quoted values are unquoted. Raises ValueError otherwise."""
    m = PLAIN_LINE.match(line)
    if not m:
        raise ValueError(f"not a plain report line: {line!r}")
    pairs = {}
    for item in re.findall(_PAIR, m["pairs"]):
        key, value = item.split("=", 1)
        pairs[key] = json.loads(value) if value.startswith('"') else value
    return m["kind"], pairs


def record_kind(record: dict) -> str:
    """train, eval or warning: which kind of metrics.jsonl record this is."""
    if any(k.startswith("eval_") for k in record):
        return "eval"
    if "warning" in record and "loss" not in record:
        return "warning"
    return "train"
