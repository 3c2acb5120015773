"""apply / status / flush as an admin uses them, as root in the sandbox host.

Every test compares the kernel state before and after (both families of the
filter table and the nft ruleset) and checks the CLI's exit code and words.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from hostprep.observed import normalise_nft, parse_save
from hostprep.sandbox import HOST_EXT4
from tests.helpers import tcp
from hostprep.model import BUILTIN_CHAINS, GROUPS, PREFIX, Rule

JUMPS = {"INPUT": "-i eth1 -j HOSTPREP-IN", "FORWARD": "-i eth1 -j HOSTPREP-IN",
         "OUTPUT": "-o eth1 -j HOSTPREP-OUT"}
# OUTPUT's second jump (ddos group): the SYN synproxy sends for a client that returned a valid cookie
COOKIE_JUMP = ("-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype ! --src-type LOCAL -m conntrack "
               "--ctstate NEW -j HOSTPREP-CONTAINERS")
ALL_JUMPS = {**{c: [j] for c, j in JUMPS.items()}, "OUTPUT": [JUMPS["OUTPUT"], COOKIE_JUMP]}
# the same on the native backend (rules/hostprep.nft.j2: fib saddr type != local), as its view shows it
NATIVE_JUMPS = {**ALL_JUMPS, "OUTPUT": [JUMPS["OUTPUT"], "-j HOSTPREP-CONTAINERS"]}
EXT_SESSION = "198.51.100.20 50000 198.51.100.10 22"       # arrives at the external NIC
EXT_SESSION6 = "2001:db8:e::20 50000 2001:db8:e::10 22"
INT_SESSION = "192.0.2.20 50000 192.0.2.10 22"             # arrives at the internal NIC
NOT_APPLIED = "hostprep is not applied (settings remembered): run 'hostprep apply'"
NOTHING_YET = "nothing applied yet: run 'hostprep apply -i <external NIC>'"
REPO = str(Path(__file__).resolve().parents[2])


NATIVE = True      # runs on the native nft backend too (conftest.variant)
LEGACY = False     # conftest.variant: iptables-nft stands for both iptables variants here
LEGACY_WHY = ("the iptables variant changes only the tool hostprep runs in this module; its rules, "
              "reading and boot files are proven on iptables-legacy by the hardening, containers, "
              "persistence, boot, switch, synproxy and selftest modules")


def chain_counters_zeroed(text: str) -> str:
    """iptables-legacy-save prints the built-in chains' policy counters even without -c."""
    return re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", text, flags=re.M)


def nft_tables(text: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """``nft list ruleset`` as {table: {chain: rule lines}}, counters stripped.

    Chain order is not part of the comparison (nft lists chains in creation order,
    and iptables-nft creates built-in chains on first use), and a built-in chain
    left empty with policy accept (iptables-nft does not delete it when its last
    rule goes) counts as absent: neither is a rule nor changes what a packet meets.
    """
    tables: dict[str, dict[str, tuple[str, ...]]] = {}
    table = chain = None
    body: list[str] = []
    for line in normalise_nft(text).splitlines():
        if line.startswith("table "):
            table = line.rstrip(" {")
            tables[table] = {}
        elif line.startswith("\tchain "):
            chain, body = line.strip().rstrip(" {"), []
        elif line == "\t}" and chain is not None:
            empty_base = len(body) == 1 and body[0].startswith("type ") and body[0].endswith("policy accept;")
            if not empty_base:
                tables[table][chain] = tuple(body)
            chain = None
        elif chain is not None:
            body.append(line.strip())
    return tables


def state(host) -> dict:
    """Everything apply/flush may change: both families of the filter table and nft (no counters)."""
    return {"4": chain_counters_zeroed(host.ruleset_text(4)),
            "6": chain_counters_zeroed(host.ruleset_text(6)),
            "nft": nft_tables(host.nft_listing())}


def foreign_text(host, family: int) -> str:
    """The filter table without hostprep's chains, rules and jumps."""
    return "\n".join(ln for ln in chain_counters_zeroed(host.ruleset_text(family)).splitlines()
                     if PREFIX not in ln) + "\n"


def foreign(host) -> dict:
    """The iptables filter table's foreign part (on the native backend too: iptables-nft's rules,
    as Podman's would be next to it, stay byte-identical)."""
    return {fam: (foreign_text(host, fam), parse_save(host.save(fam), fam).foreign()) for fam in (4, 6)}


def jumps_into_hostprep(host, family: int, chain: str) -> list[str]:
    return [r.spec for r in host.observed(family).chain_rules(chain)
            if Rule(r.chain, r.spec).target.startswith(PREFIX)]


def first_rule(host, family: int, chain: str) -> str | None:
    rules = host.observed(family).chain_rules(chain)
    return rules[0].spec if rules else None


def status_json(host) -> tuple[int, dict]:
    res = host.hostprep("status", "--json", check=False)
    return res.returncode, json.loads(res.stdout)


def assert_one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in res.stdout + res.stderr
    return lines[0]


def assert_applied(host) -> None:
    code, report = status_json(host)
    assert (code, report["problems"]) == (0, [])
    for fam in (4, 6):
        for chain, spec in JUMPS.items():
            assert first_rule(host, fam, chain) == spec


def assert_nothing_of_hostprep(host) -> None:
    for fam in (4, 6):
        assert host.observed(fam).our_chains == ()
        assert host.observed(fam).our_jumps == ()
        assert PREFIX not in host.ruleset_text(fam)
    assert "netdev hostprep" not in host.nft_listing()


# -- idempotency ---------------------------------------------------------------

def test_apply_twice_is_idempotent(host):
    first = host.apply()
    assert first.stdout.count("applied: ") == 1
    after_first = state(host)
    second = host.apply()
    assert "nothing changed: the hardening on eth1 is already live" in second.stdout
    assert "applied: " not in second.stdout
    assert state(host) == after_first
    assert list(after_first["nft"]["table netdev hostprep"]) == ["chain ingress", "chain syn4", "chain syn6"]
    for fam in (4, 6):
        for chain in BUILTIN_CHAINS:
            assert jumps_into_hostprep(host, fam, chain) == (NATIVE_JUMPS if host.native else ALL_JUMPS)[chain]
            assert first_rule(host, fam, chain) == JUMPS[chain]


# -- foreign rules ---------------------------------------------------------------

def test_foreign_rules_untouched_by_apply_and_flush(host):
    before = foreign(host)
    before_state = state(host)
    # the fixture's foreign rules are there to be protected
    assert before[4][1][1] == before[6][1][1]
    assert ("INPUT", "-j FOREIGN-IN") in before[4][1][1]
    assert ("PODMAN-FWD", "-i podman0 -j ACCEPT") in before[4][1][1]

    host.apply()
    applied_state = state(host)
    assert foreign(host) == before
    assert_applied(host)

    flushed = host.hostprep("flush")
    # what was done, one item per line, then a summary (issue 15, item 4); the native backend has
    # one rule more per family (a SYN without an MSS option: the iptables rule's "!" matches it too)
    n4, n6, c, j = (48, 52, 13, 8) if host.native else (47, 51, 13, 8)
    assert flushed.stdout.splitlines()[:6] == [
        f"  - IPv4: removed {n4} rules in {c} chains", "  - IPv4: removed the jumps from INPUT, FORWARD, OUTPUT",
        f"  - IPv6: removed {n6} rules in {c} chains", "  - IPv6: removed the jumps from INPUT, FORWARD, OUTPUT",
        "  - removed the nft ingress table on eth1",
        f"removed hostprep's rules: {n4 + n6} rules in {2 * c} chains, {j} jumps and the nft ingress table"]
    assert "the settings stay remembered: 'hostprep apply' brings the hardening back" in flushed.stdout
    assert foreign(host) == before
    assert_nothing_of_hostprep(host)
    assert state(host) == before_state

    again = host.hostprep("flush")
    assert again.returncode == 0
    assert "nothing to remove: no hostprep rules are loaded" in again.stdout
    assert state(host) == before_state

    # The settings were remembered: plain 'apply -y' brings the same hardening back.
    back = host.hostprep("apply", "-y")
    assert "re-applying the remembered settings" in back.stdout
    assert state(host) == applied_state
    assert foreign(host) == before
    assert_applied(host)


def test_foreign_rule_inserted_above_the_jump(host, variant):
    host.apply()
    for fam in (4, 6):
        base = "iptables" if fam == 4 else "ip6tables"
        host.run(host.box.host, [f"{base}-{'nft' if host.native else variant}", "-I", "INPUT", "1", "-j", "ACCEPT"])
    if host.native:
        # Another table's accept ends only its own chain: hostprep's base chain still judges the
        # packet, nothing of hostprep changed, and its default deny still drops.
        code, report = status_json(host)
        assert (code, report["problems"]) == (0, [])
        r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445)])
        assert (r["answered"], host.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")) == (False, 1)
        return
    code, report = status_json(host)
    assert code == 1
    assert "IPv4: jump from INPUT missing or not first" in report["problems"]
    assert "IPv6: jump from INPUT missing or not first" in report["problems"]
    text = host.hostprep("status", check=False)
    assert text.returncode == 1
    assert "difference: IPv4: jump from INPUT missing or not first" in text.stderr

    moved = host.apply()
    assert "nothing changed" not in moved.stdout
    for fam in (4, 6):
        assert [r.spec for r in host.observed(fam).chain_rules("INPUT")] == [
            JUMPS["INPUT"], "-j ACCEPT", "-j FOREIGN-IN"]
        assert [r.spec for r in host.observed(fam).chain_rules("FORWARD")] == [
            JUMPS["FORWARD"], "-j PODMAN-FWD"]
    assert_applied(host)


def test_duplicate_jump_from_another_tool_is_removed(host, variant):
    if host.native:
        pytest.skip("iptables has no hostprep chain to jump to on the native backend")
    host.apply()
    host.run(host.box.host, [f"ip6tables-{variant}", "-A", "OUTPUT", "-o", "eth1", "-j", "HOSTPREP-OUT"])
    assert jumps_into_hostprep(host, 6, "OUTPUT") == ALL_JUMPS["OUTPUT"] + [JUMPS["OUTPUT"]]
    code, report = status_json(host)
    assert (code, report["problems"][0]) == (1, "IPv6: jump from OUTPUT missing or not first")
    host.apply()
    assert jumps_into_hostprep(host, 6, "OUTPUT") == ALL_JUMPS["OUTPUT"]
    assert_applied(host)


# -- status ---------------------------------------------------------------------

def test_status_exit_codes_and_json(host, variant):
    host.apply()
    code, report = status_json(host)
    assert code == 0
    assert report["schema"] == 1
    assert report["backend"] == host.backend
    assert sorted(report["families"]) == ["4", "6"]
    for fam in ("4", "6"):
        groups = report["families"][fam]["groups"]
        assert list(groups) == list(GROUPS)
        assert {g: (v["wanted"], v["present"]) for g, v in groups.items()} == {g: (True, True) for g in GROUPS}
        assert report["families"][fam]["differences"] == []
    assert report["problems"] == []
    assert report["ipv6_parity"] is True
    text = host.hostprep("status")
    assert "everything desired is live" in text.stdout

    # Tamper with a hostprep chain: delete the one SSH rule (IPv4) with the variant's tool.
    if host.native:
        listing = host.run(host.box.host, ["nft", "-a", "list", "chain", "inet", "hostprep", "HOSTPREP-SSH-v4"]).stdout
        handle = re.search(r"# handle (\d+)\s*$", [ln for ln in listing.splitlines() if "dport 22" in ln][0]).group(1)
        host.run(host.box.host, ["nft", "delete", "rule", "inet", "hostprep", "HOSTPREP-SSH-v4", "handle", handle])
    else:
        host.run(host.box.host, [f"iptables-{variant}", "-D", "HOSTPREP-SSH", "1"])
    code, report = status_json(host)
    assert code == 1
    assert "IPv4: chain HOSTPREP-SSH differs" in report["problems"]
    assert report["families"]["4"]["groups"]["ssh"]["present"] is False
    assert report["families"]["6"]["groups"]["ssh"]["present"] is True
    text = host.hostprep("status", check=False)
    assert text.returncode == 1
    assert "difference: IPv4: chain HOSTPREP-SSH differs" in text.stderr

    # apply repairs it, status is clean again
    host.apply()
    assert status_json(host)[0] == 0

    host.hostprep("flush")
    code, report = status_json(host)
    assert code == 1
    assert report["problems"] == [NOT_APPLIED]


def test_status_reports_missing_ingress_table(host):
    host.apply()
    host.run(host.box.host, ["nft", "delete", "table", "netdev", "hostprep"])
    code, report = status_json(host)
    if host.native:     # one listing of both tables: the ingress part is gone from it
        assert (code, report["problems"]) == (1, ["nft ingress table: live table differs from the recorded one"])
        assert report["fragments"]["counters"] == {}
    else:
        assert (code, report["problems"]) == (1, ["nft ingress table: table missing"])
        assert report["fragments"] is None
    host.apply()
    code, report = status_json(host)
    assert (code, report["problems"]) == (0, [])
    assert report["fragments"]["device"] == "eth1"


def test_status_changes_nothing(host):
    host.apply()
    before = state(host)
    before_files = sorted(str(p) for p in host.root.rglob("*"))
    journal = (host.root / "var/log/hostprep/journal.log").read_text()
    assert host.hostprep("status").returncode == 0
    assert status_json(host)[0] == 0
    assert state(host) == before
    assert sorted(str(p) for p in host.root.rglob("*")) == before_files
    assert (host.root / "var/log/hostprep/journal.log").read_text() == journal


def test_status_before_anything_applied(host):
    before = state(host)
    code, report = status_json(host)
    assert (code, report["problems"]) == (1, [NOTHING_YET])
    assert state(host) == before


# -- dry run --------------------------------------------------------------------

def test_dry_run_changes_nothing(host):
    before = state(host)
    res = host.hostprep("apply", "-i", "eth1", "--dry-run")
    assert res.returncode == 0
    assert ('tcp dport 22 counter drop comment "hostprep ssh: no ssh in"' if host.native else
            "-A HOSTPREP-SSH -p tcp -m tcp --dport 22") in res.stdout
    assert "# nft -f - <<EOF" in res.stdout
    assert "dry run: nothing was changed" in res.stdout
    assert state(host) == before
    # nothing remembered either
    assert status_json(host)[1]["problems"] == [NOTHING_YET]

    # a dry run against the applied hardening shows only the change
    host.apply()
    applied = state(host)
    res = host.hostprep("apply", "-i", "eth1", "-p", "203.0.113.7", "--dry-run")
    assert res.returncode == 0
    assert "IPv4: chain HOSTPREP-ICMP differs" in res.stdout
    assert "-A HOSTPREP-SSH" not in res.stdout
    assert state(host) == applied
    assert status_json(host)[1]["settings"]["ping_from"] == []


def test_dry_run_as_non_root(host):
    # setpriv, not runuser: this machine's interpreter lives under /root (mode 0700);
    # setpriv resolves the program path before exec drops the capabilities.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    before = state(host)
    env = {"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend, "PYTHONPATH": REPO}
    res = host.run(host.box.host, [*drop, "id", "-u"], env=env)
    assert res.stdout.strip() == "65534"
    res = host.run(host.box.host, [*drop, sys.executable, "-m", "hostprep", "apply", "-i", "eth1",
                                   "--dry-run"], env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert ('tcp dport 22 counter drop comment "hostprep ssh: no ssh in"' if host.native else
            "-A HOSTPREP-SSH -p tcp -m tcp --dport 22") in res.stdout
    assert ("# nft -f - <<EOF" if host.native else "# ip6tables-restore --noflush <<EOF") in res.stdout
    assert "dry run: nothing was changed" in res.stdout
    assert state(host) == before


# -- bad input --------------------------------------------------------------------

BAD_INPUT = {
    "nonexistent NIC": (["apply", "-i", "eth9", "-y"], "existing interfaces: eth0, eth1, lo"),
    "injection in NIC": (["apply", "-i", "eth1;reboot", "-y"], "is not a valid interface name"),
    "16-character NIC": (["apply", "-i", "abcdefghijklmnop", "-y"], "is 16 characters"),
    "bad IPv4 -p": (["apply", "-i", "eth1", "-y", "-p", "300.1.2.3"], "-p/--ping-from"),
    "space in -p": (["apply", "-i", "eth1", "-y", "-p", "a b"], "-p/--ping-from"),
    "prefix /33": (["apply", "-i", "eth1", "-y", "-p", "198.51.100.0/33"], "-p/--ping-from"),
    "-d with -i": (["apply", "-d", "-i", "eth1"], "-d cannot be used with -i, -e or -a"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_refused_with_one_line(host, case):
    argv, says = BAD_INPUT[case]
    host.apply()                     # a change would be visible against the applied hardening
    before = state(host)
    res = host.hostprep(*argv, check=False)
    line = assert_one_error_line(res)
    assert says in line
    assert state(host) == before
    assert status_json(host)[0] == 0


def test_apply_without_interface_and_nothing_remembered(host):
    before = state(host)
    res = host.hostprep("apply", "-y", check=False)
    line = assert_one_error_line(res)
    assert "no external NIC given and none remembered" in line
    assert state(host) == before


def test_no_terminal_and_no_yes_refused(host):
    before = state(host)
    res = host.hostprep("apply", "-i", "eth1", check=False, input="")
    line = assert_one_error_line(res)
    assert "-y" in line
    assert state(host) == before
    assert status_json(host)[1]["problems"] == [NOTHING_YET]


# -- SSH lockout guard -----------------------------------------------------------

@pytest.mark.parametrize("session", [EXT_SESSION, EXT_SESSION6])
def test_ssh_session_on_external_nic_refused(host, session):
    before = state(host)
    res = host.hostprep("apply", "-i", "eth1", "-y", check=False, env={"SSH_CONNECTION": session})
    line = assert_one_error_line(res)
    assert "External/Internet facing" in line
    assert "--force" in line
    assert state(host) == before
    assert status_json(host)[1]["problems"] == [NOTHING_YET]


def test_ssh_session_on_internal_nic_applies(host):
    res = host.hostprep("apply", "-i", "eth1", "-y", env={"SSH_CONNECTION": INT_SESSION})
    assert "WARNING" not in res.stderr
    assert "applied: " in res.stdout
    assert_applied(host)


def test_force_applies_with_loud_warning(host):
    res = host.hostprep("apply", "-i", "eth1", "-y", "--force", env={"SSH_CONNECTION": EXT_SESSION})
    assert res.returncode == 0
    assert "WARNING: Current shell session (198.51.100.20 -> 198.51.100.10, found by SSH_CONNECTION) " \
           "is connected through External/Internet facing Network Interface eth1" in res.stderr
    assert "applied: " in res.stdout
    assert_applied(host)


# -- -d ----------------------------------------------------------------------------

def test_disable_works_like_flush(host):
    before_foreign = foreign(host)
    before = state(host)
    host.apply()
    res = host.hostprep("apply", "-d")
    n, c, j = (100, 26, 8) if host.native else (98, 26, 8)   # native: one MSS rule more per family
    assert f"removed hostprep's rules: {n} rules in {c} chains, {j} jumps and the nft ingress table" \
        in res.stdout.splitlines()
    assert_nothing_of_hostprep(host)
    assert state(host) == before
    assert foreign(host) == before_foreign
    assert status_json(host)[1]["problems"] == [NOT_APPLIED]
    again = host.hostprep("apply", "-d")
    assert "nothing to remove: no hostprep rules are loaded" in again.stdout
    assert state(host) == before
