"""The trainer's window on the world: a small reporter protocol. The library never prints; the CLI draws.

Tests pass `Reporter()` (silent) or a recording subclass; `cli/ui.py` implements the rich dashboard and the
plain line mode on top of the same calls.
"""

from __future__ import annotations

from typing import Any


class Reporter:
    """Silent base reporter: subclasses override what they show. Every method must return quickly."""

    def phase(self, name: str, done: int = 0, total: int | None = None, note: str = "") -> None:
        """Progress of a long phase ("loading model", "tokenizing", "reference log-probs", ...).

        Called with done=0 when the phase starts and done=total when it ends; `note` says e.g.
        "reused from cache".
        """

    def header(self, info: dict[str, Any]) -> None:
        """Run facts before the first step: model, quantization, parameters, loss, POET, LoRA, data."""

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """Every optimizer step: loss, grad_norm, learning_rate, tokens, ..."""

    def log(self, record: dict[str, Any]) -> None:
        """Every metrics.jsonl record (averaged training metrics, or eval_ metrics), as written."""

    def checkpoint(self, step: int, path: str) -> None:
        """A checkpoint was written completely to `path`."""

    def warning(self, message: str) -> None:
        """Something the user should know now (not learning, non-finite values, memory)."""

    def done(self, summary: dict[str, Any]) -> None:
        """End of run: final and best metrics, time, tokens, where the files are."""


class RecordingReporter(Reporter):
    """Keeps every call, for tests and for callers that want the records in memory."""

    def __init__(self):
        self.calls: list[tuple[str, Any]] = []

    def phase(self, name, done=0, total=None, note=""):
        self.calls.append(("phase", (name, done, total, note)))

    def header(self, info):
        self.calls.append(("header", info))

    def step(self, step, total, metrics):
        self.calls.append(("step", (step, total, metrics)))

    def log(self, record):
        self.calls.append(("log", record))

    def checkpoint(self, step, path):
        self.calls.append(("checkpoint", (step, path)))

    def warning(self, message):
        self.calls.append(("warning", message))

    def done(self, summary):
        self.calls.append(("done", summary))

    def of(self, kind: str) -> list:
        return [payload for k, payload in self.calls if k == kind]
