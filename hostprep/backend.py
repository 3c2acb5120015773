"""The firewall backends behind one written contract, ``FirewallBackend``.

The engine (engine.py) speaks only this contract; a backend turns a plan
(plan.ApplyPlan: what to change in hostprep's part of the kernel) into the
kernel's own transactions.  ``choose`` picks the backend of a command (asked, remembered,
or auto: nft where ``nft -c`` accepts PROBE_SCRIPT, else iptables) and says why.  A switch
between backends uses ``part``/``release``/``others`` (engine.release, snapshot.holder_of).

``IptablesBackend``: ``iptables-restore --noflush`` of hostprep's own chains,
one atomic transaction per family, its ipsets swapped in, and the nft
``netdev`` ingress table.  RHEL 9's iptables is the nf_tables variant; older or
Debian hosts may use the legacy x_tables one.  ``iptables -V`` tells which
(``(nf_tables)`` or ``(legacy)``); ``--backend``/``HOSTPREP_BACKEND`` overrides
it (the kernel tests run both).  Reading never creates tables: the legacy save
tool creates an empty filter table when asked for one, so
/proc/net/ip*_tables_names is read first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hostprep import faults
from hostprep import plan as planmod
from hostprep.errors import CommandFailed, HostprepError, InputError, NoBackend
from hostprep import render
from hostprep.model import SET_PREFIX, BanSet, Desired, is_ban_set
from hostprep.observed import (LiveState, NftObserved, Observed, merge_ban_table, normalise_nft, parse_ipset_save,
                               parse_nft_json, parse_nft_listing, parse_save)
from hostprep.plan import ApplyPlan
from hostprep.plan import plural as plural_of
from hostprep.runner import Runner

VARIANTS = ("nft", "legacy")

NFT_TABLE = ("netdev", "hostprep")


def _undo_state(failed: list[str]) -> str:
    """How an undo ended, for the error of the load it undid."""
    return "the previous rules are back" if not failed else "ROLLBACK FAILED: " + "; ".join(failed)


def detect_variant(runner: Runner, override: str | None = None) -> str:
    """The iptables variant: ``override`` ("nft"/"legacy"), else what ``iptables -V`` says."""
    if override:
        if override not in VARIANTS:
            raise InputError("--backend", f"{override!r} is not an iptables variant", "use nft or legacy")
        return override
    out = runner.run(["iptables", "-V"]).stdout
    if "nf_tables" in out:
        return "nft"
    if "legacy" in out:
        return "legacy"
    raise CommandFailed("iptables -V", f"cannot tell the variant from {out.strip()!r}",
                        "pass --backend iptables-nft or --backend iptables-legacy")


def installed_variants(runner: Runner, proc: Path = Path("/proc")) -> list["IptablesBackend"]:
    """The iptables variants whose own save and restore tools are installed (iptables-nft-save, ...)."""
    return [IptablesBackend(runner, v, proc) for v in VARIANTS
            if runner.which(f"iptables-{v}-save") and runner.which(f"iptables-{v}-restore")]


@dataclass
class Staged:
    """What a backend staged (``test``) and loaded (``load``) of one plan, so that the
    engine can finish it or undo it."""

    created: list[str] = field(default_factory=list)   # ipsets created
    temps: list[str] = field(default_factory=list)     # NAME-n sets holding the other contents
    swapped: bool = False
    loaded: list[int] = field(default_factory=list)    # families loaded
    nft_touched: bool = False
    previous: str | None = None                        # nft backend: the script that puts back plan.live
    # nft backend: hostprep's iptables part load() removed (the fail-safe included), as
    # (iptables backend, family, Ruleset) each, for undo() to put back after the nft tables
    iptables_removed: list = field(default_factory=list)


class FirewallBackend(Protocol):
    """The contract between the engine and a firewall backend (iptables now, nft next).

    One change is: ``observe`` -> plan (pure, plan.plan_change) -> ``test`` ->
    ``load`` -> ``observe`` again (the engine's verify) -> ``finish``, or ``undo``
    when the kernel does not hold what was loaded.  Removing hostprep's part
    (``hostprep flush``) is loading the plan to nothing, tested, verified and
    undone like any other: a backend has no separate flush path.  ``variant`` is
    what applied.json records as "backend"; ``runner`` runs every command.
    """

    variant: str
    runner: Runner
    proc: Path          # /proc of the network namespace it works in (the kernel's own counters)

    def describe(self) -> str:
        """The backend's name as an error or status line says it ("iptables (nft variant)")."""
        ...

    @property
    def name(self) -> str:
        """The name ``--backend`` and ``status`` use: nft, iptables-nft or iptables-legacy."""
        ...

    def target(self, desired: Desired | None) -> Desired | None:
        """``desired`` (render.desired) in the form this backend loads and observes (idempotent)."""
        ...

    def is_supported(self) -> bool:
        """Whether this host has what the backend needs (its tools); runs nothing that changes the host."""
        ...

    def families(self) -> tuple[int, ...]:
        """The IP families this kernel has: (4, 6), or (4,) when IPv6 is disabled at boot."""
        ...

    def observe(self) -> LiveState:
        """hostprep's part of the kernel as it is now (rules, sets, tables); never creates anything."""
        ...

    def test(self, plan: ApplyPlan) -> Staged:
        """Check every transaction of ``plan`` without changing what filters packets (raises if one fails)."""
        ...

    def load(self, plan: ApplyPlan, staged: Staged) -> None:
        """Carry out the tested ``plan``; if a step fails, the state before is put back and it raises."""
        ...

    def undo(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """Bring the kernel back to ``plan.live`` after a load; returns what could not be put back."""
        ...

    def finish(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """After a verified load, drop what only the load needed (temporary, stale sets); returns warnings."""
        ...

    def other_firewalls(self) -> list[str]:
        """What else on this host judges the same packets (another variant's tables): status warnings."""
        ...

    def part(self) -> list[str]:
        """What of hostprep lives in this backend's own place now (empty: nothing); the shared ingress table is no one's."""
        ...

    def release(self) -> None:
        """Remove this backend's own part once another backend holds hostprep (a switch); the ingress table stays."""
        ...

    def others(self) -> list["FirewallBackend"]:
        """The other backends of this host that may hold a part of hostprep (what a switch releases)."""
        ...


class IptablesBackend:
    """FirewallBackend: iptables-restore per family (nft or legacy variant), ipsets, the nft ingress table.

    The methods below the contract's are its primitives, one command each; tests
    replace them with an in-memory kernel (tests/helpers.FakeKernel).
    """

    owns_sets = True        # part()/release() include the ipsets (shared by both variants: one of them has them)

    def __init__(self, runner: Runner, variant: str, proc: Path = Path("/proc")) -> None:
        self.runner = runner
        self.variant = variant
        self.proc = proc

    # -- the contract (FirewallBackend) ------------------------------------------
    def describe(self) -> str:
        return f"iptables ({self.variant} variant)"

    @property
    def name(self) -> str:
        return f"iptables-{self.variant}"

    def target(self, desired: Desired | None) -> Desired | None:
        """The model's rulesets are iptables-restore lines already."""
        return desired

    def is_supported(self) -> bool:
        """The variant's restore and save tools (or the generic ones) and nft are installed."""
        return all(self.runner.which(self.tool(4, kind)) for kind in ("restore", "save")) \
            and self.runner.which("nft") is not None

    def observe(self) -> LiveState:
        """The live state of every family the kernel has (IPv6 may be disabled at boot)."""
        return LiveState({fam: self.observe_family(fam) for fam in self.families()}, self.nft_observe(),
                         self.ipset_observe())

    def test(self, plan: ApplyPlan) -> Staged:
        """ipsets first (the rules refer to them): missing sets are created, sets whose
        members changed are filled into NAME-n; then every iptables transaction is tested
        (``--test``) and the nft script checked (``nft -c``).  On failure the sets made
        here are destroyed again."""
        sp = plan.sets
        staged = Staged(temps=[s.name + planmod.TEMP_SUFFIX for s in sp.replace])
        try:
            if sp.create:
                staged.created = [s.name for s in sp.create]
                self.ipset_restore(planmod.ipset_fill_script(sp.create))
            if sp.replace:
                self.ipset_restore(planmod.ipset_fill_script(sp.replace, planmod.TEMP_SUFFIX))
            for fam, fplan in plan.families.items():
                if not fplan.empty:
                    self.restore_test(fam, plan.texts[fam])
            if plan.nft.action == "load":
                assert plan.desired is not None and plan.desired.nft is not None
                self.nft_check(plan.desired.nft.script)
        except HostprepError:
            for name in staged.created + staged.temps:
                self.ipset_destroy(name)
            raise
        return staged

    def load(self, plan: ApplyPlan, staged: Staged) -> None:
        """The changed sets swapped in, then each family loaded (one atomic restore each), then
        the nft table; a failure undoes everything done so far and raises."""
        sp = plan.sets
        try:
            if sp.replace:
                self.ipset_restore(planmod.ipset_swap_script(sp.replace))
                staged.swapped = True
            for fam, fplan in plan.families.items():
                if not fplan.empty:
                    if staged.loaded:
                        faults.hit("between-families")
                    staged.loaded.append(fam)
                    self.restore(fam, plan.texts[fam])
            if plan.nft.action != "none":
                staged.nft_touched = True
                if plan.nft.action == "load":
                    assert plan.desired is not None and plan.desired.nft is not None
                    self.nft_load(plan.desired.nft.script)
                else:
                    self.nft_delete()
        except HostprepError as err:
            failed = self.undo(plan, staged)
            state = "the previous rules are back" if not failed else "ROLLBACK FAILED: " + "; ".join(failed)
            raise CommandFailed(err.field, f"{err.problem}; {state}", err.fix or
                                "nothing of this apply stayed loaded; fix the cause and run again") from None

    def undo(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """Each loaded family back to its rules in ``plan.live``, a new nft table deleted, the sets
        swapped back; the sets made for the load destroyed."""
        failed = self._put_back(plan.live, staged.loaded, staged.nft_touched)
        if staged.swapped:
            try:
                self.ipset_restore(planmod.ipset_swap_script(plan.sets.replace))
            except HostprepError as serr:
                failed.append(f"ipset: {serr}")
        for name in staged.created + staged.temps:
            self.ipset_destroy(name)
        return failed

    def finish(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """The temporary and the stale sets destroyed."""
        warnings = []
        for name in staged.temps + list(plan.sets.destroy):
            if not self.ipset_destroy(name):
                warnings.append(f"ipset {name} could not be destroyed (still referenced?)")
        return warnings

    def _put_back(self, live: LiveState, families: list[int], nft_touched: bool) -> list[str]:
        """Put back what was loaded before a later step failed. Returns what failed to roll back."""
        failed: list[str] = []
        for fam in families:
            try:
                before = planmod.ruleset_from_observed(live.observed[fam])
                back = planmod.plan_family(before, self.observe_family(fam))
                if not back.empty:
                    self.restore(fam, planmod.restore_text(back, before))
            except HostprepError as err:
                failed.append(f"IPv{fam}: {err}")
        if nft_touched:
            try:
                if live.nft is None:
                    if self.nft_observe() is not None:
                        self.nft_delete()
                # A table that existed before was replaced atomically by a script that
                # failed as a whole, so the kernel still holds the old one.
            except HostprepError as err:
                failed.append(f"nft: {err}")
        return failed

    def part(self) -> list[str]:
        """hostprep's chains and jumps per family (the fail-safe's too) and its ipsets."""
        out: list[str] = []
        for fam in self.families():
            obs = self.observe_family(fam)
            if obs.our_chains or obs.our_jumps:
                out.append(f"{self.name} IPv{fam}: {plural_of(len(obs.our_chains), 'chain')}, "
                           f"{plural_of(len(obs.our_jumps), 'jump')}")
        sets = [n for n in self.ipset_observe() if not n.endswith(planmod.TEMP_SUFFIX)] if self.owns_sets else []
        if sets:
            out.append(f"{self.name}: {plural_of(len(sets), 'ipset')}")
        return out

    def has_chains(self) -> bool:
        """hostprep's chains or jumps are in this variant's filter table (either family)."""
        return any(obs.our_chains or obs.our_jumps for obs in map(self.observe_family, self.families()))

    def release(self) -> None:
        """hostprep's chains and jumps removed (one restore per family), then its ipsets destroyed
        (fail2ban's ban sets too: the native backend keeps its bans in its own table)."""
        for fam in self.families():
            obs = self.observe_family(fam)
            if obs.our_chains or obs.our_jumps:
                self.restore(fam, planmod.restore_text(planmod.plan_family(None, obs), None))
        left = [n for n in self.ipset_observe() if not self.ipset_destroy(n)] if self.owns_sets else []
        if left:
            raise CommandFailed("ipset destroy", f"{', '.join(sorted(left))} could not be destroyed (still "
                                "referenced?)", "see 'ipset list -n' and 'iptables -S'")

    def others(self) -> list["FirewallBackend"]:
        """The native backend, where nft is installed (a switch between the iptables variants, which
        share the ipsets, is not one hostprep makes: see README "Choosing a backend")."""
        return [NftBackend(self.runner, self.proc)] if self.runner.which("nft") else []

    # -- tool names ------------------------------------------------------
    def tool(self, family: int, kind: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        specific = f"{base}-{self.variant}-{kind}"
        if self.runner.which(specific):
            return specific
        generic = f"{base}-{kind}"
        if self.runner.which(generic):
            return generic
        return specific  # not installed: Runner raises MissingBinary naming it

    def legacy_tables(self, family: int) -> set[str]:
        name = "ip_tables_names" if family == 4 else "ip6_tables_names"
        try:
            return set((self.proc / "net" / name).read_text().split())
        except OSError:
            return set()

    def families(self) -> tuple[int, ...]:
        """(4, 6), or (4,) on a kernel booted with ipv6.disable=1 (no IPv6 to harden)."""
        return (4, 6) if (self.proc / "sys/net/ipv6").is_dir() else (4,)

    # -- iptables --------------------------------------------------------
    def observe_family(self, family: int) -> Observed:
        """One family's filter table, parsed."""
        if self.variant == "legacy" and "filter" not in self.legacy_tables(family):
            return Observed(family)  # nothing loaded; asking the save tool would create it
        out = self.runner.run([self.tool(family, "save"), "-c", "-t", "filter"]).stdout
        return parse_save(out, family)

    def restore_test(self, family: int, text: str) -> None:
        self.runner.run([self.tool(family, "restore"), "--noflush", "--test"], input=text)

    def restore(self, family: int, text: str) -> None:
        self.runner.run([self.tool(family, "restore"), "--noflush"], input=text, mutates=True)

    def other_firewalls(self) -> list[str]:
        """Warnings when the other variant also holds tables (both judge every packet)."""
        warnings: list[str] = []
        if self.variant == "nft":
            for fam in (4, 6):
                tables = self.legacy_tables(fam)
                if tables:
                    warnings.append(f"legacy {'ip' if fam == 4 else 'ip6'}tables tables are loaded too "
                                    f"({', '.join(sorted(tables))}): they judge every packet as well")
        else:
            res = self.runner.run(["nft", "list", "tables"], check=False)
            names = [ln.strip() for ln in res.stdout.splitlines()
                     if ln.startswith("table ") and ln.strip() != "table netdev hostprep"]
            if names:
                warnings.append(f"nf_tables tables exist too ({'; '.join(names)}): "
                                "they judge every packet as well")
        return warnings

    # -- ipsets ----------------------------------------------------------
    def ipset_observe(self) -> dict[str, frozenset[str]]:
        """hostprep's sets and their members; {} where ipset is not installed (no set can be ours)."""
        if self.runner.which("ipset") is None:
            return {}
        res = self.runner.run(["ipset", "save"], check=False)
        if res.returncode != 0:
            return {}
        return parse_ipset_save(res.stdout, SET_PREFIX)

    def ipset_restore(self, script: str) -> None:
        if script.strip():
            self.runner.run(["ipset", "restore"], input=script, mutates=True)

    def ipset_destroy(self, name: str) -> bool:
        res = self.runner.run(["ipset", "destroy", name], check=False, mutates=True)
        return res.returncode == 0

    # -- nft ingress table -------------------------------------------------
    def nft_observe(self) -> NftObserved | None:
        res = self.runner.run(["nft", "list", "table", *NFT_TABLE], check=False)
        if res.returncode != 0:
            if "No such file" in res.stderr or "does not exist" in res.stderr:
                return None
            raise CommandFailed("nft list table", (res.stderr.strip().splitlines() or ["failed"])[-1])
        return parse_nft_listing(res.stdout)

    def nft_check(self, script: str) -> None:
        self.runner.run(["nft", "-c", "-f", "-"], input=script)

    def nft_load(self, script: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script, mutates=True)

    def nft_delete(self) -> None:
        self.runner.run(["nft", "delete", "table", *NFT_TABLE], mutates=True)


NATIVE = "nftables"          # what applied.json and snapshots record for the native nft backend
SYNPROXY_RULE = "synproxy mss"   # how nft quotes the SYN cookie rule (rules/hostprep.nft.j2) in an error
INET_TABLE = ("inet", "hostprep")
BAN_TABLE = render.BAN_TABLE
NFT_REMOVE_BANS = "table inet hostprep_ban\ndelete table inet hostprep_ban\n"
NFT_REMOVE_OWN = ("table inet hostprep\ndelete table inet hostprep\n"
                  "table netdev hostprep\ndelete table netdev hostprep\n")
NFT_REMOVE = NFT_REMOVE_OWN + NFT_REMOVE_BANS


class NftBackend:
    """FirewallBackend: native nftables, one ``inet hostprep`` table (both families, the sets) and
    the ``netdev hostprep`` ingress table, loaded by ONE ``nft -f`` per change.

    The script (rules/hostprep.nft.j2) declares, deletes and re-creates both tables, so the
    kernel replaces them in one transaction: a change the kernel refuses leaves everything as
    it was.  Read back with ``nft -j list table inet hostprep``; the plan and status see the
    table per family (observed.parse_nft_json), the same groups, counters and differences as
    on iptables.  Removing hostprep (flush) is the same transaction with the tables only deleted.

    fail2ban's bans (container up --fail2ban) live in a third table, ``inet hostprep_ban``
    (rules/ban.nft.j2), in the same transaction but never deleted and re-created by it: its
    sets (``flags timeout``, one per container, fail2ban's action adds and deletes the members)
    are only declared, so the bans survive every change, a rollback and the boot unit; its
    chains are flushed and filled again.  Re-adding the live members to a re-created set
    instead would lose a ban fail2ban adds between the read and the load, and the remaining
    time of each.  The table goes with ``flush``, and when no container has fail2ban on any
    more (as the ipsets do on iptables); a ban set goes with its container (``delete set``,
    added to the script from the plan's live state).

    Under a SYN flood the container ports answer with SYN cookies as on iptables (issue 12): the
    netdev table's notrack and the inet table's ``synproxy`` statement, in the same transaction.
    """

    variant = NATIVE
    # load() removes hostprep's iptables chains itself, right after the nft transaction (the
    # fail-safe a boot unit loaded included); release() of the iptables backend then destroys
    # the ipsets.  The fault point "before-release" is in load() for this backend.
    releases_in_load = True

    def __init__(self, runner: Runner, proc: Path = Path("/proc"), sys_net: Path = Path("/sys/class/net")) -> None:
        self.runner = runner
        self.proc = proc
        self.sys_net = sys_net

    # -- the contract (FirewallBackend) ------------------------------------------
    def describe(self) -> str:
        return "nft (native nftables)"

    @property
    def name(self) -> str:
        return "nft"

    def is_supported(self) -> bool:
        """The nft binary is installed (the kernel's features are checked by ``nft -c`` before any load)."""
        return self.runner.which("nft") is not None

    def families(self) -> tuple[int, ...]:
        return (4, 6) if (self.proc / "sys/net/ipv6").is_dir() else (4,)

    def target(self, desired: Desired | None) -> Desired | None:
        """The one nft script (as ``nft``) and the per-family view of it (render.nft_desired)."""
        if not isinstance(desired, Desired) or (desired.nft is not None
                                                and desired.nft.script.startswith(render.NFT_HEADER)):
            return desired      # already in this form (or a snapshot's target)
        return render.nft_desired(desired)

    def observe(self) -> LiveState:
        """Both tables; a family view per family this kernel has; never creates anything."""
        fams = self.families()
        js = self._list(["-j", "list", "table", *INET_TABLE])
        bans = self._list(["-j", "list", "table", *BAN_TABLE])
        ingress = self._list(["list", "table", *NFT_TABLE])
        leftovers = self.iptables_leftovers()
        if js is None and ingress is None and bans is None:
            return LiveState({fam: self._with_leftovers(Observed(fam), leftovers) for fam in fams}, None, {})
        table = parse_nft_json(js, fams, SET_PREFIX) if js is not None else None
        terse = self._list(["-t", "list", "table", *INET_TABLE]) or ""
        if bans is not None:
            # the ban sets' members (fail2ban's bans) are in the sets, not in the compared listing (-t)
            table = merge_ban_table(table, parse_nft_json(bans, fams, SET_PREFIX), fams)
            terse += self._list(["-t", "list", "table", *BAN_TABLE]) or ""
        ing = parse_nft_listing(ingress) if ingress is not None else None
        text = normalise_nft(terse + (ingress or ""))
        device = table.device if table is not None and table.device else (ing.device if ing else "")
        nft = NftObserved(device, text, ing.counters if ing else {}, ing.flooded if ing else (),
                          table.limiters if table is not None else {})
        observed = table.observed if table is not None else {fam: Observed(fam) for fam in fams}
        observed = {fam: self._with_leftovers(obs, leftovers) for fam, obs in observed.items()}
        return LiveState(observed, nft, table.sets if table is not None else {})

    def test(self, plan: ApplyPlan) -> Staged:
        """``nft -c`` of the one script; what puts ``plan.live`` back is kept for undo."""
        staged = Staged(previous=self.previous_script(plan.live))
        self._nft_f(["nft", "-c", "-f", "-"], self.script(plan), mutates=False)
        return staged

    def load(self, plan: ApplyPlan, staged: Staged) -> None:
        """ONE ``nft -f``: both families, the sets, the ingress table; the kernel takes all or nothing."""
        staged.nft_touched = True
        script = self.script(plan)
        try:
            self._nft_f(["nft", "-f", "-"], script, mutates=True)
        except HostprepError as err:
            raise CommandFailed(err.field, f"{err.problem}; the kernel refused the whole transaction, the "
                                "previous rules are in place", err.fix or
                                "nothing of this change was loaded; fix the cause and run again") from None
        # The tables are in (nft -f returns 0 only once the kernel committed the whole
        # transaction); read back before the iptables part goes: never neither.
        if script != NFT_REMOVE and self._list(["list", "table", *INET_TABLE]) is None:
            raise CommandFailed("nft -f", "the kernel does not list table inet hostprep after loading it; "
                                + _undo_state(self.undo(plan, staged)), "run 'hostprep status' and report this")
        faults.hit("before-release")
        try:
            # applied or flushed: hostprep's iptables part goes too; what went is kept for undo()
            self.remove_iptables_part(staged.iptables_removed)
        except HostprepError as err:
            raise CommandFailed(err.field, f"{err.problem}; removing hostprep's iptables chains after the nft "
                                f"load failed; {_undo_state(self.undo(plan, staged))}",
                                "fix the cause and run again") from None

    def undo(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """The tables as they were in ``plan.live``, in one ``nft -f`` again; then hostprep's iptables
        part load() removed (the fail-safe a boot unit loaded) put back as it was, so that a boot
        whose load is undone keeps the fail-safe.  Returns what could not be put back."""
        failed: list[str] = []
        if staged.nft_touched:
            try:
                script = NFT_REMOVE if staged.previous is None else \
                    staged.previous + self.ban_leftovers(staged.previous)
                self.runner.run(["nft", "-f", "-"], input=script, mutates=True)
            except HostprepError as err:
                failed.append(f"nft: {err}")
        for be, fam, before in staged.iptables_removed:
            try:
                be.restore(fam, planmod.restore_text(planmod.plan_family(before, be.observe_family(fam)), before))
            except HostprepError as err:
                failed.append(f"{be.name} IPv{fam} (hostprep's iptables chains): {err}")
        if not failed:
            staged.iptables_removed.clear()
        return failed

    def finish(self, plan: ApplyPlan, staged: Staged) -> list[str]:
        """Nothing to clean up: the sets live in the table, the iptables part went in load()."""
        return []

    def other_firewalls(self) -> list[str]:
        """Other nf_tables tables and legacy x_tables (they judge every packet as well)."""
        warnings: list[str] = []
        res = self.runner.run(["nft", "list", "tables"], check=False)
        # iptables-nft's own tables (what `iptables -S` shows: Podman's, fail2ban's rules) are not
        # named: they judge packets the same way next to either backend.
        xt = {f"table {fam} {t}" for fam in ("ip", "ip6") for t in ("filter", "nat", "mangle", "raw", "security")}
        names = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("table ")
                 and ln.strip() not in ("table netdev hostprep", "table inet hostprep", "table inet hostprep_ban")
                 and ln.strip() not in xt]
        if names:
            warnings.append(f"other nf_tables tables exist ({'; '.join(names)}): they judge every packet as "
                            "well; hostprep's drops hold whatever they accept")
        for fam in (4, 6):
            name = "ip_tables_names" if fam == 4 else "ip6_tables_names"
            try:
                tables = set((self.proc / "net" / name).read_text().split())
            except OSError:
                tables = set()
            if tables:
                warnings.append(f"legacy {'ip' if fam == 4 else 'ip6'}tables tables are loaded too "
                                f"({', '.join(sorted(tables))}): they judge every packet as well")
        return warnings

    def part(self) -> list[str]:
        """The ``inet hostprep`` table and the ban table ``inet hostprep_ban`` (fail2ban's bans: on
        the iptables backend they are ipsets, so a ban table there is only a left-over that still
        drops); the netdev ingress table is shared with the iptables backend."""
        return [f"nft: table {' '.join(t)}" for t in (INET_TABLE, BAN_TABLE)
                if self._list(["list", "table", *t]) is not None]

    def release(self) -> None:
        """``table inet hostprep`` and the ban table deleted in one ``nft -f`` (each declared first:
        absent is no error).  A switch releases them only once the new backend is in and read back
        (engine.converge); the bans in the ban sets are not carried over (as the ipsets are not)."""
        self._nft_f(["nft", "-f", "-"], "table inet hostprep\ndelete table inet hostprep\n" + NFT_REMOVE_BANS,
                    mutates=True)

    def others(self) -> list["FirewallBackend"]:
        """The iptables variants whose save and restore tools are installed, the one holding hostprep's
        chains first; the ipsets (both variants share them) count as that one's."""
        found = sorted(self._iptables(), key=lambda be: not be.has_chains())
        for be in found[1:]:
            be.owns_sets = False
        return list(found)

    # -- hostprep's iptables part (the fail-safe, an earlier iptables apply) ------------
    def _iptables(self) -> list["IptablesBackend"]:
        return installed_variants(self.runner, self.proc)

    def remove_iptables_part(self, removed: list | None = None) -> None:
        """hostprep's chains and jumps in iptables removed, once the nft tables hold the policy: the
        fail-safe a boot unit loaded (an iptables-restore file), or what an iptables apply left.
        New rules in before the old go.  Each part removed is appended to ``removed`` as
        (backend, family, Ruleset) as soon as it is gone, for undo() to put back."""
        for be in self._iptables():
            for fam in self.families():
                obs = be.observe_family(fam)
                if obs.our_chains or obs.our_jumps:
                    before = planmod.ruleset_from_observed(obs)
                    be.restore(fam, planmod.restore_text(planmod.plan_family(None, obs), None))
                    if removed is not None:
                        removed.append((be, fam, before))

    def iptables_leftovers(self) -> dict[int, tuple[str, ...]]:
        """hostprep's chains in the iptables filter tables (either variant), per family."""
        out: dict[int, tuple[str, ...]] = {}
        for be in self._iptables():
            for fam in self.families():
                obs = be.observe_family(fam)
                names = obs.our_chains + (("jumps",) if obs.our_jumps and not obs.our_chains else ())
                if names:
                    out[fam] = out.get(fam, ()) + names
        return out

    @staticmethod
    def _with_leftovers(obs: Observed, leftovers: dict[int, tuple[str, ...]]) -> Observed:
        """The view with hostprep's iptables chains of this family added: the fail-safe under its own
        name (status says it is live), anything else as HOSTPREP-IPTABLES; either one makes the plan
        load, and finish() removes them after the nft tables are in."""
        names = leftovers.get(obs.family, ())
        if not names:
            return obs
        extra = tuple(dict.fromkeys(n if n == render.FAILSAFE_CHAIN else "HOSTPREP-IPTABLES" for n in names))
        return Observed(obs.family, obs.chains + tuple(n for n in extra if n not in obs.chains), obs.rules)

    # -- primitives -------------------------------------------------------------
    @staticmethod
    def loads_script(script: str) -> bool:
        """``script`` is one this backend wrote: rendered (render.nft_desired) or previous_script's."""
        return script.startswith((render.NFT_HEADER, NFT_REMOVE_OWN))

    def script(self, plan: ApplyPlan) -> str:
        """The one transaction of ``plan``: the desired script, or both tables deleted."""
        want = plan.desired.nft if plan.desired is not None else None
        if want is None:
            return NFT_REMOVE
        if not self.loads_script(want.script):
            # only a snapshot's script can get here unrendered (a hand-edited or older snapshot)
            raise CommandFailed("nft script", "the nft script to load (a rollback snapshot's) is not one the "
                                "native backend wrote", "nothing was loaded; remove the change's snapshot "
                                "(rollback/ under hostprep's state directory) and run 'hostprep apply' to converge")
        if not (self.sys_net / want.device).exists():
            # The external NIC is absent (boot before it appears): an ingress hook on a missing
            # device makes kernels before 6.x refuse the whole transaction.  The inet table (it
            # matches the NIC by name) loads without it; hostprep-nic@ adds it when the NIC comes.
            return want.script.split(render.NFT_INGRESS_MARK)[0] + "\n" + self.ban_tail(plan)
        return want.script + self.ban_tail(plan)

    @staticmethod
    def ban_tail(plan: ApplyPlan) -> str:
        """What the script says of the ban table beyond what it wants: no ban wanted, the table
        deleted (declared first, so that the delete never fails); else the ban sets and chains the
        live table has and the plan does not want deleted, after the script flushed the chains
        that referred to them."""
        wanted = [s for s in planmod.wanted_sets(plan.desired) if isinstance(s, BanSet)]
        if not wanted:
            return NFT_REMOVE_BANS
        table = " ".join(BAN_TABLE)
        lines = []
        for fam, obs in plan.live.observed.items():
            want = plan.desired.ruleset(fam) if plan.desired is not None else None
            if "HOSTPREP-BAN" in obs.our_chains and (want is None or want.chain("HOSTPREP-BAN") is None):
                chain = f"{render.BAN_CHAIN_PREFIX}{fam}"
                lines += [f"flush chain {table} {chain}", f"delete chain {table} {chain}"]
        names = {s.name for s in wanted}
        lines += [f"delete set {table} {n}" for n in sorted(plan.live.sets) if is_ban_set(n) and n not in names]
        return "".join(ln + "\n" for ln in lines)

    def previous_script(self, live: LiveState) -> str | None:
        """A script that puts the live tables back as they are now (None: there are none)."""
        if live.nft is None:
            return None
        # nft_loadable: nft lists some of hostprep's lines in a form it refuses to read back
        inet = render.nft_loadable(self._list(["-s", "list", "table", *INET_TABLE]) or "")
        ingress = self._list(["-s", "list", "table", *NFT_TABLE]) or ""
        bans = self._list(["-s", "-t", "list", "table", *BAN_TABLE])
        bans = render.nft_loadable(bans) if bans is not None else None
        # the ingress table last, after the mark: script() leaves it out while the NIC is absent
        return (NFT_REMOVE_OWN + inet + (render.ban_restore_text(bans) if bans is not None else NFT_REMOVE_BANS)
                + (render.NFT_INGRESS_MARK + "\n" + ingress if ingress else ""))

    def ban_leftovers(self, previous: str) -> str:
        """The ban sets and chains a change made that ``previous`` (previous_script) does not
        have: deleted by undo, after previous's flushes (the members of the others stay)."""
        if NFT_REMOVE_BANS in previous:
            return ""
        now = self._list(["-t", "list", "table", *BAN_TABLE])
        if now is None:
            return ""
        before_sets, before_chains = render.ban_objects(previous)
        now_sets, now_chains = render.ban_objects(now)
        table = " ".join(BAN_TABLE)
        lines = [f"flush chain {table} {c}" for c in now_chains if c not in before_chains]
        lines += [f"delete chain {table} {c}" for c in now_chains if c not in before_chains]
        lines += [f"delete set {table} {s}" for s in now_sets if s not in before_sets]
        return "".join(ln + "\n" for ln in lines)

    def _nft_f(self, argv: list[str], script: str, *, mutates: bool) -> None:
        """``nft -f -`` (or ``-c``); a failure names nft's own "Error:" line (its last lines
        point at the script with carets)."""
        res = self.runner.run(argv, input=script, check=False, mutates=mutates)
        if res.returncode != 0:
            lines = res.stderr.strip().splitlines()
            why = next((ln.strip() for ln in lines if "Error:" in ln), lines[-1] if lines else "failed")
            if any(SYNPROXY_RULE in ln for ln in lines):
                # nft quotes the rule the kernel refused: the SYN cookie statement (nft_synproxy)
                raise CommandFailed(" ".join(argv[:2]), f"exit {res.returncode}: {why} (the SYN cookie rule: this "
                                    "kernel has no nft synproxy, CONFIG_NFT_SYNPROXY, Linux 5.3+)",
                                    "use --backend iptables on this host (its SYNPROXY target), or -e to leave "
                                    "out the ddos group; nothing was changed")
            raise CommandFailed(" ".join(argv[:2]), f"exit {res.returncode}: {why}")

    def _list(self, args: list[str]) -> str | None:
        res = self.runner.run(["nft", *args], check=False)
        if res.returncode != 0:
            if "No such file" in res.stderr or "does not exist" in res.stderr:
                return None
            raise CommandFailed("nft " + " ".join(args), (res.stderr.strip().splitlines() or ["failed"])[-1])
        return res.stdout


# --backend / HOSTPREP_BACKEND: the backend asked for.  "legacy" is the value hostprep took
# before the native backend (the iptables legacy variant): still accepted, same meaning.
# "nft" used to mean the iptables nft variant; it now names the native nftables backend
# (README "Choosing a backend").  Records keep the old variant names ("nft", "legacy" for
# iptables, "nftables" for native), so an applied.json written before still reads the same.
CHOICES = ("nft", "iptables", "iptables-nft", "iptables-legacy")
ALIASES = {"legacy": "iptables-legacy"}
CHOICE_FIX = "use nft, iptables, iptables-nft or iptables-legacy"


def resolve_choice(value: str | None, field: str = "--backend") -> str | None:
    """The backend asked for, in its canonical name (None: not asked; the host decides)."""
    if not value:
        return None
    value = ALIASES.get(value, value)
    if value not in CHOICES:
        raise InputError(field, f"{value!r} is not a backend", CHOICE_FIX)
    return value


def name_of(variant: str | None) -> str | None:
    """A recorded variant as ``status`` names it (nft, iptables-nft, iptables-legacy)."""
    if variant == NATIVE:
        return "nft"
    return f"iptables-{variant}" if variant in VARIANTS else variant


def for_variant(runner: Runner, variant: str | None) -> FirewallBackend:
    """The backend a record or snapshot names by its variant."""
    if variant == NATIVE:
        return NftBackend(runner)
    return IptablesBackend(runner, variant or detect_variant(runner))


# What hostprep's nft script needs from nft and the kernel, in one script checked with
# ``nft -c`` (the kernel validates the whole transaction and aborts it: nothing changes):
# an inet table, a netdev ingress hook (on lo: every namespace has it), dynamic sets with
# and without timeout (the limiters, the flooded set), interval sets, concatenations,
# ct count, limit rate over, synproxy, notrack at ingress, fib saddr type, the bogus-flag
# set lookup, tcp option maxseg (size range and missing), ct original daddr and proto-dst,
# log prefix, ip6 hoplimit: the statements rules/hostprep.nft.j2 and ingress.nft.j2 use
# (README's table of kernel features; accepted by ``nft -c`` here: nftables 1.0.6, Linux
# 6.18).  RHEL 9's 5.14 has all (synproxy: CONFIG_NFT_SYNPROXY, see README).
PROBE_SCRIPT = """table inet hostprep_probe {
	set cl {
		type ipv4_addr
		size 16
		flags dynamic
	}
	set rl {
		type ipv6_addr
		size 16
		flags dynamic,timeout
		timeout 1000ms
	}
	chain raw {
		type filter hook prerouting priority raw; policy accept;
		tcp dport 9 tcp flags syn notrack
	}
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 9 ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm
		tcp dport 9 add @cl { ip saddr ct count over 4 } drop
		tcp dport 9 update @rl { ip6 saddr limit rate 5/second burst 5 packets } accept
		tcp dport 9 ip saddr { 10.0.0.0/8, 192.0.2.0/24 } drop
		meta l4proto tcp ct state new tcp option maxseg size != 536-65535 drop
		meta l4proto tcp ct state new tcp option maxseg missing drop
		ct original ip daddr 192.0.2.1 meta l4proto tcp ct original proto-dst 9 limit rate 1/minute burst 5 packets log prefix "hostprep probe " drop
		icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept
	}
	chain output {
		type filter hook output priority filter; policy accept;
		tcp flags & (fin|syn|rst|ack) == syn fib saddr type != local ct state new accept
	}
}
table netdev hostprep_probe {
	set cookie4 {
		type ipv4_addr . inet_service
		elements = { 192.0.2.1 . 9 }
	}
	set flooded4 {
		type ipv4_addr
		size 64
		flags dynamic,timeout
		timeout 10s
	}
	chain ingress {
		type filter hook ingress device "lo" priority -500; policy accept;
		ip frag-off & 0x3fff != 0 drop
		meta protocol ip6 exthdr frag exists drop
		tcp flags & (fin | syn | rst | psh | ack | urg) { 0x0, 0x3 } drop
		tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @cookie4 jump syn4
	}
	chain syn4 {
		limit rate over 200/second burst 400 packets update @flooded4 { ip daddr } counter notrack return
		ip daddr @flooded4 counter notrack return
	}
}
"""


def nft_probe(runner: Runner) -> str | None:
    """None when ``nft -c`` accepts PROBE_SCRIPT (nft and the kernel have what hostprep needs), else why not."""
    if runner.which("nft") is None:
        return "nft is not installed"
    res = runner.run(["nft", "-c", "-f", "-"], input=PROBE_SCRIPT, check=False)
    if res.returncode == 0:
        return None
    lines = (res.stderr or "").strip().splitlines()
    return "nft -c refused the probe: " + next((ln.strip() for ln in lines if "Error:" in ln),
                                               lines[-1].strip() if lines else f"exit {res.returncode}")


@dataclass(frozen=True)
class Chosen:
    """The backend of a command and why: ``asked`` (--backend, HOSTPREP_BACKEND), ``remembered``
    (applied.json: the backend the last apply used) or ``auto`` (this host); ``detail`` says more."""

    backend: "FirewallBackend"
    why: str
    detail: str = ""

    @property
    def reason(self) -> str:
        return f"{self.why} ({self.detail})" if self.detail else self.why


def choose(runner: Runner, variant: str | None = None, remembered: str | None = None, *,
           env: bool = True) -> Chosen:
    """The backend of this host, in this order:

    1. asked for: ``variant`` (--backend), else HOSTPREP_BACKEND; ``iptables`` is the variant
       ``iptables -V`` names;
    2. remembered: the backend the last apply recorded (applied.json "backend": ``nftables``,
       or the iptables variant ``nft``/``legacy``), so a host stays on its backend;
    3. auto: the native nft backend when ``nft -c`` accepts PROBE_SCRIPT, else iptables as
       ``iptables -V`` says (each variant whose tools exist, without an ``iptables`` command).

    ``env``: False ignores HOSTPREP_BACKEND (a boot unit's copy of the environment of an apply
    made before the last one).  Every candidate must pass is_supported(); none does: an error
    naming each one tried."""
    asked = resolve_choice(variant) if variant is not None else \
        resolve_choice(os.environ.get("HOSTPREP_BACKEND"), "HOSTPREP_BACKEND") if env else None
    if asked is not None:
        if asked == "nft":
            tried: list[FirewallBackend] = [NftBackend(runner)]
        elif asked in ("iptables-nft", "iptables-legacy"):
            tried = [IptablesBackend(runner, asked.split("-", 1)[1])]
        else:
            tried = _iptables_by_version(runner)
        how = "--backend" if variant is not None else "HOSTPREP_BACKEND"
        return _first(tried, "asked", f"{how} {asked}")
    if remembered == NATIVE:
        return _first([NftBackend(runner)], "remembered", "the last apply used it")
    if remembered in VARIANTS:
        return _first([IptablesBackend(runner, remembered)], "remembered", "the last apply used it")
    why_not = nft_probe(runner)
    if why_not is None:
        return _first([NftBackend(runner)], "auto", "nft and the kernel have every feature hostprep uses")
    return _first(_iptables_by_version(runner), "auto", why_not)


def _iptables_by_version(runner: Runner) -> list[FirewallBackend]:
    if runner.which("iptables") is None:
        return [IptablesBackend(runner, v) for v in VARIANTS]
    return [IptablesBackend(runner, detect_variant(runner))]


def _first(tried: list[FirewallBackend], why: str, detail: str) -> Chosen:
    for backend in tried:
        if backend.is_supported():
            return Chosen(backend, why, detail)
    raise NoBackend("firewall backend", "no backend fits this host: tried " + ", ".join(b.describe() for b in tried)
                    + " (the restore/save tools or nft are not installed)",
                    "install them: dnf install iptables-nft nftables  or  apt-get install iptables nftables")


def for_host(runner: Runner, variant: str | None = None, remembered: str | None = None) -> FirewallBackend:
    """The backend ``choose`` picks."""
    return choose(runner, variant, remembered).backend
