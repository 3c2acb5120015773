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
from hostprep.backend import Backend
from hostprep.errors import CommandFailed, HostprepError
from hostprep.model import Desired
from hostprep.observed import LiveState
from hostprep.plan import ApplyPlan
from hostprep.state import Store


def observe(backend: Backend) -> LiveState:
    """The live state of every family the kernel has (IPv6 may be disabled at boot)."""
    return LiveState({fam: backend.observe(fam) for fam in backend.families()}, backend.nft_observe(),
                     backend.ipset_observe())


def make_plan(backend: Backend, desired: Desired | None, record: dict | None,
              live: LiveState | None = None, *, keep_nft: bool = False) -> ApplyPlan:
    """The plan from ``live`` (observed now when not given) to ``desired``."""
    return planmod.plan_change(desired, live or observe(backend), record, keep_nft=keep_nft)


def _rollback(backend: Backend, snap: LiveState, families: list[int], nft_touched: bool) -> list[str]:
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
    """Bring the kernel back to the live state the plan was made from; returns what failed."""
    failed = _rollback(backend, plan.live, ex.loaded, ex.nft_touched)
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


def verify(backend: Backend, desired: Desired | None, *, keep_nft: bool = False) -> tuple[LiveState, list[str]]:
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


@dataclass
class Verified:
    """What ``load_verified`` did: the state read back, and what differed (empty: the kernel holds it)."""

    plan: ApplyPlan
    executed: Executed
    after: LiveState
    problems: list[str]
    undo_failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def undo_state(self) -> str:
        return "the previous rules are back" if not self.undo_failed else \
            "ROLLBACK FAILED: " + "; ".join(self.undo_failed)


def load_verified(backend: Backend, plan: ApplyPlan, desired: Desired | None, *,
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
        return Verified(plan, ex, after, problems, undo_failed=undo(backend, plan, ex))
    return Verified(plan, ex, after, [], warnings=finish(backend, plan, ex))


@dataclass
class Outcome:
    changed: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    before: LiveState | None = None
    after: LiveState | None = None
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
        return Outcome(False, [], [], plan.live, plan.live)
    try:
        done = load_verified(backend, plan, desired, keep_nft=keep_nft)
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
    faults.hit("before-record")
    store.journal(command, "; ".join(plan.actions()), "ok")
    return Outcome(True, plan.actions(), done.warnings, plan.live, done.after, plan.summary())
