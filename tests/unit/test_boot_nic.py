"""boot and the external NIC's identity: a missing, renamed or swapped NIC fails the boot loudly,
and the nft table hooked on a device that still exists is never dropped (issue 10, item 4).

No kernel: ``converge`` is replaced by a recorder (what boot asks it to load is the decision under
test), /sys/class/net by a directory, the runner by a fake.  The kernel tests
(tests/kernel/test_nic_identity.py) prove the same on real devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostprep import engine, ops, records, render
from hostprep.observed import LiveState, NftObserved
from hostprep.model import Policy
from hostprep.paths import Paths
from hostprep.state import Store
from tests.helpers import FakeKernel

RECORDED = "52:54:00:12:34:56"


def kernel(nft_device: str | None) -> FakeKernel:
    """A kernel whose nft ingress table is hooked on ``nft_device`` (None: no table)."""
    return FakeKernel(nft=NftObserved(nft_device, "table netdev hostprep {}\n", {}) if nft_device else None)


def sys_net(tmp_path: Path, devices: dict[str, str]) -> Path:
    """name -> MAC, all permanent (addr_assign_type 0), as physical NICs have them."""
    root = tmp_path / "net"
    root.mkdir()
    for name, mac in devices.items():
        (root / name).mkdir()
        (root / name / "address").write_text(mac + "\n")
        (root / name / "addr_assign_type").write_text("0\n")
    return root


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(Paths(tmp_path / "root"))
    desired = render.desired(Policy("eth1"))
    records.save_applied(s, records.AppliedRecord.of(desired, LiveState({}, None), "nft",
                                                     {"mac": RECORDED, "permanent": True}))
    return s


@pytest.fixture
def calls(monkeypatch):
    """What boot asked converge to do: (nft device wanted or None, keep_nft)."""
    seen: list[tuple[str | None, bool]] = []

    def converge(backend, store, desired, command, *, recorded_nft=None, keep_nft=False):
        seen.append((desired.nft.device if desired and desired.nft else None, keep_nft))
        return engine.Outcome(False)
    monkeypatch.setattr(engine, "converge", converge)
    return seen


def boot(*args):
    res = ops.boot(*args)
    return res.notes, res.failures


def journal(store: Store) -> list[list[str]]:
    return [ln.split("\t")[2:] for ln in store.paths.journal.read_text().splitlines()]


def test_same_nic_loads_the_table_on_it(store, calls, tmp_path, fake_runner):
    notes, failures = boot(kernel("eth1"), store, fake_runner(), sys_net(tmp_path, {"eth1": RECORDED}))
    assert (failures, calls) == ([], [("eth1", False)])


def test_renamed_nic_fails_and_keeps_the_table(store, calls, tmp_path, fake_runner):
    notes, failures = boot(kernel("ext9"), store, fake_runner(), sys_net(tmp_path, {"ext9": RECORDED}))
    assert [f.split(";")[0] for f in failures] == [
        f"external NIC eth1 is gone: the device hardened at apply (permanent MAC {RECORDED}) is now named ext9"]
    assert calls == [(None, True)]          # the iptables rules for eth1 are loaded; the table stays
    assert [j[:2] for j in journal(store)] == [["hostprep boot", "external NIC eth1: renamed"]]


def test_swapped_nic_fails_and_leaves_the_table_on_the_device_it_is_hooked_on(store, calls, tmp_path, fake_runner):
    """Kernels before 6.x keep a netdev hook on the device across a rename (the listing names ext9)."""
    net = sys_net(tmp_path, {"eth1": "52:54:00:00:00:99", "ext9": RECORDED})
    notes, failures = boot(kernel("ext9"), store, fake_runner(), net)
    assert [f.split(":")[0] for f in failures] == ["external NIC eth1 is another device now"]
    assert calls == [(None, True)]
    assert "the fragment table stays on ext9, where it is hooked; it is not moved to eth1, which is another " \
        "device now" in notes


def test_swapped_nic_without_a_live_table_gets_the_hardening(store, calls, tmp_path, fake_runner):
    """A permanent MAC that differs and the old NIC gone: fail loudly, harden the name (fail closed)."""
    notes, failures = boot(kernel(None), store, fake_runner(),
                                    sys_net(tmp_path, {"eth1": "52:54:00:00:00:99"}))
    assert [f.split(":")[0] for f in failures] == ["external NIC eth1 is another device now"]
    assert calls == [("eth1", False)]


def test_missing_nic_fails_and_keeps_a_live_table(store, calls, tmp_path, fake_runner):
    notes, failures = boot(kernel("eth1"), store, fake_runner(), sys_net(tmp_path, {}))
    assert [f.split(";")[0] for f in failures] == [
        f"external NIC eth1 is not present (no device has its permanent MAC {RECORDED})"]
    assert calls == [(None, True)]


def test_a_record_without_identity_is_a_note_not_a_failure(store, calls, tmp_path, fake_runner):
    rec = json.loads(store.paths.state_file.read_text())
    del rec["nic"]
    store.paths.state_file.write_text(json.dumps(rec))
    notes, failures = boot(kernel("eth1"), store, fake_runner(), sys_net(tmp_path, {"eth1": RECORDED}))
    assert (failures, calls) == ([], [("eth1", False)])
    assert [n for n in notes if n.startswith("warning: ")] == [
        "warning: the identity (MAC) of external NIC eth1 is not recorded (applied by an older hostprep): a renamed "
        "or swapped NIC cannot be detected; run 'hostprep apply' to record it"]


def test_apply_records_the_identity_and_container_changes_keep_it(store, monkeypatch):
    from hostprep import nic as nicmod

    now = {"ident": nicmod.NicIdentity("52:54:00:00:00:99", True)}
    monkeypatch.setattr(nicmod, "identity_of", lambda name, runner, sys_net=None: now["ident"])
    monkeypatch.setattr(engine, "converge", lambda *a, **kw: engine.Outcome(False, before=LiveState(
        {}, None), after=LiveState({}, None)))

    class Bk:
        variant = "nft"
        runner = None

        def target(self, desired):
            return desired
    desired = render.desired(Policy("eth1"))
    # container up/down: the NIC may have been swapped meanwhile; they must not bless it
    ops.converge_and_record(Bk(), store, desired, "hostprep container up x", record_nic=False)
    assert store.applied()["nic"] == {"mac": RECORDED, "permanent": True}
    ops.converge_and_record(Bk(), store, desired, "hostprep apply -i eth1")
    assert store.applied()["nic"] == {"mac": "52:54:00:00:00:99", "permanent": True}
    now["ident"] = None                     # the NIC cannot be read: recorded as unknown
    ops.converge_and_record(Bk(), store, desired, "hostprep apply -i eth1")
    assert store.applied()["nic"] is None
