"""Exit codes of a signal's kind, and the quiet end when the reader of stdout went away."""

from __future__ import annotations

import os
import signal
import sys

EXIT_SIGPIPE = 128 + signal.SIGPIPE
EXIT_SIGINT = 128 + signal.SIGINT


def broken_pipe() -> None:
    """The reader of stdout went away: stop writing, exit 141, print nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise SystemExit(EXIT_SIGPIPE)
