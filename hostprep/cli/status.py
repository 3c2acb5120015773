"""status: observe the host and print the report (hostprep.status collects it)."""

from __future__ import annotations

import json
from typing import Optional

import typer
import typer.core

from hostprep import status as statusmod
from hostprep.paths import Paths
from hostprep.runner import Runner
from hostprep.state import Store
from hostprep.cli.common import EXAMPLES, BackendOpt, app, handle_errors, need_root, choose_backend
from hostprep.cli.output import err, out, print_status


@app.command("status", epilog=EXAMPLES["status"])
@handle_errors
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (schema in README)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="List every kernel key (without -v only "
                                 "when one drifts)."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Am I protected? What is open to whom, then desired vs live with counters.

    Exit 0 all live, 1 something differs, 2 error.
    """
    need_root("status")
    runner = Runner()
    chosen = choose_backend(runner, backend)
    report = statusmod.collect(runner, chosen.backend, Store(Paths.from_env()), chosen=chosen)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_status(out, err, report, verbose=verbose)
    raise typer.Exit(statusmod.exit_code(report))
