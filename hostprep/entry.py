"""The ``hostprep`` command's entry point: quiet on Ctrl-C and on a closed pipe.

Importing the CLI (Typer, Rich) takes a moment; a Ctrl-C during it would print
a Python traceback.  Until the CLI is loaded SIGINT keeps its default action (the
process ends, the shell sees 130, nothing is printed); from then on every command
turns it into "interrupted" (exit 130) itself, and changes defer it until they are
whole (txn).  A reader that goes away (``hostprep status | head``) ends hostprep
quietly with 141, as SIGPIPE ends other tools; SIGPIPE itself stays ignored, so a
child tool exiting early never kills hostprep half-way through a change.
"""

from __future__ import annotations

import _signal  # first, and without 'signal' (its enums take a while to import)

_signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import signal  # noqa: E402

from hostprep.exits import EXIT_SIGINT, broken_pipe  # noqa: E402

def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)      # (when imported earlier by someone else)
    # Imported here, not above: Typer and Rich take a moment, and SIGINT keeps its
    # default action until they are loaded (the one deliberate late import).
    from hostprep import cli
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli.main()
    except KeyboardInterrupt:
        # (between Typer's parsing and a command's own handling)
        raise SystemExit(EXIT_SIGINT) from None
    except BrokenPipeError:
        broken_pipe()
