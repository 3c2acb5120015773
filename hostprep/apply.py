"""The only code that changes the host: plan, test, load per family, verify, record.

Order of one apply:
  1. observe both families and the nft table; plan (pure); nothing to do -> stop;
  2. test every transaction first (``iptables-restore --test``, ``nft -c``);
  3. load IPv4, then IPv6, then the nft ingress table, each one atomic; if a
     later one fails, the earlier ones are put back as they were (snapshot);
  4. observe again and re-plan: anything left to do means the kernel did not take
     what was loaded -> error;
  5. record the settings and what was applied, then one journal line.

Each public entry point (apply, flush, container_up/down) runs inside
``txn.change``: the lock, the snapshot of the state before (what ``hostprep
rollback`` and ``--confirm`` restore), the in-flight marker that a kill -9
leaves behind, and the restore when anything above raises, including a record
that cannot be written.  ``boot`` is what the systemd units run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hostprep import faults
from hostprep import plan as planmod
from hostprep import render
from hostprep import txn
from hostprep.backend import Backend, NftObserved
from hostprep.errors import CommandFailed, HostprepError, InputError, StateError
from hostprep.model import CONTAINER_DISPATCH, Container, Desired, PingSource, Policy
from hostprep.paths import Paths
from hostprep.plan import FamilyPlan, Observed
from hostprep.runner import Runner
from hostprep.state import Store, now

import ipaddress


@dataclass(frozen=True)
class NftPlan:
    action: str          # "none", "load" or "delete"
    reason: str = ""


@dataclass(frozen=True)
class Snapshot:
    observed: dict[int, Observed]
    nft: NftObserved | None
    sets: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyPlan:
    desired: Desired | None            # None: flush
    families: dict[int, FamilyPlan]
    texts: dict[int, str]
    nft: NftPlan
    snapshot: Snapshot
    sets: planmod.SetPlan = planmod.SetPlan()

    @property
    def empty(self) -> bool:
        return all(p.empty for p in self.families.values()) and self.nft.action == "none" and self.sets.empty

    def notes(self) -> list[str]:
        """The differences this plan removes (what --dry-run's "plan:" and status list)."""
        out = self.sets.notes()
        out += [f"IPv{fam}: {n}" for fam, p in self.families.items() for n in p.notes]
        if self.nft.action != "none":
            out.append(f"nft netdev hostprep: {self.nft.action} ({self.nft.reason})")
        return out

    def actions(self) -> list[str]:
        """What carrying out this plan does, one item each, as done ("added chain HOSTPREP-IN
        (3 rules)", "removed 43 rules in 11 chains"): the words of apply, flush and the journal."""
        out: list[str] = []
        for fam, p in self.families.items():
            out += [f"IPv{fam}: {a}" for a in _family_actions(p, self.desired.ruleset(fam) if self.desired else None,
                                                            self.snapshot.observed.get(fam))]
        out += [f"created ipset {s.name} ({_n(len(s.members), 'member')})" for s in self.sets.create]
        out += [f"replaced the members of ipset {s.name} ({_n(len(s.members), 'member')})"
                for s in self.sets.replace]
        out += [f"destroyed ipset {n}" for n in self.sets.destroy]
        if self.nft.action == "load":
            dev = self.desired.nft.device if self.desired and self.desired.nft else "?"
            out.append(f"loaded the nft ingress table on {dev}" + ("" if self.nft.reason == "table missing"
                                                                   else f" ({self.nft.reason})"))
        elif self.nft.action == "delete":
            dev = self.snapshot.nft.device if self.snapshot.nft else "?"
            out.append(f"removed the nft ingress table on {dev}")
        return out

    def summary(self) -> str:
        """All of ``actions()`` in one line: "removed 90 rules in 22 chains, 6 jumps, 2 ipsets, ..."."""
        added = removed = chains_added = chains_removed = 0
        for fam, p in self.families.items():
            want = self.desired.ruleset(fam) if self.desired else None
            live = self.snapshot.observed.get(fam)
            for c in p.reload_chains:
                added += len(want.chain(c).rules) if want and want.chain(c) else 0
                if live is not None and c in live.our_chains:
                    removed += len(live.chain_specs(c))
                else:
                    chains_added += 1
            for c in p.delete_chains:
                removed += len(live.chain_specs(c)) if live is not None else 0
                chains_removed += 1
        jumps_added = sum(len(p.insert_jumps) for p in self.families.values())
        jumps_removed = sum(len(p.delete_jumps) for p in self.families.values())
        plus, minus = [], []
        if added or chains_added:
            plus.append(_n(added, "rule") + (f" in {_n(chains_added, 'new chain')}" if chains_added else ""))
        if removed or chains_removed:
            minus.append(_n(removed, "rule") + (f" in {_n(chains_removed, 'chain')}" if chains_removed else ""))
        if jumps_added:
            plus.append(_n(jumps_added, "jump"))
        if jumps_removed:
            minus.append(_n(jumps_removed, "jump"))
        if self.sets.create:
            plus.append(_n(len(self.sets.create), "ipset"))
        if self.sets.destroy:
            minus.append(_n(len(self.sets.destroy), "ipset"))
        if self.nft.action == "load":
            plus.append("the nft ingress table")
        elif self.nft.action == "delete":
            minus.append("the nft ingress table")
        parts = ([f"added {_and(plus)}"] if plus else []) + ([f"removed {_and(minus)}"] if minus else []) \
            + ([f"replaced the members of {_n(len(self.sets.replace), 'ipset')}"] if self.sets.replace else [])
        return "; ".join(parts) or "nothing changed"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _n(count: int, word: str) -> str:
    return f"{count} {word if count == 1 else word + 's'}"


# More chains than this added (or replaced) at once are reported in one line.
_LIST_CHAINS = 3


def _family_actions(p: FamilyPlan, want, live: Observed | None) -> list[str]:
    """One family's part of ApplyPlan.actions()."""
    out: list[str] = []
    ours = set(live.our_chains) if live is not None else set()

    def rules(name: str) -> int:
        chain = want.chain(name) if want is not None else None
        return len(chain.rules) if chain is not None else 0

    for verb, names in (("added", [c for c in p.reload_chains if c not in ours]),
                        ("replaced", [c for c in p.reload_chains if c in ours])):
        if len(names) > _LIST_CHAINS:
            out.append(f"{verb} {_n(len(names), 'chain')} ({_n(sum(rules(c) for c in names), 'rule')})")
        else:
            out += [f"{verb} chain {c} ({_n(rules(c), 'rule')})" for c in names]
    if p.delete_chains:
        gone = sum(len(live.chain_specs(c)) for c in p.delete_chains) if live is not None else 0
        if len(p.delete_chains) == 1:
            out.append(f"removed chain {p.delete_chains[0]} ({_n(gone, 'rule')})")
        else:
            out.append(f"removed {_n(gone, 'rule')} in {_n(len(p.delete_chains), 'chain')}")
    inserted = list(dict.fromkeys(j.chain for j in p.insert_jumps))
    deleted = list(dict.fromkeys(r.chain for r in p.delete_jumps))
    again = [c for c in inserted if c in deleted]
    if again:
        out.append(f"put the jumps from {', '.join(again)} first again")
    if [c for c in inserted if c not in again]:
        out.append(f"added the jumps from {', '.join(c for c in inserted if c not in again)}")
    if [c for c in deleted if c not in again]:
        out.append(f"removed the jumps from {', '.join(c for c in deleted if c not in again)}")
    return out


def observe(backend: Backend) -> Snapshot:
    """The live state of every family the kernel has (IPv6 may be disabled at boot)."""
    return Snapshot({fam: backend.observe(fam) for fam in backend.families()}, backend.nft_observe(),
                    backend.ipset_observe())


def plan_nft(desired: Desired | None, live: NftObserved | None, record: dict | None, *,
             keep: bool = False) -> NftPlan:
    """``keep``: the live table stays whatever it is (boot, while the external NIC is absent or
    another device: the table may be hooked on the renamed NIC, which still exists)."""
    if keep:
        return NftPlan("none")
    want = desired.nft if desired else None
    if want is None:
        return NftPlan("delete", "not wanted") if live is not None else NftPlan("none")
    if live is None:
        return NftPlan("load", "table missing")
    rec = (record or {}).get("nft") or {}
    if live.device != want.device:
        return NftPlan("load", f"hooked on {live.device}, wanted on {want.device}")
    if rec.get("script") != want.script:
        return NftPlan("load", "rules changed")
    if rec.get("live") != live.text:
        return NftPlan("load", "live table differs from the recorded one")
    return NftPlan("none")


def make_plan(backend: Backend, desired: Desired | None, record: dict | None,
              snapshot: Snapshot | None = None, *, keep_nft: bool = False) -> ApplyPlan:
    snap = snapshot or observe(backend)
    families: dict[int, FamilyPlan] = {}
    texts: dict[int, str] = {}
    for fam in snap.observed:
        want = desired.ruleset(fam) if desired else None
        families[fam] = planmod.plan_family(want, snap.observed[fam])
        texts[fam] = planmod.restore_text(families[fam], want)
    sets = planmod.plan_sets(planmod.wanted_sets(desired), snap.sets)
    return ApplyPlan(desired, families, texts, plan_nft(desired, snap.nft, record, keep=keep_nft), snap, sets)


def _rollback(backend: Backend, snap: Snapshot, families: list[int], nft_touched: bool) -> list[str]:
    """Put back what was loaded before a later step failed. Returns what failed to roll back."""
    failed: list[str] = []
    for fam in families:
        try:
            before = planmod.ruleset_from_observed(snap.observed[fam])
            back = planmod.plan_family(before, backend.observe(fam))
            if not back.empty:
                backend.load(fam, planmod.restore_text(back, before))
        except HostprepError as err:
            failed.append(f"IPv{fam}: {err}")
    if nft_touched:
        try:
            if snap.nft is None:
                if backend.nft_observe() is not None:
                    backend.nft_delete()
            # A table that existed before was replaced atomically by a script that
            # failed as a whole, so the kernel still holds the old one.
        except HostprepError as err:
            failed.append(f"nft: {err}")
    return failed


@dataclass
class Executed:
    """What one execute() changed, so that it can be finished or undone."""

    created: list[str] = field(default_factory=list)   # ipsets created
    temps: list[str] = field(default_factory=list)     # NAME-n sets holding the other contents
    swapped: bool = False
    loaded: list[int] = field(default_factory=list)    # families loaded
    nft_touched: bool = False


def undo(backend: Backend, plan: ApplyPlan, ex: Executed) -> list[str]:
    """Bring the kernel back to the snapshot the plan was made from; returns what failed."""
    failed = _rollback(backend, plan.snapshot, ex.loaded, ex.nft_touched)
    if ex.swapped:
        try:
            backend.ipset_restore(planmod.ipset_swap_script(plan.sets.replace))
        except HostprepError as serr:
            failed.append(f"ipset: {serr}")
    for name in ex.created + ex.temps:
        backend.ipset_destroy(name)
    return failed


def finish(backend: Backend, plan: ApplyPlan, ex: Executed) -> list[str]:
    """After a verified load: destroy the temporary and the stale sets. Returns warnings."""
    warnings = []
    for name in ex.temps + list(plan.sets.destroy):
        if not backend.ipset_destroy(name):
            warnings.append(f"ipset {name} could not be destroyed (still referenced?)")
    return warnings


def execute(backend: Backend, plan: ApplyPlan) -> Executed:
    """Test, then load family by family; both families (and nft, and the sets) or none.

    ipsets come first (the rules refer to them): missing sets are created, sets
    whose members changed are filled into NAME-n; then every iptables transaction
    is tested; then the changed sets are swapped in and the families loaded.  On
    failure everything done so far is undone.  The caller verifies, then calls
    finish() (stale sets destroyed) or undo().
    """
    sp = plan.sets
    ex = Executed(temps=[s.name + planmod.TEMP_SUFFIX for s in sp.replace])
    try:
        if sp.create:
            ex.created = [s.name for s in sp.create]
            backend.ipset_restore(planmod.ipset_fill_script(sp.create))
        if sp.replace:
            backend.ipset_restore(planmod.ipset_fill_script(sp.replace, planmod.TEMP_SUFFIX))
        for fam, fplan in plan.families.items():
            if not fplan.empty:
                backend.test(fam, plan.texts[fam])
        if plan.nft.action == "load":
            assert plan.desired is not None and plan.desired.nft is not None
            backend.nft_check(plan.desired.nft.script)
    except HostprepError:
        for name in ex.created + ex.temps:
            backend.ipset_destroy(name)
        raise
    faults.hit("before-load")
    try:
        if sp.replace:
            backend.ipset_restore(planmod.ipset_swap_script(sp.replace))
            ex.swapped = True
        for fam, fplan in plan.families.items():
            if not fplan.empty:
                if ex.loaded:
                    faults.hit("between-families")
                ex.loaded.append(fam)
                backend.load(fam, plan.texts[fam])
        if plan.nft.action != "none":
            ex.nft_touched = True
            if plan.nft.action == "load":
                assert plan.desired is not None and plan.desired.nft is not None
                backend.nft_load(plan.desired.nft.script)
            else:
                backend.nft_delete()
    except HostprepError as err:
        failed = undo(backend, plan, ex)
        state = "the previous rules are back" if not failed else "ROLLBACK FAILED: " + "; ".join(failed)
        raise CommandFailed(err.field, f"{err.problem}; {state}", err.fix or
                            "nothing of this apply stayed loaded; fix the cause and run again") from None
    return ex


def verify(backend: Backend, desired: Desired | None, *, keep_nft: bool = False) -> tuple[Snapshot, list[str]]:
    snap = observe(backend)
    leftover = make_plan(backend, desired, None, snap, keep_nft=keep_nft)
    # Sets no rule wants any more (and the NAME-n temporaries) are destroyed by
    # finish() after this check; only missing or differing wanted sets count.
    wanted_sets = planmod.SetPlan(leftover.sets.create, leftover.sets.replace)
    problems = [n for fam, p in leftover.families.items() for n in p.notes] + wanted_sets.notes()
    if keep_nft:
        return snap, problems
    if desired and desired.nft and (snap.nft is None or snap.nft.device != desired.nft.device):
        problems.append("nft ingress table missing after load")
    if desired is None or desired.nft is None:
        if snap.nft is not None:
            problems.append("nft ingress table still present")
    return snap, problems


def record_dict(desired: Desired, snap: Snapshot, variant: str, nic: dict | None = None) -> dict:
    """``nic``: the identity of the external NIC at apply (nic.NicIdentity.as_dict(); None: unknown)."""
    pol = desired.policy
    return {
        "time": now(),
        "backend": variant,
        "settings": pol.to_settings(),
        "ping_resolved": [{"given": s.given, "networks": [str(n) for n in s.networks]} for s in pol.ping],
        "rules": {str(fam): [r.line() for c in desired.ruleset(fam).chains for r in c.rules]
                  + [j.line() for j in desired.ruleset(fam).jumps] for fam in (4, 6)},
        "nft": ({"script": desired.nft.script, "live": snap.nft.text if snap.nft else None}
                if desired.nft else None),
        "nic": nic,
    }


def policy_from_record(record: dict) -> Policy:
    try:
        s = record["settings"]
        ping = tuple(PingSource(p["given"], tuple(ipaddress.ip_network(n) for n in p["networks"]))
                     for p in record.get("ping_resolved", []))
        return Policy(s["interface"], bool(s.get("skip_ddos")), bool(s.get("allow_private")), ping)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StateError("applied.json", f"malformed record of the last apply ({type(err).__name__}: {err})",
                         "run 'hostprep apply -i <external NIC>' to write it again") from None


@dataclass
class Outcome:
    changed: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    before: Snapshot | None = None
    after: Snapshot | None = None
    summary: str = ""            # the actions in one line


_READ = object()


def converge(backend: Backend, store: Store, desired: Desired | None, command: str,
             record: dict | None | object = _READ, *, keep_nft: bool = False) -> Outcome:
    """Bring hostprep's part of the kernel to ``desired`` (None: remove it all), verify, journal.

    The one path every command that changes rules goes through (apply, flush,
    container up/down).  The caller records its own state after this returns.
    ``record``: the last apply's record (read from the store unless given; boot
    passes None when applied.json is unusable).  ``keep_nft``: the live nft table is left as it
    is (boot, when the external NIC is absent or another device).
    """
    if record is _READ:
        record = store.applied()
    plan = make_plan(backend, desired, record, keep_nft=keep_nft)
    if plan.empty:
        store.journal(command, "nothing changed", "ok")
        return Outcome(False, [], [], plan.snapshot, plan.snapshot)
    try:
        ex = execute(backend, plan)
    except HostprepError as err:
        store.journal(command, "; ".join(plan.actions()), f"failed: {err.line()}")
        err.journalled = True
        raise
    snap, problems = verify(backend, desired, keep_nft=keep_nft)
    if problems:
        # The kernel did not take what was loaded: put the previous state back
        # rather than leave an unrecorded half of it.
        failed = undo(backend, plan, ex)
        state = "the previous rules are back" if not failed else "ROLLBACK FAILED: " + "; ".join(failed)
        store.journal(command, "; ".join(plan.actions()), "verify failed: " + "; ".join(problems) + f"; {state}")
        failed_verify = CommandFailed("verify", "the kernel does not hold what was loaded: " + "; ".join(problems)
                                      + f"; {state}", "run 'hostprep status' and report this")
        failed_verify.journalled = True
        raise failed_verify
    warnings = finish(backend, plan, ex)
    faults.hit("before-record")
    store.journal(command, "; ".join(plan.actions()), "ok")
    return Outcome(True, plan.actions(), warnings, plan.snapshot, snap, plan.summary())


def apply(backend: Backend, store: Store, desired: Desired, command: str, *, record_nic: bool = True) -> Outcome:
    """``record_nic``: record the external NIC's identity as it is now (apply); False keeps the
    recorded one (container up/down must not bless a NIC that was swapped meanwhile)."""
    with txn.change(backend, store, command) as ch:
        outcome = _apply_locked(backend, store, desired, command, record_nic=record_nic)
        if ch is not None:
            ch.changed = outcome.changed
        return outcome


def _apply_locked(backend: Backend, store: Store, desired: Desired, command: str, *,
                  record_nic: bool = True) -> Outcome:
    from hostprep import nic as nicmod
    outcome = converge(backend, store, desired, command)
    record = store.applied()
    if record_nic:
        ident = nicmod.identity_of(desired.policy.interface, backend.runner)
        nic = ident.as_dict() if ident else None
    else:
        same = ((record or {}).get("settings") or {}).get("interface") == desired.policy.interface
        nic = (record or {}).get("nic") if same else None
    if outcome.changed or record is None or record.get("settings") != desired.policy.to_settings() \
            or record.get("rules") != record_dict(desired, outcome.after, backend.variant)["rules"] \
            or record.get("nic") != nic:
        store.save_applied(record_dict(desired, outcome.after, backend.variant, nic))
        store.save_settings(desired.policy.to_settings())
    if outcome.changed or record is None:
        # the kernel's cumulative drop counters now: status warns of a bound reached since (issue 12)
        from hostprep import attack
        attack.save_baseline(store.paths.state_file.parent, backend.proc)
    return outcome


def flush(backend: Backend, store: Store, command: str) -> Outcome:
    """Remove every hostprep rule, set and table.  Settings and the container registry stay."""
    with txn.change(backend, store, command) as ch:
        outcome = converge(backend, store, None, command)
        store.clear_applied()
        if ch is not None:
            ch.changed = outcome.changed
        return outcome


# -- containers -------------------------------------------------------------

def applied_policy(store: Store) -> Policy:
    record = store.applied()
    if record is None:
        raise InputError("external NIC", "External Interface is empty: the base hardening is not applied",
                         "run 'hostprep apply -i <external NIC>' first")
    return policy_from_record(record)


def container_lines(desired: Desired | Snapshot, c: Container) -> list[str]:
    """The iptables-save lines of one container (its dispatch rule and its chain), per family."""
    if isinstance(desired, Desired):
        rs = desired.ruleset(c.family)
        rules = [r.line() for ch in rs.chains if ch.name in (CONTAINER_DISPATCH, c.chain)
                 for r in ch.rules if ch.name == c.chain or r.target == c.chain]
    else:
        obs = desired.observed.get(c.family)
        rules = [] if obs is None else [
            f"-A {r.chain} {r.spec}" for r in obs.rules
            if r.chain == c.chain or (r.chain == CONTAINER_DISPATCH and planmod.target_of(r.spec) == c.chain)]
    return rules


def check_conflicts(c: Container, others: dict[str, Container]) -> None:
    if not c.hardening:
        return
    for o in others.values():
        if o.hardening and o.dest == c.dest and set(o.ports) & set(c.ports):
            shared = ", ".join(str(p) for p in sorted(set(o.ports) & set(c.ports)))
            raise InputError(c.name, f"port {shared} on {c.dest} is already opened for container {o.name}",
                             "every host+port pair must be unique: use another PROXY_BINDING_IP or port")


def container_up(backend: Backend, store: Store, c: Container,
                 command: str) -> tuple[Outcome, list[str], list[str], list[str]]:
    """Open (or replace) one container's rules; returns (outcome, added, removed, kept lines)."""
    with txn.change(backend, store, command):
        return _container_up_locked(backend, store, c, command)


def container_desired(store: Store, c: Container) -> tuple[Desired, Container | None]:
    """The whole desired state with ``c`` up (conflicts refused), and its recorded version."""
    policy = applied_policy(store)
    registry = store.containers()
    others = {n: o for n, o in registry.items() if n != c.name}
    check_conflicts(c, others)
    return render.desired(policy, tuple(others.values()) + (c,)), registry.get(c.name)


def container_diff(before_snap: Snapshot, desired: Desired, previous: Container | None,
                   c: Container) -> tuple[list[str], list[str], list[str]]:
    """(added, removed, kept) iptables-save lines of one container."""
    before = container_lines(before_snap, previous) if previous else []
    after = container_lines(desired, c)
    # A rule is kept only within one family: moved from IPv4 to IPv6, every rule
    # is removed from one table and added to the other, even where the text reads the same.
    same = previous is not None and previous.family == c.family
    added = [ln for ln in after if not (same and ln in before)]
    removed = [ln for ln in before if not (same and ln in after)]
    kept = [ln for ln in after if same and ln in before]
    return added, removed, kept


def container_up_plan(backend: Backend, store: Store, c: Container) -> tuple[ApplyPlan, list[str], list[str]]:
    """What ``container up`` would do (for --dry-run): the plan, and the lines added and removed."""
    desired, previous = container_desired(store, c)
    plan = make_plan(backend, desired, store.applied())
    added, removed, _ = container_diff(plan.snapshot, desired, previous, c)
    return plan, added, removed


def _container_up_locked(backend: Backend, store: Store, c: Container,
                         command: str) -> tuple[Outcome, list[str], list[str], list[str]]:
    desired, previous = container_desired(store, c)
    outcome = apply(backend, store, desired, command, record_nic=False)
    store.save_container(c)
    added, removed, kept = container_diff(outcome.before, desired, previous, c)
    return outcome, added, removed, kept


def container_down(backend: Backend, store: Store, name: str, command: str) -> tuple[Outcome, list[str]]:
    with txn.change(backend, store, command):
        return _container_down_locked(backend, store, name, command)


def _container_down_locked(backend: Backend, store: Store, name: str,
                           command: str) -> tuple[Outcome, list[str]]:
    registry = store.containers()
    if name not in registry:
        raise InputError(name, "no such container is up", "see 'hostprep container list'")
    policy = applied_policy(store)
    c = registry[name]
    desired = render.desired(policy, tuple(o for n, o in registry.items() if n != name))
    outcome = apply(backend, store, desired, command, record_nic=False)
    store.remove_container(name)
    return outcome, container_lines(outcome.before, c)


# -- boot -------------------------------------------------------------------------

def boot(backend: Backend, store: Store, runner: Runner,
         sys_net: Path = Path("/sys/class/net")) -> tuple[list[str], list[str]]:
    """What hostprep.service (and hostprep-nic@, and the iptables drop-ins) run.

    Returns (notes, failures).  It fails closed: whatever cannot be read or
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
    3a. the external NIC must be the device recorded at apply (nic_check, after
       udev settled): missing, renamed or another device is a failure (exit 1,
       journalled); the rules are loaded for the name all the same, and the
       nft table is left as it is while the NIC is absent or another device
       (it may be hooked on the renamed NIC);
    4. the kernel profile, when recorded, is written and read back again.
    """
    import dataclasses
    import time
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
            p = txn.pending(store)
        except Exception as err:  # noqa: BLE001
            failures.append(_line(err))
            p = None
        if p:
            if p.get("boot_id") != txn.boot_id():
                why = "was not confirmed before the reboot"
            elif time.time() >= p["deadline"]:
                why = "passed its deadline without 'hostprep confirm' (its timer did not run)"
            else:
                why = None
                notes.append(f"change {p['id']} ({p['command']}) waits for 'hostprep confirm' until "
                             f"{p['deadline_text']}: kept, its timer is armed")
            if why:
                try:
                    txn.rollback(backend, store, runner, "hostprep boot", reason=f"it {why}")
                    notes.append(f"change {p['id']} ({p['command']}) {why}: rolled back")
                except Exception as err:  # noqa: BLE001
                    failures.append(f"rolling back change {p['id']} failed: {_line(err)}")

        policy: Policy | None = None
        record_missing = False
        record: dict | None = None
        try:
            record = store.applied()
            record_missing = record is None
            if record is not None:
                policy = policy_from_record(record)
        except HostprepError as err:
            record = None       # converge must not read it again
            failures.append(err.line())
            try:
                s = store.settings() or {}
                if s.get("interface"):
                    policy = Policy(s["interface"], bool(s.get("skip_ddos")), bool(s.get("allow_private")), ())
                    notes.append(f"loading the remembered NIC's base hardening instead ({policy.interface}, "
                                 "no -p sources: ping stays closed)")
            except (HostprepError, AttributeError, TypeError) as serr:
                failures.append(f"no usable remembered NIC either: {getattr(serr, 'problem', serr)}")
        if policy is None:
            if record_missing:
                # Nothing recorded as applied: none of hostprep's rules belongs in the
                # kernel (a copy saved by iptables-services, say, is removed).
                try:
                    outcome = converge(backend, store, None, "hostprep boot", record=None)
                    notes.append("nothing is recorded as applied: " + (outcome.summary
                                                                       if outcome.changed else "no rules loaded"))
                except HostprepError as err:
                    failures.append(err.line())
            else:
                failures.append("NOTHING LOADED: neither applied.json nor settings.json names the external NIC")
        else:
            check = nic_check(runner, policy.interface, record, sys_net)
            if check.failed:
                failures.append(check.line())
                store.journal("hostprep boot", f"external NIC {policy.interface}: {check.state}",
                              f"FAILED: {check.line()}")
            elif check.state != "ok":
                notes.append(f"warning: {check.line()}")
            containers, bad = store.containers_tolerant()
            failures += [f"{e}: its ports stay closed" for e in bad]
            desired = build_desired(policy, tuple(containers.values()))
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
                    live_nft = backend.nft_observe()
                except HostprepError:
                    live_nft = None
                if live_nft is not None and live_nft.device != policy.interface \
                        and (sys_net / live_nft.device).exists():
                    desired = dataclasses.replace(desired, nft=None)
                    keep_nft = True
                    notes.append(f"the fragment table stays on {live_nft.device}, where it is hooked; it is not "
                                 f"moved to {policy.interface}, which is another device now")
            base = build_desired(policy, ())
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
                    outcome = converge(backend, store, want, "hostprep boot" + (f" ({label})" if label else ""),
                                       record=record, keep_nft=keep)
                except HostprepError as err:
                    failures.append(f"loading {label or 'the recorded state'} failed: {err.line()}")
                    continue
                notes.append(f"hardening on {policy.interface}: " + (outcome.summary if outcome.changed
                                                                     else "already live")
                             + f" ({_n(len(want.containers), 'container')})" + (f" ({label})" if label else ""))
                break
            else:
                failures.append("NOTHING LOADED: every attempt failed")
    try:
        from hostprep import sysctl
        kstate = sysctl.KernelState(store.paths).load()
        if kstate and kstate.get("applied"):
            with store.lock():
                report, _ = sysctl.apply_kernel(sysctl.Kernel(), store.paths)
            bad_keys = [r.key for r in report if r.state in ("drift", "overridden")]
            notes.append(f"kernel profile: {sum(1 for r in report if r.state == 'ok')} keys live"
                         + (f", NOT live: {', '.join(bad_keys)}" if bad_keys else ""))
    except HostprepError as err:
        failures.append(f"kernel profile: {err.line()}")
    return notes, failures


def nic_check(runner: Runner, interface: str, record: dict | None, sys_net: Path = Path("/sys/class/net"), *,
              settle: bool = True):
    """The external NIC against the identity recorded at apply (nic.NicCheck).

    Anything but a match is checked again once udev has settled (at boot the
    kernel's names may not be the final ones yet); status (``settle=False``) does not wait.
    """
    from hostprep import nic as nicmod
    rec = record or {}
    same = (rec.get("settings") or {}).get("interface") == interface
    recorded = nicmod.NicIdentity.from_record(rec.get("nic")) if same else None
    check = nicmod.check_identity(interface, recorded, nicmod.link_identities(runner, sys_net))
    if settle and check.state not in ("ok", "unrecorded") and nicmod.settle_udev(runner):
        check = nicmod.check_identity(interface, recorded, nicmod.link_identities(runner, sys_net))
    return check


def _line(err: Exception) -> str:
    return err.line() if isinstance(err, HostprepError) else f"{type(err).__name__}: {err}"


def untracked_connections(nic_addrs: list[str], proc: Path = Path("/proc")) -> int:
    """Established TCP connections to the NIC's addresses that conntrack is not tracking.

    A namespace where nothing used conntrack yet classifies the first packet of
    an old connection as NEW (mid-stream pickup), and "NEW without SYN" then cuts
    it.  Returns how many connections are at risk (0 when conntrack tracks).
    """
    try:
        count = int((proc / "sys/net/netfilter/nf_conntrack_count").read_text())
    except (OSError, ValueError):
        count = 0
    addrs = {a.split("/")[0] for a in nic_addrs}
    try:
        conns = [c for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.ip in addrs]
    except (psutil.Error, OSError):
        return 0
    return len(conns) if count == 0 else 0


def build_desired(policy: Policy, containers: tuple[Container, ...] = ()) -> Desired:
    return render.desired(policy, containers)


def default_backend(runner: Runner, variant: str | None) -> Backend:
    from hostprep.backend import detect_variant
    return Backend(runner, detect_variant(runner, variant))


def paths() -> Paths:
    return Paths.from_env()


def is_root() -> bool:
    return os.geteuid() == 0
