"""`hostprep boot` fails closed: a damaged state file never means "no rules at all".

Each test applies the hardening (and containers) in the sandbox host, then wipes
the filter table the way iptables-services' restart does (iptables-restore
without --noflush), damages one state file, and runs `hostprep boot` as the
units do.  Boot must exit 1 with a line naming what it could not use, and still
load the hardening: SSH and a closed port on the external NIC get no answer
(real packets), the working containers' ports answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_containers import finesse_env, up
from tests.helpers import QUIET

HOST4 = "198.51.100.10"
EMPTY_FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


NATIVE = True      # runs on the native nft backend too (conftest.variant)


def wipe(host) -> None:
    """What `systemctl restart iptables` does to the filter table (hostprep's chains gone); on
    the native backend what `systemctl restart nftables` does to hostprep's tables (its
    ExecStop is `nft flush ruleset`; only hostprep's two tables are deleted here)."""
    if host.native:
        for table in ("inet", "netdev"):
            host.run(host.box.host, ["nft", "delete", "table", table, "hostprep"])
        assert host.nft_state() is None
        return
    for fam, tool in ((4, "iptables"), (6, "ip6tables")):
        host.run(host.box.host, [f"{tool}-{host.variant}-restore"], input=EMPTY_FILTER)
    assert "HOSTPREP" not in host.save(4) + host.save(6)


def jumps(host) -> list[list[str]]:
    if host.native:
        return [[f"-A INPUT {r.spec}" for r in host.observed(fam).chain_rules("INPUT")] for fam in (4, 6)]
    return [[ln for ln in host.save(fam, counters=False).splitlines() if ln.startswith("-A INPUT ")]
            for fam in (4, 6)]


def answered(host, port: int) -> bool:
    res = host.probe1(host.box.inet, kind="tcp", dst=HOST4, dport=port, timeout=QUIET)
    return res["answered"]


def boot(host):
    return host.hostprep("boot", check=False)


def test_a_broken_container_record_leaves_its_ports_closed_and_the_rest_loaded(host, tmp_path):
    host.apply()
    up(host, "fin", finesse_env(tmp_path))
    up(host, "ids", finesse_env(tmp_path, "ids.env", NGX_PRXY_FIN_PORT=8446))
    assert answered(host, 8446) and answered(host, 8445)
    wipe(host)
    bad = host.root / "var/lib/hostprep/containers/fin.json"
    bad.write_text('{"name": "fin"}')
    res = boot(host)
    assert res.returncode == 1
    assert [ln for ln in res.stderr.splitlines() if str(bad) in ln] != []
    assert jumps(host) == [["-A INPUT -i eth1 -j HOSTPREP-IN"]] * 2
    chains = host.observed(4).chains
    assert "HOSTPREP-C-ids" in chains and "HOSTPREP-C-fin" not in chains
    assert (answered(host, 8446), answered(host, 8445), answered(host, 22)) == (True, False, False)


@pytest.mark.parametrize("damage", ['{"settings": {}}', '{"settings": {"interface": "eth1"', "[1]"],
                         ids=["no-settings", "truncated", "not-an-object"])
def test_an_unusable_record_falls_back_to_the_remembered_nic(host, damage):
    host.apply("-p", "198.51.100.20")
    wipe(host)
    rec = host.root / "var/lib/hostprep/applied.json"
    rec.write_text(damage)
    res = boot(host)
    assert res.returncode == 1
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("hostprep boot: FAILED: ")]
    assert len(failed) == 1 and "applied.json" in failed[0], res.stderr
    assert "loading the remembered NIC's base hardening instead (eth1, no -p sources: ping stays closed)" \
        in res.stdout
    assert jumps(host) == [["-A INPUT -i eth1 -j HOSTPREP-IN"]] * 2
    assert answered(host, 22) is False
    # ping from the -p host stays closed: its resolved networks were in the broken record
    assert host.probe1(host.box.inet, kind="icmp", dst=HOST4, src="198.51.100.20",
                       timeout=QUIET)["answered"] is False


def test_a_broken_pending_record_does_not_stop_the_boot(host):
    host.apply()
    wipe(host)
    (host.root / "var/lib/hostprep/pending.json").write_text("{garbage")
    (host.root / "var/lib/hostprep/inflight.json").write_text(json.dumps({"id": "gone", "pid": 1,
                                                                          "command": "x"}))
    res = boot(host)
    assert res.returncode == 1
    assert "pending.json: cannot read" in res.stderr
    assert "hostprep boot: interrupted change gone: no snapshot; marker removed" in res.stdout.splitlines()
    assert jumps(host) == [["-A INPUT -i eth1 -j HOSTPREP-IN"]] * 2
    assert not Path(host.root / "var/lib/hostprep/inflight.json").exists()
    assert answered(host, 22) is False
