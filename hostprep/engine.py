"""The engine: observe, plan, test, load, read back, undo; one converge for every change.

``converge`` brings hostprep's part of the kernel to a desired state:

  1. observe every family, the sets and the nft table; plan (pure, plan.py);
     nothing to do -> journal "nothing changed" and stop;
  2. test every transaction first (``iptables-restore --test``, ``nft -c``);
  3. load IPv4, then IPv6, then the nft ingress table, each one atomic; if a
     later one fails, the earlier ones are put back as they were;
  4. observe again and re-plan: anything left to do means the kernel did not take
     what was loaded -> undo, error;
  5. destroy the stale sets; one journal line.

The engine depends on nothing above it: no lock, no snapshot file, no record.
``ops`` opens the change (txn) around it and records what was applied; ``txn``
restores a snapshot through ``load_verified`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hostprep import faults
from hostprep import plan as planmod
from hostprep.backend import FirewallBackend, Staged
from hostprep.errors import CommandFailed, HostprepError
from hostprep.model import Desired
from hostprep.observed import LiveState
from hostprep.plan import ApplyPlan, NftRecord
from hostprep.state import Store


def make_plan(backend: FirewallBackend, desired: Desired | None, recorded_nft: NftRecord | None,
              live: LiveState | None = None, *, keep_nft: bool = False) -> ApplyPlan:
    """The plan from ``live`` (observed now when not given) to ``desired``; ``recorded_nft``: the nft
    table as the last apply recorded it."""
    return planmod.plan_change(backend.target(desired), live or backend.observe(), recorded_nft, keep_nft=keep_nft)


def execute(backend: FirewallBackend, plan: ApplyPlan) -> Staged:
    """Test, then load: both families, the sets and the nft table, or none of them.

    A failed test changes nothing; a failed load is undone by the backend and
    raises.  The caller verifies, then has the backend finish() or undo().
    """
    staged = backend.test(plan)
    faults.hit("before-load")
    backend.load(plan, staged)
    return staged


def verify(backend: FirewallBackend, desired: Desired | None, *, keep_nft: bool = False) -> tuple[LiveState, list[str]]:
    snap = backend.observe()
    desired = backend.target(desired)
    leftover = make_plan(backend, desired, None, snap, keep_nft=keep_nft)
    # Sets no rule wants any more (and the NAME-n temporaries) are destroyed by
    # finish() after this check; only missing or differing wanted sets count.
    wanted_sets = planmod.SetPlan(leftover.sets.create, leftover.sets.replace)
    problems = [n for fam, p in leftover.families.items() for n in p.notes] + wanted_sets.notes()
    if faults.differs("read-back"):
        problems.append("injected difference at read-back (HOSTPREP_FAULT)")
    if keep_nft:
        return snap, problems
    if desired and desired.nft and (snap.nft is None or snap.nft.device != desired.nft.device):
        problems.append("nft ingress table missing after load")
    if desired is None or desired.nft is None:
        if snap.nft is not None:
            problems.append("nft ingress table still present")
    return snap, problems


@dataclass
class Verified:
    """What ``load_verified`` did: the state read back, and what differed (empty: the kernel holds it)."""

    plan: ApplyPlan
    staged: Staged
    after: LiveState
    problems: list[str]
    undo_failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def undo_state(self) -> str:
        return "the previous rules are back" if not self.undo_failed else \
            "ROLLBACK FAILED: " + "; ".join(self.undo_failed)


def load_verified(backend: FirewallBackend, plan: ApplyPlan, desired: Desired | None, *,
                  keep_nft: bool = False) -> Verified:
    """execute(), read back; what differs is undone at once, else the stale sets are destroyed.

    A failed load raises (execute undid it); a load the kernel does not hold is
    returned with its ``problems`` (undone), for the caller to word its error.
    """
    ex = execute(backend, plan)
    after, problems = verify(backend, desired, keep_nft=keep_nft)
    if problems:
        # The kernel did not take what was loaded: put the previous state back
        # rather than leave an unrecorded half of it.
        return Verified(plan, ex, after, problems, undo_failed=backend.undo(plan, ex))
    return Verified(plan, ex, after, [], warnings=backend.finish(plan, ex))


@dataclass
class Outcome:
    changed: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    before: LiveState | None = None
    after: LiveState | None = None
    summary: str = ""            # the actions in one line


def converge(backend: FirewallBackend, store: Store, desired: Desired | None, command: str, *,
             recorded_nft: NftRecord | None, keep_nft: bool = False) -> Outcome:
    """Bring hostprep's part of the kernel to ``desired`` (None: remove it all), verify, journal.

    The one path every command that changes rules goes through (apply, flush,
    container up/down, boot).  The caller records its own state after this returns.
    ``recorded_nft``: the nft table as the last apply recorded it (None: not recorded,
    or applied.json unusable).  ``keep_nft``: the live nft table is left as it is
    (boot, when the external NIC is absent or another device).
    """
    holders = holding_others(backend)
    plan = make_plan(backend, desired, recorded_nft, keep_nft=keep_nft)
    if plan.empty and not holders:
        store.journal(command, "nothing changed", "ok")
        return Outcome(False, [], [], plan.live, plan.live)
    try:
        done = load_verified(backend, plan, desired, keep_nft=keep_nft) if not plan.empty else \
            Verified(plan, Staged(), plan.live, [])
    except HostprepError as err:
        store.journal(command, "; ".join(plan.actions()), f"failed: {err.line()}")
        err.journalled = True
        raise
    if done.problems:
        problems = done.problems
        state = done.undo_state
        store.journal(command, "; ".join(plan.actions()), "verify failed: " + "; ".join(problems) + f"; {state}")
        failed_verify = CommandFailed("verify", "the kernel does not hold what was loaded: " + "; ".join(problems)
                                      + f"; {state}", "run 'hostprep status' and report this")
        failed_verify.journalled = True
        raise failed_verify
    actions = plan.actions()
    if holders:
        # A switch: the new backend holds hostprep (loaded and read back above); only now
        # does the old one's part go.  Never both half, never neither; a failure here is
        # undone by the change (txn), which puts the old backend back.
        actions.append(release(backend, holders, store, command))
    faults.hit("before-record")
    store.journal(command, "; ".join(actions), "ok")
    return Outcome(True, actions, done.warnings, plan.live, done.after,
                   plan.summary() + (f"; {actions[-1]}" if holders else ""))


def holding_others(backend: FirewallBackend) -> list[tuple[FirewallBackend, list[str]]]:
    """The other backends that hold a part of hostprep now, with what they hold."""
    out = []
    for other in backend.others():
        part = other.part()
        if part:
            out.append((other, part))
    return out


def release(backend: FirewallBackend, holders: list[tuple[FirewallBackend, list[str]]], store: Store,
            command: str) -> str:
    """The old backends' parts removed, once ``backend`` holds hostprep; read back; the journal's words."""
    for other, _ in holders:
        if not getattr(backend, "releases_in_load", False):
            faults.hit("before-release")        # (the native backend's load has this point itself)
        try:
            other.release()
            left = other.part()
        except HostprepError as err:
            store.journal(command, f"backend {other.name} -> {backend.name}: removing {other.name}'s part",
                          f"failed: {err.line()}")
            raise
        if left:
            store.journal(command, f"backend {other.name} -> {backend.name}: removing {other.name}'s part",
                          "failed: still there: " + "; ".join(left))
            raise CommandFailed("switch", f"{other.name} still holds {'; '.join(left)} after removing it",
                                "run 'hostprep status' and report this")
    names = ", ".join(dict.fromkeys(o.name for o, _ in holders))
    return (f"backend {names} -> {backend.name}: {backend.name} loaded and read back, then removed "
            + "; ".join(p for _, part in holders for p in part))
