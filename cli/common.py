"""What every command shares: output-mode flags, user-error handling, signal handling."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Callable

from poet_mlx.errors import PoetError

EXIT_USER_ERROR = 2


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--plain", action="store_true", help="One line per report, no live dashboard "
                     "(the default when output is not a terminal).")
    out.add_argument("--quiet", action="store_true", help="Print errors only.")
    out.add_argument("--debug", action="store_true", help="Show tracebacks for errors.")


def run_guarded(body: Callable[[], int], debug: bool = False) -> int:
    """Run a command body: a PoetError becomes one line on stderr and exit code 2 (traceback with --debug)."""
    try:
        return body()
    except PoetError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class StopFlag:
    """Set by SIGINT/SIGTERM: the trainer stops between steps and saves. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0


@contextmanager
def graceful_stop():
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
