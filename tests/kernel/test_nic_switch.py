"""Issue 10, item 6: applying on another NIC than the hardened one says what the hardened
NIC loses and which containers are bound elsewhere, before any prompt; with -y only
together with --switch-nic."""

from __future__ import annotations

import json
from pathlib import Path

from hostprep.sandbox import HOST_EXT4

NATIVE = True      # runs on the native nft backend too (conftest.variant)


def jumps(host, family: int) -> list[str]:
    """The jumps into hostprep's chains from INPUT (as the backend reads them: iptables-save, or
    the native table's base chain seen per family)."""
    return [r.spec for r in host.observed(family).chain_rules("INPUT") if "HOSTPREP" in r.spec]


def finesse(host, tmp_path: Path) -> None:
    env = tmp_path / "finesse.env"
    env.write_text("TEMPLATE_TYPE=finesse\n")
    host.hostprep("container", "up", "finesse", "--env", str(env))


def test_switching_the_nic_is_said_and_needs_switch_nic_with_yes(host, tmp_path):
    host.apply()
    finesse(host, tmp_path)
    def rules():
        return [[f"{r.chain} {r.spec}" for r in host.observed(fam).rules] for fam in (4, 6)] + [host.nft_state()]
    before = rules()
    warning = [f"NIC SWITCH: eth1 is the hardened external NIC now: applying on eth0 REMOVES the hardening from "
               "eth1 (its SSH, UDP, ICMP and port drops go; whatever listens there is reachable again)",
               f"NIC SWITCH: container finesse is bound to {HOST_EXT4}, which is not an address of eth0: its "
               "ports 8445 would not be reachable through eth0"]

    dry = host.hostprep("apply", "-i", "eth0", "--dry-run")
    assert [ln for ln in dry.stderr.splitlines() if ln.startswith("NIC SWITCH:")] == warning

    refused = host.hostprep("apply", "-i", "eth0", "-y", check=False)
    assert refused.returncode == 2
    assert [ln for ln in refused.stderr.splitlines() if ln.startswith("NIC SWITCH:")] == warning
    assert refused.stderr.splitlines()[-1] == (
        "error: -i/--interface: eth0 is not the hardened NIC (eth1); with -y the hardening is moved only on "
        "request (add --switch-nic to move it to eth0, or give -i eth1)")
    dry_y = host.hostprep("apply", "-i", "eth0", "-y", "--dry-run", check=False)
    assert (dry_y.returncode, dry_y.stderr.splitlines()[-1]) == (2, refused.stderr.splitlines()[-1])
    assert rules() == before
    assert json.loads((host.root / "var/lib/hostprep/applied.json").read_text())["settings"]["interface"] == "eth1"

    moved = host.hostprep("apply", "-i", "eth0", "-y", "--switch-nic")
    assert [ln for ln in moved.stderr.splitlines() if ln.startswith("NIC SWITCH:")] == warning
    assert jumps(host, 4) == jumps(host, 6) == ["-i eth0 -j HOSTPREP-IN"]
    # the same NIC again: nothing to say
    again = host.hostprep("apply", "-i", "eth0", "-y")
    assert [ln for ln in again.stderr.splitlines() if ln.startswith("NIC SWITCH:")] == []
