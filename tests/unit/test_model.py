"""model: frozen dataclasses refuse invalid content at construction."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from hostprep.errors import InputError
from hostprep.model import Chain, Policy, PingSource, Rule, Ruleset, group_of_chain

DROP = '-m comment --comment "hostprep deny: default deny" -j DROP'


def net(text):
    return ipaddress.ip_network(text)


def test_rule_without_target_refused():
    with pytest.raises(InputError) as err:
        Rule("HOSTPREP-DENY", "-s 192.0.2.0/24")
    assert err.value.field == "rule in HOSTPREP-DENY"


def test_rule_with_newline_refused():
    with pytest.raises(InputError):
        Rule("HOSTPREP-DENY", "-j DROP\n-A INPUT -j ACCEPT")


def test_rule_with_unbalanced_quote_refused():
    with pytest.raises(InputError):
        Rule("HOSTPREP-DENY", '-m comment --comment "open -j DROP')


def test_rule_target_and_line():
    rule = Rule("HOSTPREP-DENY", DROP)
    assert (rule.target, rule.line()) == ("DROP", f"-A HOSTPREP-DENY {DROP}")


def test_rule_is_frozen():
    rule = Rule("HOSTPREP-DENY", DROP)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.spec = "-j ACCEPT"  # type: ignore[misc]


def test_chain_without_prefix_refused():
    with pytest.raises(InputError) as err:
        Chain("DENY", (Rule("DENY", DROP),))
    assert err.value.field == "chain"


def test_chain_name_longer_than_28_refused():
    name = "HOSTPREP-" + "X" * 20  # 29 characters: iptables allows 28
    with pytest.raises(InputError):
        Chain(name, ())


def test_chain_with_rule_of_other_chain_refused():
    with pytest.raises(InputError):
        Chain("HOSTPREP-DENY", (Rule("HOSTPREP-UDP", DROP),))


def test_ruleset_jump_to_undeclared_chain_refused():
    chain = Chain("HOSTPREP-IN", (Rule("HOSTPREP-IN", "-j HOSTPREP-DENY"),))
    with pytest.raises(InputError) as err:
        Ruleset(4, (chain,), ())
    assert err.value.field == "ruleset"


def test_ruleset_builtin_jump_to_foreign_target_refused():
    chain = Chain("HOSTPREP-DENY", (Rule("HOSTPREP-DENY", DROP),))
    with pytest.raises(InputError):
        Ruleset(4, (chain,), (Rule("INPUT", "-i eth1 -j ACCEPT"),))


def test_ruleset_chain_declared_twice_refused():
    chain = Chain("HOSTPREP-DENY", (Rule("HOSTPREP-DENY", DROP),))
    with pytest.raises(InputError):
        Ruleset(4, (chain, chain), ())


def test_ruleset_bad_family_refused():
    with pytest.raises(InputError):
        Ruleset(5, (), ())


def test_ruleset_counts_and_groups():
    deny = Chain("HOSTPREP-DENY", (Rule("HOSTPREP-DENY", DROP),))
    dispatch = Chain("HOSTPREP-IN", (Rule("HOSTPREP-IN", "-j HOSTPREP-DENY"),))
    rs = Ruleset(4, (dispatch, deny), (Rule("INPUT", "-i eth1 -j HOSTPREP-IN"),))
    assert (rs.rule_count, rs.groups, rs.chain("HOSTPREP-DENY"), rs.chain("HOSTPREP-X")) == \
        (3, ("deny",), deny, None)


def test_group_of_chain():
    assert [group_of_chain(c) for c in ("HOSTPREP-RST", "HOSTPREP-OUT", "HOSTPREP-IN", "INPUT")] == \
        ["ddos", "ssh", None, None]


@pytest.mark.parametrize("iface", ["", "eth1;reboot", "eth 1", "eth1+", "a" * 16])
def test_policy_bad_interface_refused(iface):
    with pytest.raises(InputError) as err:
        Policy(iface)
    assert err.value.field == "-i/--interface"


def test_policy_ping_source_without_network_refused():
    with pytest.raises(InputError) as err:
        Policy("eth1", ping=(PingSource("monitor.example.com", ()),))
    assert err.value.field == "-p/--ping-from"


def test_policy_ping_networks_dedup_and_family_split():
    policy = Policy("eth1", ping=(
        PingSource("203.0.113.7", (net("203.0.113.7/32"),)),
        PingSource("monitor.example.com", (net("203.0.113.7/32"), net("2001:db8::7/128"))),
        PingSource("198.51.100.0/24", (net("198.51.100.0/24"),)),
        PingSource("2001:db8::7", (net("2001:db8::7/128"),)),
    ))
    assert (policy.ping_networks(4), policy.ping_networks(6)) == (
        ("203.0.113.7/32", "198.51.100.0/24"), ("2001:db8::7/128",))
