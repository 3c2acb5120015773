"""container up, down and list: one container's port rules (ops.container_up/down)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

from hostprep import nic as nicmod
from hostprep import envfiles, ops, records, timers
from hostprep import fail2ban as f2b
from hostprep.plan import plural
from hostprep import plan as planmod
from hostprep import status as statusmod
from hostprep.errors import RefusedError
from hostprep.model import container_name
from hostprep.paths import Paths
from hostprep.runner import DryRunner, Runner
from hostprep.state import Store
from hostprep.cli.common import (EXAMPLES, BackendOpt, ConfirmOpt, PlainCommand, container_app, handle_errors, pick_backend,
                                 need_root, working)
from hostprep.cli.output import err, out, print_containers, print_plan, say, say_pending


def fail2ban_part(c, previous, files, store: Store, wanted: Optional[bool]):
    """NAME with fail2ban on or off (given, else as at its last up) and its jail, validated
    before anything changes (bad input: one line, nothing written)."""
    on = wanted if wanted is not None else bool(previous is not None and previous.fail2ban)
    c = dataclasses.replace(c, fail2ban=on and c.hardening)
    if not on:
        return c, None
    f2b.require_installed(Runner(), f2b.Files(store.paths.root))
    return c, f2b.resolve(c, files.env, files.core, files.installer, store.paths.root)


def fail2ban_dry_run(name: str, jail, previous, store: Store, kind: str = "ipset") -> None:
    files = f2b.Files(store.paths.root)
    if jail is not None:
        for path, text in f2b.wanted_files(jail, files, kind).items():
            same = path.is_file() and path.read_text() == text
            out.print(f"fail2ban: {path} {'unchanged' if same else 'would be written'}", markup=False)
        out.print(f"fail2ban: ban set {jail.ban.name}; then 'fail2ban-client reload' if fail2ban runs", markup=False)
    elif previous is not None and previous.fail2ban:
        out.print(f"fail2ban: {files.jail(name)} and {files.logrotate(name)} would be removed", markup=False)


def say_fail2ban(result) -> None:
    if result is not None:
        (err if result.failed else out).print(f"fail2ban: {result.line}", markup=False,
                                              style="yellow" if result.failed else None)


def confirm_widening(name: str, widening: list[str], *, yes: bool) -> None:
    """A re-up that widens access goes ahead with -y, or after a y at a terminal; else refused."""
    if not widening or yes:
        return
    if not sys.stdin.isatty():
        raise RefusedError("-y/--yes", f"this up of {name} widens access ({len(widening)} change"
                           f"{'s' if len(widening) > 1 else ''} listed above) and there is no terminal to confirm; "
                           "nothing was changed", "check the files; pass -y to go ahead, --dry-run to see the rules")
    answer = typer.prompt(f"Widen access to {name} as listed above? [y/N]", default="N", show_default=False)
    if answer.strip().lower() not in ("y", "yes"):
        raise RefusedError("confirmation", "not confirmed; nothing was changed")


@container_app.command("up", cls=PlainCommand, epilog=EXAMPLES["container up"])
@handle_errors
def container_up_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Container name (e.g. finesse); a safe identifier."),
    env: Optional[Path] = typer.Option(None, "--env", metavar="FILE", help="The component .env file (finesse.env, ids.env, ...). "
                                       "Without it, the one of NAME's last up is read again."),
    core: Optional[Path] = typer.Option(None, "--core", metavar="FILE", help="core.env (hardening switch, load balancers, "
                                        "rate-limit-disable IPs, traffic restriction). Without it, the one of "
                                        "NAME's last up is read again."),
    no_core: bool = typer.Option(False, "--no-core", help="Forget the remembered core.env: its defaults apply "
                                 "(no load balancers, no restriction, the installer's exempt defaults)."),
    installer: Optional[Path] = typer.Option(None, "--installer", metavar="FILE", help="installer.env (PROXY_BINDING_IP). "
                                             "Without it, the one of NAME's last up is read again."),
    no_installer: bool = typer.Option(False, "--no-installer", help="Forget the remembered installer.env "
                                      "(the NIC's only IPv4 address is the destination)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Go ahead when this up widens NAME's access (listed "
                             "first); without it such an up asks at a terminal and is refused without one."),
    allow_wide_exempt: bool = typer.Option(False, "--allow-wide-exempt", help="Accept exempt and load-balancer "
                                           "networks wider than /8 (IPv4) or /32 (IPv6); /0 is never accepted."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would change (the plan and the rules), "
                                 "run every check, change nothing; exit as the real run would."),
    fail2ban: Optional[bool] = typer.Option(None, "--fail2ban/--no-fail2ban", help="Ban in the firewall the "
                                            "addresses the proxy logs to HOST_WORKING_DIR/logs/blocking.log (a "
                                            "fail2ban jail, a ban set, logrotate for the proxy's logs); remembered "
                                            "for NAME's next up. Needs fail2ban installed."),
    backend: Optional[str] = BackendOpt,
    confirm_secs: Optional[int] = ConfirmOpt,
) -> None:
    """Open NAME's ports on the external NIC with its limits; replaces its rules atomically.

    The env files are remembered in NAME's record: 'container up NAME' alone reads
    them again; a file given replaces the remembered one (--no-core/--no-installer
    drop one).  Changes that widen access (restriction off, exempt or load-balancer
    entries added, limits raised, ports added, hardening switched) are listed first
    and need -y or a y at a terminal.  --fail2ban (remembered) also writes NAME's
    fail2ban jail and the logrotate file of its logs, and bans in the firewall what
    the proxy logs to blocking.log.
    """
    container_name(name)
    need_root("container up")
    store = Store(Paths.from_env())
    timers.refuse_if_pending(store)
    previous = store.containers().get(name)
    files = envfiles.choose_files(name, previous, env=env, core=core, installer=installer, no_core=no_core,
                                  no_installer=no_installer)
    policy = records.applied_policy(store)
    info = nicmod.nic_info(policy.interface)
    with working(f"container {name}: reading and checking the env files"):
        c = envfiles.load_container(name, files.env, files.core, files.installer, info.name,
                                    list(info.ipv4 + info.ipv6), key=store.file_key(create=not dry_run),
                                    allow_wide=allow_wide_exempt)
    c, jail = fail2ban_part(c, previous, files, store, fail2ban)
    if set(files.sources.values()) - {"given", "none"}:
        out.print(f"container {name}: files: {files.describe()}", markup=False)
    for w in envfiles.permission_warnings([p for p in (files.env, files.core, files.installer) if p]):
        err.print(f"warning: {w}", markup=False, style="yellow")
    if not c.hardening:
        say(err, "bold yellow", "WARNING:", f"NGX_IPTABLES_HARDENING=0: no port is opened for {name}; the base "
                  f"hardening keeps {', '.join(map(str, c.ports))} on {info.name} CLOSED (clients time out)")
    if c.template == "cloudconnect" and c.exempt:
        out.print(f"exempt from limits: {len(c.exempt)} addresses (NGX_RATELIMIT_DISABLE_IPS, "
                  "NGX_CLOUDCONNECT_CLIENT_IPS)")
    widening = planmod.container_widening(previous, c) if previous is not None else []
    for w in widening:
        err.print(f"WIDENS ACCESS: {name}: {w}", markup=False, style="bold yellow")
    if dry_run:
        be = pick_backend(DryRunner(), backend)
        preview = ops.container_up_plan(be, store, c)
        print_plan(preview.plan)
        out.print(f"container {name}: {len(preview.added)} rules would be added, {len(preview.removed)} removed",
                  markup=False)
        for ln in preview.removed:
            out.print(f"  removed: {ln}", markup=False)
        for ln in preview.added:
            out.print(f"  added: {ln}", markup=False)
        fail2ban_dry_run(name, jail, previous, store, f2b.ban_kind(be.variant))
        if confirm_secs is not None:
            out.print(f"dry run: with --confirm {confirm_secs} a rollback would be armed first")
        out.print("dry run: nothing was changed")
        if widening and not yes and sys.stdin.isatty():
            out.print("(the real run would ask before widening access)")
        confirm_widening(name, widening, yes=yes or sys.stdin.isatty())
        return
    confirm_widening(name, widening, yes=yes)
    be = pick_backend(Runner(), backend)
    argv = "hostprep " + " ".join(sys.argv[1:])
    res = ops.container_up(be, store, c, argv, confirm=confirm_secs, jail=jail)
    outcome, added, removed = res.outcome, res.added, res.removed
    say_fail2ban(res.fail2ban)
    for note in res.change.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    for w in outcome.warnings:
        say(err, "yellow", "warning:", f"{w}")
    what = "rules unchanged" if not outcome.changed else \
        f"{plural(len(added), 'rule')} added, {len(removed)} removed"
    out.print(f"container {name}: {what}; ports {','.join(map(str, c.ports))} on {c.dest} "
              f"({'open with limits' if c.hardening else 'closed'}); log {store.container_log(name)}")
    say_pending(res.change)


@container_app.command("down", cls=PlainCommand)
@handle_errors
def container_down_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Container name given to 'container up'."),
    backend: Optional[str] = BackendOpt,
    confirm_secs: Optional[int] = ConfirmOpt,
) -> None:
    """Remove exactly NAME's rules (and its sets, its fail2ban jail); other containers and the base stay."""
    container_name(name)
    need_root("container down")
    store = Store(Paths.from_env())
    be = pick_backend(Runner(), backend)
    argv = "hostprep " + " ".join(sys.argv[1:])
    res = ops.container_down(be, store, name, argv, confirm=confirm_secs)
    removed = res.removed
    for note in res.change.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    say_fail2ban(res.fail2ban)
    out.print(f"container {name}: {plural(len(removed), 'rule')} removed; log {store.container_log(name)}")
    say_pending(res.change)


@container_app.command("list")
@handle_errors
def container_list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the containers part of status --json)."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """The containers whose rules are up: ports, destination, limits, exempt counts, drop counters."""
    need_root("container list")
    runner = Runner()
    be = pick_backend(runner, backend)
    report = statusmod.collect(runner, be, Store(Paths.from_env()))
    if as_json:
        print(json.dumps(report["containers"], indent=2))
    elif report["containers"]:
        print_containers(report["containers"], title="containers")
    else:
        out.print("no container is up")
