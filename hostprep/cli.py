"""The command line.  The only module that prints.

Every HostprepError becomes one red line on stderr and its exit code; an
unexpected exception becomes one line too (never a traceback).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hostprep import __version__
from hostprep.entry import EXIT_SIGINT, broken_pipe
from hostprep import apply as applymod
from hostprep import nic as nicmod
from hostprep import output
from hostprep import persist
from hostprep import status as statusmod
from hostprep.errors import HostprepError, InputError, PermissionNeeded, RefusedError, StateError
from hostprep.model import GROUPS, Policy
from hostprep.paths import Paths, open_nofollow, trusted_dir, untrusted_reason
from hostprep.runner import PACKAGE_PARENT, DryRunner, Runner, python_module
from hostprep.sandbox import EXT, SANDBOX_MARKER, Sandbox
from hostprep.state import Store

# The end of --help: two or three examples (\\b keeps click from re-wrapping them).
EXAMPLES = {
    "apply": "Examples:\n\n\b\n  hostprep apply -i eth1                     show eth1, ask y/N, apply\n  hostprep apply -i eth1 -y -p 203.0.113.7   ping allowed from one host\n  hostprep apply --dry-run -i eth1           plan and rules, no change",
    "status": "Examples:\n\n\b\n  hostprep status             am I protected? what is open to whom\n  hostprep status -v          with every kernel key\n  hostprep status --json      one JSON document (schema in the README)",
    "container up": "Examples:\n\n\b\n  hostprep container up finesse --env finesse.env --core core.env\n  hostprep container up ids --env ids.env --installer installer.env\n  hostprep container list",
    "selftest": "Examples:\n\n\b\n  hostprep selftest                      remembered settings, containers\n  hostprep selftest -i eth1 -p 203.0.113.7\n  hostprep selftest --env finesse.env --core core.env --json",
}


class PlainCommand(typer.core.TyperCommand):
    """Help that reads like a man page: arguments as NAME (not {name} or 'name <str>')."""

    def collect_usage_pieces(self, ctx):
        return [self.options_metavar] + [p.metavar or p.name.upper() for p in self.get_params(ctx)
                                         if isinstance(p, typer.core.TyperArgument) and not p.hidden]

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, typer.core.TyperArgument):
                p.display_type_rich = lambda ctx: ""
        return params


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Harden the host of an internet-facing reverse proxy "
                       "(replaces install_os_settings.sh of Cisco's Reverse Proxy Installer).")
sandbox_app = typer.Typer(no_args_is_help=True, help="The embedded default: a throwaway two-NIC host "
                                                    "in network namespaces, for trying hostprep safely.")
app.add_typer(sandbox_app, name="sandbox")
container_app = typer.Typer(no_args_is_help=True, help="Per-container port rules: open a proxy container's "
                                                      "ports on the external NIC with the limits of its .env files.")
app.add_typer(container_app, name="container")

# Tables keep their columns when the output is a pipe or a file (rich would assume 80),
# unless COLUMNS says how wide the reader is.
_width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
# markup=False, emoji=False: nothing printed is read as Rich markup or an emoji code,
# so a value from a flag, a file or a subprocess ('[/]', '[bold]', 'hostprep[probe]',
# a MAC such as 62:ab:9d...) is printed as it is; styled labels go through say(),
# which builds a Text instead.
class _Console(Console):
    def on_broken_pipe(self) -> None:      # the reader went away: 141, as for SIGPIPE
        self.quiet = True
        broken_pipe()


out = _Console(highlight=False, soft_wrap=True, width=_width, markup=False, emoji=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def say(console: Console, style: str, label: str, text: str) -> None:
    """``label`` in ``style``, then ``text`` exactly as given (never parsed as markup)."""
    console.print(Text.assemble((label, style), " ", text))


def fail(message: str, code: int) -> None:
    say(err, "bold red", "error:", f"{message}")
    raise typer.Exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HostprepError as exc:
            fail(exc.line(), exc.exit_code)
        except BrokenPipeError:
            broken_pipe()
        except KeyboardInterrupt:
            fail("interrupted", EXIT_SIGINT)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the promise is: never a traceback
            fail(f"internal error: {type(exc).__name__}: {exc} (please report it)", 3)
    return wrapper


def version_cb(value: bool) -> None:
    if value:
        out.print(f"hostprep {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_cb(version: bool = typer.Option(False, "--version", callback=version_cb, is_eager=True,
                                         help="Print the version and exit.")) -> None:
    pass


def backend_cb(value: Optional[str]) -> Optional[str]:
    """--backend is checked before anything is shown or asked."""
    from hostprep.backend import VARIANTS
    if value is not None and value not in VARIANTS:
        fail(InputError("--backend", f"{value!r} is not a backend", "use nft or legacy").line(), 2)
    return value


BackendOpt = typer.Option(None, "--backend", metavar="nft|legacy", callback=backend_cb,
                          help="Firewall variant: nft or legacy (default: what 'iptables -V' says; env "
                               "HOSTPREP_BACKEND).")


def need_root(what: str) -> None:
    if not applymod.is_root():
        raise PermissionNeeded(what, "needs root (CAP_NET_ADMIN) to change or read the firewall",
                               f"run it with sudo: sudo hostprep {what}")


def show_nic(info: nicmod.NicInfo) -> None:
    t = Table(title=f"External NIC {info.name}", show_header=False)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold")           # a long address is folded, never cut with an ellipsis
    t.add_row("state", ("UP" if info.up else "DOWN") + f" (operstate {info.operstate})")
    t.add_row("IPv4", ", ".join(info.ipv4) or "-")
    t.add_row("IPv6", ", ".join(info.ipv6) or "-")
    t.add_row("MAC", info.mac or "-")
    t.add_row("speed", f"{info.speed_mbps} Mb/s" if info.speed_mbps else "not reported by the driver")
    t.add_row("MTU", str(info.mtu))
    out.print(t)
    if info.slow:
        say(err, "yellow", "warning:", f"{info.name} runs at {info.speed_mbps} Mb/s; the reverse-proxy "
                  "launcher refuses NICs slower than 1000 Mb/s")


def confirm(prompt: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise RefusedError("-y/--yes", "no terminal to ask for confirmation",
                           "pass -y to confirm the external NIC non-interactively")
    answer = typer.prompt(f"{prompt} [y/N]", default="N", show_default=False)
    if answer.strip().lower() not in ("y", "yes"):
        err.print("not confirmed: nothing changed")
        raise typer.Exit(1)


def print_plan(plan: applymod.ApplyPlan) -> None:
    if plan.empty:
        out.print("plan: nothing to change")
        return
    out.print("plan:")
    for note in plan.notes():
        out.print(f"  - {note}")
    for fam, text in plan.texts.items():
        if not plan.families[fam].empty:
            tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
            out.print(f"\n# {tool} --noflush <<EOF", markup=False)
            out.print(text.rstrip(), markup=False)
            out.print("EOF", markup=False)
    if plan.nft.action == "load" and plan.desired and plan.desired.nft:
        out.print("\n# nft -f - <<EOF", markup=False)
        out.print(plan.desired.nft.script.rstrip(), markup=False)
        out.print("EOF", markup=False)
    elif plan.nft.action == "delete":
        out.print("\n# nft delete table netdev hostprep", markup=False)


def settings_policy(interface: str, skip_ddos: bool, allow_private: bool,
                    ping_from: list[str]) -> Policy:
    sources = nicmod.resolve_ping_sources(ping_from, allow_private=allow_private)
    return Policy(interface, skip_ddos, allow_private, sources)


def what_to_apply(interface: Optional[str], skip_ddos: bool, allow_private: bool, ping_from: list[str],
                  kernel: bool, store: Store) -> tuple[Optional[Policy], bool, str]:
    """(firewall policy or None, apply the kernel profile?, where the settings came from).

    -i [-e -a -p] [-k]: what the flags say; -k alone: the kernel only (as the
    original's -k); nothing: every part remembered from the last successful apply.
    """
    if interface is not None:
        return settings_policy(interface, skip_ddos, allow_private, ping_from), kernel, "command line"
    if skip_ddos or allow_private or ping_from:
        raise InputError("-e/-a/-p", "these need -i", "give the external NIC with -i, or "
                         "run plain 'hostprep apply' to re-apply the remembered settings")
    if kernel:
        return None, True, "command line"
    remembered = store.settings() or {}
    if not remembered.get("interface") and not remembered.get("kernel"):
        raise InputError("-i/--interface", "no external NIC given and none remembered",
                         "start with: hostprep apply -i <external NIC>")
    policy = None
    if remembered.get("interface"):
        policy = settings_policy(remembered["interface"], bool(remembered.get("skip_ddos")),
                                 bool(remembered.get("allow_private")), list(remembered.get("ping_from", [])))
    return policy, bool(remembered.get("kernel")), "remembered settings"


def selinux_gate(store: Store, ignore_flag: bool, core: Optional[Path]) -> list[str]:
    """Refuse unless SELinux is enforcing, --ignore-selinux, or NGX_IGNORE_SELINUX=true in --core;
    returns the warnings, which the caller prints once, after its work."""
    from hostprep import selinux
    fs, config = selinux.default_paths(store.paths.root)
    state = selinux.read_state(fs, config)
    return selinux.check_enforcing(state, ignore_flag, selinux.ignore_from_core(core))


def say_warnings(warnings: list[str]) -> None:
    for w in warnings:
        say(err, "yellow", "warning:", f"{w}")


def ssh_guard(runner: Runner, info: nicmod.NicInfo, force: bool) -> None:
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


def rp_filter_guard(runner: Runner, force: bool) -> None:
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


def print_kernel_dry_run(store: Store) -> None:
    from hostprep import sysctl
    kernel = sysctl.Kernel()
    settings = sysctl.profile()
    missing, machine = kernel.skipped(settings)
    changes = [f"  {s.key}: {kernel.read(s.key)} -> {s.value}" for s in settings
               if s.key not in missing and s.key not in machine and kernel.read(s.key) != s.value]
    out.print(f"\n# kernel: {store.paths.root / 'etc/sysctl.d' / sysctl.DROPIN_NAME} would be:", markup=False)
    out.print(sysctl.render(missing, machine).rstrip(), markup=False)
    out.print(f"kernel keys that would change ({len(changes)}):", markup=False)
    for line in changes:
        out.print(line, markup=False)
    for key in sorted(missing):
        out.print(f"  {key}: not in this kernel, would be skipped", markup=False)
    if machine:
        out.print(f"machine-wide keys left alone ({len(machine)}; this is not the machine's own network "
                  "namespace):", markup=False)
        for key in sorted(machine):
            out.print(f"  {key}: {sysctl.MACHINE_WIDE_DETAIL}", markup=False)


def run_kernel_part(store: Store, argv: str):
    """Write, load and read back the kernel profile (inside the caller's change); prints nothing."""
    from hostprep import sysctl
    report, notes = sysctl.apply_kernel(sysctl.Kernel(), store.paths)
    bad = [r for r in report if r.state in ("drift", "overridden")]
    store.save_settings({"kernel": True})
    ok = sum(1 for r in report if r.state == "ok")
    store.journal(argv, f"kernel profile: {ok} keys live",
                  "ok" if not bad else f"{len(bad)} keys overridden or drifting")
    return report, notes, bad


def print_kernel_part(store: Store, report, notes, bad) -> None:
    from hostprep import sysctl
    for n in notes:
        say(err, "yellow", "note:", f"{n}")
    for r in bad:
        say(err, "red", "kernel drift:", f"{r.key}: wanted {r.desired}, {r.detail}")
    ok = sum(1 for r in report if r.state == "ok")
    out.print(f"kernel: {ok} of {len(report)} keys live and verified"
              + (f", {len(bad)} overridden or drifting (see above)" if bad else "")
              + f"; drop-in {store.paths.root / 'etc/sysctl.d' / sysctl.DROPIN_NAME}")


ConfirmOpt = typer.Option(None, "--confirm", metavar="SECONDS", min=1, max=86400,
                          help="Commit-confirmed: arm an automatic rollback before changing anything; unless "
                               "'hostprep confirm' runs within SECONDS, the state before is restored (also "
                               "when your SSH session is gone). A systemd timer, or a detached watcher "
                               "process where systemd is not running.")


def say_pending(ch) -> None:
    if ch is None or ch.pending is None:
        return
    p = ch.pending
    how = f"systemd timer {p['unit']}" if p["mechanism"] == "systemd" else \
        f"watcher process {p['watcher_pid']} (no systemd in this namespace)"
    say(err, "bold yellow", f"confirm within {p['seconds']} s:", f"run 'hostprep confirm' before "
        f"{p['deadline_text']}, or the state before this change is restored ({how}); "
        "'hostprep rollback' restores it now")


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
        from hostprep.validate import _IFNAME
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
    policy, do_kernel, source = what_to_apply(interface, skip_ddos, allow_private, ping_from, kernel, store)
    # Every guard runs before any change, and for a dry run too: a dry run refuses
    # (same line, same exit code) where the real run would.
    selinux_warnings: list[str] = []
    with unreadable_in_dry_run(dry_run, "the SELinux state cannot be read; the real run checks it"):
        selinux_warnings = selinux_gate(store, ignore_selinux, core)
    if do_kernel:
        # -i ... -k must not load the firewall and then refuse the kernel part.
        rp_filter_guard(Runner(), force)
    pending_guard(store, dry_run)
    if source == "remembered settings":
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
    from hostprep import txn
    prepared = prepare_firewall(policy, store, yes=yes, dry_run=False, force=force, backend=backend,
                                switch_nic=switch_nic) if policy is not None else None
    be = prepared[1] if prepared else None
    argv = "hostprep " + " ".join(sys.argv[1:])
    if do_kernel and store.applied() is None and prepared is None:
        say(err, "bold yellow", "WARNING:", "the profile turns on ip_forward (containers need it) but hostprep's "
                  "firewall is not applied: nothing filters what is forwarded from the external NIC; run "
                  "'hostprep apply -i <external NIC>'")
    kernel_result = None
    # Nothing prints inside the change: a terminal gone with the SSH session must
    # not turn a finished load into a failure.
    with txn.change(be, store, argv, firewall=prepared is not None, kernel=do_kernel, confirm=confirm_secs) as ch:
        outcome = None
        if prepared is not None:
            info, _, desired = prepared
            outcome = applymod.apply(be, store, desired, argv)
        if do_kernel:
            kernel_result = run_kernel_part(store, argv)
        ch.changed = do_kernel or bool(outcome and outcome.changed)
        # The boot units belong to the change: a hang-up right after it must not
        # leave the new hardening live without them.  (-k alone installs them too:
        # the boot unit rolls back an unconfirmed -k at the next boot.)
        persistence = persistence_part(store, policy.interface if policy is not None else
                                       ((store.applied() or {}).get("settings") or {}).get("interface"))
    for note in ch.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    if prepared is not None:
        report_firewall(info, desired, outcome)
    if kernel_result is not None:
        print_kernel_part(store, *kernel_result)
    persistence()
    say_warnings(selinux_warnings)
    say_pending(ch)
    if kernel_result is not None and kernel_result[2]:
        raise typer.Exit(1)


def persistence_part(store: Store, interface: Optional[str]):
    """Install the boot units now (silently); returns what prints the outcome later."""
    from hostprep import persist
    try:
        changed = persist.install(store.paths, interface, Runner())
    except HostprepError as exc:
        problem = exc.line()

        def warn() -> None:
            say(err, "bold red", "WARNING:", f"boot persistence not installed: {problem}; the hardening is live "
                      "now but will be gone after a reboot")
        return warn

    def report_units() -> None:
        if changed:
            out.print(f"boot persistence: {persist.UNIT}"
                      + (f" and {persist.nic_instance(interface)}" if interface else "")
                      + f" enabled ({len(changed)} files written under " + " and ".join(written_under(store, changed))
                      + ")")
    return report_units


def written_under(store: Store, files: list[str]) -> list[str]:
    """Where the files of the boot persistence went: <root>/etc, and the state directory (fail-safe)."""
    places = {str(store.paths.state_dir) if Path(f.removeprefix("removed ")).is_relative_to(store.paths.state_dir)
              else str(store.paths.root / "etc") for f in files}
    return sorted(places)


def report_firewall(info, desired, outcome) -> None:
    for w in outcome.warnings:
        say(err, "yellow", "warning:", f"{w}")
    if not outcome.changed:
        out.print(f"nothing changed: the hardening on {info.name} is already live")
        return
    for action in outcome.notes:
        out.print(f"  - {action}")
    out.print(f"applied: {', '.join(desired.v4.groups)} on {info.name} (IPv4 {desired.v4.rule_count} rules, "
              f"IPv6 {desired.v6.rule_count} rules, fragments {'dropped' if desired.nft else 'not handled (-e)'})")


@contextlib.contextmanager
def unreadable_in_dry_run(dry_run: bool, what: str):
    """A state file root alone can read: an error for a real run (or as root), a note for a
    dry run without root (which changes nothing and shows what it can)."""
    try:
        yield
    except StateError:
        if not dry_run or applymod.is_root():
            raise
        out.print(f"(not root: {what})")


def pending_guard(store: Store, dry_run: bool) -> None:
    """A change waiting for 'hostprep confirm' blocks the next one (a dry run says so the same way)."""
    from hostprep import txn
    with unreadable_in_dry_run(dry_run, "whether a change waits for confirmation cannot be read"):
        txn.refuse_if_pending(store)


def nic_switch_guard(store: Store, info: nicmod.NicInfo, containers: tuple, *, yes: bool,
                     switch_nic: bool) -> str | None:
    """Applying on another NIC than the hardened one: say what that NIC loses, and which
    containers are bound to an address the new NIC does not have; with -y, only with --switch-nic.
    Returns the NIC the hardening moves from (None: no switch)."""
    try:
        record = store.applied() or {}
    except StateError:
        return None
    current = (record.get("settings") or {}).get("interface") if isinstance(record, dict) else None
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


def prepare_firewall(policy: Policy, store: Store, *, yes: bool, dry_run: bool, force: bool,
                     backend: Optional[str], switch_nic: bool = False):
    """Guards, the NIC shown, the admin's yes; returns (NIC info, backend, desired) or None after a dry run."""
    info = nicmod.nic_info(policy.interface)
    if info.loopback:
        raise InputError("-i/--interface", f"{info.name} is the loopback interface",
                         "give the internet-facing NIC")
    for src in policy.ping:
        if [str(n) for n in src.networks] != [src.given]:
            out.print(f"-p {src.given} -> {', '.join(str(n) for n in src.networks)}")
    runner: Runner = DryRunner() if dry_run else Runner()
    ssh_guard(runner, info, force)
    show_nic(info)
    at_risk = applymod.untracked_connections(list(info.ipv4 + info.ipv6))
    if at_risk:
        say(err, "yellow", "warning:", f"conntrack is not tracking this namespace yet: {at_risk} established "
                  f"TCP connection(s) on {info.name} will be classified NEW without SYN and dropped")
    be = applymod.default_backend(runner, backend)
    containers: tuple = ()
    with unreadable_in_dry_run(dry_run, "the containers that are up cannot be read; showing the base hardening "
                               "only"):
        containers = tuple(store.containers().values())
    moving_from = nic_switch_guard(store, info, containers, yes=yes, switch_nic=switch_nic)
    desired = applymod.build_desired(policy, containers)
    if dry_run:
        try:
            plan = applymod.make_plan(be, desired, store.applied() if applymod.is_root() else None)
        except HostprepError:
            if applymod.is_root():
                raise
            out.print("(not root: the live ruleset cannot be read; showing everything hostprep would load)")
            from hostprep.apply import Snapshot
            from hostprep.plan import Observed
            plan = applymod.make_plan(be, desired, None, Snapshot({4: Observed(4), 6: Observed(6)}, None))
        print_plan(plan)
        out.print("dry run: nothing was changed")
        return None
    confirm(f"Move the hardening from {moving_from} to {info.name} (backend {be.variant})?" if moving_from else
            f"Apply the hardening on {info.name} (backend {be.variant})?", yes)
    return info, be, desired


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
    from hostprep import txn
    pending_guard(store, dry_run)           # a dry run refuses where the real flush would
    argv = "hostprep " + " ".join(sys.argv[1:])
    if kernel:
        from hostprep import sysctl
        if dry_run:
            out.print("dry run: would restore the recorded kernel values and remove the drop-in")
            return
        with txn.change(None, store, argv, firewall=False, kernel=True):
            restored = sysctl.flush_kernel(sysctl.Kernel(), store.paths)
            store.save_settings({"kernel": False})
        store.journal(argv, f"kernel: {len(restored)} keys restored", "ok")
        out.print(f"kernel: {len(restored)} keys restored to their values before hostprep; drop-in removed")
        for line in restored:
            out.print(f"  {line}")
        return
    runner: Runner = DryRunner() if dry_run else Runner()
    be = applymod.default_backend(runner, backend)
    if dry_run:
        print_plan(applymod.make_plan(be, None, store.applied()))
        from hostprep import fail2ban as f2b
        files = f2b.Files(store.paths.root)
        for p in files.jails() + [p for p in (files.filter, files.action) if p.is_file()] + files.logrotates():
            out.print(f"fail2ban: would remove {p}", markup=False)
        out.print("dry run: nothing was changed")
        return
    fail2ban_flush(store, argv)           # the jails first: fail2ban lets go of the ban sets flush destroys
    outcome = applymod.flush(be, store, argv)
    if outcome.changed:
        for action in outcome.notes:
            out.print(f"  - {action}")
        out.print(f"removed hostprep's rules: {outcome.summary.removeprefix('removed ')}")
    else:
        out.print("nothing to remove: no hostprep rules are loaded")
    if persistent:
        from hostprep import persist
        gone = persist.remove(store.paths, runner)
        store.journal(argv, f"boot persistence removed ({len(gone)} files)", "ok")
        out.print(f"boot persistence removed: {len(gone)} files" if gone else "boot persistence: nothing installed")
    elif store.settings():
        out.print("the settings stay remembered: 'hostprep apply' brings the hardening back"
                  + ("; the boot unit stays installed and loads nothing while nothing is applied "
                     "(--persistent removes it)" if (store.paths.root / "etc/systemd/system/hostprep.service")
                     .is_file() else ""))


def print_status(report: dict, verbose: bool = False) -> None:
    """Verdict / what is open to whom / details (hostprep.output lays them out)."""
    output.print_status(out, err, report, verbose=verbose)


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
    be = applymod.default_backend(runner, backend)
    report = statusmod.collect(runner, be, Store(Paths.from_env()))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_status(report, verbose=verbose)
    raise typer.Exit(statusmod.exit_code(report))


@app.command("confirm")
@handle_errors
def confirm_cmd() -> None:
    """Keep the change applied with --confirm: the armed rollback is cancelled."""
    from hostprep import txn
    need_root("confirm")
    p = txn.confirm(Store(Paths.from_env()), Runner())
    out.print(f"confirmed: change {p['id']} ({p['command']}) stays"
              + (" (its deadline had passed, but the rollback had not run yet)" if p["late"] else ""))


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
    from hostprep import txn
    need_root("rollback")
    store = Store(Paths.from_env())
    runner = Runner()
    if due is not None and wait:
        txn.ignore_hangup()
        if not txn.wait_until_due(store, due):
            return
    be = applymod.default_backend(runner, backend)
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
            p = txn.pending(store)
            if p is None or p.get("id") != due:
                return
    for note in res["recovered"]:
        out.print(note)
    if res["skipped"]:
        out.print(f"change {due} no longer waits for confirmation: nothing rolled back")
        return
    if res["id"] is None:
        return
    out.print(f"rolled back change {res['id']} ({res['command']}), {res['why']}: "
              + (f"{len(res['notes'])} items restored" if res["notes"] else "nothing differed"))
    for note in res["notes"][:12]:
        out.print(f"  - {note}")
    if len(res["notes"]) > 12:
        out.print(f"  - ... and {len(res['notes']) - 12} more")


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
    be = applymod.default_backend(runner, backend)
    notes, failures = applymod.boot(be, store, runner)
    for note in notes:
        out.print(f"hostprep boot: {note}", markup=False)
    if failures:
        for f in failures:
            err.print(f"hostprep boot: FAILED: {f}", markup=False, style="bold red")
        raise typer.Exit(1)


def sandbox_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name):
        raise InputError("--name", f"{name!r} is not a usable namespace name",
                         "use up to 40 letters, digits, '.', '_' or '-'")


def print_containers(rows: list[dict], title: str) -> None:
    out.print(f"{title}:")
    for line in output.containers_listing(rows):
        out.print(line)


def container_log_file_line(f) -> str:
    """One env file in the log: never a plain hash of it (core.env holds secrets)."""
    import datetime as dt
    when = dt.datetime.fromtimestamp(f.mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return (f"# file {f.path} ({f.role or 'env file'}): {f.size} bytes, modified {when}"
            + (f", hmac-sha256 {f.digest} (host key)" if f.digest else ""))


def container_log_text(name: str, c, added: list[str], removed: list[str], event: str,
                       unchanged: list[str] = ()) -> str:
    """The iptables_logs/NAME.log text: when, which files (size, mtime, keyed HMAC), each rule added or removed."""
    from hostprep.state import now, who
    lines = [f"# hostprep container {event}: {name} at {now()} by {who()}"]
    if c is not None:
        lines.append(f"# template {c.template}, destination {c.dest}, ports {','.join(map(str, c.ports))}, "
                     f"hardening {'on' if c.hardening else 'OFF'}")
        lines += [container_log_file_line(f) for f in c.files]
        lines += [f"# ipset {s.name}: {len(s.members)} members" for s in c.sets()]
        if c.ban_set() is not None:
            lines.append(f"# ipset {c.ban_set().name}: ban set (fail2ban's bans; kept across reloads)")
    lines.append(f"# rules removed: {len(removed)}")
    lines += [f"removed: {ln}" for ln in removed]
    if event == "up":
        lines.append(f"# rules added: {len(added)}")
        lines += [f"added: {ln}" for ln in added]
        if unchanged:
            lines.append(f"# rules kept as they were: {len(unchanged)}")
            lines += [f"kept: {ln}" for ln in unchanged]
    return "\n".join(lines) + "\n"


def confirm_widening(name: str, widening: list[str], yes: bool) -> None:
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


# -- fail2ban (issue 14; hostprep/fail2ban.py): hooks of container up/down and flush --------

def fail2ban_part(c, previous, files, store: Store, wanted: Optional[bool]):
    """NAME with fail2ban on or off (given, else as at its last up) and its jail, validated
    before anything changes (bad input: one line, nothing written)."""
    import dataclasses
    from hostprep import fail2ban as f2b
    on = wanted if wanted is not None else bool(previous is not None and previous.fail2ban)
    c = dataclasses.replace(c, fail2ban=on and c.hardening)
    if not on:
        return c, None
    f2b.require_installed(Runner(), f2b.Files(store.paths.root))
    return c, f2b.resolve(c, files.env, files.core, files.installer, store.paths.root)


def fail2ban_dry_run(name: str, jail, previous, store: Store) -> None:
    from hostprep import fail2ban as f2b
    files = f2b.Files(store.paths.root)
    if jail is not None:
        for path, text in f2b.wanted_files(jail, files).items():
            same = path.is_file() and path.read_text() == text
            out.print(f"fail2ban: {path} {'unchanged' if same else 'would be written'}", markup=False)
        out.print(f"fail2ban: ban set {jail.ban.name}; then 'fail2ban-client reload' if fail2ban runs", markup=False)
    elif previous is not None and previous.fail2ban:
        out.print(f"fail2ban: {files.jail(name)} and {files.logrotate(name)} would be removed", markup=False)


def fail2ban_apply(name: str, jail, store: Store, argv: str) -> None:
    """After the rules are live: write (jail given) or remove (None) NAME's files, test, reload."""
    from hostprep import fail2ban as f2b
    files, runner = f2b.Files(store.paths.root), Runner()
    if jail is not None:
        changed = f2b.install(jail, files, runner)
        what = (f"wrote {', '.join(changed)}" if changed else "jail unchanged")
    else:
        changed = f2b.remove(name, files)
        if not changed:
            return
        what = f"removed {', '.join(changed)}"
    done = f2b.reload(runner, files) if changed else "nothing to reload"
    failed = "FAILED" in done
    store.journal(argv, f"fail2ban {name}: {what}; {done}", "warning" if failed else "ok")
    (err if failed else out).print(f"fail2ban: {name}: {what}; {done}", markup=False,
                                   style="yellow" if failed else None)


def fail2ban_flush(store: Store, argv: str) -> None:
    from hostprep import fail2ban as f2b
    files, runner = f2b.Files(store.paths.root), Runner()
    gone = f2b.remove_all(files)
    if gone:
        done = f2b.reload(runner, files)
        store.journal(argv, f"fail2ban: removed {', '.join(gone)}; {done}", "ok")
        out.print(f"fail2ban: removed {len(gone)} files (hostprep's jails, filter, action, logrotate); {done}",
                  markup=False)


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
    from hostprep import envfiles, txn
    from hostprep import plan as planmod
    from hostprep.model import container_name
    container_name(name)
    need_root("container up")
    store = Store(Paths.from_env())
    txn.refuse_if_pending(store)
    previous = store.containers().get(name)
    files = envfiles.choose_files(name, previous, env=env, core=core, installer=installer, no_core=no_core,
                                  no_installer=no_installer)
    policy = applymod.applied_policy(store)
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
        be = applymod.default_backend(DryRunner(), backend)
        plan, added, removed = applymod.container_up_plan(be, store, c)
        print_plan(plan)
        out.print(f"container {name}: {len(added)} rules would be added, {len(removed)} removed", markup=False)
        for ln in removed:
            out.print(f"  removed: {ln}", markup=False)
        for ln in added:
            out.print(f"  added: {ln}", markup=False)
        fail2ban_dry_run(name, jail, previous, store)
        if confirm_secs is not None:
            out.print(f"dry run: with --confirm {confirm_secs} a rollback would be armed first")
        out.print("dry run: nothing was changed")
        if widening and not yes and sys.stdin.isatty():
            out.print("(the real run would ask before widening access)")
        confirm_widening(name, widening, yes or sys.stdin.isatty())
        return
    confirm_widening(name, widening, yes)
    be = applymod.default_backend(Runner(), backend)
    argv = "hostprep " + " ".join(sys.argv[1:])
    with txn.change(be, store, argv, confirm=confirm_secs) as ch:
        outcome, added, removed, kept = applymod.container_up(be, store, c, argv)
        ch.changed = outcome.changed
        # inside the change: a jail fail2ban's own test refuses undoes the rules too
        fail2ban_apply(name, jail, store, argv)
    for note in ch.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    store.write_container_log(name, container_log_text(name, c, added, removed, "up", kept), append=False)
    for w in outcome.warnings:
        say(err, "yellow", "warning:", f"{w}")
    what = "rules unchanged" if not outcome.changed else \
        f"{output.plural(len(added), 'rule')} added, {len(removed)} removed"
    out.print(f"container {name}: {what}; ports {','.join(map(str, c.ports))} on {c.dest} "
              f"({'open with limits' if c.hardening else 'closed'}); log {store.container_log(name)}")
    say_pending(ch)


@container_app.command("down", cls=PlainCommand)
@handle_errors
def container_down_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Container name given to 'container up'."),
    backend: Optional[str] = BackendOpt,
    confirm_secs: Optional[int] = ConfirmOpt,
) -> None:
    """Remove exactly NAME's rules (and its sets, its fail2ban jail); other containers and the base stay."""
    from hostprep.model import container_name
    container_name(name)
    need_root("container down")
    store = Store(Paths.from_env())
    be = applymod.default_backend(Runner(), backend)
    from hostprep import txn
    argv = "hostprep " + " ".join(sys.argv[1:])
    with txn.change(be, store, argv, confirm=confirm_secs) as ch:
        outcome, removed = applymod.container_down(be, store, name, argv)
        ch.changed = outcome.changed
    for note in ch.recovered:
        say(err, "yellow", "recovered:", f"{note}")
    store.write_container_log(name, container_log_text(name, None, [], removed, "down"), append=True)
    fail2ban_apply(name, None, store, argv)
    out.print(f"container {name}: {output.plural(len(removed), 'rule')} removed; log {store.container_log(name)}")
    say_pending(ch)


@container_app.command("list")
@handle_errors
def container_list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the containers part of status --json)."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """The containers whose rules are up: ports, destination, limits, exempt counts, drop counters."""
    need_root("container list")
    runner = Runner()
    be = applymod.default_backend(runner, backend)
    report = statusmod.collect(runner, be, Store(Paths.from_env()))
    if as_json:
        print(json.dumps(report["containers"], indent=2))
    elif report["containers"]:
        print_containers(report["containers"], title="containers")
    else:
        out.print("no container is up")


selinux_app = typer.Typer(no_args_is_help=True, help="The SELinux policy module for the proxy container's "
                                                    "working directory (HOST_WORKING_DIR).")
app.add_typer(selinux_app, name="selinux")


def _selinux_run(action: str, working_dir: Path, dry_run: bool) -> None:
    from hostprep import selinux
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
    _selinux_run("install", working_dir, dry_run)


@selinux_app.command("remove")
@handle_errors
def selinux_remove_cmd(
    working_dir: Path = typer.Option(..., "--working-dir", metavar="DIR", help="The directory given to 'selinux install'."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the commands; change nothing."),
) -> None:
    """Undo 'selinux install': drop the file-context mappings, relabel, remove the module when unused."""
    _selinux_run("remove", working_dir, dry_run)


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
    import shutil
    # Only a state root that `sandbox up` made is removed: directly under /tmp or
    # /var/tmp, no symlink, root's alone, and carrying its marker file.
    real = Path(os.path.abspath(root))
    if real.parent in (Path("/tmp"), Path("/var/tmp")) and untrusted_reason(real) is None \
            and (real / SANDBOX_MARKER).is_file():
        shutil.rmtree(real, ignore_errors=True)
    elif root.exists():
        out.print(f"state root {root} left in place (not a sandbox root made by 'sandbox up')")
    out.print(f"removed: {', '.join(gone) if gone else 'no namespaces (none existed)'}; state root {root}")


def print_selftest(report: dict) -> None:
    from hostprep import selftest
    s = report["settings"]
    out.print(f"selftest: sandbox {', '.join(report['sandbox']['namespaces'])} (backend {report['backend']}); "
              f"settings from {s['source']}: -i {report['sandbox']['external_nic']}"
              + (" -e" if s["skip_ddos"] else "") + (" -a" if s["allow_private"] else "")
              + "".join(f" -p {p}" for p in s["ping_from_in_sandbox"]))
    for c in report["containers"]:
        lim = c["limits"]
        out.print(f"container {c['name']} ({c['template']}, {c['from']}): ports {','.join(map(str, c['ports']))} "
                  f"on {c['dest']} -> {c['dest_in_sandbox']} in the sandbox, limits {lim['connlimit_above']}/"
                  f"{lim['hash_upto']}/s/{lim['hash_burst']}")
    for note in report["notes"]:
        out.print(f"note: {note}", markup=False)
    out.print(selftest.report_table(report))
    if report["sandbox"]["kept"]:
        out.print(f"kept (--keep): remove with: hostprep sandbox down --name {report['sandbox']['name']} "
                  f"--root {report['sandbox']['root']}", markup=False)
    n = len(report["probes"])
    if report["ok"]:
        out.print(f"selftest: all {n} probes as expected ({report['seconds']} s)")
    else:
        say(err, "bold red", "selftest:", f"{report['mismatches']} of {n} probes not as expected "
                  f"({report['seconds']} s)")


@contextlib.contextmanager
def working(what: str):
    """A spinner with ``what`` on stderr while a step that may take seconds runs (a terminal only;
    never inside a change: a terminal gone with the SSH session must not fail a load)."""
    if not err.is_terminal:
        yield
        return
    with err.status(Text(what), spinner="dots"):
        yield


def run_with_progress(work):
    """Run ``work(progress)`` under a live progress line (a terminal only): one step per
    probe group, as the engine reports them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=out, transient=True) as bar:
        task = bar.add_task("selftest: starting", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"selftest: {what}")
            bar.refresh()       # every step is drawn, even one shorter than the refresh period
        return work(progress)


def print_selftest_compact(report: dict) -> None:
    """On a terminal: one line per probe group (passed/failed), the failures in full."""
    from hostprep import selftest
    s = report["settings"]
    out.print(f"selftest: sandbox {report['sandbox']['name']} (backend {report['backend']}); settings from "
              f"{s['source']}: -i {report['sandbox']['external_nic']}" + (" -e" if s["skip_ddos"] else "")
              + (" -a" if s["allow_private"] else "") + "".join(f" -p {p}" for p in s["ping_from_in_sandbox"])
              + (f"; {output.plural(len(report['containers']), 'container')}" if report["containers"] else ""))
    for group, passed, failed in selftest.group_results(report):
        out.print(Text.assemble(f"  {group}: ", (f"{passed} passed", "green"),
                                *((", ", (f"{failed} FAILED", "bold red")) if failed else ())))
    if report["mismatches"]:
        out.print(selftest.report_table(report, only_failed=True))
    if report["sandbox"]["kept"]:
        out.print(f"kept (--keep): remove with: hostprep sandbox down --name {report['sandbox']['name']} "
                  f"--root {report['sandbox']['root']}")
    n = len(report["probes"])
    if report["ok"]:
        out.print(f"selftest: all {n} probes as expected ({report['seconds']} s); --json or a pipe shows each probe")
    else:
        say(err, "bold red", "selftest:", f"{report['mismatches']} of {n} probes not as expected "
                  f"({report['seconds']} s)")


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
    from hostprep import selftest
    from hostprep.validate import interface_name
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


def main() -> None:
    app(prog_name="hostprep")


if __name__ == "__main__":
    main()
