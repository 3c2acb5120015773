"""hostprep selftest without a kernel: the probe matrix, the judging, the env files for
``container up`` in the sandbox, the options, and the refusals.  No root, no namespace."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostprep import selftest as st
from hostprep.envfiles import load_container
from hostprep.errors import CommandFailed, InputError, RefusedError
from hostprep.model import Container, Limits
from hostprep.plan import parse_save
from hostprep.probe import KINDS
from hostprep.runner import Result, Runner
from hostprep.sandbox import HOST_EXT4, HOST_EXT6

net = ipaddress.ip_network
ip = ipaddress.ip_address
FULL = st.Settings(ping=(net("203.0.113.7/32"), net("2001:db8:f::7/128")))


def finesse(**kw) -> Container:
    base = dict(name="fin", template="finesse", ports=(8445,), dest=ip(HOST_EXT4), limits=Limits(10, 6, 8, 1, 1))
    base.update(kw)
    return Container(**base)


# --------------------------------------------------------------------------- the matrix

SETTINGS = {
    "default": FULL,
    "-e": st.Settings(skip_ddos=True, ping=FULL.ping),
    "-a": st.Settings(allow_private=True, ping=FULL.ping),
    "-e -a, no IPv6": st.Settings(True, True, FULL.ping, ipv6=False),
}
CONTAINERS = (
    finesse(exempt=(net("203.0.113.99/32"),), load_balancers=(net("198.51.100.77/32"),)),
    Container("ids", "ids", (8553,), ip("198.51.100.11"), Limits(6, 2, 4, 1, 1), exempt=(net("192.168.1.69/32"),)),
    Container("cuic", "cuic", (443,), ip(HOST_EXT4), Limits(6, 2, 4, 1, 1), restricted=True,
              load_balancers=(net("203.0.113.150/32"),)),
    Container("ld", "livedata", (443,), ip("198.51.100.11"), Limits(10, 6, 8, 1, 1), hardening=False),
    Container("chat6", "chat", (5280, 15280), ip(HOST_EXT6), Limits(30, 20, 25, 1, 1)),
)


@pytest.mark.parametrize("which", list(SETTINGS))
def test_every_probe_has_an_expected_value_and_a_counter(which):
    matrix = st.build_matrix(SETTINGS[which], CONTAINERS)
    assert len(matrix.probes) > 30
    for p in matrix.probes:
        assert p.expected in ("dropped", "answered"), p.name
        assert isinstance(p.counter, st.CounterCheck), p.name
        assert p.role in ("inet", "admin", "host"), p.name
        assert p.probe["kind"] in KINDS, p.name
        assert p.counter.label != "", p.name
    names = [p.name for p in matrix.probes]
    assert len(names) == len(set(names))


def primary(matrix: st.Matrix, role: str = "inet", expected: str = "dropped") -> list[tuple[str, str]]:
    return [(p.name, p.counter.label) for p in matrix.probes if p.role == role and p.expected == expected]


def test_default_matrix_drops_and_the_rules_that_count_them():
    m = st.build_matrix(FULL)
    assert primary(m) == [
        ("v4 SYN to closed port 40404", "v4 HOSTPREP-DENY: default deny"),
        ("v4 SSH in (port 22)", "v4 HOSTPREP-SSH: no ssh in"),
        ("v4 echo request from 203.0.113.8 (not -p)", "v4 HOSTPREP-ICMP: other icmp"),
        ("v4 UDP to port 5353", "v4 HOSTPREP-UDP: udp dropped"),
        ("v4 spoofed private source 10.1.2.3", "v4 HOSTPREP-SPOOF: 10.0.0.0/8"),
        ("v4 XMAS flags (FIN,PSH,URG)", "nft ingress: bogus tcp flags"),
        ("v4 SYN with MSS 100", "v4 HOSTPREP-DDOS: odd mss"),
        ("v4 bare ACK (NEW without SYN)", "v4 HOSTPREP-DDOS: new without syn"),
        ("v4 fragmented echo request from 203.0.113.8", "nft ingress: ipv4 fragment"),
        ("v4 NULL flags", "nft ingress: bogus tcp flags"),
        ("v4 SYN+FIN", "nft ingress: bogus tcp flags"),
        ("v4 SYN+RST", "nft ingress: bogus tcp flags"),
        ("v4 unsolicited SYN+ACK", "v4 HOSTPREP-DDOS: invalid"),
        ("v6 SYN to closed port 40404", "v6 HOSTPREP-DENY: default deny"),
        ("v6 SSH in (port 22)", "v6 HOSTPREP-SSH: no ssh in"),
        ("v6 echo request from 2001:db8:f::8 (not -p)", "v6 HOSTPREP-ICMP: other icmp"),
        ("v6 UDP to port 5353", "v6 HOSTPREP-UDP: udp dropped"),
        ("v6 spoofed private source fd00::1", "v6 HOSTPREP-SPOOF: fc00::/7"),
        ("v6 XMAS flags (FIN,PSH,URG)", "nft ingress: bogus tcp flags"),
        ("v6 SYN with MSS 1000", "v6 HOSTPREP-DDOS: odd mss"),
        ("v6 bare ACK (NEW without SYN)", "v6 HOSTPREP-DDOS: new without syn"),
        ("v6 fragmented echo request from 2001:db8:f::8", "nft ingress: ipv6 fragment"),
        ("v4 RST flood (50 in 1 s; 2/s burst 2 pass)", "v4 HOSTPREP-RST: rst flood"),
    ]
    assert primary(m, "host") == [("v4 SSH out through the external NIC", "v4 HOSTPREP-OUT: no ssh out"),
                                  ("v6 SSH out through the external NIC", "v6 HOSTPREP-OUT: no ssh out")]
    assert primary(m, "inet", "answered") == [
        ("v4 echo request from 203.0.113.7 (-p)", "v4 HOSTPREP-ICMP: ping allowed (-p)"),
        ("v6 echo request from 2001:db8:f::7 (-p)", "v6 HOSTPREP-ICMP: ping allowed (-p)"),
        ("v6 neighbour solicitation", "v6 HOSTPREP-ICMP: --icmpv6-type 135 -m hl --hl-eq 255")]


def test_controls_go_to_the_internal_nic_and_must_not_move_the_counter():
    m = st.build_matrix(FULL)
    controls = [p for p in m.probes if p.name.endswith("(control)")]
    assert len(controls) == 11
    for p in controls:
        assert p.expected == "answered", p.name
        assert (p.counter.lo, p.counter.hi) == (0, 0), p.name
        dst = p.probe.get("dst")
        assert ip(dst) in net("192.0.2.0/24") or ip(dst) in net("2001:db8:1::/64"), p.name
    # every control checks a counter that a probe from the internet side is expected to move
    outside = {p.counter.key for p in m.probes if p.expected == "dropped"}
    assert [p.name for p in controls if p.counter.key not in outside] == []


def test_skip_ddos_probes_the_same_packets_and_expects_the_default_deny():
    m = st.build_matrix(SETTINGS["-e"])
    labels = {p.counter.label for p in m.probes}
    assert [lab for lab in labels if "DDOS" in lab or "RST" in lab or lab.startswith("nft")] == []
    by_name = {p.name: p for p in m.probes}
    assert by_name["v4 XMAS flags (FIN,PSH,URG) (-e: default deny)"].counter == st.deny(4)
    assert by_name["v4 RST flood (50 in 1 s) (-e: default deny)"].counter == st.deny(4, 50, 50)
    # the reassembled fragments meet the icmp group
    assert by_name["v4 fragmented echo request from 203.0.113.8 (-e: reassembled, icmp group)"].counter.label == \
        "v4 HOSTPREP-ICMP: other icmp"


def test_allow_private_expects_spoofed_sources_in_the_default_deny():
    by_name = {p.name: p for p in st.build_matrix(SETTINGS["-a"]).probes}
    assert by_name["v4 spoofed private source 10.1.2.3 (-a: default deny)"].counter == st.deny(4)
    assert by_name["v6 spoofed private source fd00::1 (-a: default deny)"].counter == st.deny(6)


def test_spoof_networks_are_read_from_the_rules():
    assert net("10.0.0.0/8") in st.spoof_networks(4)
    assert net("fc00::/7") in st.spoof_networks(6)


def test_a_ping_network_covering_the_other_source_moves_it():
    s = st.Settings(ping=FULL.ping + (net("203.0.113.0/24"),))
    m = st.build_matrix(s)
    echo = [p for p in m.probes if p.name.startswith("v4 echo request from") and "(not -p)" in p.name]
    assert [p.probe["src"] for p in echo] == ["198.51.100.129"]
    assert [st_.argv for st_ in echo[0].setup] == [("ip", "addr", "add", "198.51.100.129/32", "dev", "eth0")]


def test_no_source_left_that_may_not_ping_skips_those_probes_with_a_note():
    s = st.Settings(ping=FULL.ping + (net("203.0.113.0/24"), net("198.51.100.0/24")))
    m = st.build_matrix(s)
    assert [p.name for p in m.probes if p.name.startswith("v4 echo request") and "(not -p)" in p.name] == []
    assert "v4: every probe source is allowed to ping (-p): echo requests from a source that is not allowed " \
           "are not probed" in m.notes


def container_rows(m: st.Matrix, name: str) -> dict[str, st.Probe]:
    return {p.name: p for p in m.probes if p.name.startswith(f"{name}: ")}


def test_container_probes_ports_lb_exempt_rate_and_connection_limit():
    m = st.build_matrix(FULL, CONTAINERS)
    rows = container_rows(m, "fin")
    assert sorted(rows) == sorted([
        "fin: port 8445 open", "fin: port 8445 from load balancer 198.51.100.77",
        "fin: 10 SYNs at once from exempt source 203.0.113.99",
        "fin: rate 6/s burst 8: 9 SYNs at once, the last dropped",
        "fin: connection limit 10: 11 held connections, the last dropped"])
    rate = rows["fin: rate 6/s burst 8: 9 SYNs at once, the last dropped"]
    assert (rate.repeat, rate.phase, rate.judge, rate.expected) == (9, "limits", "reply", "dropped")
    assert rate.probe["kind"] == "connect" and rate.probe["dst"] == HOST_EXT4 and rate.probe["port"] == 8445
    assert [(c.label, c.lo, c.hi) for c in rate.checks] == [
        ("v4 HOSTPREP-C-fin: fin rate drop", 1, 1), ("v4 HOSTPREP-C-fin: fin within rate", 8, 8)]
    conn = rows["fin: connection limit 10: 11 held connections, the last dropped"]
    assert (conn.repeat, conn.judge) == (11, "counter")
    assert [(c.label, c.lo, c.hi) for c in conn.checks] == [
        ("v4 HOSTPREP-C-fin: fin connlimit drop", 1, 1), ("v4 HOSTPREP-C-fin: fin within rate", 10, 10)]
    # the host drops its own RSTs to that source only, before conntrack
    src = conn.probe["src"]
    assert [s.argv for s in conn.setup if s.role == "host"][-1] == (
        "nft", f"add rule inet hpselftest out oifname eth1 ip daddr {src} tcp flags & rst == rst counter drop")
    # each limit has a source of its own, shared with no other probe
    limits = [p.probe["src"] for p in m.probes if "the last dropped" in p.name]
    others = [p.probe.get("src") for p in m.probes if "the last dropped" not in p.name]
    assert len(limits) == 6        # rate and connection limit of fin, ids, chat6
    assert (len(set(limits)), set(limits) & set(others)) == (6, set())


def test_private_exempt_source_is_a_note_unless_allow_private():
    notes = st.build_matrix(FULL, CONTAINERS).notes
    assert "ids: exempt sources not probed (192.168.1.69 is a private/reserved source: the spoof group drops it " \
           "on the external NIC before the container rules (-a leaves the spoof group out))" in notes
    rows = container_rows(st.build_matrix(SETTINGS["-a"], CONTAINERS), "ids")
    assert rows["ids: 6 SYNs at once from exempt source 192.168.1.69"].counter == st.ipt(
        4, "HOSTPREP-C-ids", "hostprep containers: ids exempt", 6, 6)


def test_restricted_and_hardening_off_containers():
    m = st.build_matrix(FULL, CONTAINERS)
    cuic = container_rows(m, "cuic")
    assert [(n, p.expected, p.counter.label) for n, p in cuic.items()] == [
        ("cuic: port 443 from a source that is no load balancer (restricted)", "dropped",
         "v4 HOSTPREP-C-cuic: cuic restricted to load balancers"),
        ("cuic: port 443 from load balancer 203.0.113.150", "answered", "v4 HOSTPREP-C-cuic: cuic load balancer")]
    ld = container_rows(m, "ld")
    assert [(n, p.expected, p.counter) for n, p in ld.items()] == [
        ("ld: port 443 closed (NGX_IPTABLES_HARDENING=0)", "dropped", st.deny(4))]


def test_ipv6_container_with_two_ports():
    rows = container_rows(st.build_matrix(FULL, CONTAINERS), "chat6")
    assert sorted(rows) == ["chat6: connection limit 30: 31 held connections, the last dropped",
                            "chat6: port 15280 open", "chat6: port 5280 open",
                            "chat6: rate 20/s burst 25: 26 SYNs at once, the last dropped"]
    assert [(p.probe["dst"], p.probe["port"], p.counter.label) for n, p in sorted(rows.items()) if "open" in n] == [
        (HOST_EXT6, 15280, "v6 HOSTPREP-C-chat6: chat6 within rate"),
        (HOST_EXT6, 5280, "v6 HOSTPREP-C-chat6: chat6 within rate")]
    assert rows["chat6: port 5280 open"].setup == (
        st.Step("inet", ("ip", "addr", "add", f"{rows['chat6: port 5280 open'].probe['src']}/128", "dev", "eth0",
                         "nodad")),)


def test_rate_limits_a_burst_cannot_show_are_a_note():
    fast = finesse(limits=Limits(2000, 1000, 100, 1, 1))
    below = finesse(name="low", dest=ip("198.51.100.11"), limits=Limits(5, 6, 8, 1, 1))
    m = st.build_matrix(FULL, (fast, below))
    assert [p.name for p in m.probes if ": rate " in p.name] == []
    assert [n for n in m.notes if "rate limit not probed" in n] == [
        "fin: rate limit not probed: 1000/s refills the bucket within a burst",
        "low: rate limit not probed: the connection limit 5 is below the burst 8 + 1, so it would drop first"]


@pytest.mark.parametrize("above, rate, burst, pace", [
    (10, 6, 8, 0.078),       # finesse defaults
    (6, 2, 4, 0.29),         # ids, cuic
    (30, 20, 25, 0.041),     # chat
    (4, 1, 8, 0.03),         # burst above the limit: no pacing needed
    (10, 1, 1, None),        # would need 0.9 s or more between SYNs
])
def test_connlimit_pace(above, rate, burst, pace):
    assert st.connlimit_pace(above, rate, burst) == pace


def test_connection_limit_too_slow_to_hold_is_a_note():
    c = finesse(limits=Limits(200, 6, 8, 1, 1))
    m = st.build_matrix(FULL, (c,))
    assert [p.name for p in m.probes if "connection limit" in p.name] == []
    assert "fin: connection limit 200 not probed: holding that many connections within 6/s would take more than " \
           "12 s" in m.notes


def test_probe_refuses_unknown_kind_role_and_expectation():
    chk = st.deny(4)
    with pytest.raises(ValueError, match="kind"):
        st.Probe("x", "inet", {"kind": "telnet"}, "dropped", chk)
    with pytest.raises(ValueError, match="role"):
        st.Probe("x", "dmz", {"kind": "tcp"}, "dropped", chk)
    with pytest.raises(ValueError, match="expected"):
        st.Probe("x", "inet", {"kind": "tcp"}, "refused", chk)
    with pytest.raises(ValueError, match="range"):
        st.CounterCheck(4, "HOSTPREP-DENY", "x", 2, 1)


# --------------------------------------------------------------------------- judging

def save(rules: dict[str, list[tuple[str, int]]]) -> str:
    lines = ["*filter"] + [f":{c} - [0:0]" for c in rules]
    lines += [f"[{n}:{n * 60}] -A {c} {spec}" for c, specs in rules.items() for spec, n in specs]
    return "\n".join(lines + ["COMMIT"]) + "\n"


DENY = '-m comment --comment "hostprep deny: default deny" -j DROP'
INVALID = '-m conntrack --ctstate INVALID -m comment --comment "hostprep ddos: invalid" -j DROP'
NOSYN = '-p tcp -m comment --comment "hostprep ddos: new without syn" -j DROP'


def counters(deny=0, invalid=0, nosyn=0, frag=0) -> st.Counters:
    v4 = parse_save(save({"HOSTPREP-DENY": [(DENY, deny)], "HOSTPREP-DDOS": [(INVALID, invalid), (NOSYN, nosyn)]}), 4)
    return st.Counters(v4, parse_save("", 6), {"hostprep ddos: ipv4 fragment": frag})


def probe(name, expected, check, role="inet", **kw) -> st.Probe:
    return st.Probe(name, role, {"kind": "tcp", "dst": HOST_EXT4, "dport": 1}, expected, check, **kw)


DROP = {"answered": False, "reply": None}
ANSWER = {"answered": True, "reply": "RA"}


def test_judge_dropped_and_counted():
    p = probe("closed", "dropped", st.deny(4))
    v, = st.judge_phase([p], {"closed": [DROP]}, counters(deny=5), counters(deny=6))
    assert (v.observed, v.ok, [(c.delta, c.ok) for c in v.counters]) == ("dropped", True, [(1, True)])
    assert v.counters[0].packets() == "+1"


def test_judge_dropped_but_counted_by_another_rule_is_a_mismatch():
    p = probe("closed", "dropped", st.deny(4))
    v, = st.judge_phase([p], {"closed": [DROP]}, counters(), counters(invalid=1))
    assert (v.observed, v.ok, v.counters[0].delta) == ("dropped", False, 0)
    assert v.counters[0].packets() == "+0, wanted 1"


def test_judge_answered_where_dropped_expected_is_a_mismatch():
    p = probe("closed", "dropped", st.deny(4))
    v, = st.judge_phase([p], {"closed": [ANSWER]}, counters(), counters(deny=1))
    assert (v.observed, v.ok) == ("answered", False)


def test_judge_shared_counter_is_judged_on_the_sum_of_the_phase():
    ps = [probe("xmas", "dropped", st.ipt(4, "HOSTPREP-DDOS", "hostprep ddos: invalid")),
          probe("null", "dropped", st.ipt(4, "HOSTPREP-DDOS", "hostprep ddos: invalid")),
          probe("control", "answered", st.ipt(4, "HOSTPREP-DDOS", "hostprep ddos: invalid", 0, 0), role="admin")]
    res = {"xmas": [DROP], "null": [DROP], "control": [ANSWER]}
    ok = st.judge_phase(ps, res, counters(), counters(invalid=2))
    assert [(v.observed, v.ok) for v in ok] == [("dropped", True), ("dropped", True), ("answered", True)]
    assert [v.counters[0].packets() for v in ok] == ["+2 (phase), 1 here", "+2 (phase), 1 here", "+2 (phase), 0 here"]
    short = st.judge_phase(ps, res, counters(), counters(invalid=1))
    assert [v.ok for v in short] == [False, False, False]
    assert short[2].counters[0].packets() == "+1 (phase), wanted 2, 0 here"


def test_judge_fragments_counted_as_many_as_were_sent():
    chk = st.CounterCheck(None, "", "hostprep ddos: ipv4 fragment", from_result="fragments")
    p = probe("frag", "dropped", chk)
    res = {"frag": [{"answered": False, "reply": None, "fragments": 3}]}
    assert st.judge_phase([p], res, counters(frag=1), counters(frag=4))[0].ok is True
    assert st.judge_phase([p], res, counters(frag=1), counters(frag=3))[0].ok is False


def test_judge_burst_pattern():
    p = probe("rate", "dropped", st.deny(4), repeat=3)
    judged = {tuple(a["answered"] for a in r): st.judge_phase([p], {"rate": r}, counters(), counters(deny=1))[0]
              for r in ([ANSWER, ANSWER, DROP], [ANSWER, ANSWER, ANSWER], [ANSWER, DROP, DROP], [DROP, ANSWER, DROP])}
    assert {k: (v.observed, v.ok) for k, v in judged.items()} == {
        (True, True, False): ("dropped", True),
        (True, True, True): ("answered", False),
        (True, False, False): ("1 of 3 answered", False),
        (False, True, False): ("1 of 3 answered", False)}
    q = probe("exempt", "answered", st.deny(4, 0, 0), repeat=2)
    assert st.judge_phase([q], {"exempt": [ANSWER, ANSWER]}, counters(), counters())[0].ok is True
    assert st.judge_phase([q], {"exempt": [ANSWER, DROP]}, counters(), counters())[0].observed == "1 of 2 answered"


def test_judge_by_counter_and_open_ended_range():
    flood = st.Probe("flood", "inet", {"kind": "flood", "dst": HOST_EXT4, "dport": 1, "count": 50}, "dropped",
                     st.deny(4, 45, 48), judge="counter", also=(st.ipt(4, "HOSTPREP-DDOS", "hostprep ddos: invalid",
                                                                        2, None),))
    res = {"flood": [{"answered": False, "sent": 50}]}
    good = st.judge_phase([flood], res, counters(), counters(deny=47, invalid=9))[0]
    assert (good.observed, good.ok) == ("dropped", True)
    bad = st.judge_phase([flood], res, counters(), counters(deny=44, invalid=9))[0]
    assert (bad.observed, bad.ok) == ("not dropped", False)
    assert bad.counters[0].packets() == "+44, wanted 45..48"
    low = st.judge_phase([flood], res, counters(), counters(deny=47, invalid=1))[0]
    assert (low.ok, low.counters[1].packets()) == (False, "+1, wanted >= 2")


def test_judge_probe_error_and_missing_result():
    p = probe("x", "dropped", st.deny(4))
    assert st.judge_phase([p], {"x": [{"answered": False, "error": "unknown probe kind 'tcp'"}]}, counters(),
                          counters(deny=1))[0].observed == "error: unknown probe kind 'tcp'"
    v = st.judge_phase([p], {}, counters(), counters(deny=1))[0]
    assert (v.observed, v.ok) == ("not sent", False)


def test_counter_sums_every_rule_of_the_chain_with_the_comment():
    v4 = parse_save(save({"HOSTPREP-C-x": [('-p tcp --ctorigdstport 1 -m comment --comment "hostprep containers: x '
                                            'within rate" -j ACCEPT', 2),
                                           ('-p tcp --ctorigdstport 2 -m comment --comment "hostprep containers: x '
                                            'within rate" -j ACCEPT', 3),
                                           ('-m comment --comment "hostprep containers: x load balancer" -j ACCEPT', 7),
                                           ('-m comment --comment "hostprep containers: x restricted to load '
                                            'balancers" -j DROP', 11)]}), 4)
    c = st.Counters(v4, parse_save("", 6))
    assert c.packets(st.ipt(4, "HOSTPREP-C-x", "hostprep containers: x within rate")) == 5
    assert c.packets(st.ipt(4, "HOSTPREP-C-x", "hostprep containers: x load balancer")) == 7


# --------------------------------------------------------------------------- env files for the sandbox

ROUND_TRIP = [
    finesse(exempt=(net("203.0.113.99/32"), net("192.168.1.69/32")), load_balancers=(net("198.51.100.77/32"),)),
    Container("cuic", "cuic_12.6(1)", (8444, 8447), ip("10.1.1.1"), Limits(6, 2, 4, 3, 2), restricted=True,
              load_balancers=(net("203.0.113.150/32"), net("2001:db8:5::/64"))),
    Container("chat", "chat", (5280, 15280, 25280), ip("2001:db8:77::5"), Limits(30, 20, 25, 1, 1)),
    Container("cc", "cloudconnect", (443,), ip("10.1.1.2"), Limits(8, 4, 6, 1, 1),
              exempt=(net("192.168.1.69/32"), net("35.161.238.252/32"))),
    Container("ld", "livedata", (443,), ip("10.1.1.3"), Limits(10, 6, 8, 1, 1), hardening=False),
]


@pytest.mark.parametrize("c", ROUND_TRIP, ids=[c.name for c in ROUND_TRIP])
def test_env_files_rebuild_the_recorded_container_on_the_sandbox_address(c, tmp_path):
    dest = HOST_EXT6 if c.family == 6 else HOST_EXT4
    texts = st.env_texts(c, dest)
    paths = {}
    for kind, text in texts.items():
        paths[kind] = tmp_path / f"{kind}.env"
        paths[kind].write_text(text)
    back = load_container(c.name, paths["env"], paths["core"], paths["installer"], "eth1",
                          [f"{HOST_EXT4}/24", f"{HOST_EXT6}/64"])
    assert st.rebind(back, dest) == st.rebind(c, dest)
    assert back.dest == ip(dest)


def test_each_binding_ip_gets_its_own_sandbox_address_of_its_family():
    cs = [finesse(dest=ip("10.0.0.5")), finesse(name="b", dest=ip("10.0.0.6")), finesse(name="c", dest=ip("10.0.0.5")),
          finesse(name="d", dest=ip("2001:db8:77::1"))]
    assert st.sandbox_dests(cs) == {"10.0.0.5": "198.51.100.10", "10.0.0.6": "198.51.100.11",
                                    "2001:db8:77::1": "2001:db8:e::10"}


def test_closed_port_avoids_container_ports():
    assert st.closed_port((finesse(ports=(40404, 40405)),)) == 40406
    assert st.closed_port(()) == 40404


# --------------------------------------------------------------------------- options

class FakeStore:
    def __init__(self, settings=None, containers=None):
        self._settings = settings
        self._containers = containers or {}

    def settings(self):
        return self._settings

    def containers(self):
        return self._containers


def test_options_flags_win_over_remembered_settings():
    store = FakeStore({"interface": "ens192", "skip_ddos": True, "allow_private": True, "ping_from": ["a.example"]},
                      {"fin": finesse()})
    o = st.resolve_options(None, False, False, ["203.0.113.9"], [], [], None, False, store)
    assert (o.source, o.skip_ddos, o.allow_private, o.ping_from, o.registry) == (
        "command line", False, False, ("203.0.113.9",), (finesse(),))
    o = st.resolve_options(None, False, False, [], [], [], "legacy", True, store)
    assert (o.source, o.interface, o.skip_ddos, o.allow_private, o.ping_from, o.backend, o.keep) == (
        "remembered settings", "ens192", True, True, ("a.example",), "legacy", True)
    o = st.resolve_options(None, False, False, [], [], [], None, False, FakeStore())
    assert (o.source, o.skip_ddos, o.allow_private, o.ping_from) == ("defaults (nothing remembered)", False, False, ())


def test_env_files_replace_the_registry_and_pair_with_core_files():
    store = FakeStore(None, {"fin": finesse()})
    o = st.resolve_options(None, False, False, [], [Path("a/finesse.env"), Path("b/finesse.env"), Path("ids.env")],
                           [Path("core.env")], None, False, store)
    assert o.registry == ()
    assert o.env_files == (st.EnvPair("finesse", Path("a/finesse.env"), Path("core.env")),
                           st.EnvPair("finesse-2", Path("b/finesse.env"), Path("core.env")),
                           st.EnvPair("ids", Path("ids.env"), Path("core.env")))
    assert st.env_pairs([Path("x.env"), Path("y.env")], [Path("1.env"), Path("2.env")]) == (
        st.EnvPair("x", Path("x.env"), Path("1.env")), st.EnvPair("y", Path("y.env"), Path("2.env")))
    with pytest.raises(InputError, match="2 core files for 3 env files"):
        st.env_pairs([Path("a.env"), Path("b.env"), Path("c.env")], [Path("1.env"), Path("2.env")])
    with pytest.raises(InputError, match="given without --env"):
        st.env_pairs([], [Path("core.env")])


# --------------------------------------------------------------------------- refusals, and where commands run

class NetnsRefused(Runner):
    """Records every command; ``ip netns add`` fails as where namespaces cannot be made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def which(self, binary):
        return f"/usr/sbin/{binary}"

    def run(self, argv, *, input=None, check=True, mutates=False, cwd=None):
        self.calls.append(list(argv))
        if argv[:3] == ["ip", "netns", "add"]:
            raise CommandFailed("ip netns", "exit 1: mount --make-shared /run/netns failed: Operation not permitted")
        return Result(tuple(argv), 0, "", "")


def test_refuses_where_namespaces_cannot_be_made_and_leaves_nothing():
    runner = NetnsRefused()
    before = set(Path("/tmp").glob("hpself*"))
    with pytest.raises(RefusedError) as exc:
        st.run_selftest(st.Options(backend="nft"), runner)
    assert exc.value.line() == ("selftest: network namespaces cannot be made here (exit 1: mount --make-shared "
                                "/run/netns failed: Operation not permitted) (run it as root on a host (or VM) that "
                                "allows 'ip netns add')")
    assert set(Path("/tmp").glob("hpself*")) == before
    # only the sandbox's own namespaces were named; nothing ran in the machine's namespace
    assert [c for c in runner.calls if c[:2] != ["ip", "netns"]] == []


class ApplyFails(NetnsRefused):
    """Namespaces can be made; hostprep apply inside the sandbox fails."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def run(self, argv, *, input=None, check=True, mutates=False, cwd=None):
        self.calls.append(list(argv))
        if argv[:3] == ["ip", "netns", "add"]:
            self.made.append(argv[3])
        if argv[:3] == ["ip", "netns", "del"]:
            self.made.remove(argv[3])
        if argv[:3] == ["ip", "netns", "list"]:
            return Result(tuple(argv), 0, "\n".join(self.made), "")
        if "hostprep" in argv and "apply" in argv:
            return Result(tuple(argv), 2, "", "error: something: went wrong (fix it)\n")
        return Result(tuple(argv), 0, "", "")


def test_a_failure_inside_the_sandbox_removes_it_and_every_command_targets_the_sandbox():
    runner = ApplyFails()
    with pytest.raises(CommandFailed, match="hostprep apply in the sandbox: something: went wrong"):
        st.run_selftest(st.Options(backend="nft"), runner)
    assert runner.made == []
    box = runner.calls[1][3]
    assert box.startswith("hpself")
    ours = {box, f"{box}-inet", f"{box}-admin"}
    for argv in runner.calls:
        if argv[:3] in (["ip", "netns", "add"], ["ip", "netns", "del"], ["ip", "netns", "exec"]):
            assert argv[3] in ours, argv
        elif argv[:2] == ["ip", "-n"]:
            assert argv[2] in ours, argv
        elif argv[:3] == ["ip", "link", "add"]:      # the veth pairs are created straight into our namespaces
            assert [argv[i + 1] for i, a in enumerate(argv) if a == "netns"] in (
                [box, f"{box}-inet"], [box, f"{box}-admin"]), argv
        else:
            assert argv == ["ip", "netns", "list"], argv
    apply_argv = next(a for a in runner.calls if "apply" in a)
    assert apply_argv[:8] == ["ip", "netns", "exec", box, "env", "-u", "HOSTPREP_SELINUXFS",
                              apply_argv[7]]
    assert apply_argv[7].startswith(f"HOSTPREP_ROOT=/tmp/{box}-")
    assert apply_argv[-9:] == ["apply", "-i", "eth1", "-y", "--ignore-selinux", "-p", "203.0.113.7", "-p",
                               "2001:db8:f::7"]
    assert not Path(apply_argv[7].split("=", 1)[1]).exists()


def test_cli_refuses_without_root(monkeypatch):
    from hostprep import apply as applymod
    from hostprep.cli import app
    monkeypatch.setattr(applymod, "is_root", lambda: False)
    res = CliRunner().invoke(app, ["selftest", "--json"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: selftest: needs root (CAP_NET_ADMIN) to change or read the firewall (run it with sudo: sudo "
        "hostprep selftest)"]


def test_cli_refuses_a_bad_interface_name_in_one_line(monkeypatch):
    from hostprep.cli import app
    res = CliRunner().invoke(app, ["selftest", "-i", "eth1;reboot"])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("error: -i/--interface: 'eth1;reboot' is not a valid interface name")


def test_ipv6_probe_sources_each_in_a_48_of_its_own():
    """A container's IPv6 limits key on a prefix (48..128, /64 by default): two probes from one
    /64 would share a bucket and a connection count."""
    src = st.Sources(())
    got = [ipaddress.ip_network(f"{src.fresh(6)}/48", strict=False) for _ in range(20)]
    assert (len(set(got)), all(n.subnet_of(ipaddress.ip_network("2001:db8::/32")) for n in got)) == (20, True)
