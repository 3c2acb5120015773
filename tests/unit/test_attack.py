"""SYN cookie rendering and the attack section of status (issue 12 items 2, 5 and 6), no root."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hostprep import attack, render
from hostprep.observed import parse_nft_listing
from hostprep.model import (BOGUS_TCP_FLAGS, SYNPROXY_BURST, SYNPROXY_RATE, Container, Limits, Policy,
                            bogus_flag_bytes)
from hostprep.observed import Counter

FIN = Container("fin", "finesse", (8445, 8443), ipaddress.ip_address("198.51.100.10"), Limits(10, 6, 8, 1, 1))
V6 = Container("v6", "finesse", (8445,), ipaddress.ip_address("2001:db8:e::10"), Limits(10, 6, 8, 1, 1))
LB = ipaddress.ip_network("203.0.113.7/32")
RESTRICTED = Container("only", "finesse", (9000,), ipaddress.ip_address("198.51.100.10"), Limits(10, 6, 8, 1, 1),
                       restricted=True, load_balancers=(LB,))


def test_bogus_flag_bytes_match_the_iptables_patterns_bit_by_bit():
    # oracle: a flag byte is bogus iff one pattern's masked bits equal its set bits
    names = {"FIN": 1, "SYN": 2, "RST": 4, "PSH": 8, "ACK": 16, "URG": 32}
    bits = lambda t: 0 if t == "NONE" else sum(names[n] for n in t.split(","))   # noqa: E731
    want = [v for v in range(64) if any((v & bits(m)) == bits(c) for m, c in BOGUS_TCP_FLAGS)]
    got = bogus_flag_bytes()
    assert (list(got), 0x02 in got, 0x12 in got, 0x10 in got, 0x03 in got, 0x00 in got) == \
        (want, False, False, False, True, True)   # SYN, SYN+ACK, ACK pass; SYN+FIN, NULL are bogus


def test_cookie_rules_per_port_of_unrestricted_containers_only():
    d = render.desired(Policy("eth1"), (FIN, RESTRICTED, V6))
    v4 = d.v4.chain("HOSTPREP-COOKIES").specs
    assert [(s.split(" --dport ")[1].split()[0], "UNTRACKED" in s, "INVALID,NEW" in s) for s in v4] == [
        ("8445", True, False), ("8445", False, True), ("8443", True, False), ("8443", False, True)]
    assert all(s.startswith("-d 198.51.100.10/32 -p tcp -m tcp --dport ") and s.endswith("-j HOSTPREP-SYNPROXY")
               for s in v4)
    assert [s.split()[1] for s in d.v6.chain("HOSTPREP-COOKIES").specs] == ["2001:db8:e::10/128"] * 2
    assert d.v6.chain("HOSTPREP-SYNPROXY").specs[-1].endswith("-j SYNPROXY --sack-perm --timestamp --wscale 7 "
                                                              "--mss 1440")
    script = d.nft.script
    assert "elements = { 198.51.100.10 . 8445, 198.51.100.10 . 8443 }" in script
    assert "elements = { 2001:db8:e::10 . 8445 }" in script
    assert "9000" not in script
    assert f"limit rate over {SYNPROXY_RATE}/second burst {SYNPROXY_BURST} packets" in script


def test_skip_ddos_has_no_cookies_and_allow_private_no_spoof_before_synproxy():
    e = render.desired(Policy("eth1", skip_ddos=True), (FIN,))
    a = render.desired(Policy("eth1", allow_private=True), (FIN,))
    full = render.desired(Policy("eth1"), (FIN,))
    assert (e.v4.chain("HOSTPREP-COOKIES"), e.nft) == (None, None)
    assert full.v4.chain("HOSTPREP-SYNPROXY").specs[0] == "-j HOSTPREP-SPOOF"
    assert [s for s in a.v4.chain("HOSTPREP-SYNPROXY").specs if "SPOOF" in s] == []


LISTING = """table netdev hostprep {
	set flooded4 {
		type ipv4_addr
		size 64
		flags dynamic,timeout
		timeout 10s
		elements = { 198.51.100.10 expires 9s120ms }
	}
	chain ingress {
		ip frag-off & 0x3fff != 0 counter packets 2 bytes 3 drop comment "hostprep ddos: ipv4 fragment"
	}
	chain syn4 {
		counter packets 7 bytes 8 notrack return comment "hostprep ddos: ipv4 syn while flooded"
		counter packets 5 bytes 6 comment "hostprep ddos: ipv4 syn tracked"
	}
}
"""


def test_flooded_addresses_read_and_left_out_of_the_compared_listing():
    obs = parse_nft_listing(LISTING)
    calm = parse_nft_listing(LISTING.replace("\t\telements = { 198.51.100.10 expires 9s120ms }\n", ""))
    assert (obs.flooded, calm.flooded, obs.text == calm.text) == (("198.51.100.10",), (), True)


def write_proc(root: Path, count: int, top: int, drop: int, syn: int, entries: int) -> Path:
    (root / "sys/net/netfilter").mkdir(parents=True, exist_ok=True)
    (root / "sys/net/netfilter/nf_conntrack_count").write_text(f"{count}\n")
    (root / "sys/net/netfilter/nf_conntrack_max").write_text(f"{top}\n")
    (root / "net/stat").mkdir(parents=True, exist_ok=True)
    # two CPUs, hex, as the kernel prints them
    (root / "net/stat/nf_conntrack").write_text(
        "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop\n"
        f"00000000 0 0 0 00000004 0 0 0 0 0 {drop:08x} 00000000\n"
        "00000000 0 0 0 00000001 0 0 0 0 0 00000001 00000000\n")
    (root / "net/stat/synproxy").write_text(
        "entries\t\tsyn_received\tcookie_invalid\tcookie_valid\tcookie_retrans\tconn_reopened\n"
        f"00000000\t{syn:08x}\t00000000\t00000003\t00000000\t00000000\n"
        "00000000\t00000010\t00000000\t00000000\t00000000\t00000000\n")
    (root / "net/ipt_hashlimit").mkdir(parents=True, exist_ok=True)
    (root / "net/ipt_hashlimit" / FIN.hashlimit_name(8445)).write_text("".join(
        f"2 203.0.113.{i}:0->0.0.0.0:8445 1 2 3\n" for i in range(entries)))
    return root


def test_attack_section_counts_and_warns_of_bounds_since_the_last_change(tmp_path):
    proc, state = tmp_path / "proc", tmp_path / "state"
    state.mkdir()
    write_proc(proc, 100, 1000, 0, 0x20, 3)
    attack.save_baseline(state, proc)
    nft = parse_nft_listing(LISTING)
    calm, warn0 = attack.section(proc, state, (FIN,), None)
    assert (calm["conntrack"]["count"], calm["conntrack"]["full_since_last_change"], calm["bound_reached"],
            warn0) == (100, {"drop": 0, "early_drop": 0, "insert_failed": 0}, False, [])
    assert calm["limiters"] == [
        {"container": "fin", "port": 8445, "name": FIN.hashlimit_name(8445), "entries": 3, "max": 131072},
        {"container": "fin", "port": 8443, "name": FIN.hashlimit_name(8443), "entries": None, "max": 131072}]
    # a flood later: the table filled (5 more drops), cookies sent, the address flooded now
    write_proc(proc, 1000, 1000, 5, 0x120, 3)
    rep, warns = attack.section(proc, state, (FIN,), nft)
    assert (rep["conntrack"]["full_since_last_change"]["drop"], rep["bound_reached"]) == (5, True)
    assert (rep["syn_cookies"]["syn_received"], rep["syn_cookies"]["since_last_change"]["syn_received"],
            rep["syn_cookies"]["cookie_valid"], rep["syn_cookies"]["flooded"]) == (0x130, 0x100, 3, ["198.51.100.10"])
    assert rep["ingress"]["dropped_or_counted"] == {"fragments": 2, "syn_tracked": 5, "syn_cookie": 7}
    assert warns == ["conntrack table reached its bound (1,000 of 1,000 entries now; 5 new connections refused "
                     "since the last change)",
                     "SYN flood: the container ports on 198.51.100.10 answer with SYN cookies now"]


def test_attack_section_without_the_kernel_counters_is_empty(tmp_path):
    rep, warns = attack.section(tmp_path / "noproc", tmp_path, (FIN,), None)
    assert (rep["conntrack"], rep["syn_cookies"], rep["ingress"], rep["bound_reached"], warns) == \
        (None, None, None, False, [])
    assert attack.ingress_reasons({"hostprep ddos: bogus tcp flags": Counter(4, 5)}) == {"bogus_flags": 4}


# -- the native nft backend (rules/hostprep.nft.j2) ------------------------------------------

def test_native_cookie_rules_per_port_and_the_synproxy_statement():
    script = render.nft_backend_text(Policy("eth1"), (FIN, RESTRICTED, V6))
    cookie = [ln.strip() for ln in script.splitlines() if 'comment "hostprep ddos: syn cookie for' in ln
              or 'comment "hostprep ddos: cookie ack for' in ln]
    flags = "tcp flags & (fin|syn|rst|ack) =="
    assert cookie == [
        f"ip daddr 198.51.100.10 tcp dport {p} {flags} {f} ct state {s} counter jump HOSTPREP-SYNPROXY-v4 "
        f'comment "hostprep ddos: {what} for fin"'
        for p in (8445, 8443) for f, s, what in (("syn", "untracked", "syn cookie"), ("ack", "invalid,new", "cookie ack"))
    ] + [f"ip6 daddr 2001:db8:e::10 tcp dport 8445 {flags} {f} ct state {s} counter jump HOSTPREP-SYNPROXY-v6 "
         f'comment "hostprep ddos: {what} for v6"'
         for f, s, what in (("syn", "untracked", "syn cookie"), ("ack", "invalid,new", "cookie ack"))]
    # the options the client sees, from model.SYNPROXY_OPTIONS (IPv6: MSS 1440)
    assert [ln.strip() for ln in script.splitlines() if " synproxy " in ln and "#" not in ln] == [
        'counter synproxy mss 1460 wscale 7 timestamp sack-perm comment "hostprep ddos: syn cookie"',
        'counter synproxy mss 1440 wscale 7 timestamp sack-perm comment "hostprep ddos: syn cookie"']
    # the spoof group first; the cookie's SYN sent by the kernel goes through the container chains
    assert ("chain HOSTPREP-SYNPROXY-v4 {\n\t\tip saddr { 0.0.0.0/8, 10.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, "
            "172.16.0.0/12, 192.0.2.0/24, 192.168.0.0/16, 224.0.0.0/3 } counter jump HOSTPREP-SPOOF-v4\n") in script
    assert ("chain HOSTPREP-SYNPROXY-v6 {\n\t\tip6 saddr { ::1/128, ::ffff:0:0/96, fc00::/7, fec0::/10, ff00::/8 } "
            "counter jump HOSTPREP-SPOOF-v6\n") in script
    assert ("meta nfproto ipv4 tcp flags & (fin|syn|rst|ack) == syn fib saddr type != local ct state new counter "
            "jump HOSTPREP-CONTAINERS-v4") in script
    # the netdev table is rules/ingress.nft.j2 itself: the same cookie ports, counting and notrack
    assert script.split(render.NFT_INGRESS_MARK)[1].split("\ntable netdev hostprep {", 1)[1] == \
        render.nft_text(Policy("eth1"), (FIN, RESTRICTED, V6)).split("\ntable netdev hostprep {", 1)[1]
    ingress = script.split(render.NFT_INGRESS_MARK)[1]
    assert "elements = { 198.51.100.10 . 8445, 198.51.100.10 . 8443 }" in ingress and "9000" not in ingress


def test_native_skip_ddos_and_allow_private():
    e = render.nft_backend_text(Policy("eth1", skip_ddos=True), (FIN,))
    a = render.nft_backend_text(Policy("eth1", allow_private=True), (FIN,))
    assert ("synproxy" in e, "COOKIES" in e, "fib saddr" in e, "notrack" in e) == (False, False, False, False)
    assert "chain HOSTPREP-SYNPROXY-v4 {\n\t\tcounter synproxy" in a and "HOSTPREP-SPOOF" not in a


def test_native_limiter_fill_and_flooded_in_the_attack_section(tmp_path):
    from hostprep.observed import NftObserved
    proc, state = tmp_path / "proc", tmp_path / "state"
    state.mkdir()
    write_proc(proc, 10, 1000, 0, 0, 0)
    listing = parse_nft_listing(LISTING)
    name = render.nft_limiter_set(FIN, "rl", 8445)
    nft = NftObserved("eth1", listing.text, listing.counters, listing.flooded, {name: 131072})
    rep, warns = attack.section(proc, state, (FIN,), nft)
    assert rep["limiters"] == [
        {"container": "fin", "port": 8445, "name": name, "entries": 131072, "max": 131072},
        {"container": "fin", "port": 8443, "name": render.nft_limiter_set(FIN, "rl", 8443), "entries": None,
         "max": 131072}]
    assert rep["bound_reached"] is True and rep["syn_cookies"]["flooded"] == ["198.51.100.10"]
    assert warns[-1] == ("container fin port 8445: its rate limiter is full (131,072 of 131,072 sources): new "
                         "sources are dropped until entries expire")
