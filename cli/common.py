"""What every command shares: output-mode flags, user-error handling, signal handling."""

from __future__ import annotations

import argparse
import errno
import os
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


USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
"""OS errors that are the machine's state rather than a bug (disk full, permissions, read-only disk)."""


def one_line(message: str) -> str:
    """A multi-line diagnosis (e.g. a list of invalid rows) as one line: detail lines joined with ' | '."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return lines[0] + " " + " | ".join(line[2:] if line.startswith("- ") else line for line in lines[1:])


def run_guarded(body: Callable[[], int], debug: bool = False) -> int:
    """Run a command body: a PoetError (or a full disk, a permission error) becomes one `error: ...` line on
    stderr and exit code 2; --debug adds the traceback and the message as written (several lines)."""
    try:
        return body()
    except PoetError as exc:
        return _user_error(str(exc), debug)
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        return _user_error(f"{exc.strerror or exc}{where}; free some space or fix the permissions, then run "
                           "again (--debug shows where it happened)", debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _rank_prefix() -> str:
    """"rank N: " inside a job started by mlx.launch (which sets MLX_RANK), so a failure names its rank."""
    rank = os.environ.get("MLX_RANK")
    return f"rank {rank}: " if rank is not None else ""


def _user_error(message: str, debug: bool) -> int:
    message = _rank_prefix() + message
    if debug:
        traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
    else:
        print(f"error: {one_line(message)}", file=sys.stderr)
    return EXIT_USER_ERROR


class StopFlag:
    """Set by SIGINT/SIGTERM: the trainer stops between steps and saves (a stop during the preparation takes
    effect when training starts: a resumable step-0 checkpoint). A second Ctrl-C aborts at once: the last
    complete checkpoint stays loadable, since every write is atomic."""

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
        if flag.signum is None:  # the first signal decides the exit code (130 or 143)
            flag.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
