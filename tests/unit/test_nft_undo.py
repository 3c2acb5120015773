"""The native backend's undo and its snapshots (review of s5/merge, findings 1 and 2): an undone
load puts back the iptables part (the fail-safe) it removed, and a snapshot holds a script the
native backend loads, also when the live tables drifted from the record."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostprep import engine, ops, render, snapshot
from hostprep.backend import NATIVE, IptablesBackend, NftBackend
from hostprep.errors import CommandFailed, HostprepError, StateError
from hostprep.model import PingSource, Policy
from hostprep.observed import parse_save
from hostprep.paths import Paths
from hostprep.state import Store, write_atomic
from tests.helpers import FakeNft

import ipaddress
import json


class FakeIptables(IptablesBackend):
    """One iptables variant's filter tables in memory: restore --noflush texts applied line by line,
    observed through iptables-save's format (parse_save)."""

    def __init__(self) -> None:
        super().__init__(None, "nft", Path("/nonexistent/proc"))
        self.chains: dict[int, dict[str, list[str]]] = {
            fam: {"INPUT": [], "FORWARD": [], "OUTPUT": []} for fam in (4, 6)}

    def families(self) -> tuple[int, ...]:
        return (4, 6)

    def ipset_observe(self) -> dict[str, frozenset[str]]:
        return {}

    def restore(self, family: int, text: str) -> None:
        chains = self.chains[family]
        for line in text.splitlines():
            if line.startswith(":"):
                chains[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                chain, spec = line[3:].split(" ", 1)
                chains[chain].append(spec)
            elif line.startswith("-I "):
                chain, pos, spec = line[3:].split(" ", 2)
                chains[chain].insert(int(pos) - 1, spec)
            elif line.startswith("-D "):
                chain, spec = line[3:].split(" ", 1)
                chains[chain].remove(spec)
            elif line.startswith("-F "):
                chains[line[3:].strip()] = []
            elif line.startswith("-X "):
                del chains[line[3:].strip()]

    def observe_family(self, family: int):
        chains = self.chains[family]
        lines = ["*filter"] + [f":{c} {'ACCEPT' if c.isupper() and c in ('INPUT', 'FORWARD', 'OUTPUT') else '-'} "
                               "[0:0]" for c in chains]
        lines += [f"-A {c} {s}" for c, specs in chains.items() for s in specs] + ["COMMIT"]
        return parse_save("\n".join(lines) + "\n", family)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "proc/sys/net/ipv6").mkdir(parents=True)
    (tmp_path / "sys/class/net/eth1").mkdir(parents=True)
    return tmp_path / "proc"


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)


def native(fake: FakeNft, proc: Path, ipt: FakeIptables | None = None) -> NftBackend:
    be = NftBackend(fake, proc=proc, sys_net=proc.parent / "sys/class/net")
    be._iptables = lambda: [ipt] if ipt is not None else []      # type: ignore[method-assign]
    return be


def with_failsafe() -> FakeIptables:
    ipt = FakeIptables()
    for fam in (4, 6):
        ipt.restore(fam, render.failsafe_text("eth1", fam))
    assert ipt.chains[4]["INPUT"] == ["-i eth1 -j HOSTPREP-FAILSAFE"]
    return ipt


def test_a_read_back_mismatch_after_load_leaves_the_failsafe_as_it_was(tmp_path: Path, proc: Path, monkeypatch):
    """Boot (no change, no snapshot around it): the nft load removed the fail-safe; verify finds a
    difference; the undo deletes the new tables and puts the fail-safe chains and jumps back."""
    ipt = with_failsafe()
    before = {fam: {c: list(s) for c, s in ch.items()} for fam, ch in ipt.chains.items()}
    fake = FakeNft()
    be = native(fake, proc, ipt)
    real = engine.verify
    seen = {}

    def mismatch(backend, desired, **kw):
        snap, problems = real(backend, desired, **kw)
        seen["failsafe during verify"] = "HOSTPREP-FAILSAFE" in ipt.chains[4]
        return snap, problems + ["chain HOSTPREP-INPUT differs"]

    monkeypatch.setattr(engine, "verify", mismatch)
    store = Store(Paths(tmp_path))
    with pytest.raises(HostprepError) as err:
        engine.converge(be, store, be.target(render.desired(Policy("eth1"))), "hostprep boot", recorded_nft=None)
    assert seen == {"failsafe during verify": False}        # the load did remove it
    assert ipt.chains == before                             # and the undo put it back, jumps first
    assert fake.tables == {}                                # the nft tables as they were: none
    assert "ROLLBACK FAILED" not in str(err.value)


def test_an_undo_that_cannot_put_the_iptables_part_back_says_so(tmp_path: Path, proc: Path, monkeypatch):
    ipt = with_failsafe()
    be = native(FakeNft(), proc, ipt)
    plan = engine.make_plan(be, be.target(render.desired(Policy("eth1"))), None)
    staged = be.test(plan)
    be.load(plan, staged)
    assert "HOSTPREP-FAILSAFE" not in ipt.chains[6]

    def refuse(family, text):
        raise CommandFailed("ip6tables-nft-restore", "exit 1: line 2 failed")

    monkeypatch.setattr(ipt, "restore", refuse)
    failed = be.undo(plan, staged)
    assert len(failed) == 2 and all("hostprep's iptables chains" in f for f in failed)


def test_a_table_missing_after_the_load_is_undone_iptables_part_included(tmp_path: Path, proc: Path, monkeypatch):
    ipt = with_failsafe()
    before = {fam: {c: list(s) for c, s in ch.items()} for fam, ch in ipt.chains.items()}
    fake = FakeNft()
    be = native(fake, proc, ipt)
    plan = engine.make_plan(be, be.target(render.desired(Policy("eth1"))), None)
    staged = be.test(plan)
    real_list = be._list
    monkeypatch.setattr(be, "_list", lambda args: None if args == ["list", "table", "inet", "hostprep"]
                        else real_list(args))
    # the read-back right after nft -f says the table is not there: nothing of the iptables part went yet
    with pytest.raises(CommandFailed) as err:
        be.load(plan, staged)
    assert "the previous rules are back" in err.value.problem
    assert ipt.chains == before and fake.tables == {}


def test_a_failed_removal_of_the_iptables_part_is_undone(tmp_path: Path, proc: Path, monkeypatch):
    ipt = with_failsafe()
    before = {fam: {c: list(s) for c, s in ch.items()} for fam, ch in ipt.chains.items()}
    fake = FakeNft()
    be = native(fake, proc, ipt)
    plan = engine.make_plan(be, be.target(render.desired(Policy("eth1"))), None)
    staged = be.test(plan)
    real = ipt.restore
    calls = []

    def second_fails(family, text):
        calls.append(family)
        if len(calls) == 2:
            raise CommandFailed("ip6tables-nft-restore", "exit 4: resource busy")
        real(family, text)

    monkeypatch.setattr(ipt, "restore", second_fails)
    with pytest.raises(CommandFailed) as err:
        be.load(plan, staged)
    assert "ROLLBACK FAILED" not in err.value.problem and "the previous rules are back" in err.value.problem
    assert ipt.chains == before and fake.tables == {}


# -- snapshots (finding 2) --------------------------------------------------------------------

def ping_policy() -> Policy:
    return Policy("eth1", ping=(PingSource("198.51.100.1", (ipaddress.ip_network("198.51.100.1/32"),)),))


def drift(fake: FakeNft) -> None:
    """A hand edit of the live table: one rule's comment changed (status would advise apply)."""
    text = fake.tables["inet hostprep"]
    assert 'comment "hostprep' in text
    fake.tables["inet hostprep"] = text.replace('comment "hostprep', 'comment "handmade hostprep', 1)


def test_a_snapshot_of_drifted_tables_restores_them(tmp_path: Path, proc: Path):
    fake = FakeNft()
    be = native(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    drift(fake)
    drifted = dict(fake.tables)
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="hostprep apply -i eth1 -p ...")
    assert snap.backend == NATIVE and NftBackend.loads_script(snap.nft.script)
    ops.apply(store, "hostprep apply -i eth1 -p 198.51.100.1", backend=be, desired=render.desired(ping_policy()),
              kernel=False)
    assert fake.tables != drifted
    snapshot.restore(be, store, snap, sys_net=proc.parent / "sys/class/net")
    assert fake.tables == drifted


def test_a_snapshot_of_drifted_tables_restores_them_without_the_nic(tmp_path: Path, proc: Path):
    fake = FakeNft()
    be = native(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    drift(fake)
    drifted = dict(fake.tables)
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="hostprep apply")
    ops.apply(store, "hostprep apply -i eth1 -p 198.51.100.1", backend=be, desired=render.desired(ping_policy()),
              kernel=False)
    (proc.parent / "sys/class/net/eth1").rmdir()          # the NIC went away before the rollback
    notes = snapshot.restore(be, store, snap, sys_net=proc.parent / "sys/class/net")
    assert "nft table: eth1 is not present, left to hostprep-nic@" in notes
    assert fake.tables["inet hostprep"] == drifted["inet hostprep"]
    loaded = [inp for a, inp, m in fake.calls if m and a[:3] == ["nft", "-f", "-"]][-1]
    assert "table netdev hostprep {" not in loaded        # no ingress hook on a missing device


def corrupt(tmp_path: Path, proc: Path) -> tuple[Store, dict]:
    fake = FakeNft()
    be = native(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="hostprep apply").to_dict()
    # what an earlier hostprep stored when the live table drifted: the iptables ingress-table shape
    snap["nft"]["script"] = "table netdev hostprep\ndelete table netdev hostprep\n" + snap["nft"]["text"]
    return store, snap


def test_a_corrupt_native_snapshot_is_one_line_not_a_traceback(tmp_path: Path, proc: Path):
    store, snap = corrupt(tmp_path, proc)
    cid = "20261206T013000-1-abc"
    snapshot.rollback_dir(store).mkdir(parents=True, exist_ok=True)
    write_atomic(snapshot.snapshot_file(store, cid), json.dumps(snap) + "\n")
    with pytest.raises(StateError) as err:
        snapshot.load_snapshot(store, cid)
    assert "nft script is not one the native backend wrote" in err.value.line()
    assert str(snapshot.snapshot_file(store, cid)) in err.value.line() and "\n" not in err.value.line()


def test_a_corrupt_script_reaching_the_backend_is_command_failed(tmp_path: Path, proc: Path):
    store, snap = corrupt(tmp_path, proc)
    fake = FakeNft()
    be = native(fake, proc)
    ops.apply(store, "hostprep apply -i eth1 -p 198.51.100.1", backend=be, desired=render.desired(ping_policy()),
              kernel=False)
    before = dict(fake.tables)
    with pytest.raises(CommandFailed) as err:      # a HostprepError: txn._fail and recover catch it
        snapshot.restore(be, store, snapshot.Snapshot.from_dict(snap), sys_net=proc.parent / "sys/class/net")
    assert "not one the native backend wrote" in err.value.line() and "\n" not in err.value.line()
    assert fake.tables == before
