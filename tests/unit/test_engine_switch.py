"""A switch of backends in the engine and the snapshot, over the FakeKernel: the new backend
loaded and read back first, then the old backend's part released; never the other way round,
never without a read-back; a release that leaves something is an error; the snapshot of a
change is read through the backend that holds hostprep."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostprep import engine, render, snapshot
from hostprep.errors import CommandFailed
from hostprep.model import Policy
from hostprep.paths import Paths
from hostprep.state import Store
from tests.helpers import FakeKernel


class OldBackend:
    """Another backend holding a part of hostprep; ``release`` is recorded in ``events``."""

    name = "nft"
    variant = "nftables"

    def __init__(self, events: list[str], *, stays: bool = False, fails: bool = False) -> None:
        self.events, self.stays, self.fails, self.held = events, stays, fails, ["nft: table inet hostprep"]

    def part(self) -> list[str]:
        return list(self.held)

    def release(self) -> None:
        self.events.append("release")
        if self.fails:
            raise CommandFailed("nft -f", "exit 1: Error: injected")
        if not self.stays:
            self.held = []

    def others(self) -> list:
        return []


class Recording(FakeKernel):
    """A FakeKernel that notes its loads in the shared ``events`` list."""

    events: list[str] = None

    def restore(self, family: int, text: str) -> None:
        self.events.append(f"load IPv{family}")
        super().restore(family, text)


def desired():
    return render.desired(Policy("eth1"))


def journal(tmp_path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in (tmp_path / "var/log/hostprep/journal.log").read_text().splitlines()]


def test_the_new_backend_holds_it_before_the_old_part_goes(tmp_path: Path, monkeypatch):
    events: list[str] = []
    d = desired()
    new = Recording.holding(d, nft=None)
    new.events = events
    old = OldBackend(events)
    new.other_backends = [old]
    # the load "lands": read back afterwards, the kernel holds what was loaded
    monkeypatch.setattr(engine, "verify", lambda backend, want, keep_nft=False: (backend.observe(), []))
    out = engine.converge(new, Store(Paths(tmp_path)), d, "hostprep apply --backend iptables-nft",
                          recorded_nft=None)
    assert events == ["load IPv4", "load IPv6", "release"]       # new in (and read back), then old out
    assert out.changed is True
    line = journal(tmp_path)[-1]
    assert line[-1] == "ok"
    assert line[3].endswith("backend nft -> iptables-nft: iptables-nft loaded and read back, then removed "
                            "nft: table inet hostprep")
    assert out.summary.endswith("then removed nft: table inet hostprep")


def test_a_failed_load_releases_nothing(tmp_path: Path):
    events: list[str] = []
    new = FakeKernel()            # reads back none of what it loads: verify fails, the load is undone
    new.other_backends = [OldBackend(events)]
    with pytest.raises(CommandFailed) as err:
        engine.converge(new, Store(Paths(tmp_path)), desired(), "hostprep apply", recorded_nft=None)
    assert err.value.field == "verify"
    assert events == []           # the old backend's part stays: it is all that holds hostprep


@pytest.mark.parametrize("stays, fails", [(True, False), (False, True)])
def test_a_release_that_fails_or_leaves_something_is_an_error(tmp_path: Path, monkeypatch, stays, fails):
    events: list[str] = []
    d = desired()
    new = FakeKernel.holding(d, nft=None)
    new.other_backends = [OldBackend(events, stays=stays, fails=fails)]
    monkeypatch.setattr(engine, "verify", lambda backend, want, keep_nft=False: (backend.observe(), []))
    with pytest.raises(CommandFailed) as err:
        engine.converge(new, Store(Paths(tmp_path)), d, "hostprep apply", recorded_nft=None)
    assert err.value.field == ("switch" if stays else "nft -f")
    line = journal(tmp_path)[-1]
    assert line[3] == "backend nft -> iptables-nft: removing nft's part" and line[-1].startswith("failed: ")


def test_the_snapshot_is_taken_through_the_backend_holding_hostprep(tmp_path: Path):
    """Before a switch the chosen backend holds nothing: the snapshot names the old one."""
    d = desired()
    old = FakeKernel.holding(d, variant="legacy")
    new = FakeKernel(variant="nft")
    new.other_backends = [old]
    assert snapshot.holder_of(new) is old
    snap = snapshot.take(new, Store(Paths(tmp_path)), firewall=True, kernel=False, command="hostprep apply")
    assert snap.backend == "legacy"
    assert [c[0] for c in snap.firewall["4"]["chains"]] == [c.name for c in d.ruleset(4).chains]
    # a change on the backend that holds it already: that one
    assert snapshot.holder_of(old) is old
    # nothing anywhere: the chosen one
    assert snapshot.holder_of(FakeKernel()) is not old
