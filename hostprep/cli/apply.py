"""apply and flush: the guards, the NIC shown and confirmed, then one change (ops.apply, ops.flush)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
import typer.core

from hostprep import engine
from hostprep import fail2ban as f2b
from hostprep import nic as nicmod
from hostprep import ops, persist, records, render, selinux, settings
from hostprep.backend import VARIANTS, FirewallBackend, name_of
from hostprep.errors import HostprepError, InputError, RefusedError, StateError
from hostprep.model import Desired, Policy
from hostprep.observed import LiveState, Observed
from hostprep.paths import Paths
from hostprep.runner import DryRunner, Runner
from hostprep.settings import FirewallSettings, Flags
from hostprep.state import Store
from hostprep.validate import _IFNAME
from hostprep.cli.common import (EXAMPLES, BackendOpt, ConfirmOpt, PlainCommand, app, confirm, handle_errors, pick_backend,
                                 need_root, pending_guard, unreadable_in_dry_run)
from hostprep.cli.output import (err, out, print_kernel_dry_run, print_kernel_part, print_persistence, print_plan,
                                 report_firewall, say, say_pending, say_warnings, show_nic)


def settings_policy(fw: FirewallSettings) -> Policy:
    """The policy of the firewall settings: -p hostnames resolved now."""
    sources = nicmod.resolve_ping_sources(list(fw.ping_from), allow_private=fw.allow_private)
    return Policy(fw.interface, fw.skip_ddos, fw.allow_private, sources)


@dataclass(frozen=True)
class ApplyWhat:
    """What an apply does: the firewall policy (None: the kernel part only), the kernel profile or not,
    and where the settings came from (settings.resolve)."""

    policy: Optional[Policy]
    kernel: bool
    source: str


def what_to_apply(flags: Flags, store: Store) -> ApplyWhat:
    resolved = settings.resolve("apply", flags, store)
    return ApplyWhat(settings_policy(resolved.firewall) if resolved.firewall is not None else None, resolved.kernel,
                     resolved.source)


def selinux_gate(store: Store, *, ignore_flag: bool, core: Optional[Path]) -> list[str]:
    """Refuse unless SELinux is enforcing, --ignore-selinux, or NGX_IGNORE_SELINUX=true in --core;
    returns the warnings, which the caller prints once, after its work."""
    fs, config = selinux.default_paths(store.paths.root)
    state = selinux.read_state(fs, config)
    return selinux.check_enforcing(state, ignore_flag, selinux.ignore_from_core(core))


def ssh_guard(runner: Runner, info: nicmod.NicInfo, *, force: bool) -> None:
    """Refuse while the admin's own SSH session (or any sshd connection) arrives through the NIC."""
    session = nicmod.find_ssh_session()
    msg = None
    if session and nicmod.session_through(runner, session, info):
        msg = (f"Current shell session ({session.peer} -> {session.local}, found by {session.source}) "
               f"is connected through External/Internet facing Network Interface {info.name}")
    else:
        others = nicmod.ssh_connections_on(info)
        if others:
            msg = (f"SSH sessions are connected through External/Internet facing Network Interface "
                   f"{info.name} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    if msg is None:
        return
    if not force:
        raise RefusedError("-i/--interface", msg,
                           "connect through the internal NIC, or pass --force to lose these sessions")
    say(err, "bold red", "WARNING:", f"{msg}; --force given: SSH on {info.name} will be dropped "
              "and such sessions will hang")


def rp_filter_guard(runner: Runner, *, force: bool) -> None:
    """Strict rp_filter cuts an SSH session that arrives on one NIC and is routed back by another."""
    session = nicmod.find_ssh_session()
    if session is None or not session.same_netns:
        return
    local = session.local.split("%")[0]
    arrive = next((n for n in nicmod.existing_nics()
                   if local in {a.split("/")[0] for i in [nicmod.nic_info(n)] for a in i.ipv4 + i.ipv6}), None)
    back = nicmod.route_dev(runner, session.peer)
    if arrive and back and arrive != back:
        msg = (f"your SSH session arrives on {arrive} but the route back to {session.peer} leaves by {back}: "
               "strict reverse-path filtering (rp_filter=1) would drop it")
        if not force:
            raise RefusedError("-k/--kernel", msg, f"route {session.peer}'s network through {arrive} first, "
                               "or pass --force")
        say(err, "bold red", "WARNING:", f"{msg}; --force given")


def nic_switch_guard(store: Store, info: nicmod.NicInfo, containers: tuple, *, yes: bool,
                     switch_nic: bool) -> str | None:
    """Applying on another NIC than the hardened one: say what that NIC loses, and which
    containers are bound to an address the new NIC does not have; with -y, only with --switch-nic.
    Returns the NIC the hardening moves from (None: no switch)."""
    try:
        record = records.load_applied(store)
    except StateError:
        return None
    current = record.interface if record is not None else None
    if not current or current == info.name:
        return None
    addrs = {a.split("/")[0] for a in info.ipv4 + info.ipv6}
    lines = [f"{current} is the hardened external NIC now: applying on {info.name} REMOVES the hardening from "
             f"{current} (its SSH, UDP, ICMP and port drops go; whatever listens there is reachable again)"]
    lines += [f"container {c.name} is bound to {c.dest}, which is not an address of {info.name}: its ports "
              f"{','.join(map(str, c.ports))} would not be reachable through {info.name}"
              for c in containers if str(c.dest) not in addrs]
    for line in lines:
        say(err, "bold yellow", "NIC SWITCH:", line)
    if yes and not switch_nic:
        raise RefusedError("-i/--interface", f"{info.name} is not the hardened NIC ({current}); with -y the "
                           "hardening is moved only on request", f"add --switch-nic to move it to {info.name}, "
                           f"or give -i {current}")
    return current


@dataclass(frozen=True)
class Prepared:
    """The firewall part of an apply once every guard passed and the admin said yes."""

    info: nicmod.NicInfo
    backend: FirewallBackend
    desired: Desired


def switch_message(recorded: str, be: FirewallBackend) -> str:
    """What apply says (after BACKEND SWITCH:) when ``be`` is not the backend applied.json records."""
    old = name_of(recorded)
    if recorded in VARIANTS and be.variant in VARIANTS:
        # iptables-nft <-> iptables-legacy: IptablesBackend.others() has only the native backend,
        # so nothing of the other variant is removed (README "Choosing a backend", Not done)
        return (f"the hardening is loaded with {be.name}; {old}'s chains are NOT removed (a switch between "
                f"the iptables variants removes nothing of the other): both judge every packet until you "
                f"remove {old}'s hostprep chains by hand; the ipsets are shared")
    return (f"the hardening moves from {old} to {be.name} in one change: {be.name}'s rules are loaded and "
            f"read back first, then {old}'s are removed; 'hostprep rollback' (or --confirm) brings {old} back")


def prepare_firewall(policy: Policy, store: Store, *, yes: bool, dry_run: bool, force: bool,
                     backend: Optional[str], switch_nic: bool = False) -> Prepared | None:
    """Guards, the NIC shown, the admin's yes; returns what to apply, or None after a dry run."""
    info = nicmod.nic_info(policy.interface)
    if info.loopback:
        raise InputError("-i/--interface", f"{info.name} is the loopback interface",
                         "give the internet-facing NIC")
    for src in policy.ping:
        if [str(n) for n in src.networks] != [src.given]:
            out.print(f"-p {src.given} -> {', '.join(str(n) for n in src.networks)}")
    runner: Runner = DryRunner() if dry_run else Runner()
    ssh_guard(runner, info, force=force)
    show_nic(info)
    at_risk = nicmod.untracked_connections(list(info.ipv4 + info.ipv6))
    if at_risk:
        say(err, "yellow", "warning:", f"conntrack is not tracking this namespace yet: {at_risk} established "
                  f"TCP connection(s) on {info.name} will be classified NEW without SYN and dropped")
    be = pick_backend(runner, backend)
    containers: tuple = ()
    with unreadable_in_dry_run("the containers that are up cannot be read; showing the base hardening only",
                               dry_run=dry_run):
        containers = tuple(store.containers().values())
    moving_from = nic_switch_guard(store, info, containers, yes=yes, switch_nic=switch_nic)
    switching = None
    with unreadable_in_dry_run("the backend of the last apply cannot be read", dry_run=dry_run):
        record = records.load_applied(store, tolerant=True)
        if record is not None and record.backend not in (None, be.variant):
            switching = name_of(record.backend)
    if switching:
        say(err, "yellow", "BACKEND SWITCH:", switch_message(record.backend, be))
    desired = render.desired(policy, containers)
    if dry_run:
        try:
            record = records.load_applied(store, tolerant=True) if ops.is_root() else None
            plan = engine.make_plan(be, desired, record.nft if record else None)
        except HostprepError:
            if ops.is_root():
                raise
            out.print("(not root: the live ruleset cannot be read; showing everything hostprep would load)")
            plan = engine.make_plan(be, desired, None, LiveState({4: Observed(4), 6: Observed(6)}, None))
        print_plan(plan)
        out.print("dry run: nothing was changed")
        return None
    confirm(f"Move the hardening from {moving_from} to {info.name} (backend {be.name})?" if moving_from else
            f"Switch the hardening on {info.name} from {switching} to {be.name}?" if switching else
            f"Apply the hardening on {info.name} (backend {be.name})?", yes=yes)
    return Prepared(info, be, desired)


@app.command("apply", cls=PlainCommand, epilog=EXAMPLES["apply"])
@handle_errors
def apply_cmd(
    extra: Optional[list[str]] = typer.Argument(None, hidden=True),
    interface: Optional[str] = typer.Option(None, "-i", "--interface", metavar="NIC",
                                            help="The external (internet-facing) NIC. Without -i and -k, "
                                                 "the settings of the last successful apply are re-applied."),
    kernel: bool = typer.Option(False, "-k", "--kernel", help="Write, load and verify the kernel (sysctl) "
                                "profile; alone, only the kernel part runs."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Skip the external-NIC confirmation."),
    skip_ddos: bool = typer.Option(False, "-e", "--skip-ddos", help="Leave out the ddos group "
                                   "(INVALID, NEW without SYN, odd MSS, bogus flags, fragments, RST limit, "
                                   "SYN cookies)."),
    allow_private: bool = typer.Option(False, "-a", "--allow-private",
                                       help="Leave out the spoof group (private/reserved sources)."),
    ping_from: list[str] = typer.Option([], "-p", "--ping-from", metavar="HOST",
                                        help="Allow ICMP echo from this IP, CIDR or hostname "
                                             "(repeatable; hostnames are resolved now and shown; a "
                                             "private/reserved source needs -a, the spoof group drops it)."),
    disable: bool = typer.Option(False, "-d", "--disable", help="Remove hostprep's rules "
                                 "(same as 'hostprep flush'); not allowed with -i, -e or -a."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the exact rules; change "
                                 "nothing (works without root)."),
    force: bool = typer.Option(False, "--force", help="Apply even though your own SSH session comes "
                               "in through the external NIC (or would be cut by rp_filter)."),
    ignore_selinux: bool = typer.Option(False, "--ignore-selinux", help="Apply although SELinux is not "
                                        "enforcing."),
    core: Optional[Path] = typer.Option(None, "--core", metavar="FILE", help="core.env: NGX_IGNORE_SELINUX=true there "
                                        "has the effect of --ignore-selinux."),
    backend: Optional[str] = BackendOpt,
    confirm_secs: Optional[int] = ConfirmOpt,
    switch_nic: bool = typer.Option(False, "--switch-nic", help="With -y: move the hardening to another NIC "
                                    "than the one hardened now (that NIC loses it). Without -y you are asked."),
) -> None:
    """Apply the base hardening on the external NIC (IPv4 and IPv6), and with -k the kernel profile.

    Every apply is one transaction: a snapshot first (for 'hostprep rollback'),
    then both IP families, the sets, the nft table and the kernel keys, or none.
    After a successful firewall apply the boot units are installed and enabled.
    """
    if extra:
        raise InputError("apply", f"unexpected argument {extra[0]!r}",
                         f"the external NIC is given with -i: hostprep apply -i {extra[0]}"
                         if _IFNAME.fullmatch(extra[0]) else "see 'hostprep apply --help'")
    if disable and (interface is not None or skip_ddos or allow_private):
        raise InputError("-d/--disable", "Invalid option: option -d cannot be used with -i, -e or -a "
                         "arguments", "run 'hostprep apply -d' alone, or 'hostprep flush'")
    if disable and (kernel or ping_from or confirm_secs is not None):
        raise InputError("-d/--disable", "-d removes the firewall rules only; it takes no -k, -p or --confirm",
                         "run 'hostprep apply -d' alone ('hostprep flush --kernel' restores the kernel values)")
    if disable:
        flush_cmd.__wrapped__(dry_run=dry_run, backend=backend, kernel=False, persistent=False)
        return
    store = Store(Paths.from_env())
    if not dry_run:
        need_root("apply")
    what = what_to_apply(Flags(interface, skip_ddos, allow_private, tuple(ping_from), kernel), store)
    policy, do_kernel, source = what.policy, what.kernel, what.source
    # Every guard runs before any change, and for a dry run too: a dry run refuses
    # (same line, same exit code) where the real run would.
    selinux_warnings: list[str] = []
    with unreadable_in_dry_run("the SELinux state cannot be read; the real run checks it", dry_run=dry_run):
        selinux_warnings = selinux_gate(store, ignore_flag=ignore_selinux, core=core)
    if do_kernel:
        # -i ... -k must not load the firewall and then refuse the kernel part.
        rp_filter_guard(Runner(), force=force)
    pending_guard(store, dry_run=dry_run)
    if source == settings.SOURCE_REMEMBERED:
        out.print("re-applying the remembered settings: "
                  + ("firewall on " + policy.interface if policy else "")
                  + (" and " if policy and do_kernel else "") + ("kernel profile" if do_kernel else ""))
    if dry_run:
        if policy is not None:
            prepare_firewall(policy, store, yes=yes, dry_run=True, force=force, backend=backend,
                             switch_nic=switch_nic)
        if do_kernel:
            print_kernel_dry_run(store)
        if confirm_secs is not None:
            out.print(f"dry run: with --confirm {confirm_secs} a rollback would be armed first")
        say_warnings(selinux_warnings)
        return
    prepared = prepare_firewall(policy, store, yes=yes, dry_run=False, force=force, backend=backend,
                                switch_nic=switch_nic) if policy is not None else None
    argv = "hostprep " + " ".join(sys.argv[1:])
    if do_kernel and records.load_applied(store, tolerant=True) is None and prepared is None:
        say(err, "bold yellow", "WARNING:", "the profile turns on ip_forward (containers need it) but hostprep's "
                  "firewall is not applied: nothing filters what is forwarded from the external NIC; run "
                  "'hostprep apply -i <external NIC>'")
    # Nothing prints inside the change: a terminal gone with the SSH session must
    # not turn a finished load into a failure.
    res = ops.apply(store, argv, backend=prepared.backend if prepared else None,
                    desired=prepared.desired if prepared else None, kernel=do_kernel, confirm=confirm_secs)
    for note in res.change.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    if prepared is not None:
        report_firewall(prepared.info, prepared.desired, res.outcome)
    if res.kernel is not None:
        print_kernel_part(store, res.kernel)
    print_persistence(store, res.persistence)
    say_warnings(selinux_warnings)
    say_pending(res.change)
    if res.kernel is not None and res.kernel.bad:
        raise typer.Exit(1)


@app.command("flush")
@handle_errors
def flush_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be removed; change nothing."),
    backend: Optional[str] = BackendOpt,
    kernel: bool = typer.Option(False, "--kernel", help="Instead: restore the kernel values recorded "
                                "before the first 'apply -k' and remove the sysctl drop-in."),
    persistent: bool = typer.Option(False, "--persistent", help="Also remove the boot units (hostprep.service, "
                                    "hostprep-nic@, the iptables-services drop-ins), so nothing comes back "
                                    "at the next boot."),
) -> None:
    """Remove hostprep's chains, jumps, sets, nft table and fail2ban jails, and nothing else. Settings stay remembered."""
    if kernel and persistent:
        raise InputError("--kernel/--persistent", "--kernel restores the kernel values only, --persistent goes "
                         "with the firewall flush", "run 'hostprep flush --kernel' and 'hostprep flush --persistent'")
    need_root("flush")
    store = Store(Paths.from_env())
    pending_guard(store, dry_run=dry_run)   # a dry run refuses where the real flush would
    argv = "hostprep " + " ".join(sys.argv[1:])
    if kernel:
        if dry_run:
            out.print("dry run: would restore the recorded kernel values and remove the drop-in")
            return
        restored = ops.flush_kernel(store, argv)
        out.print(f"kernel: {len(restored)} keys restored to their values before hostprep; drop-in removed")
        for line in restored:
            out.print(f"  {line}")
        return
    runner: Runner = DryRunner() if dry_run else Runner()
    be = pick_backend(runner, backend)
    if dry_run:
        record = records.load_applied(store, tolerant=True)
        print_plan(engine.make_plan(be, None, record.nft if record else None))
        files = f2b.Files(store.paths.root)
        for p in files.jails() + [p for p in (files.filter, files.action) if p.is_file()] + files.logrotates():
            out.print(f"fail2ban: would remove {p}", markup=False)
        out.print("dry run: nothing was changed")
        return
    flushed = ops.flush(be, store, argv)
    if flushed.fail2ban is not None:
        (err if flushed.fail2ban.failed else out).print(f"fail2ban: {flushed.fail2ban.line}", markup=False)
    outcome = flushed.outcome
    if outcome.changed:
        for action in outcome.notes:
            out.print(f"  - {action}")
        out.print(f"removed hostprep's rules: {outcome.summary.removeprefix('removed ')}")
    else:
        out.print("nothing to remove: no hostprep rules are loaded")
    if persistent:
        gone = persist.remove(store.paths, runner)
        store.journal(argv, f"boot persistence removed ({len(gone)} files)", "ok")
        out.print(f"boot persistence removed: {len(gone)} files" if gone else "boot persistence: nothing installed")
    elif (store.settings() or settings.Settings()).to_dict():
        out.print("the settings stay remembered: 'hostprep apply' brings the hardening back"
                  + ("; the boot unit stays installed and loads nothing while nothing is applied "
                     "(--persistent removes it)" if (store.paths.root / "etc/systemd/system/hostprep.service")
                     .is_file() else ""))
