"""A renamed or swapped external NIC is reported loudly, and its nft table is never dropped (issue 10, item 4).

hostprep's iptables rules match the external NIC by name (``-i eth1``).  When
eth1 is renamed, the device keeps its addresses and answers on them unfiltered;
when another device takes the name, the hardening sits on the wrong device.
apply records the NIC's identity (its MAC, and whether it is a permanent one);
``hostprep boot`` and ``status`` compare it with the device of that name now:
boot exits 1 with one line naming the device and the fix, journals it, still
loads the rules for the name (fail closed), and leaves the nft table where it
is hooked; status exits 1 and says what happened.

Real namespaces (the ``host`` fixture's sandbox), real packets; every backend.
"""

from __future__ import annotations

import json
import re

from hostprep.sandbox import HOST_EXT4
from tests.helpers import ANSWER


def mac(host, dev: str) -> str:
    return host.run(host.box.host, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()


def nft_table(host) -> str | None:
    res = host.run(host.box.host, ["nft", "list", "table", "netdev", "hostprep"], check=False)
    return re.sub(r"counter packets \d+ bytes \d+", "counter", res.stdout) if res.returncode == 0 else None


def rename(host, old: str, new: str) -> None:
    for argv in (["ip", "link", "set", old, "down"], ["ip", "link", "set", old, "name", new],
                 ["ip", "link", "set", new, "up"]):
        host.run(host.box.host, argv)


def journal(host) -> list[list[str]]:
    p = host.root / "var/log/hostprep/journal.log"
    return [ln.split("\t") for ln in p.read_text().splitlines()]


def failed_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("hostprep boot: FAILED: ")]


NATIVE = True      # runs on the native nft backend too (conftest.variant)
LEGACY = False     # conftest.variant: iptables-nft stands for both iptables variants here
LEGACY_WHY = ("the iptables variant changes only the tool hostprep runs in this module; its rules, "
              "reading and boot files are proven on iptables-legacy by the hardening, containers, "
              "persistence, boot, switch, synproxy and selftest modules")


def hostprep_jumps(host) -> list[str]:
    """hostprep's jumps from INPUT, IPv4, as the backend reads them (iptables-save, or the native
    table's base chain: it matches the NIC by name too, ``iifname "eth1"``)."""
    return [f"-A INPUT {r.spec}" for r in host.observed(4).chain_rules("INPUT") if "HOSTPREP" in r.spec]


def test_apply_records_the_nic_identity(host):
    host.apply()
    rec = json.loads((host.root / "var/lib/hostprep/applied.json").read_text())
    # a veth: its address is random (addr_assign_type 1), not a permanent one
    assert rec["nic"] == {"mac": mac(host, "eth1"), "permanent": False}
    st = host.hostprep("status", "--json", check=False)
    assert json.loads(st.stdout)["nic"]["identity"] == {
        "recorded": {"mac": mac(host, "eth1"), "permanent": False}, "state": "ok", "detail": "", "now_named": None}
    assert st.returncode == 0, st.stdout


def test_renamed_nic_boot_fails_loudly_and_keeps_the_nft_table(host):
    host.apply()
    m = mac(host, "eth1")
    table = nft_table(host)
    assert table is not None
    rename(host, "eth1", "ext9")
    # The danger: the renamed device is not filtered any more (a closed port answers).
    assert host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT4, dport=8446, timeout=ANSWER)["reply"] == "RA"

    res = host.hostprep("boot", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    problem = (f"external NIC eth1 is gone: the device hardened at apply (MAC {m}) is now named ext9; hostprep's "
               "rules match eth1 by name, so ext9 is NOT filtered; rename it back (ip link set ext9 down; ip link "
               "set ext9 name eth1; ip link set eth1 up), or run 'hostprep apply -i ext9'")
    assert failed_lines(res) == [f"hostprep boot: FAILED: {problem}"]
    assert nft_table(host) == table                      # not deleted
    assert hostprep_jumps(host) == ["-A INPUT -i eth1 -j HOSTPREP-IN"]   # the name stays hardened
    assert [f[2:] for f in journal(host) if f[3].startswith("external NIC ")] == [
        ["hostprep boot", "external NIC eth1: renamed", f"FAILED: {problem}"]]

    st = host.hostprep("status", check=False)
    assert st.returncode == 1
    assert f"difference: {problem}" in " ".join(st.stderr.split()), st.stderr
    ident = json.loads(host.hostprep("status", "--json", check=False).stdout)["nic"]["identity"]
    assert (ident["state"], ident["now_named"]) == ("renamed", "ext9")

    # Renamed back: boot and status are content again, nothing was lost meanwhile.
    rename(host, "ext9", "eth1")
    assert host.hostprep("boot", check=False).returncode == 0
    assert nft_table(host) == table
    # (its carrier may still be coming up: the identity, not the exit code, is what this checks)
    ident = json.loads(host.hostprep("status", "--json", check=False).stdout)["nic"]["identity"]
    assert (ident["state"], ident["now_named"]) == ("ok", None)


def test_another_device_named_like_the_nic_is_a_swap(host):
    host.apply()
    m = mac(host, "eth1")
    rename(host, "eth1", "ext9")
    host.run(host.box.host, ["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "swp0"])
    other = mac(host, "eth1")
    assert other != m

    res = host.hostprep("boot", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    problem = (f"external NIC eth1 is another device now: its MAC is {other}, not {m} as at apply; the device "
               f"hardened at apply (MAC {m}) is now named ext9 and is NOT filtered; if eth1 is the internet-facing "
               "NIC now, run 'hostprep apply -i eth1' to record it; otherwise give the external NIC its name back")
    assert failed_lines(res) == [f"hostprep boot: FAILED: {problem}"]
    assert nft_table(host) is not None
    assert [f[4] for f in journal(host) if f[3] == "external NIC eth1: swapped"] == [f"FAILED: {problem}"]
    st = host.hostprep("status", check=False)
    assert st.returncode == 1
    assert f"difference: {problem}" in " ".join(st.stderr.split()), st.stderr
    ident = json.loads(host.hostprep("status", "--json", check=False).stdout)["nic"]["identity"]
    assert (ident["state"], ident["now_named"]) == ("swapped", "ext9")


def test_a_record_without_identity_is_not_an_error(host):
    """applied.json written by an older hostprep: boot and status work, status notes it."""
    host.apply()
    path = host.root / "var/lib/hostprep/applied.json"
    rec = json.loads(path.read_text())
    del rec["nic"]
    path.write_text(json.dumps(rec))
    assert host.hostprep("boot", check=False).returncode == 0
    st = host.hostprep("status", check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "the identity (MAC) of external NIC eth1 is not recorded" in " ".join(st.stderr.split())
