"""IPv4 base hardening on the external NIC, proven with real packets.

Every probe is judged twice: by the peer (reply or silence) and by hostprep's own
rule counters (iptables-save -c of the sandbox host, nft counters of the netdev
table).  Where it makes sense a control probe shows that the same packet is
answered when hostprep is not in the way (the internal NIC, a -p source, -a).

Probes that expect no answer cost their timeout, so they use 0.5 s.  Each test
runs on both firewall variants (nft and legacy) through the ``host`` fixture.
"""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from hostprep.model import PingSource, Policy
from hostprep.observed import target_of
from hostprep.sandbox import ADMIN4, HOST_EXT4, HOST_INT4, INET4, INET_EXTRA4

from bgproc import Bg
from conftest import load_rendered
from flows import tracked_flow
from tests.helpers import ANSWER, QUIET, tcp


DDOS_CHAINS = ("HOSTPREP-RST", "HOSTPREP-DDOS", "HOSTPREP-COOKIES", "HOSTPREP-SYNPROXY")
SPOOF_CHAINS = ("HOSTPREP-SPOOF",)


# --------------------------------------------------------------------------- helpers


NATIVE = True      # runs on the native nft backend too (conftest.variant)


def counted(host, probe_ns: str, probe: dict, counters: dict) -> tuple[dict, dict]:
    """Send one probe; return its result and the delta of each named counter.

    ``counters`` maps a label to a zero-argument callable reading a counter.
    """
    before = {k: read() for k, read in counters.items()}
    result = host.probe1(probe_ns, **probe)
    after = {k: read() for k, read in counters.items()}
    return result, {k: after[k] - before[k] for k in counters}


def group_drops(host, chain: str) -> int:
    """Packets dropped by the DROP rules of ``chain`` (jumps and RETURNs inside it not counted)."""
    return host.counter(4, chain, "-j DROP")


# --------------------------------------------------------------------------- 1. default deny

def test_syn_to_unopened_port_dropped_outside_rst_inside(host):
    host.apply()
    deny = {"deny": lambda: host.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")}
    outside, d_out = counted(host, host.box.inet, tcp(HOST_EXT4, 8445), deny)
    inside, d_in = counted(host, host.box.admin, tcp(HOST_INT4, 8445, ANSWER), deny)
    assert (outside["answered"], outside["reply"]) == (False, None)
    assert d_out == {"deny": 1}
    # control: the internal NIC never enters hostprep's chains, the closed port answers RST
    assert inside["reply"] == "RA"
    assert d_in == {"deny": 0}


# --------------------------------------------------------------------------- 2. ssh

def test_ssh_in_dropped_outside_answered_inside(host):
    host.apply()
    ssh = {"ssh": lambda: host.counter(4, "HOSTPREP-SSH", "hostprep ssh: no ssh in"),
           "deny": lambda: host.counter(4, "HOSTPREP-DENY")}
    outside, d_out = counted(host, host.box.inet, tcp(HOST_EXT4, 22), ssh)
    inside, d_in = counted(host, host.box.admin, tcp(HOST_INT4, 22, ANSWER), ssh)
    assert (outside["answered"], outside["reply"]) == (False, None)
    assert d_out == {"ssh": 1, "deny": 0}       # dropped by the ssh group, before default deny
    assert inside["reply"] == "RA"              # control: no sshd, so the internal NIC answers RST
    assert d_in == {"ssh": 0, "deny": 0}


def test_ssh_out_through_external_nic_blocked(host):
    host.apply()
    out = {"out": lambda: host.counter(4, "HOSTPREP-OUT", "hostprep ssh: no ssh out")}
    # A real connect() from the host itself; the inet peer has no sshd, so without the
    # rule the SYN would be refused at once.  Timeout 0.8 s < the 1 s initial SYN RTO:
    # exactly one SYN leaves the socket, hence exactly one packet counted.
    blocked, d_blocked = counted(host, host.box.host,
                                 {"kind": "connect", "dst": INET4, "port": 22, "timeout": 0.8}, out)
    control, d_control = counted(host, host.box.host,
                                 {"kind": "connect", "dst": ADMIN4, "port": 22, "timeout": ANSWER}, out)
    assert blocked == {"answered": False, "reply": None}        # timed out
    assert d_blocked == {"out": 1}
    assert control == {"answered": True, "reply": "refused"}    # internal NIC: RST came back
    assert d_control == {"out": 0}


# --------------------------------------------------------------------------- 3. icmp

def test_echo_dropped_outside_answered_inside(host):
    host.apply()
    icmp = {"other": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: other icmp")}
    outside, d_out = counted(host, host.box.inet, {"kind": "icmp", "dst": HOST_EXT4, "timeout": QUIET}, icmp)
    inside, d_in = counted(host, host.box.admin, {"kind": "icmp", "dst": HOST_INT4, "timeout": ANSWER}, icmp)
    assert (outside["answered"], outside["reply"]) == (False, None)
    assert d_out == {"other": 1}
    assert inside["reply"] == "icmp 0/0"
    assert d_in == {"other": 0}


def test_echo_allowed_only_from_ping_source(host):
    allowed_src, other_src = INET_EXTRA4          # 203.0.113.7, 203.0.113.8 live in the inet ns
    host.apply("-p", allowed_src)
    icmp = {"allowed": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: ping allowed (-p)"),
            "other": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: other icmp")}
    ok, d_ok = counted(host, host.box.inet,
                       {"kind": "icmp", "dst": HOST_EXT4, "src": allowed_src, "timeout": ANSWER}, icmp)
    no, d_no = counted(host, host.box.inet,
                       {"kind": "icmp", "dst": HOST_EXT4, "src": other_src, "timeout": QUIET}, icmp)
    assert ok["reply"] == "icmp 0/0"
    assert d_ok == {"allowed": 1, "other": 0}
    assert (no["answered"], no["reply"]) == (False, None)
    assert d_no == {"allowed": 0, "other": 1}


# ICMP errors quoting a connection the host opened (tests/kernel/flows.py); the fast
# path accepts RELATED only for the error types a connection needs.
RELATED = "hostprep fastpath: related"   # every fast-path rule that accepts RELATED (its comment, any backend)
UNREACH = "hostprep fastpath: related icmp destination unreachable"
OTHER_ICMP = "hostprep icmp: other icmp"


def icmperr(quote: dict, **kw) -> dict:
    return {"kind": "icmperr", "dst": HOST_EXT4, "src": INET4, "quote": quote, **kw}


def test_pmtu_icmp_error_of_tracked_connection_accepted(host):
    """ICMP "fragmentation needed" for a connection the host opened still arrives.

    Criterion: the error is accepted by the fast path's RELATED destination-unreachable
    rule (the "other icmp" drop does not count it) and the host really used it: before
    it the route to the peer has no learned MTU, after it ``ip route get`` shows
    ``mtu 1280`` (the route exception PMTU discovery creates).
    """
    host.apply()
    mtu = 1280
    c = {"unreach": lambda: host.counter(4, "HOSTPREP-FAST", UNREACH),
         "other": lambda: host.counter(4, "HOSTPREP-ICMP", OTHER_ICMP)}
    with tracked_flow(host, INET4) as quote:
        route_before = host.run(host.box.host, ["ip", "route", "get", INET4]).stdout
        res, d = counted(host, host.box.inet, icmperr(quote, type=3, code=4, mtu=mtu), c)
        time.sleep(0.2)
        route_after = host.run(host.box.host, ["ip", "route", "get", INET4]).stdout
    assert res == {"answered": False, "sent": 1}
    assert "mtu" not in route_before
    assert f"mtu {mtu}" in route_after, route_after
    assert d == {"unreach": 1, "other": 0}


def test_icmp_redirect_quoting_tracked_connection_dropped(host):
    """Issue 10 item 13: conntrack calls a redirect (type 5) that quotes a tracked flow RELATED;
    the fast path must not accept it.  It goes on to the icmp group and is dropped there.
    Control: a "fragmentation needed" quoting the same segment is accepted."""
    host.apply()
    c = {"related": lambda: host.counter(4, "HOSTPREP-FAST", RELATED),
         "other": lambda: host.counter(4, "HOSTPREP-ICMP", OTHER_ICMP)}
    with tracked_flow(host, INET4) as quote:
        redirect, d_redirect = counted(host, host.box.inet,
                                       icmperr(quote, type=5, code=1, gw=INET_EXTRA4[0]), c)
        needed, d_needed = counted(host, host.box.inet, icmperr(quote, type=3, code=4, mtu=1400), c)
    assert (redirect, needed) == ({"answered": False, "sent": 1}, {"answered": False, "sent": 1})
    assert d_redirect == {"related": 0, "other": 1}
    assert d_needed == {"related": 1, "other": 0}


# --------------------------------------------------------------------------- 4. udp

def test_udp_dropped_outside_delivered_inside(host):
    host.apply()
    udp = {"udp": lambda: host.counter(4, "HOSTPREP-UDP", "hostprep udp: udp dropped")}
    outside, d_out = counted(host, host.box.inet,
                             {"kind": "udp", "dst": HOST_EXT4, "dport": 5353, "timeout": QUIET}, udp)
    inside, d_in = counted(host, host.box.admin,
                           {"kind": "udp", "dst": HOST_INT4, "dport": 5353, "timeout": ANSWER}, udp)
    assert (outside["answered"], outside["reply"]) == (False, None)
    assert d_out == {"udp": 1}
    # delivered to the host's UDP stack: nothing listens, so "port unreachable" comes back
    assert inside["reply"] == "icmp 3/3"
    assert d_in == {"udp": 0}


# --------------------------------------------------------------------------- 5. spoof

SPOOFED = "10.1.2.3"    # RFC 1918: cannot be a real source on the internet-facing NIC


def test_private_source_dropped_by_spoof_group(host):
    host.apply()
    c = {"spoof": lambda: host.counter(4, "HOSTPREP-SPOOF", "hostprep spoof: 10.0.0.0/8"),
         "deny": lambda: host.counter(4, "HOSTPREP-DENY")}
    res, d = counted(host, host.box.inet, tcp(HOST_EXT4, 8445, src=SPOOFED), c)
    assert (res["answered"], res["reply"]) == (False, None)
    assert d == {"spoof": 1, "deny": 0}


def test_allow_private_leaves_spoof_group_out(host):
    host.apply("-a")
    assert "HOSTPREP-SPOOF" not in host.observed(4).chains
    c = {"spoof": lambda: host.counter(4, "HOSTPREP-SPOOF"),
         "deny": lambda: host.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")}
    res, d = counted(host, host.box.inet, tcp(HOST_EXT4, 8445, src=SPOOFED), c)
    assert (res["answered"], res["reply"]) == (False, None)
    assert d == {"spoof": 0, "deny": 1}         # the next group that takes it: default deny


# --------------------------------------------------------------------------- 5b. -p and the spoof group

PRIVATE_PING = "10.9.9.9"   # RFC 1918: used only inside the sandbox (the inet namespace gets it)


def test_ping_source_in_spoof_list_refused_without_allow_private(host):
    res = host.hostprep("apply", "-i", "eth1", "-y", "-p", PRIVATE_PING, check=False)
    assert (res.returncode, res.stderr.strip().splitlines(), res.stdout) == (2, [
        f"error: -p/--ping-from: {PRIVATE_PING} is in 10.0.0.0/8, a private/reserved range: on the external NIC "
        "such a source is dropped as spoofed before the ping allow-list (add -a to leave the spoof group out, "
        "or remove this -p)"], "")
    assert host.observed(4).our_chains == ()        # nothing loaded
    # with -a (no spoof group) the same -p is applied and its echo requests are answered
    host.run(host.box.inet, ["ip", "addr", "add", f"{PRIVATE_PING}/32", "dev", "eth0"])
    host.apply("-a", "-p", PRIVATE_PING)
    icmp = {"allowed": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: ping allowed (-p)")}
    ok, d = counted(host, host.box.inet, {"kind": "icmp", "dst": HOST_EXT4, "src": PRIVATE_PING,
                                          "timeout": ANSWER}, icmp)
    assert (ok["reply"], d) == ("icmp 0/0", {"allowed": 1})


def test_rules_with_ping_sources_read_back_exactly(host):
    """The fast path's RELATED rules and the icmp chain's jump to the spoof group are written as
    iptables-save prints them: a second apply finds nothing to change and status is clean."""
    args = ("-p", INET_EXTRA4[0], "-p", "2001:db8:f::7")
    host.apply(*args)
    assert [r.spec for r in host.observed(4).chain_rules("HOSTPREP-ICMP")][0] == "-j HOSTPREP-SPOOF"
    again = host.apply(*args)
    assert "nothing changed: the hardening on eth1 is already live" in again.stdout
    status = host.hostprep("status", "--json", check=False)
    assert (status.returncode, json.loads(status.stdout)["problems"]) == (0, [])


def test_spoof_group_drops_a_private_ping_source_before_the_allow_list(host):
    """Rules whose -p holds a private source with the spoof group on (an older hostprep recorded
    such a policy; boot renders it): the echo request is dropped as spoofed, not allowed by -p."""
    host.run(host.box.inet, ["ip", "addr", "add", f"{PRIVATE_PING}/32", "dev", "eth0"])
    load_rendered(host, Policy("eth1", ping=(PingSource(PRIVATE_PING, (ipaddress.ip_network(PRIVATE_PING),)),)), 4)
    c = {"spoof": lambda: host.counter(4, "HOSTPREP-SPOOF", "hostprep spoof: 10.0.0.0/8"),
         "allowed": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: ping allowed (-p)"),
         "other": lambda: host.counter(4, "HOSTPREP-ICMP", "hostprep icmp: other icmp")}
    res, d = counted(host, host.box.inet, {"kind": "icmp", "dst": HOST_EXT4, "src": PRIVATE_PING,
                                           "timeout": QUIET}, c)
    assert (res["answered"], res["reply"]) == (False, None)
    assert d == {"spoof": 1, "allowed": 0, "other": 0}


# --------------------------------------------------------------------------- 6. ddos (tcp)

INGRESS_FLAGS = "hostprep ddos: bogus tcp flags"


def ddos_counters(host) -> dict:
    return {"ingress": lambda: host.nft_counter(INGRESS_FLAGS),
            "ddos": lambda: group_drops(host, "HOSTPREP-DDOS"),
            "invalid": lambda: host.counter(4, "HOSTPREP-DDOS", "hostprep ddos: invalid"),
            "deny": lambda: group_drops(host, "HOSTPREP-DENY")}


@pytest.mark.parametrize("flags", ["FPU", "", "SF", "SR"], ids=["xmas", "null", "syn-fin", "syn-rst"])
def test_bogus_flags_dropped_at_ingress(host, flags):
    host.apply()
    res, d = counted(host, host.box.inet, tcp(HOST_EXT4, 8445, flags=flags), ddos_counters(host))
    assert (res["answered"], res["reply"]) == (False, None)
    # dropped at the NIC's ingress hook, before conntrack: the filter table's ddos group
    # (which conntrack's INVALID verdict would have sent them to) sees nothing
    assert d == {"ingress": 1, "ddos": 0, "invalid": 0, "deny": 0}
    if flags != "SR":   # control: the internal NIC answers with RST (an RST itself is never answered)
        inside = host.probe1(host.box.admin, **tcp(HOST_INT4, 8445, ANSWER, flags=flags))
        assert inside["answered"] is True
        assert "R" in inside["reply"]


@pytest.mark.parametrize("probe, rule", [
    ({"mss": 100}, "hostprep ddos: odd mss"),
    ({"flags": "A"}, "hostprep ddos: new without syn"),
    ({"flags": "SA"}, "hostprep ddos: invalid"),    # an unsolicited SYN+ACK: conntrack says INVALID
], ids=["mss-100", "bare-ack", "invalid-synack"])
def test_ddos_rule_drops(host, probe, rule):
    host.apply()
    c = {"rule": lambda: host.counter(4, "HOSTPREP-DDOS", rule),
         "ddos": lambda: group_drops(host, "HOSTPREP-DDOS"),
         "deny": lambda: group_drops(host, "HOSTPREP-DENY")}
    res, d = counted(host, host.box.inet, tcp(HOST_EXT4, 8445, **probe), c)
    assert (res["answered"], res["reply"]) == (False, None)
    assert d == {"rule": 1, "ddos": 1, "deny": 0}
    # control: the same segment to the internal NIC is answered (RST or RST+ACK)
    inside = host.probe1(host.box.admin, **tcp(HOST_INT4, 8445, ANSWER, **probe))
    assert inside["answered"] is True
    assert "R" in inside["reply"]


# --------------------------------------------------------------------------- 7. fragments

def test_fragments_dropped_at_ingress(host):
    host.apply()
    comment = "hostprep ddos: ipv4 fragment"
    frag = {"frag": lambda: host.nft_counter(comment)}
    outside, d_out = counted(host, host.box.inet, {"kind": "frag", "dst": HOST_EXT4, "timeout": QUIET}, frag)
    inside, d_in = counted(host, host.box.admin, {"kind": "frag", "dst": HOST_INT4, "timeout": ANSWER}, frag)
    assert outside["answered"] is False
    assert outside["fragments"] == 3            # 1208 bytes of ICMP in 512-byte pieces
    assert d_out == {"frag": outside["fragments"]}
    # control: the internal NIC has no ingress hook; the reassembled echo is answered
    assert inside["reply"] == "icmp 0/0"
    assert d_in == {"frag": 0}


# --------------------------------------------------------------------------- 8. rst flood

def test_rst_flood_limited(host):
    host.apply()
    c = {"within": lambda: host.counter(4, "HOSTPREP-RST", "hostprep ddos: rst within 2/s"),
         "flood": lambda: host.counter(4, "HOSTPREP-RST", "hostprep ddos: rst flood"),
         "invalid": lambda: host.counter(4, "HOSTPREP-DDOS", "hostprep ddos: invalid")}
    res, d = counted(host, host.box.inet, {"kind": "flood", "dst": HOST_EXT4, "dport": 8445, "flags": "R",
                                           "count": 50, "seconds": 1.0}, c)
    assert res["sent"] == 50
    # Tolerance: the bucket starts full with the burst of 2, then refills at 2/s
    # while the flood lasts (~1 s): 2 .. 2 + 2 (+1 for a refill straddling the end).
    assert res["elapsed"] < 1.5, res
    assert 2 <= d["within"] <= 5, (d, res)
    assert d["within"] + d["flood"] == 50       # every RST went through the meter exactly once
    assert d["flood"] >= 45
    # the RSTs within the limit go on and are dropped as INVALID (untracked RSTs)
    assert d["invalid"] == d["within"]


# --------------------------------------------------------------------------- 9. live connection

ECHO_SERVER = r"""
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(4)
print("listening", flush=True)
conn, _ = ls.accept()
f = conn.makefile("rwb")
for line in f:
    f.write(line)
    f.flush()
"""

ECHO_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("connected", flush=True)
f = s.makefile("rwb")
for line in sys.stdin:
    try:
        f.write(line.encode())
        f.flush()
        echo = f.readline().decode().rstrip("\n")
        print("echo " + echo, flush=True)
    except OSError as e:
        print("error " + type(e).__name__, flush=True)
        break
"""


def test_connection_opened_before_apply_survives(host):
    port = 8445
    server = Bg(host.box.host, ECHO_SERVER, HOST_EXT4, str(port))
    client = None
    try:
        assert server.readline() == "listening"
        client = Bg(host.box.inet, ECHO_CLIENT, HOST_EXT4, str(port))
        assert client.readline() == "connected"
        client.send("before")
        assert client.readline() == "echo before"

        host.apply()

        fast0 = host.counter(4, "HOSTPREP-FAST")
        nosyn0 = host.counter(4, "HOSTPREP-DDOS", "hostprep ddos: new without syn")
        client.send("after")
        assert client.readline() == "echo after"
        # >= 1: at least the client's data segment took the fast path (ACKs may add more)
        assert host.counter(4, "HOSTPREP-FAST") - fast0 >= 1
        assert host.counter(4, "HOSTPREP-DDOS", "hostprep ddos: new without syn") - nosyn0 == 0

        # a NEW connection to the same port after apply: no answer, default deny counts it
        deny = {"deny": lambda: host.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")}
        fresh, d = counted(host, host.box.inet, tcp(HOST_EXT4, port), deny)
        assert (fresh["answered"], fresh["reply"]) == (False, None)
        assert d == {"deny": 1}
    finally:
        for p in (client, server):
            if p is not None:
                p.kill()


# --------------------------------------------------------------------------- 10. -e and -a

def layout(host, family: int) -> tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str], ...]]:
    """hostprep's chains with their rule specs, and the jumps into them from built-in chains."""
    obs = host.observed(family)
    return {c: obs.chain_specs(c) for c in obs.our_chains}, tuple((r.chain, r.spec) for r in obs.our_jumps)


def nft_table_present(host) -> bool:
    return host.run(host.box.host, ["nft", "list", "table", "netdev", "hostprep"], check=False).returncode == 0


@pytest.mark.parametrize("flag, left_out, nft_after", [
    ("-e", DDOS_CHAINS, False),
    ("-a", SPOOF_CHAINS, True),
], ids=["skip-ddos", "allow-private"])
def test_flag_leaves_out_exactly_its_group(host, flag, left_out, nft_after):
    host.apply()
    full = {fam: layout(host, fam) for fam in (4, 6)}
    assert nft_table_present(host) is True
    host.apply(flag)
    reduced = {fam: layout(host, fam) for fam in (4, 6)}
    assert nft_table_present(host) is nft_after
    for fam in (4, 6):
        (full_chains, full_jumps), (red_chains, red_jumps) = full[fam], reduced[fam]
        # the chains that disappeared are exactly the group's chains
        assert sorted(set(full_chains) - set(red_chains)) == sorted(left_out)
        assert sorted(set(red_chains) - set(full_chains)) == []
        # in the chains that remain, exactly the jumps into the group's chains
        # disappeared (order kept); every other rule and chain is identical
        jumps = sorted((c, s) for c, specs in full_chains.items() if c not in left_out
                       for s in specs if target_of(s) in left_out)
        assert jumps != []                      # the group was reachable before
        kept = {c: tuple(s for s in specs if target_of(s) not in left_out)
                for c, specs in full_chains.items() if c not in left_out}
        assert red_chains == kept
        # and the jumps from the built-in chains into hostprep are identical (but, with -e, the
        # OUTPUT jump for the SYN synproxy sends: SYN cookies are part of the ddos group)
        cookie_syn = [j for j in full_jumps if j[0] == "OUTPUT" and j[1].endswith("-j HOSTPREP-CONTAINERS")]
        assert len(cookie_syn) == 1
        assert red_jumps == tuple(j for j in full_jumps if flag != "-e" or j not in cookie_syn)
