"""The native backend's undo puts back the iptables part its load removed (review of s5/merge,
finding 1): a boot whose read-back differs (HOSTPREP_FAULT=read-back:differ) leaves the
fail-safe live, never the external NIC open."""

from __future__ import annotations

import re

import pytest
from conftest import tool
from tests.helpers import QUIET

from hostprep import render

HOST4 = "198.51.100.10"
NATIVE = True      # runs on the native nft backend only (the iptables backends' load leaves the fail-safe)


def test_a_boot_whose_read_back_differs_keeps_the_failsafe(host):
    if not host.native:
        pytest.skip("the native backend's load removes the fail-safe; the iptables backends' does not")
    host.apply()
    for table in ("inet", "netdev"):          # a reboot: no hostprep table yet
        host.run(host.box.host, ["nft", "delete", "table", table, "hostprep"])
    for fam in (4, 6):                        # what the boot unit's ExecStartPre loads
        host.run(host.box.host, [tool(host.variant, fam, "restore"), "--noflush"],
                 input=render.failsafe_text("eth1", fam))
    before = [host.ruleset_text(fam) for fam in (4, 6)]
    assert all("-A INPUT -i eth1 -j HOSTPREP-FAILSAFE" in text for text in before)
    res = host.hostprep("boot", check=False, env={"HOSTPREP_FAULT": "read-back:differ"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "injected difference at read-back" in res.stdout + res.stderr
    assert [host.ruleset_text(fam) for fam in (4, 6)] == before       # the fail-safe, as it was
    assert host.run(host.box.host, ["nft", "list", "table", "inet", "hostprep"], check=False).returncode != 0
    assert host.probe1(host.box.inet, kind="tcp", dst=HOST4, dport=22, timeout=QUIET)["answered"] is False


def unordered(listing: str) -> str:
    """The listing with the elements of each anonymous set sorted: nft lists a reloaded set's
    elements in another order (the same set)."""
    return re.sub(r"\{ ([^{}\n]*) \}", lambda m: "{ " + ", ".join(sorted(m[1].split(", "))) + " }", listing)


def test_rollback_to_a_snapshot_of_drifted_tables_puts_them_back(host):
    """The live table differs from the record (a hand edit): the snapshot holds what puts the
    live tables back (previous_script), and the rollback loads it (finding 2)."""
    if not host.native:
        pytest.skip("the native backend's snapshots")
    host.apply()
    host.run(host.box.host, ["nft", "add", "rule", "inet", "hostprep", "HOSTPREP-DENY-v4", "tcp", "dport", "9",
                             "counter", "drop", "comment", '"handmade"'])
    drifted = host.nft_state()
    assert "handmade" in drifted
    host.apply("-p", "198.51.100.20")
    assert "handmade" not in host.nft_state()
    res = host.hostprep("rollback", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert unordered(host.nft_state()) == unordered(drifted)
    assert host.probe1(host.box.inet, kind="tcp", dst=HOST4, dport=22, timeout=QUIET)["answered"] is False
