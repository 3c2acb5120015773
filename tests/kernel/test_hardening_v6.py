"""IPv6 hardening on real packets: the external NIC drops, the internal NIC answers.

Every probe from the "internet" namespace goes to the host's external address
2001:db8:e::10 and must get no answer AND be counted by the hostprep rule that
is supposed to drop it; every control goes to the internal address
2001:db8:1::10 from the admin namespace (or is the allowed case) and must be
answered.  Probes that expect silence use short timeouts (they cost them).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import textwrap
import time

import pytest
from conftest import load_rendered
from flows import tracked_flow
from hostprep.model import PingSource, Policy
from hostprep.sandbox import ADMIN6, EXT, HOST_EXT6, HOST_INT6, INET6, INET_EXTRA6

ALLOWED, NOT_ALLOWED = INET_EXTRA6          # 2001:db8:f::7 (-p), 2001:db8:f::8
SILENT = 0.6                                # timeout of a probe that must stay unanswered
ANSWER = 3.0                                # timeout of a probe that must be answered (only paid on failure)
ND_RULE = ("--icmpv6-type 135 -m hl --hl-eq 255",       # neighbour solicitation accept rule (iptables, nft)
           "icmpv6 type nd-neighbor-solicit ip6 hoplimit 255")
NA_RULE = ("--icmpv6-type 136 -m hl --hl-eq 255",       # neighbour advertisement accept rule
           "icmpv6 type nd-neighbor-advert ip6 hoplimit 255")
OTHER_ICMP = "hostprep icmp: other icmp"
PING_ALLOWED = "hostprep icmp: ping allowed (-p)"
FRAG_COMMENT = "hostprep ddos: ipv6 fragment"


NATIVE = True      # runs on the native nft backend too (conftest.variant)


def icmp6_type(reply: str | None) -> str | None:
    """The ICMPv6 type of a probe reply.

    probe.py documents replies as "icmp6 T/C"; today it returns scapy's summary for
    IPv6 (see test_probe_describes_icmpv6_replies_as_documented), so read both.
    """
    if reply is None:
        return None
    if reply.startswith("icmp6 "):
        return reply.split()[1].split("/")[0]
    for name, typ in (("ICMPv6DestUnreach", "1"), ("ICMPv6 Echo Reply", "129"), ("ICMPv6ND_NA", "136")):
        if name in reply:
            return typ
    return reply


def neigh(host, ns: str, dev: str) -> dict[str, str]:
    """IPv6 neighbour cache of ``dev`` in ``ns``: address -> lladdr ("" when unresolved)."""
    out = host.run(ns, ["ip", "-6", "-j", "neigh", "show", "dev", dev]).stdout
    return {e["dst"]: e.get("lladdr", "") for e in json.loads(out or "[]")}


def mac_of(host, ns: str, dev: str) -> str:
    return json.loads(host.run(ns, ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["address"]


def test_ssh_dropped_outside_answered_inside(host):
    host.apply()
    before = host.counter(6, "HOSTPREP-SSH", "hostprep ssh: no ssh in")
    outside = host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT6, dport=22, timeout=SILENT)
    inside = host.probe1(host.box.admin, kind="tcp", dst=HOST_INT6, dport=22, timeout=ANSWER)
    assert outside == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-SSH", "hostprep ssh: no ssh in") == before + 1
    # Nothing listens on 22 in the sandbox host: the kernel answers with RST,ACK.
    assert inside == {"answered": True, "reply": "RA"}
    assert host.counter(6, "HOSTPREP-SSH", "hostprep ssh: no ssh in") == before + 1


def test_udp_dropped_outside_port_unreachable_inside(host):
    host.apply()
    before = host.counter(6, "HOSTPREP-UDP")
    outside = host.probe1(host.box.inet, kind="udp", dst=HOST_EXT6, dport=5353, timeout=SILENT)
    inside = host.probe1(host.box.admin, kind="udp", dst=HOST_INT6, dport=5353, timeout=ANSWER)
    assert outside == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-UDP") == before + 1
    assert inside["answered"] is True
    assert icmp6_type(inside["reply"]) == "1"      # destination unreachable (port unreachable)
    assert host.counter(6, "HOSTPREP-UDP") == before + 1


def test_echo_dropped_outside_answered_inside(host):
    host.apply()
    before = host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP)
    outside = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, timeout=SILENT)
    inside = host.probe1(host.box.admin, kind="icmp", dst=HOST_INT6, timeout=ANSWER)
    assert outside == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) == before + 1
    assert inside["answered"] is True
    assert icmp6_type(inside["reply"]) == "129"


def test_echo_answered_only_from_ping_source(host):
    host.apply("-p", ALLOWED)
    allowed_before = host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED)
    other_before = host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP)
    ok = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=ALLOWED, timeout=ANSWER)
    assert ok["answered"] is True
    assert icmp6_type(ok["reply"]) == "129"
    assert host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED) == allowed_before + 1
    assert host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) == other_before
    refused = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=NOT_ALLOWED, timeout=SILENT)
    assert refused == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) == other_before + 1
    assert host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED) == allowed_before + 1
    # The -p rule is exactly the one source, in the IPv6 family only.
    if host.native:
        rules = [ln.strip() for ln in host.nft_listing().splitlines() if PING_ALLOWED in ln]
        assert [r.split(" counter ")[0] for r in rules] == [f"ip6 saddr {ALLOWED} icmpv6 type echo-request"]
    else:
        assert [r.spec for r in host.observed(6).chain_rules("HOSTPREP-ICMP") if PING_ALLOWED in r.spec] == [
            f'-s {ALLOWED}/128 -p ipv6-icmp -m icmp6 --icmpv6-type 128 -m comment --comment "{PING_ALLOWED}" -j ACCEPT']
    assert [r.spec for r in host.observed(4).chain_rules("HOSTPREP-ICMP") if PING_ALLOWED in r.spec] == []


def test_unopened_port_dropped_by_default_deny(host):
    host.apply()
    before = host.counter(6, "HOSTPREP-DENY")
    outside = host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT6, dport=8445, timeout=SILENT)
    inside = host.probe1(host.box.admin, kind="tcp", dst=HOST_INT6, dport=8445, timeout=ANSWER)
    assert outside == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-DENY") == before + 1
    assert inside == {"answered": True, "reply": "RA"}
    assert host.counter(6, "HOSTPREP-DENY") == before + 1


def test_neighbour_solicitation_answered(host):
    host.apply()
    before = host.rule_counter(6, "HOSTPREP-ICMP", *ND_RULE)
    other_before = host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP)
    res = host.probe1(host.box.inet, kind="ns", src=INET6, iface="eth0", dst=HOST_EXT6, timeout=ANSWER)
    assert res["answered"] is True          # True only when the reply is an ICMPv6 NA
    assert icmp6_type(res["reply"]) == "136"
    assert host.rule_counter(6, "HOSTPREP-ICMP", *ND_RULE) == before + 1
    assert host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) == other_before


# Run in the sandbox host: a kernel-originated echo (raw ICMPv6 socket), so the
# host's own neighbour resolution of the next hop is what is exercised.
HOST_PING = textwrap.dedent("""
    import socket, struct, sys, time
    dst = sys.argv[1]
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    ident = 0x4850
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"hostprep-nd", (dst, 0))
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, addr = s.recvfrom(2048)
        except (TimeoutError, socket.timeout):
            break
        if data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident:
            print("reply", addr[0])
            sys.exit(0)
    print("no reply")
    sys.exit(1)
""")


def test_ping_works_after_neighbour_cache_flush(host):
    host.apply("-p", ALLOWED)
    inet_mac = mac_of(host, host.box.inet, "eth0")
    first = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=ALLOWED, timeout=ANSWER)
    assert first["answered"] is True
    assert neigh(host, host.box.host, EXT).get(INET6) == inet_mac

    # Forget the peer: the host's reply to the -p source needs the next hop
    # (2001:db8:e::20) resolved again, through neighbour discovery on eth1.
    host.run(host.box.host, ["ip", "-6", "neigh", "flush", "dev", EXT])
    assert INET6 not in neigh(host, host.box.host, EXT)
    nd_before = host.counter(6, "HOSTPREP-ICMP", "hostprep icmp: neighbour discovery")
    again = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=ALLOWED, timeout=ANSWER)
    assert again["answered"] is True
    assert icmp6_type(again["reply"]) == "129"
    assert neigh(host, host.box.host, EXT).get(INET6) == inet_mac
    assert host.counter(6, "HOSTPREP-ICMP", "hostprep icmp: neighbour discovery") > nd_before

    # And the host resolving the peer by itself (its own NS out, the peer's NA in).
    host.run(host.box.host, ["ip", "-6", "neigh", "flush", "dev", EXT])
    assert INET6 not in neigh(host, host.box.host, EXT)
    na_before = host.rule_counter(6, "HOSTPREP-ICMP", *NA_RULE)
    res = host.run(host.box.host, [sys.executable, "-c", HOST_PING, INET6, str(ANSWER)], check=False)
    assert (res.returncode, res.stdout.strip()) == (0, f"reply {INET6}")
    assert host.rule_counter(6, "HOSTPREP-ICMP", *NA_RULE) == na_before + 1
    assert neigh(host, host.box.host, EXT).get(INET6) == inet_mac


def test_fragmented_echo_dropped_at_ingress(host):
    host.apply()
    before = host.nft_counter(FRAG_COMMENT)
    outside = host.probe1(host.box.inet, kind="frag", dst=HOST_EXT6, timeout=SILENT + 0.4)
    assert outside["answered"] is False
    assert outside["fragments"] == 3          # 1200 bytes of echo data in 600-byte pieces
    assert host.nft_counter(FRAG_COMMENT) == before + outside["fragments"]
    # Control: the same fragmented echo to the internal NIC is reassembled and answered.
    inside = host.probe1(host.box.admin, kind="frag", dst=HOST_INT6, timeout=ANSWER)
    assert inside["answered"] is True
    assert icmp6_type(inside["reply"]) == "129"
    assert host.nft_counter(FRAG_COMMENT) == before + outside["fragments"]


def test_spoofed_ula_source_dropped(host):
    host.apply()
    ula = "fd00::1"
    spoof_before = host.counter(6, "HOSTPREP-SPOOF", "hostprep spoof: fc00::/7")
    deny_before = host.counter(6, "HOSTPREP-DENY")
    # The host would answer fd00::1 through its default route, i.e. back into the
    # inet namespace, where the probe would see it: no answer means dropped.
    outside = host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT6, dport=8445, src=ula, timeout=SILENT)
    assert outside == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-SPOOF", "hostprep spoof: fc00::/7") == spoof_before + 1
    assert host.counter(6, "HOSTPREP-SPOOF") == spoof_before + 1
    assert host.counter(6, "HOSTPREP-DENY") == deny_before      # dropped before default deny

    # Control 1: a real source on the external NIC is not counted as spoofed.
    real = host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT6, dport=8445, timeout=SILENT)
    assert real == {"answered": False, "reply": None}
    assert host.counter(6, "HOSTPREP-SPOOF") == spoof_before + 1
    assert host.counter(6, "HOSTPREP-DENY") == deny_before + 1

    # Control 2: the same ULA source on the internal NIC is answered (replies to
    # fd00::1 routed back to the admin namespace inside the sandbox host).
    host.run(host.box.host, ["ip", "-6", "route", "add", f"{ula}/128", "via", ADMIN6])
    inside = host.probe1(host.box.admin, kind="tcp", dst=HOST_INT6, dport=8445, src=ula, timeout=ANSWER)
    assert inside == {"answered": True, "reply": "RA"}
    assert host.counter(6, "HOSTPREP-SPOOF") == spoof_before + 1


# ICMPv6 errors quoting a connection the host opened (tests/kernel/flows.py): the fast
# path accepts RELATED only for the error types 1-4.
RELATED = "--ctstate RELATED"       # every fast-path rule that accepts RELATED (before the fix: one rule)
TOO_BIG = "hostprep fastpath: related icmp packet too big"


def icmperr(quote: dict, **kw) -> dict:
    return {"kind": "icmperr", "dst": HOST_EXT6, "src": INET6, "quote": quote, **kw}


def test_packet_too_big_of_tracked_connection_accepted(host):
    """PMTU discovery on IPv6: "packet too big" quoting the host's connection is accepted by the
    fast path's RELATED type-2 rule and used: ``ip -6 route get`` shows the learned MTU."""
    host.apply()
    mtu = 1280
    with tracked_flow(host, INET6) as quote:
        route_before = host.run(host.box.host, ["ip", "-6", "route", "get", INET6]).stdout
        too_big0, other0 = host.counter(6, "HOSTPREP-FAST", TOO_BIG), host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP)
        res = host.probe1(host.box.inet, **icmperr(quote, type=2, mtu=mtu))
        time.sleep(0.2)
        route_after = host.run(host.box.host, ["ip", "-6", "route", "get", INET6]).stdout
        counts = (host.counter(6, "HOSTPREP-FAST", TOO_BIG) - too_big0,
                  host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) - other0)
    assert res == {"answered": False, "sent": 1}
    assert "mtu" not in route_before
    assert f"mtu {mtu}" in route_after, route_after
    assert counts == (1, 0)


@pytest.mark.parametrize("probe", [
    {"type": 137, "gw": "fe80::1"},     # redirect, hop limit 255 as a real one has
    {"type": 100},                      # an error type (< 128) conntrack calls RELATED, not one a connection needs
], ids=["redirect-137", "error-type-100"])
def test_icmpv6_quoting_tracked_connection_not_accepted_by_fast_path(host, probe):
    """Issue 10 item 13: only destination unreachable, packet too big, time exceeded and
    parameter problem are accepted as RELATED; a redirect (never RELATED: not an error
    type) and any other error type quoting a tracked flow are dropped by the icmp group."""
    host.apply()
    with tracked_flow(host, INET6) as quote:
        related0, other0 = host.counter(6, "HOSTPREP-FAST", RELATED), host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP)
        res = host.probe1(host.box.inet, **icmperr(quote, **probe))
        counts = (host.counter(6, "HOSTPREP-FAST", RELATED) - related0,
                  host.counter(6, "HOSTPREP-ICMP", OTHER_ICMP) - other0)
    assert res == {"answered": False, "sent": 1}
    assert counts == (0, 1)


PRIVATE_PING = "fd00::9"      # unique-local: used only inside the sandbox (the inet namespace gets it)


def test_ping_source_in_spoof_list_refused_without_allow_private(host):
    res = host.hostprep("apply", "-i", "eth1", "-y", "-p", PRIVATE_PING, check=False)
    assert (res.returncode, res.stderr.strip().splitlines(), res.stdout) == (2, [
        f"error: -p/--ping-from: {PRIVATE_PING} is in fc00::/7, a private/reserved range: on the external NIC "
        "such a source is dropped as spoofed before the ping allow-list (add -a to leave the spoof group out, "
        "or remove this -p)"], "")
    assert host.observed(6).our_chains == ()


def test_spoof_group_drops_a_private_ping_source_neighbour_discovery_still_works(host):
    """Rules whose -p holds a unique-local source with the spoof group on (an older hostprep recorded
    such a policy; boot renders it): its echo request is dropped as spoofed.  Neighbour discovery is
    judged before the spoof group in the icmp chain: an on-link neighbour solicitation from that
    unique-local source (hop limit 255) is still answered, and so is the -p source of the family."""
    host.run(host.box.inet, ["ip", "-6", "addr", "add", f"{PRIVATE_PING}/128", "dev", "eth0", "nodad"])
    ping = tuple(PingSource(v, (ipaddress.ip_network(v),)) for v in (PRIVATE_PING, ALLOWED))
    load_rendered(host, Policy("eth1", ping=ping), 6)
    spoof0 = host.counter(6, "HOSTPREP-SPOOF", "hostprep spoof: fc00::/7")
    allowed0 = host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED)
    dropped = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=PRIVATE_PING, timeout=SILENT)
    assert dropped == {"answered": False, "reply": None}
    assert (host.counter(6, "HOSTPREP-SPOOF", "hostprep spoof: fc00::/7"), host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED)) \
        == (spoof0 + 1, allowed0)

    nd0 = host.rule_counter(6, "HOSTPREP-ICMP", *ND_RULE)
    res = host.probe1(host.box.inet, kind="ns", src=PRIVATE_PING, iface="eth0", dst=HOST_EXT6, timeout=ANSWER)
    assert (res["answered"], icmp6_type(res["reply"])) == (True, "136")
    assert (host.rule_counter(6, "HOSTPREP-ICMP", *ND_RULE), host.counter(6, "HOSTPREP-SPOOF")) == (nd0 + 1, spoof0 + 1)

    ok = host.probe1(host.box.inet, kind="icmp", dst=HOST_EXT6, src=ALLOWED, timeout=ANSWER)
    assert (ok["answered"], icmp6_type(ok["reply"])) == (True, "129")
    assert host.counter(6, "HOSTPREP-ICMP", PING_ALLOWED) == allowed0 + 1


def test_probe_describes_icmpv6_replies_as_documented(host):
    host.apply()
    res = host.probe(host.box.admin, [
        {"kind": "udp", "dst": HOST_INT6, "dport": 5353, "timeout": ANSWER},
        {"kind": "icmp", "dst": HOST_INT6, "timeout": ANSWER},
    ])
    assert [r["reply"] for r in res] == ["icmp6 1/4", "icmp6 129/0"]
