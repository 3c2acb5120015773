"""Change control: confirm, rollback (also the --confirm timer's), and boot (what the units run)."""

from __future__ import annotations

from typing import Optional

import typer
import typer.core

from hostprep import ops, timers, txn
from hostprep.errors import StateError
from hostprep.paths import Paths
from hostprep.runner import Runner
from hostprep.state import Store
from hostprep.cli.common import BackendOpt, app, handle_errors, need_root, pick_backend
from hostprep.cli.output import err, out


@app.command("confirm")
@handle_errors
def confirm_cmd() -> None:
    """Keep the change applied with --confirm: the armed rollback is cancelled."""
    need_root("confirm")
    p = txn.confirm(Store(Paths.from_env()), Runner())
    out.print(f"confirmed: change {p.id} ({p.command}) stays"
              + (" (its deadline had passed, but the rollback had not run yet)" if p.late else ""))


@app.command("rollback")
@handle_errors
def rollback_cmd(
    due: Optional[str] = typer.Option(None, "--due", hidden=True, help="(timer) roll back change ID only if it "
                                      "still waits for confirmation."),
    wait: bool = typer.Option(False, "--wait", hidden=True, help="(watcher) sleep until the deadline first."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Restore the state before the change waiting for confirmation, else before the last change.

    hostprep's chains and jumps of both families, its ipsets and nft table, with
    -k the sysctls and the drop-in, and the recorded settings and containers
    come back exactly as they were; the journal records it.
    """
    need_root("rollback")
    store = Store(Paths.from_env())
    runner = Runner()
    if due is not None and wait:
        timers.ignore_hangup()
        if not timers.wait_until_due(store, due):
            return
    be = pick_backend(runner, backend)
    what = "hostprep rollback" + (f" (deadline of change {due})" if due else "")
    while True:
        try:
            res = txn.rollback(be, store, runner, what, due)
            break
        except StateError as exc:
            # The timer must not give up because someone held the lock for a while
            # (a 'hostprep confirm' waiting too): try again until the change is no
            # longer pending.
            if due is None or exc.field != "lock":
                raise
            p = timers.pending(store)
            if p is None or p.id != due:
                return
    for note in res.recovered:
        out.print(note)
    if res.skipped:
        out.print(f"change {due} no longer waits for confirmation: nothing rolled back")
        return
    if res.id is None:
        return
    out.print(f"rolled back change {res.id} ({res.command}), {res.why}: "
              + (f"{len(res.notes)} items restored" if res.notes else "nothing differed"))
    for note in res.notes[:12]:
        out.print(f"  - {note}")
    if len(res.notes) > 12:
        out.print(f"  - ... and {len(res.notes) - 12} more")


@app.command("boot")
@handle_errors
def boot_cmd(backend: Optional[str] = BackendOpt) -> None:
    """Load the recorded state: what hostprep.service runs at boot (and after iptables-services reloads).

    Recovers an interrupted change, rolls back a change that was never
    confirmed, then renders and loads the recorded hardening and containers
    (no saved ruleset), replacing the fail-safe the unit loaded first. Fails
    closed: what cannot be read or loaded is reported (exit 1) and the base
    hardening is loaded without it. The external NIC must be the device
    recorded at apply (its MAC): missing, renamed or another device is exit 1,
    journalled, and its nft table is left where it is hooked.
    """
    need_root("boot")
    runner = Runner()
    store = Store(Paths.from_env())
    be = pick_backend(runner, backend, unit=True)
    res = ops.boot(be, store, runner)
    for note in res.notes:
        out.print(f"hostprep boot: {note}", markup=False)
    if res.failures:
        for f in res.failures:
            err.print(f"hostprep boot: FAILED: {f}", markup=False, style="bold red")
        raise typer.Exit(1)
