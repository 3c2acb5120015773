"""selinux install and remove: the policy module of the proxy container's working directory."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import typer.core

from hostprep import selinux
from hostprep.paths import Paths
from hostprep.runner import DryRunner, Runner
from hostprep.state import Store
from hostprep.cli.common import handle_errors, need_root, selinux_app, working
from hostprep.cli.output import out


def _selinux_run(action: str, working_dir: Path, *, dry_run: bool) -> None:
    need_root(f"selinux {action}")
    store = Store(Paths.from_env())
    fs, cfg = selinux.default_paths(store.paths.root)
    state = selinux.read_state(fs, cfg)
    if dry_run and action == "install" and (not state.present or state.runtime == "disabled"):
        # Nothing to query here; show what an SELinux host would run.
        out.print(f"SELinux is not enabled on this host ({state.describe()}): 'selinux install' would "
                  "refuse here; on an SELinux host it runs:")
        for argv in selinux.preview_install(working_dir):
            out.print("would run: " + " ".join(argv))
        out.print("dry run: nothing was changed")
        return
    runner: Runner = DryRunner(inner=Runner(timeout=300)) if dry_run else Runner(timeout=300)
    fn = selinux.install if action == "install" else selinux.remove
    with working(f"selinux {action}: " + ("compiling and loading the policy module, relabelling "
                                          if action == "install" else "removing the mappings, relabelling ")
                 + str(working_dir)):
        done = fn(runner, working_dir, state)
    for line in done:
        out.print(line, markup=False)
    if dry_run:
        for argv, _ in runner.recorded:
            out.print("would run: " + " ".join(argv), markup=False)
        out.print("dry run: nothing was changed")
    else:
        store.journal("hostprep " + " ".join(sys.argv[1:]), f"selinux {action} {working_dir}", "ok")


@selinux_app.command("install")
@handle_errors
def selinux_install_cmd(
    working_dir: Path = typer.Option(..., "--working-dir", metavar="DIR", help="The container's HOST_WORKING_DIR "
                                     "(default of the installer: ~/reverse_proxy/<container>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compile and show the commands; change nothing."),
) -> None:
    """Load the hostprep_proxy module (semodule -i) and label the working directory (restorecon)."""
    _selinux_run("install", working_dir, dry_run=dry_run)


@selinux_app.command("remove")
@handle_errors
def selinux_remove_cmd(
    working_dir: Path = typer.Option(..., "--working-dir", metavar="DIR", help="The directory given to 'selinux install'."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the commands; change nothing."),
) -> None:
    """Undo 'selinux install': drop the file-context mappings, relabel, remove the module when unused."""
    _selinux_run("remove", working_dir, dry_run=dry_run)
