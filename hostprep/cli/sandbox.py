"""sandbox up/down (the throwaway demo host) and selftest (the settings proven on real packets)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

from hostprep import persist, selftest
from hostprep.errors import InputError, RefusedError
from hostprep.paths import Paths, open_nofollow, trusted_dir, untrusted_reason
from hostprep.runner import PACKAGE_PARENT, Runner, python_module
from hostprep.sandbox import EXT, SANDBOX_MARKER, Sandbox
from hostprep.state import Store
from hostprep.validate import interface_name
from hostprep.cli.common import EXAMPLES, BackendOpt, app, fail, handle_errors, need_root, sandbox_app
from hostprep.cli.output import out, print_selftest, print_selftest_compact, run_with_progress


def sandbox_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name):
        raise InputError("--name", f"{name!r} is not a usable namespace name",
                         "use up to 40 letters, digits, '.', '_' or '-'")


@sandbox_app.command("up")
@handle_errors
def sandbox_up(
    name: str = typer.Option("hostprep-sandbox", "--name", metavar="NAME", help="Namespace name (and prefix of the peers)."),
    root: Path = typer.Option(Path("/var/tmp/hostprep-sandbox"), "--root", metavar="DIR",
                              help="HOSTPREP_ROOT for the sandbox's state, journal and settings."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Build the sandbox host, apply -i eth1 -y inside it, and print its status."""
    need_root("sandbox up")
    sandbox_name(name)
    runner = Runner()
    box = Sandbox(name)
    if box.exists(runner):
        raise RefusedError(f"sandbox {name}", "its namespaces exist already",
                           f"remove them first: hostprep sandbox down --name {name}")
    # The state root first, before any namespace: made here (mode 0700), or an
    # existing one only when no other user could have prepared it.
    made = sandbox_root(root)
    box.create(runner)
    out.print(f"sandbox: namespaces {', '.join(box.namespaces)}; external NIC {EXT}, state under {root}"
              + ("" if made else " (kept from an earlier sandbox)"))
    env_prefix = ["env", f"HOSTPREP_ROOT={root}", f"PYTHONPATH={PACKAGE_PARENT}"] + \
        ([f"HOSTPREP_BACKEND={backend}"] if backend else [])
    base = ["ip", "netns", "exec", box.host, *env_prefix, *python_module("hostprep")]
    # The sandbox is not a proxy host: the machine's SELinux state is not the point
    # of the demo (Debian has none), so apply runs with --ignore-selinux and says so.
    for args in (["apply", "-i", EXT, "-y", "--ignore-selinux"], ["status"]):
        res = runner.run(base + args, check=False, cwd="/")
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        if args[0] == "apply" and res.returncode != 0:
            fail("apply failed inside the sandbox (see above); remove it with: "
                 f"hostprep sandbox down --name {name}", res.returncode)
    out.print(try_it(box.inet, box.admin)
              + f"        ip netns exec {box.host} env HOSTPREP_ROOT={root} {persist.interpreter()} -P -m hostprep "
                "status\n"
              f"Remove it: hostprep sandbox down --name {name}")


def try_it(inet: str, admin: str) -> str:
    """The first lines of the hint 'sandbox up' prints: TCP connects with bash's /dev/tcp
    (ping may not be installed)."""
    return (f"\nTry it: ip netns exec {inet} timeout 3 bash -c 'echo > /dev/tcp/198.51.100.10/22'\n"
            "          (external NIC: SSH dropped, no answer; exit 124 after 3 s)\n"
            f"        ip netns exec {admin} bash -c 'echo > /dev/tcp/192.0.2.10/22'\n"
            "          (internal NIC: answered, 'Connection refused' as nothing listens)\n")


def sandbox_root(root: Path) -> bool:
    """Make the sandbox's state root (True), or accept an earlier sandbox's (False); else refuse.

    Directly under /tmp or /var/tmp; created with mkdir 0700 (which fails if someone
    made it meanwhile); an existing one must be a plain directory of root's that
    no one else can write (no symlink on its path) and be empty or carry the marker
    of 'sandbox up'.  The marker is created without following a symlink.
    """
    root = Path(os.path.abspath(root))
    if root.parent not in (Path("/tmp"), Path("/var/tmp")):
        raise InputError("--root", f"{root} is not directly under /tmp or /var/tmp",
                         "give a new directory such as /var/tmp/hostprep-sandbox")
    try:
        os.mkdir(root, 0o700)
        made = True
    except FileExistsError:
        made = False
        trusted_dir(root, "--root")
        if any(p.name != SANDBOX_MARKER for p in root.iterdir()) and not (root / SANDBOX_MARKER).is_file():
            raise RefusedError("--root", f"{root} exists and was not made by 'hostprep sandbox up'",
                               "give a new directory, or remove that one")
    if made or not (root / SANDBOX_MARKER).is_file():
        fd = open_nofollow(root / SANDBOX_MARKER, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("made by hostprep sandbox up\n")
    return made


@sandbox_app.command("down")
@handle_errors
def sandbox_down(
    name: str = typer.Option("hostprep-sandbox", "--name", metavar="NAME", help="Namespace name given to 'sandbox up'."),
    root: Path = typer.Option(Path("/var/tmp/hostprep-sandbox"), "--root", metavar="DIR", help="The sandbox's HOSTPREP_ROOT."),
) -> None:
    """Delete the sandbox's namespaces (by name) and its state root."""
    need_root("sandbox down")
    sandbox_name(name)
    gone = Sandbox(name).destroy(Runner())
    # Only a state root that `sandbox up` made is removed: directly under /tmp or
    # /var/tmp, no symlink, root's alone, and carrying its marker file.
    real = Path(os.path.abspath(root))
    if real.parent in (Path("/tmp"), Path("/var/tmp")) and untrusted_reason(real) is None \
            and (real / SANDBOX_MARKER).is_file():
        shutil.rmtree(real, ignore_errors=True)
    elif root.exists():
        out.print(f"state root {root} left in place (not a sandbox root made by 'sandbox up')")
    out.print(f"removed: {', '.join(gone) if gone else 'no namespaces (none existed)'}; state root {root}")


@app.command("selftest", epilog=EXAMPLES["selftest"])
@handle_errors
def selftest_cmd(
    interface: Optional[str] = typer.Option(None, "-i", "--interface", metavar="NIC",
                                            help="The external NIC (recorded only: in the sandbox it is eth1). "
                                                 "With any of -i/-e/-a/-p these flags are proven, without them "
                                                 "the remembered settings of the last apply."),
    skip_ddos: bool = typer.Option(False, "-e", "--skip-ddos", help="As apply -e: leave out the ddos group."),
    allow_private: bool = typer.Option(False, "-a", "--allow-private", help="As apply -a: leave out the spoof group."),
    ping_from: list[str] = typer.Option([], "-p", "--ping-from", metavar="HOST",
                                        help="As apply -p (repeatable; hostnames are resolved here, as "
                                             "apply does). selftest adds 203.0.113.7 and 2001:db8:f::7 itself: "
                                             "the allowed sources it pings from inside the sandbox."),
    env: list[Path] = typer.Option([], "--env", metavar="FILE", help="A component .env to prove (repeatable); "
                                   "default: the containers that are up (their recorded ports and limits)."),
    core: list[Path] = typer.Option([], "--core", metavar="FILE", help="core.env: one for every --env, or one "
                                    "per --env."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    keep: bool = typer.Option(False, "--keep", help="Keep the sandbox's namespaces (for debugging)."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Prove the settings on real packets in a throwaway sandbox of network namespaces; exit 1 on a mismatch."""
    if interface is not None:
        interface_name(interface)
    need_root("selftest")
    options = selftest.resolve_options(interface, skip_ddos, allow_private, ping_from, env, core, backend, keep,
                                       Store(Paths.from_env()))
    terminal = not as_json and out.is_terminal
    if terminal:
        report = run_with_progress(lambda progress: selftest.run_selftest(options, progress=progress))
    else:
        report = selftest.run_selftest(options)
    if as_json:
        print(json.dumps(report, indent=2))
    elif terminal:
        print_selftest_compact(report)
    else:
        print_selftest(report)
    raise typer.Exit(0 if report["ok"] else 1)
