"""What the commands do, after their guards: the only code that opens a change.

Each function here is one change of the host (``txn.change``: lock, snapshot,
in-flight marker, confirm timer, restore when anything raises) around the
engine, and records what the change applied:

  apply            the firewall (converge + applied.json + settings), the kernel
                   profile, the boot units, in one change
  flush            hostprep's rules gone; ``flush_kernel``: the kernel values back
  container_up     one container's rules opened or replaced, its record saved
  container_down   one container's rules removed, its record gone
  boot             what the systemd units run: recover, roll back an unconfirmed
                   change, load the recorded state (fails closed)

Nothing here prints: each returns a result the CLI words.  A change is never
opened inside another: the code that runs inside one (``converge_and_record``,
``container_desired``, the kernel and boot-unit parts) opens none of its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostprep import attack, engine
from hostprep import fail2ban as f2b
from hostprep import nic as nicmod
from hostprep import persist, records, render, settings, sysctl, timers, txn
from hostprep.backend import FirewallBackend, name_of
from hostprep.engine import Outcome
from hostprep.errors import HostprepError, InputError
from hostprep.model import CONTAINER_DISPATCH, Container, Desired, Policy
from hostprep.observed import LiveState, target_of
from hostprep.plan import ApplyPlan, plural
from hostprep.runner import Runner
from hostprep.settings import FirewallSettings, Settings
from hostprep.state import Store
from hostprep.txn import Change


def is_root() -> bool:
    return os.geteuid() == 0


# -- apply ---------------------------------------------------------------------------

@dataclass
class KernelResult:
    """The kernel part of an apply: every key read back, notes, the keys that do not hold."""

    report: list
    notes: list[str]
    bad: list


@dataclass
class PersistResult:
    """The boot units after a change: the files written, or why they could not be."""

    interface: str | None
    changed: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class ApplyResult:
    change: Change
    outcome: Outcome | None          # None: no firewall part (-k alone)
    kernel: KernelResult | None      # None: no kernel part
    persistence: PersistResult


def converge_and_record(backend: FirewallBackend, store: Store, desired: Desired, command: str, *,
                        record_nic: bool = True) -> Outcome:
    """Inside the caller's change: converge to ``desired`` and record it (applied.json, settings).

    ``record_nic``: record the external NIC's identity as it is now (apply); False keeps the
    recorded one (container up/down must not bless a NIC that was swapped meanwhile).
    """
    # A malformed record reads as none: this apply writes it again.
    record = records.load_applied(store, tolerant=True)
    desired = backend.target(desired)
    outcome = engine.converge(backend, store, desired, command, recorded_nft=record.nft if record else None)
    if record_nic:
        ident = nicmod.identity_of(desired.policy.interface, backend.runner)
        nic = ident.as_dict() if ident else None
    else:
        nic = record.nic if record is not None and record.interface == desired.policy.interface else None
    if outcome.changed or record is None or record.settings != FirewallSettings.of(desired.policy) \
            or record.rules != records.AppliedRecord.rules_of(desired) or record.nic != nic:
        records.save_applied(store, records.AppliedRecord.of(desired, outcome.after, backend.variant, nic))
        store.save_settings(Settings(FirewallSettings.of(desired.policy)))
    if outcome.changed or record is None:
        # the kernel's cumulative drop counters now: status warns of a bound reached since (issue 12)
        attack.save_baseline(store.paths.state_dir, backend.proc)
    return outcome


def _ban_action_follows(store: Store, backend: FirewallBackend, command: str) -> None:
    """fail2ban's ban action (ipset or nft) follows the backend this apply loaded (README
    "fail2ban and the proxy's logs"); fail2ban reloads when it changed (inside the change)."""
    files = f2b.Files(store.paths.root)
    if f2b.follow_backend(files, f2b.ban_kind(backend.variant)):
        done = f2b.reload(Runner(), files)
        store.journal(command, f"fail2ban: ban action for the {backend.name} backend written; {done}",
                      "warning" if "FAILED" in done else "ok")


def _kernel_part(store: Store, command: str) -> KernelResult:
    """Write, load and read back the kernel profile (inside the caller's change)."""
    applied = sysctl.apply_kernel(sysctl.Kernel(), store.paths)
    bad = [r for r in applied.report if r.state in ("drift", "overridden")]
    store.save_settings(Settings(kernel=True))
    ok = sum(1 for r in applied.report if r.state == "ok")
    store.journal(command, f"kernel profile: {ok} keys live",
                  "ok" if not bad else f"{len(bad)} keys overridden or drifting")
    return KernelResult(applied.report, applied.notes, bad)


def _persistence_part(store: Store, interface: str | None) -> PersistResult:
    """Install the boot units (inside the caller's change); a failure is reported, not raised."""
    try:
        return PersistResult(interface, persist.install(store.paths, interface, Runner()))
    except HostprepError as exc:
        return PersistResult(interface, error=exc.line())


def apply(store: Store, command: str, *, backend: FirewallBackend | None, desired: Desired | None, kernel: bool,
          confirm: int | None = None) -> ApplyResult:
    """One change: the firewall (``desired``; None: none), the kernel profile, the boot units.

    The boot units belong to the change: a hang-up right after it must not leave the
    new hardening live without them.  (-k alone installs them too: the boot unit
    rolls back an unconfirmed -k at the next boot.)
    """
    with txn.change(backend, store, command, firewall=desired is not None, kernel=kernel,
                    confirm=confirm) as ch:
        outcome = converge_and_record(backend, store, desired, command) if desired is not None else None
        if desired is not None:
            _ban_action_follows(store, backend, command)
        kernel_result = _kernel_part(store, command) if kernel else None
        ch.changed = kernel or bool(outcome and outcome.changed)
        applied = records.load_applied(store, tolerant=True)
        interface = desired.policy.interface if desired is not None else applied.interface if applied else None
        persistence = _persistence_part(store, interface)
    return ApplyResult(ch, outcome, kernel_result, persistence)


# -- flush -----------------------------------------------------------------------------

@dataclass
class FlushResult:
    outcome: Outcome
    fail2ban: Fail2banResult | None = None      # hostprep's jails removed first


def flush(backend: FirewallBackend, store: Store, command: str) -> FlushResult:
    """Remove every hostprep rule, set, table and fail2ban jail.  Settings and the container registry stay."""
    # the jails first: fail2ban lets go of the ban sets the flush destroys
    banning = None
    files = f2b.Files(store.paths.root)
    gone = f2b.remove_all(files)
    if gone:
        done = f2b.reload(Runner(), files)
        store.journal(command, f"fail2ban: removed {', '.join(gone)}; {done}", "ok")
        banning = Fail2banResult(f"removed {len(gone)} files (hostprep's jails, filter, action, logrotate); {done}",
                                 "FAILED" in done)
    with txn.change(backend, store, command) as ch:
        record = records.load_applied(store, tolerant=True)
        outcome = engine.converge(backend, store, None, command, recorded_nft=record.nft if record else None)
        store.clear_applied()
        ch.changed = outcome.changed
    return FlushResult(outcome, banning)


def flush_kernel(store: Store, command: str) -> list[str]:
    """Restore the kernel values recorded before the first 'apply -k', remove the drop-in."""
    with txn.change(None, store, command, firewall=False, kernel=True):
        restored = sysctl.flush_kernel(sysctl.Kernel(), store.paths)
        store.save_settings(Settings(kernel=False))
    store.journal(command, f"kernel: {len(restored)} keys restored", "ok")
    return restored


# -- containers ---------------------------------------------------------------------------

@dataclass
class ContainerDiff:
    """One container's iptables-save lines: added, removed, kept as they were."""

    added: list[str]
    removed: list[str]
    kept: list[str]


@dataclass
class ContainerPreview:
    """What ``container up --dry-run`` shows: the plan, the lines added and removed."""

    plan: ApplyPlan
    added: list[str]
    removed: list[str]


@dataclass(frozen=True)
class Fail2banResult:
    """What a change did to fail2ban's files (a jail written or removed, fail2ban reloaded)."""

    line: str           # "NAME: wrote ...; reloaded" (journalled as well)
    failed: bool        # fail2ban refused or could not reload: the rules stay, the admin is warned


@dataclass
class ContainerResult:
    change: Change
    outcome: Outcome
    added: list[str]
    removed: list[str]
    kept: list[str] = field(default_factory=list)
    fail2ban: Fail2banResult | None = None


def fail2ban_files(store: Store, name: str, jail, command: str, kind: str = "ipset") -> Fail2banResult | None:
    """Write (``jail`` given; the ban action of ``kind``, f2b.ban_kind) or remove (None) NAME's
    fail2ban files, test, reload; None: nothing to do."""
    files, runner = f2b.Files(store.paths.root), Runner()
    if jail is not None:
        changed = f2b.install(jail, files, runner, kind)
        what = (f"wrote {', '.join(changed)}" if changed else "jail unchanged")
    else:
        changed = f2b.remove(name, files)
        if not changed:
            return None
        what = f"removed {', '.join(changed)}"
    done = f2b.reload(runner, files) if changed else "nothing to reload"
    failed = "FAILED" in done
    store.journal(command, f"fail2ban {name}: {what}; {done}", "warning" if failed else "ok")
    return Fail2banResult(f"{name}: {what}; {done}", failed)


def container_lines(desired: Desired | LiveState, c: Container) -> list[str]:
    """The iptables-save lines of one container (its dispatch rule and its chain), per family."""
    if isinstance(desired, Desired):
        rs = desired.ruleset(c.family)
        rules = [r.line() for ch in rs.chains if ch.name in (CONTAINER_DISPATCH, c.chain)
                 for r in ch.rules if ch.name == c.chain or r.target == c.chain]
    else:
        obs = desired.observed.get(c.family)
        rules = [] if obs is None else [
            f"-A {r.chain} {r.spec}" for r in obs.rules
            if r.chain == c.chain or (r.chain == CONTAINER_DISPATCH and target_of(r.spec) == c.chain)]
    return rules


def check_conflicts(c: Container, others: dict[str, Container]) -> None:
    if not c.hardening:
        return
    for o in others.values():
        if o.hardening and o.dest == c.dest and set(o.ports) & set(c.ports):
            shared = ", ".join(str(p) for p in sorted(set(o.ports) & set(c.ports)))
            raise InputError(c.name, f"port {shared} on {c.dest} is already opened for container {o.name}",
                             "every host+port pair must be unique: use another PROXY_BINDING_IP or port")


def container_desired(store: Store, c: Container) -> tuple[Desired, Container | None]:
    """The whole desired state with ``c`` up (conflicts refused), and its recorded version."""
    policy = records.applied_policy(store)
    registry = store.containers()
    others = {n: o for n, o in registry.items() if n != c.name}
    check_conflicts(c, others)
    return render.desired(policy, tuple(others.values()) + (c,)), registry.get(c.name)


def container_diff(before: LiveState, desired: Desired, previous: Container | None,
                   c: Container) -> ContainerDiff:
    """The lines of one container added, removed and kept (iptables-save lines; the native nft
    backend's view of each rule: its comment and verdict)."""
    lines_before = container_lines(before, previous) if previous else []
    after = container_lines(desired, c)
    # A rule is kept only within one family: moved from IPv4 to IPv6, every rule
    # is removed from one table and added to the other, even where the text reads the same.
    same = previous is not None and previous.family == c.family
    added = [ln for ln in after if not (same and ln in lines_before)]
    removed = [ln for ln in lines_before if not (same and ln in after)]
    kept = [ln for ln in after if same and ln in lines_before]
    return ContainerDiff(added, removed, kept)


def same_backend(backend: FirewallBackend, store: Store, command: str) -> None:
    """Refused unless ``backend`` is the one holding hostprep (applied.json's "backend"): a container
    command never switches backends (only ``apply`` does, after BACKEND SWITCH and its prompt).
    ``backend`` differs only when asked for (--backend or HOSTPREP_BACKEND): without that,
    backend.choose takes the remembered one."""
    record = records.load_applied(store, tolerant=True)
    if record is None or record.backend in (None, backend.variant):
        return
    held = name_of(record.backend)
    raise InputError("--backend/HOSTPREP_BACKEND", f"{command} asks for the {backend.name} backend but hostprep "
                     f"is held by {held} (the last apply); container commands never switch backends",
                     f"run 'hostprep apply --backend {backend.name}' to switch (it asks first), or drop "
                     f"--backend / unset HOSTPREP_BACKEND to stay on {held}; nothing was changed")


def container_up_plan(backend: FirewallBackend, store: Store, c: Container) -> ContainerPreview:
    """What ``container up`` would do (for --dry-run): the plan, and the lines added and removed."""
    same_backend(backend, store, "container up")
    desired, previous = container_desired(store, c)
    record = records.load_applied(store, tolerant=True)
    plan = engine.make_plan(backend, desired, record.nft if record else None)
    diff = container_diff(plan.live, backend.target(desired), previous, c)
    return ContainerPreview(plan, diff.added, diff.removed)


def container_up(backend: FirewallBackend, store: Store, c: Container, command: str, *,
                 confirm: int | None = None, jail=None) -> ContainerResult:
    """Open (or replace) one container's rules in one change; its record is saved, its log rewritten.
    Refused when ``backend`` is not the one holding hostprep (same_backend)."""
    same_backend(backend, store, "container up")
    with txn.change(backend, store, command, confirm=confirm) as ch:
        desired, previous = container_desired(store, c)
        outcome = converge_and_record(backend, store, desired, command, record_nic=False)
        store.save_container(c)
        diff = container_diff(outcome.before, backend.target(desired), previous, c)
        ch.changed = outcome.changed
        # inside the change: a jail fail2ban's own test refuses undoes the rules too
        banning = fail2ban_files(store, c.name, jail, command, f2b.ban_kind(backend.variant))
    store.write_container_log(c.name, records.container_log_text(c.name, c, diff.added, diff.removed, "up",
                                                                 diff.kept), append=False)
    return ContainerResult(ch, outcome, diff.added, diff.removed, diff.kept, banning)


def container_down(backend: FirewallBackend, store: Store, name: str, command: str, *,
                   confirm: int | None = None) -> ContainerResult:
    """Remove exactly one container's rules (and sets) in one change; its record goes, its log says so.
    Refused when ``backend`` is not the one holding hostprep (same_backend)."""
    same_backend(backend, store, "container down")
    with txn.change(backend, store, command, confirm=confirm) as ch:
        registry = store.containers()
        if name not in registry:
            raise InputError(name, "no such container is up", "see 'hostprep container list'")
        policy = records.applied_policy(store)
        c = registry[name]
        desired = render.desired(policy, tuple(o for n, o in registry.items() if n != name))
        outcome = converge_and_record(backend, store, desired, command, record_nic=False)
        store.remove_container(name)
        ch.changed = outcome.changed
    removed = container_lines(outcome.before, c)
    store.write_container_log(name, records.container_log_text(name, None, [], removed, "down"), append=True)
    return ContainerResult(ch, outcome, [], removed, fail2ban=fail2ban_files(store, name, None, command))


# -- boot ----------------------------------------------------------------------------------

@dataclass
class BootResult:
    notes: list[str]
    failures: list[str]


def boot(backend: FirewallBackend, store: Store, runner: Runner,
         sys_net: Path = Path("/sys/class/net")) -> BootResult:
    """What hostprep.service (and hostprep-nic@, and the iptables drop-ins) run.

    Returns its notes and failures.  It fails closed: whatever cannot be read or
    loaded is reported and the next safer thing is loaded, never nothing.

    1. an interrupted change is recovered (the state before it restored);
    2. a change that still waits for 'hostprep confirm' is rolled back when it
       was armed in an earlier boot (not confirmed before the reboot) or its
       deadline passed; inside its window (iptables-services restarted, the
       NIC re-created) it stays, its timer is still armed;
    3. the recorded state is loaded: the base hardening of applied.json and
       the containers that were up, rendered afresh (no saved ruleset).  When
       the external NIC is not there yet, the iptables rules (which match it by
       name) are loaded anyway and the nft fragment table waits for
       hostprep-nic@.  Then, as long as loading fails: without the containers
       (their ports stay closed), without the nft table.  An unreadable
       container record is skipped (its ports stay closed); an unusable
       applied.json falls back to the remembered NIC's base hardening without
       -p.  With nothing recorded, any hostprep rules found are removed
       (the fail-safe that hostprep.service loaded first too; otherwise the
       load replaces it);
    3a. the external NIC must be the device recorded at apply (nic.check_recorded, after
       udev settled): missing, renamed or another device is a failure (exit 1,
       journalled); the rules are loaded for the name all the same, and the
       nft table is left as it is while the NIC is absent or another device
       (it may be hooked on the renamed NIC);
    3b. fail2ban's ban action (ipset or nft) is the one of this backend (after a rolled-back
       switch it may be the other's);
    4. the kernel profile, when recorded, is written and read back again.
    """
    notes: list[str] = []
    failures: list[str] = []
    with store.lock():
        # Nothing in these steps may keep the hardening from loading below: any
        # error (a snapshot of the wrong shape too) is reported and boot goes on.
        try:
            notes += txn.recover(backend, store, "hostprep boot")
        except Exception as err:  # noqa: BLE001
            failures.append(f"recovering an interrupted change failed: {_line(err)}")
        try:
            p = timers.pending(store)
        except Exception as err:  # noqa: BLE001
            failures.append(_line(err))
            p = None
        if p:
            if p.boot_id != timers.boot_id():
                why = "was not confirmed before the reboot"
            elif time.time() >= p.deadline:
                why = "passed its deadline without 'hostprep confirm' (its timer did not run)"
            else:
                why = None
                notes.append(f"change {p.id} ({p.command}) waits for 'hostprep confirm' until "
                             f"{p.deadline_text}: kept, its timer is armed")
            if why:
                try:
                    txn.rollback(backend, store, runner, "hostprep boot", reason=f"it {why}")
                    notes.append(f"change {p.id} ({p.command}) {why}: rolled back")
                except Exception as err:  # noqa: BLE001
                    failures.append(f"rolling back change {p.id} failed: {_line(err)}")

        policy: Policy | None = None
        record_missing = False
        record: records.AppliedRecord | None = None
        try:
            record = records.load_applied(store)
            record_missing = record is None
            if record is not None:
                policy = record.policy()
        except HostprepError as err:
            record = None       # converge must not read it again
            failures.append(err.line())
            try:
                fw = settings.resolve("boot", settings.Flags(), store).firewall
                if fw is not None:
                    policy = Policy(fw.interface, fw.skip_ddos, fw.allow_private, ())
                    notes.append(f"loading the remembered NIC's base hardening instead ({policy.interface}, "
                                 "no -p sources: ping stays closed)")
            except (HostprepError, AttributeError, TypeError) as serr:
                failures.append(f"no usable remembered NIC either: {getattr(serr, 'problem', serr)}")
        if policy is None:
            if record_missing:
                # Nothing recorded as applied: none of hostprep's rules belongs in the
                # kernel (a copy saved by iptables-services, say, is removed).
                try:
                    outcome = engine.converge(backend, store, None, "hostprep boot", recorded_nft=None)
                    notes.append("nothing is recorded as applied: " + (outcome.summary
                                                                       if outcome.changed else "no rules loaded"))
                except HostprepError as err:
                    failures.append(err.line())
            else:
                failures.append("NOTHING LOADED: neither applied.json nor settings.json names the external NIC")
        else:
            check = nicmod.check_recorded(runner, policy.interface, record, sys_net)
            if check.failed:
                failures.append(check.line())
                store.journal("hostprep boot", f"external NIC {policy.interface}: {check.state}",
                              f"FAILED: {check.line()}")
            elif check.state != "ok":
                notes.append(f"warning: {check.line()}")
            containers, bad = store.containers_tolerant()
            failures += [f"{e}: its ports stay closed" for e in bad]
            desired = render.desired(policy, tuple(containers.values()))
            # The nft table is never dropped because the NIC is absent or another device:
            # it may be hooked on the renamed NIC, which still exists (kernels before 6.x
            # follow the device, newer ones the name).
            keep_nft = False
            if desired.nft is not None and not (sys_net / policy.interface).exists():
                desired = dataclasses.replace(desired, nft=None)
                keep_nft = True
                notes.append(f"external NIC {policy.interface} is not present yet: its rules are loaded (they "
                             f"match it by name); the fragment table follows when it appears "
                             f"(hostprep-nic@{policy.interface})")
            elif desired.nft is not None and check.failed:
                try:
                    live_nft = backend.observe().nft
                except HostprepError:
                    live_nft = None
                if live_nft is not None and live_nft.device != policy.interface \
                        and (sys_net / live_nft.device).exists():
                    desired = dataclasses.replace(desired, nft=None)
                    keep_nft = True
                    notes.append(f"the fragment table stays on {live_nft.device}, where it is hooked; it is not "
                                 f"moved to {policy.interface}, which is another device now")
            base = render.desired(policy, ())
            attempts = [(desired, "")]
            if desired.containers:
                attempts.append((dataclasses.replace(base, nft=desired.nft),
                                 "base hardening only: the containers' ports stay closed"))
            if desired.nft is not None:
                attempts.append((dataclasses.replace(base, nft=None), "base hardening without the fragment table"))
            for want, label in attempts:
                # an attempt without the table (its load failed) leaves the live one as it is
                keep = keep_nft or (want.nft is None and desired.nft is not None)
                try:
                    outcome = engine.converge(backend, store, want, "hostprep boot" + (f" ({label})" if label else ""),
                                              recorded_nft=record.nft if record else None, keep_nft=keep)
                except HostprepError as err:
                    failures.append(f"loading {label or 'the recorded state'} failed: {err.line()}")
                    continue
                notes.append(f"hardening on {policy.interface}: " + (outcome.summary if outcome.changed
                                                                     else "already live")
                             + f" ({plural(len(want.containers), 'container')})" + (f" ({label})" if label else ""))
                break
            else:
                failures.append("NOTHING LOADED: every attempt failed")
            try:
                # a backend switch rolled back leaves the other ban action: the one of this backend
                _ban_action_follows(store, backend, "hostprep boot")
            except (HostprepError, OSError) as err:
                failures.append(f"fail2ban's ban action: {_line(err)}")
    try:
        kstate = sysctl.KernelState(store.paths).load()
        if kstate and kstate.get("applied"):
            with store.lock():
                report = sysctl.apply_kernel(sysctl.Kernel(), store.paths).report
            bad_keys = [r.key for r in report if r.state in ("drift", "overridden")]
            notes.append(f"kernel profile: {sum(1 for r in report if r.state == 'ok')} keys live"
                         + (f", NOT live: {', '.join(bad_keys)}" if bad_keys else ""))
    except HostprepError as err:
        failures.append(f"kernel profile: {err.line()}")
    return BootResult(notes, failures)


def _line(err: Exception) -> str:
    return err.line() if isinstance(err, HostprepError) else f"{type(err).__name__}: {err}"
