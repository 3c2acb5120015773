"""The firewall backends behind one written contract, ``FirewallBackend``.

The engine (engine.py) speaks only this contract; a backend turns a plan
(plan.ApplyPlan: what to change in hostprep's part of the kernel) into the
kernel's own transactions.  ``for_host`` picks the backend of this host.

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
from hostprep.model import SET_PREFIX
from hostprep.observed import LiveState, NftObserved, Observed, parse_ipset_save, parse_nft_listing, parse_save
from hostprep.plan import ApplyPlan
from hostprep.runner import Runner

VARIANTS = ("nft", "legacy")

NFT_TABLE = ("netdev", "hostprep")


def detect_variant(runner: Runner, override: str | None = None) -> str:
    choice = override or os.environ.get("HOSTPREP_BACKEND") or ""
    if choice:
        if choice not in VARIANTS:
            raise InputError("--backend", f"{choice!r} is not a backend", "use nft or legacy")
        return choice
    out = runner.run(["iptables", "-V"]).stdout
    if "nf_tables" in out:
        return "nft"
    if "legacy" in out:
        return "legacy"
    raise CommandFailed("iptables -V", f"cannot tell the variant from {out.strip()!r}",
                        "pass --backend nft or --backend legacy")


@dataclass
class Staged:
    """What a backend staged (``test``) and loaded (``load``) of one plan, so that the
    engine can finish it or undo it."""

    created: list[str] = field(default_factory=list)   # ipsets created
    temps: list[str] = field(default_factory=list)     # NAME-n sets holding the other contents
    swapped: bool = False
    loaded: list[int] = field(default_factory=list)    # families loaded
    nft_touched: bool = False


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


class IptablesBackend:
    """FirewallBackend: iptables-restore per family (nft or legacy variant), ipsets, the nft ingress table.

    The methods below the contract's are its primitives, one command each; tests
    replace them with an in-memory kernel (tests/helpers.FakeKernel).
    """

    def __init__(self, runner: Runner, variant: str, proc: Path = Path("/proc")) -> None:
        self.runner = runner
        self.variant = variant
        self.proc = proc

    # -- the contract (FirewallBackend) ------------------------------------------
    def describe(self) -> str:
        return f"iptables ({self.variant} variant)"

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


def candidates(runner: Runner, variant: str | None = None) -> list[FirewallBackend]:
    """The backends to try, in order: the variant asked for (--backend, HOSTPREP_BACKEND) alone;
    else the one ``iptables -V`` names; without an ``iptables`` command, each variant."""
    choice = variant or os.environ.get("HOSTPREP_BACKEND") or None
    if choice is None and runner.which("iptables") is None:
        return [IptablesBackend(runner, v) for v in VARIANTS]
    return [IptablesBackend(runner, detect_variant(runner, choice))]


def for_host(runner: Runner, variant: str | None = None) -> FirewallBackend:
    """The first of ``candidates`` whose is_supported() holds; none: an error naming each one tried."""
    tried = candidates(runner, variant)
    for backend in tried:
        if backend.is_supported():
            return backend
    raise NoBackend("firewall backend", "no backend fits this host: tried " + ", ".join(b.describe() for b in tried)
                    + " (the restore/save tools or nft are not installed)",
                    "install them: dnf install iptables-nft nftables  or  apt-get install iptables nftables")
