"""The command line: one module per command group, one output module.  Only the CLI prints.

  common      the Typer app and its groups, the common options, error handling, guards
  output      the consoles and everything the commands print (status tables, plans, ...)
  apply       apply, flush
  status      status
  change      confirm, rollback, boot
  container   container up, down, list
  selinux     selinux install, remove
  sandbox     sandbox up, down, selftest

A command reads as its procedure: guards, what is shown and asked, then one call
into ``hostprep.ops`` (the change) whose result it prints.  Every HostprepError
becomes one red line on stderr and its exit code; an unexpected exception
becomes one line too (never a traceback).
"""

from __future__ import annotations

# The command modules register their commands on the app when imported, in the
# order --help lists them.
from hostprep.cli import apply, status, change, container, selinux, sandbox  # noqa: F401
from hostprep.cli.common import app


def main() -> None:
    app(prog_name="hostprep")
