"""render: golden files plus a hand-written oracle (one assertion per feature).

Golden files live in tests/unit/golden/.  After an intended change of a template,
regenerate them and review the diff before committing:

    HOSTPREP_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py -q
    git diff tests/unit/golden/

In regeneration mode the golden tests write the files and are reported as skipped
(they verify nothing in that run).  The oracle tests below do not use the golden
files: they state each feature of the policy by hand, so a golden file regenerated
from a wrong template still fails here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from pathlib import Path

import pytest

from hostprep import render
from hostprep.model import GROUPS, Desired, Policy, PingSource, Ruleset, group_of_chain
from hostprep.paths import data_dir

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("HOSTPREP_REGEN_GOLDEN") == "1"


def ping(*values: str) -> tuple[PingSource, ...]:
    return tuple(PingSource(v, (ipaddress.ip_network(v),)) for v in values)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        pytest.skip(f"regenerated {path}")
    assert text == path.read_text()


# -- golden files ---------------------------------------------------------------

def test_golden_v4_default():
    check_golden("filter_v4_default.rules", render.filter_text(Policy("eth1"), 4))


def test_golden_v6_ping():
    check_golden("filter_v6_ping.rules",
                 render.filter_text(Policy("eth1", ping=ping("2001:db8::7")), 6))


def test_golden_v4_skip_ddos_allow_private_two_pings():
    policy = Policy("eth1", skip_ddos=True, allow_private=True,
                    ping=ping("203.0.113.7", "198.51.100.0/24"))
    check_golden("filter_v4_e_a_two_p.rules", render.filter_text(policy, 4))


def test_golden_nft():
    check_golden("ingress.nft", render.nft_text(Policy("eth1")))


# -- hand-written oracle -----------------------------------------------------------

PING = ping("203.0.113.7", "198.51.100.0/24", "2001:db8::7")


@pytest.fixture(scope="module")
def default() -> Desired:
    return render.desired(Policy("eth1", ping=PING))


def tokens(spec: str) -> list[str]:
    return shlex.split(spec)


def option(spec: str, name: str) -> str | None:
    toks = tokens(spec)
    return toks[toks.index(name) + 1] if name in toks else None


def chain_specs(rs: Ruleset) -> dict[str, tuple[str, ...]]:
    return {c.name: c.specs for c in rs.chains}


def can_drop(rs: Ruleset, name: str) -> bool:
    chain = rs.chain(name)
    assert chain is not None
    return any(r.target == "DROP" for r in chain.rules)


def test_jumps_from_builtin_chains(default):
    assert [(f, r.line()) for f in (4, 6) for r in default.ruleset(f).jumps] == [
        (f, line) for f in (4, 6) for line in (
            "-A INPUT -i eth1 -j HOSTPREP-IN",
            "-A FORWARD -i eth1 -j HOSTPREP-IN",
            "-A OUTPUT -o eth1 -j HOSTPREP-OUT",
            # the SYN synproxy sends for a client that returned a valid cookie (issue 12 item 2)
            "-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype ! --src-type LOCAL -m conntrack --ctstate NEW -j HOSTPREP-CONTAINERS",
        )]


def test_dispatch_order(default):
    icmp = {4: "icmp", 6: "ipv6-icmp"}
    assert {f: default.ruleset(f).chain("HOSTPREP-IN").specs for f in (4, 6)} == {f: (
        "-j HOSTPREP-FAST",
        "-p tcp -j HOSTPREP-COOKIES",
        f"-p {icmp[f]} -j HOSTPREP-ICMP",
        "-j HOSTPREP-DDOS",
        "-j HOSTPREP-SPOOF",
        "-p tcp -j HOSTPREP-SSH",
        "-p udp -j HOSTPREP-UDP",
        "-p tcp -j HOSTPREP-CONTAINERS",
        "-j HOSTPREP-DENY",
    ) for f in (4, 6)}


def test_fast_path_precedes_every_drop(default):
    # DESIGN: the fast path is first, so tracked connections (and their in-window
    # RSTs) are never judged by a drop rule; the RST meter lives in the ddos chain.
    before = {}
    for f in (4, 6):
        rs = default.ruleset(f)
        targets = [r.target for r in rs.chain("HOSTPREP-IN").rules]
        before[f] = [t for t in targets[:targets.index("HOSTPREP-FAST")] if can_drop(rs, t)]
    assert before == {4: [], 6: []}


def test_rst_meter_heads_the_ddos_chain(default):
    assert [default.ruleset(f).chain("HOSTPREP-DDOS").specs[0] for f in (4, 6)] == [
        "-p tcp -m tcp --tcp-flags RST RST -j HOSTPREP-RST"] * 2


def test_fast_path_is_first_without_ddos():
    d = render.desired(Policy("eth1", skip_ddos=True))
    assert [d.ruleset(f).chain("HOSTPREP-IN").rules[0].target for f in (4, 6)] == \
        ["HOSTPREP-FAST", "HOSTPREP-FAST"]


def test_fast_path_accepts_established_and_only_the_related_icmp_errors(default):
    # Issue 10 item 13: ESTABLISHED, then RELATED only for the ICMP errors a
    # connection needs (PMTU among them); no redirect, no RELATED non-ICMP.
    def related(f, proto, match, t, what):
        return (f'-p {proto} -m {match} --{"icmp" if f == 4 else "icmpv6"}-type {t} -m conntrack --ctstate RELATED '
                f'-m comment --comment "hostprep fastpath: related icmp {what}" -j ACCEPT')
    established = '-m conntrack --ctstate ESTABLISHED -m comment --comment "hostprep fastpath: established" -j ACCEPT'
    assert {f: default.ruleset(f).chain("HOSTPREP-FAST").specs for f in (4, 6)} == {
        4: (established,
            related(4, "icmp", "icmp", 3, "destination unreachable"),
            related(4, "icmp", "icmp", 4, "source quench"),
            related(4, "icmp", "icmp", 11, "time exceeded"),
            related(4, "icmp", "icmp", 12, "parameter problem")),
        6: (established,
            related(6, "ipv6-icmp", "icmp6", 1, "destination unreachable"),
            related(6, "ipv6-icmp", "icmp6", 2, "packet too big"),
            related(6, "ipv6-icmp", "icmp6", 3, "time exceeded"),
            related(6, "ipv6-icmp", "icmp6", 4, "parameter problem")),
    }


def test_fast_path_related_only_icmp_error_types_never_redirects(default):
    # Every rule of the fast path that accepts RELATED names ICMP and one of the
    # error types; the redirects (IPv4 5, IPv6 137) are none of them.
    found = {}
    for f in (4, 6):
        rows = []
        for r in default.ruleset(f).chain("HOSTPREP-FAST").rules:
            state = option(r.spec, "--ctstate")
            rows.append((state, option(r.spec, "-p"),
                         option(r.spec, "--icmp-type") or option(r.spec, "--icmpv6-type"), r.target))
        found[f] = rows
    assert found == {
        4: [("ESTABLISHED", None, None, "ACCEPT")] + [("RELATED", "icmp", t, "ACCEPT") for t in ("3", "4", "11", "12")],
        6: [("ESTABLISHED", None, None, "ACCEPT")] + [("RELATED", "ipv6-icmp", t, "ACCEPT")
                                                      for t in ("1", "2", "3", "4")],
    }


def test_ddos_invalid_rule(default):
    assert [default.ruleset(f).chain("HOSTPREP-DDOS").specs[1] for f in (4, 6)] == [
        '-m conntrack --ctstate INVALID -m comment --comment "hostprep ddos: invalid" -j DROP'] * 2


def test_ddos_new_without_syn(default):
    assert [default.ruleset(f).chain("HOSTPREP-DDOS").specs[2] for f in (4, 6)] == [
        '-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW '
        '-m comment --comment "hostprep ddos: new without syn" -j DROP'] * 2


def test_ddos_mss_range_per_family(default):
    found = {f: [(option(r.spec, "--mss"), r.target)
                 for r in default.ruleset(f).chain("HOSTPREP-DDOS").rules if "tcpmss" in r.spec]
             for f in (4, 6)}
    assert found == {4: [("536:65535", "DROP")], 6: [("1220:65535", "DROP")]}


def test_ddos_mss_rule_is_inverted_and_new_only(default):
    spec = next(r.spec for r in default.v4.chain("HOSTPREP-DDOS").rules if "tcpmss" in r.spec)
    assert spec.split(' -m comment')[0] == \
        "-p tcp -m conntrack --ctstate NEW -m tcpmss ! --mss 536:65535"


def test_ddos_bogus_flag_combinations(default):
    expected = [
        ("FIN,SYN,RST,PSH,ACK,URG", "NONE"),
        ("FIN,SYN", "FIN,SYN"),
        ("SYN,RST", "SYN,RST"),
        ("FIN,RST", "FIN,RST"),
        ("FIN,ACK", "FIN"),
        ("ACK,URG", "URG"),
        ("PSH,ACK", "PSH"),
        ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,RST,PSH,ACK,URG"),
        ("FIN,SYN,RST,PSH,ACK,URG", "FIN,PSH,URG"),
        ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,PSH,URG"),
        ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,RST,ACK,URG"),
    ]
    found = {}
    for f in (4, 6):
        rows = []
        for r in default.ruleset(f).chain("HOSTPREP-DDOS").rules:
            toks = tokens(r.spec)
            if "--tcp-flags" in toks and toks[toks.index("--tcp-flags") - 1] != "!" and r.target == "DROP":
                i = toks.index("--tcp-flags")
                rows.append((toks[i + 1], toks[i + 2], r.target))
        found[f] = rows
    assert found == {f: [(m, c, "DROP") for m, c in expected] for f in (4, 6)}


def test_rst_limit(default):
    assert {f: default.ruleset(f).chain("HOSTPREP-RST").specs for f in (4, 6)} == {f: (
        '-m limit --limit 2/sec --limit-burst 2 -m comment --comment "hostprep ddos: rst within 2/s" '
        '-j RETURN',
        '-m comment --comment "hostprep ddos: rst flood" -j DROP',
    ) for f in (4, 6)}


def test_spoof_sources(default):
    v4 = ["224.0.0.0/3", "169.254.0.0/16", "172.16.0.0/12", "192.0.2.0/24", "192.168.0.0/16",
          "10.0.0.0/8", "0.0.0.0/8", "240.0.0.0/5", "127.0.0.0/8"]
    v6 = ["::1/128", "::ffff:0.0.0.0/96", "fc00::/7", "fec0::/10", "ff00::/8"]
    found = {f: [(option(r.spec, "-s"), r.target) for r in default.ruleset(f).chain("HOSTPREP-SPOOF").rules]
             for f in (4, 6)}
    assert found == {4: [(n, "DROP") for n in v4], 6: [(n, "DROP") for n in v6]}


def test_ssh_dropped_in_and_out(default):
    found = {f: [(c, option(r.spec, "-p"), option(r.spec, "--dport"), r.target)
                 for c in ("HOSTPREP-SSH", "HOSTPREP-OUT") for r in default.ruleset(f).chain(c).rules]
             for f in (4, 6)}
    assert found == {f: [("HOSTPREP-SSH", "tcp", "22", "DROP"), ("HOSTPREP-OUT", "tcp", "22", "DROP")]
                     for f in (4, 6)}


def test_echo_request_only_from_ping_networks_of_the_family(default):
    def echo_rules(f):
        out = []
        for r in default.ruleset(f).chain("HOSTPREP-ICMP").rules:
            kind = option(r.spec, "--icmp-type") or option(r.spec, "--icmpv6-type")
            if kind in ("8", "128"):
                out.append((option(r.spec, "-s"), kind, r.target))
        return out
    assert {f: echo_rules(f) for f in (4, 6)} == {
        4: [("203.0.113.7/32", "8", "ACCEPT"), ("198.51.100.0/24", "8", "ACCEPT")],
        6: [("2001:db8::7/128", "128", "ACCEPT")],
    }


def test_spoof_group_judges_icmp_before_the_ping_allow_list(default):
    # Issue 10 item 12: a -p network must not let a private/reserved source in.
    # IPv6: after neighbour discovery and MLD (on-link, proven by hop limit or
    # link-local source), before the echo allow-list.
    def order(f):
        kinds = []
        for r in default.ruleset(f).chain("HOSTPREP-ICMP").rules:
            comment = option(r.spec, "--comment") or ""
            kinds.append("spoof" if r.target == "HOSTPREP-SPOOF" else comment.removeprefix("hostprep icmp: "))
        return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert {f: order(f) for f in (4, 6)} == {
        4: ["spoof", "ping allowed (-p)", "other icmp"],
        6: ["neighbour discovery", "multicast listener", "spoof", "ping allowed (-p)", "other icmp"],
    }


def test_no_spoof_jump_in_icmp_with_allow_private_or_without_ping():
    a = render.desired(Policy("eth1", allow_private=True, ping=PING))
    n = render.desired(Policy("eth1"))
    assert [[r.target for r in d.ruleset(f).chain("HOSTPREP-ICMP").rules if r.target == "HOSTPREP-SPOOF"]
            for d in (a, n) for f in (4, 6)] == [[], [], [], []]


def test_no_ping_sources_means_icmp_is_one_drop():
    d = render.desired(Policy("eth1"))
    assert d.v4.chain("HOSTPREP-ICMP").specs == (
        '-m comment --comment "hostprep icmp: other icmp" -j DROP',)


def test_icmp_chain_ends_with_drop(default):
    assert [default.ruleset(f).chain("HOSTPREP-ICMP").specs[-1] for f in (4, 6)] == [
        '-m comment --comment "hostprep icmp: other icmp" -j DROP'] * 2


def test_v6_neighbour_discovery_with_hop_limit_255(default):
    found = {f: [(option(r.spec, "--icmpv6-type"), option(r.spec, "--hl-eq"), r.target)
                 for r in default.ruleset(f).chain("HOSTPREP-ICMP").rules if "--hl-eq" in r.spec]
             for f in (4, 6)}
    assert found == {4: [], 6: [(t, "255", "ACCEPT") for t in ("133", "134", "135", "136")]}


def test_v6_multicast_listener_only_from_link_local(default):
    found = [(option(r.spec, "-s"), option(r.spec, "--icmpv6-type"))
             for r in default.v6.chain("HOSTPREP-ICMP").rules if "multicast listener" in r.spec]
    assert found == [("fe80::/10", t) for t in ("130", "131", "132", "143")]


def test_udp_dropped(default):
    assert {f: default.ruleset(f).chain("HOSTPREP-UDP").specs for f in (4, 6)} == {
        f: ('-m comment --comment "hostprep udp: udp dropped" -j DROP',) for f in (4, 6)}


def test_default_deny_last(default):
    found = {f: (default.ruleset(f).chain("HOSTPREP-IN").specs[-1],
                 default.ruleset(f).chain("HOSTPREP-DENY").specs) for f in (4, 6)}
    assert found == {f: ("-j HOSTPREP-DENY",
                         ('-m comment --comment "hostprep deny: default deny" -j DROP',))
                     for f in (4, 6)}


def _without(rs: Ruleset, removed: set[str]) -> dict[str, tuple[str, ...]]:
    """The chains of ``rs`` minus ``removed``, and HOSTPREP-IN without the jumps into them."""
    out = {}
    for c in rs.chains:
        if c.name in removed:
            continue
        out[c.name] = tuple(r.spec for r in c.rules if r.target not in removed)
    return out


def test_skip_ddos_removes_exactly_rst_ddos_and_nft(default):
    e = render.desired(Policy("eth1", skip_ddos=True, ping=PING))
    removed = {"HOSTPREP-RST", "HOSTPREP-DDOS", "HOSTPREP-COOKIES", "HOSTPREP-SYNPROXY"}
    found = ({f: chain_specs(e.ruleset(f)) for f in (4, 6)},
             {f: e.ruleset(f).jumps for f in (4, 6)}, e.nft)
    assert found == ({f: _without(default.ruleset(f), removed) for f in (4, 6)},
                     {f: tuple(j for j in default.ruleset(f).jumps if "--src-type LOCAL" not in j.spec)
                      for f in (4, 6)}, None)


def test_allow_private_removes_exactly_spoof(default):
    a = render.desired(Policy("eth1", allow_private=True, ping=PING))
    found = ({f: chain_specs(a.ruleset(f)) for f in (4, 6)},
             {f: a.ruleset(f).jumps for f in (4, 6)}, a.nft)
    assert found == ({f: _without(default.ruleset(f), {"HOSTPREP-SPOOF"}) for f in (4, 6)},
                     {f: default.ruleset(f).jumps for f in (4, 6)}, default.nft)


def test_nft_table_on_the_external_nic(default):
    assert (default.nft.device, 'device "eth1"' in default.nft.script) == ("eth1", True)


def test_nft_drops_fragments_and_bogus_flags_of_both_families(default):
    drops = [ln.strip() for ln in default.nft.script.splitlines()
             if " drop" in ln and not ln.strip().startswith("#")]
    assert [d.split(" counter drop")[0] if "tcp flags" not in d else d.split(" {")[0] for d in drops] == [
        "ip frag-off & 0x3fff != 0",
        "meta protocol ip6 exthdr frag exists",
        "tcp flags & (fin | syn | rst | psh | ack | urg)",
    ]
    assert drops[2].endswith('counter drop comment "hostprep ddos: bogus tcp flags"')


def test_nft_replaces_the_table_atomically(default):
    lines = default.nft.script.splitlines()
    assert [ln for ln in lines if ln.startswith(("table", "delete"))] == [
        "table netdev hostprep", "delete table netdev hostprep", "table netdev hostprep {"]


def test_every_rule_has_a_hostprep_comment_naming_its_group(default):
    bad = []
    for f in (4, 6):
        rs = default.ruleset(f)
        for chain in rs.chains:
            for r in chain.rules:
                comment = option(r.spec, "--comment")
                # Dispatch jumps into another hostprep chain carry no comment (the
                # target names the group); HOSTPREP-IN holds nothing else.
                pure_jump = tokens(r.spec)[-2:] == ["-j", r.target] and rs.chain(r.target) is not None
                if chain.name == "HOSTPREP-IN" or pure_jump:
                    if comment is not None or not pure_jump:
                        bad.append((f, r.line()))
                elif "-m comment" not in r.spec or comment is None \
                        or not comment.startswith(f"hostprep {group_of_chain(chain.name)}: "):
                    bad.append((f, r.line()))
    assert bad == []


def test_every_chain_belongs_to_a_group(default):
    known = {c for chains in GROUPS.values() for c in chains} | {"HOSTPREP-IN"}
    assert sorted({c.name for f in (4, 6) for c in default.ruleset(f).chains} - known) == []


def test_groups_present(default):
    e = render.desired(Policy("eth1", skip_ddos=True, allow_private=True))
    assert (default.v4.groups, e.v6.groups) == (
        ("fastpath", "ddos", "spoof", "ssh", "icmp", "udp", "containers", "deny"),
        ("fastpath", "ssh", "icmp", "udp", "containers", "deny"))


def test_interface_name_reaches_every_jump():
    d = render.desired(Policy("bond0.100"))
    assert [r.spec for r in d.v4.jumps if "--src-type LOCAL" not in r.spec] == [
        "-i bond0.100 -j HOSTPREP-IN", "-i bond0.100 -j HOSTPREP-IN", "-o bond0.100 -j HOSTPREP-OUT"]


# -- the templates say why on every block -----------------------------------------

def _paragraphs(template: str) -> list[list[str]]:
    """Blank-line separated paragraphs, Jinja comments and tags (even multi-line) removed."""
    text = re.sub(r"\{#.*?#\}", "", template, flags=re.S)
    text = re.sub(r"\{%.*?%\}", "{%%}", text, flags=re.S)
    paras, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            if cur:
                paras.append(cur)
            cur = []
        elif line.strip() != "{%%}":
            cur.append(line.strip())
    if cur:
        paras.append(cur)
    return paras


def test_filter_template_says_why_on_every_block():
    template = (data_dir("rules") / "filter.rules.j2").read_text()
    paras = [p for p in _paragraphs(template) if any(ln.startswith(("-A", ":")) for ln in p)]
    assert (len(paras) >= 10, [p[0] for p in paras if not p[0].startswith("#")]) == (True, [])


def test_filter_template_every_rule_line_has_a_comment_above_in_its_block():
    template = (data_dir("rules") / "filter.rules.j2").read_text()
    missing = []
    for para in _paragraphs(template):
        seen_comment = False
        for line in para:
            if line.startswith("#"):
                seen_comment = True
            elif line.startswith(("-A", ":")) and not seen_comment:
                missing.append(line)
    assert missing == []


def test_nft_template_says_why_on_every_rule():
    template = (data_dir("rules") / "ingress.nft.j2").read_text()
    lines = [ln.strip() for ln in re.sub(r"\{#.*?#\}", "", template, flags=re.S).splitlines()
             if ln.strip()]
    # the file opens with the why of the table; each drop rule has its own '#' line above it
    unexplained = [ln for i, ln in enumerate(lines) if not ln.startswith("#") and " drop" in ln and not lines[i - 1].startswith("#")]
    assert (lines[0].startswith("#"), unexplained) == (True, [])
