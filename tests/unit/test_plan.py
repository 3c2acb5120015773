"""plan: diff(desired, observed) -> changes, the restore text, and parse_save."""

from __future__ import annotations


from hostprep import render
from hostprep.model import Chain, Policy, Rule, Ruleset
from hostprep.plan import (Counter, FamilyPlan, LiveRule, Observed, parse_save, plan_family,
                           restore_text, ruleset_from_observed)

BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
DESIRED = render.desired(Policy("eth1")).v4
JUMP_IN = "-i eth1 -j HOSTPREP-IN"


def observed_of(rs: Ruleset, *, extra_chains=(), before=(), after=(), jumps=None) -> Observed:
    """An Observed holding ``rs`` as the kernel would, plus foreign chains and rules.

    ``before``/``after``: LiveRules placed before/after hostprep's jumps in their chain.
    ``jumps``: replaces the jumps of ``rs`` (LiveRules), to misplace or duplicate them.
    """
    live_jumps = [LiveRule(j.chain, j.spec) for j in rs.jumps] if jumps is None else list(jumps)
    rules = []
    for builtin in BUILTINS:
        rules += [r for r in before if r.chain == builtin]
        rules += [r for r in live_jumps if r.chain == builtin]
        rules += [r for r in after if r.chain == builtin]
    chains = BUILTINS + tuple(extra_chains) + tuple(c.name for c in rs.chains)
    for name in extra_chains:
        rules += [r for r in after if r.chain == name]
    for chain in rs.chains:
        rules += [LiveRule(chain.name, s) for s in chain.specs]
    return Observed(rs.family, chains, tuple(rules))


def small_ruleset() -> Ruleset:
    deny = Chain("HOSTPREP-DENY", (Rule("HOSTPREP-DENY", '-m comment --comment "hostprep deny: x" -j DROP'),))
    dispatch = Chain("HOSTPREP-IN", (Rule("HOSTPREP-IN", "-j HOSTPREP-DENY"),))
    return Ruleset(4, (dispatch, deny), (Rule("INPUT", JUMP_IN),))


# -- plan_family ---------------------------------------------------------------------

def test_empty_observed_reloads_everything_and_inserts_jumps():
    p = plan_family(DESIRED, Observed(4))
    # (two jumps in OUTPUT: the plan inserts each chain's jumps last first, every one at the top)
    assert (p.reload_chains, p.delete_chains, p.delete_jumps, sorted(p.insert_jumps, key=Rule.line)) == (
        tuple(c.name for c in DESIRED.chains), (), (), sorted(DESIRED.jumps, key=Rule.line))


def test_observed_equal_to_desired_gives_empty_plan():
    p = plan_family(DESIRED, observed_of(DESIRED))
    assert (p.empty, p) == (True, FamilyPlan(4))


def test_foreign_rules_after_our_jumps_keep_plan_empty():
    obs = observed_of(DESIRED, extra_chains=("DOCKER-USER",),
                      after=(LiveRule("INPUT", "-i lo -j ACCEPT"), LiveRule("DOCKER-USER", "-j RETURN")))
    assert plan_family(DESIRED, obs) == FamilyPlan(4)


def test_counters_do_not_make_a_difference():
    obs = observed_of(DESIRED)
    obs = Observed(4, obs.chains, tuple(LiveRule(r.chain, r.spec, Counter(7, 700)) for r in obs.rules))
    assert plan_family(DESIRED, obs).empty is True


def test_one_chain_differing_reloads_only_that_chain():
    obs = observed_of(DESIRED)
    rules = tuple(r for r in obs.rules if not (r.chain == "HOSTPREP-SPOOF" and "10.0.0.0/8" in r.spec))
    p = plan_family(DESIRED, Observed(4, obs.chains, rules))
    assert (p.reload_chains, p.delete_chains, p.delete_jumps, p.insert_jumps, p.notes) == (
        ("HOSTPREP-SPOOF",), (), (), (), ("chain HOSTPREP-SPOOF differs",))


def test_rule_order_matters():
    obs = observed_of(DESIRED)
    udp = tuple(r for r in obs.rules if r.chain == "HOSTPREP-IN" and "HOSTPREP-UDP" in r.spec)
    ssh = tuple(r for r in obs.rules if r.chain == "HOSTPREP-IN" and "HOSTPREP-SSH" in r.spec)
    swapped = tuple(udp[0] if r == ssh[0] else ssh[0] if r == udp[0] else r for r in obs.rules)
    assert plan_family(DESIRED, Observed(4, obs.chains, swapped)).reload_chains == ("HOSTPREP-IN",)


def test_stale_chain_deleted_after_declarations():
    obs = observed_of(DESIRED, extra_chains=("HOSTPREP-OLD",),
                      after=(LiveRule("HOSTPREP-OLD", "-j DROP"),))
    # and the UDP chain differs, so the text has a declaration too
    rules = tuple(LiveRule(r.chain, "-j ACCEPT") if r.chain == "HOSTPREP-UDP" else r for r in obs.rules)
    p = plan_family(DESIRED, Observed(4, obs.chains, rules))
    text = restore_text(p, DESIRED).splitlines()
    assert (p.reload_chains, p.delete_chains, text[:2], text[-3:]) == (
        ("HOSTPREP-UDP",), ("HOSTPREP-OLD",), ["*filter", ":HOSTPREP-UDP - [0:0]"],
        ["-F HOSTPREP-OLD", "-X HOSTPREP-OLD", "COMMIT"])


def test_two_stale_chains_flushed_before_any_is_deleted():
    obs = observed_of(DESIRED, extra_chains=("HOSTPREP-OLD", "HOSTPREP-OLD2"),
                      after=(LiveRule("HOSTPREP-OLD", "-j HOSTPREP-OLD2"), LiveRule("HOSTPREP-OLD2", "-j DROP")))
    p = plan_family(DESIRED, obs)
    assert restore_text(p, DESIRED) == (
        "*filter\n-F HOSTPREP-OLD\n-F HOSTPREP-OLD2\n-X HOSTPREP-OLD\n-X HOSTPREP-OLD2\nCOMMIT\n")


def test_jump_not_first_is_moved_to_the_top():
    obs = observed_of(DESIRED, before=(LiveRule("INPUT", "-i lo -j ACCEPT"),))
    p = plan_family(DESIRED, obs)
    assert restore_text(p, DESIRED) == (
        "*filter\n-D INPUT -i eth1 -j HOSTPREP-IN\n-I INPUT 1 -i eth1 -j HOSTPREP-IN\nCOMMIT\n")


def test_duplicated_jump_deleted_twice_inserted_once():
    jumps = [LiveRule(j.chain, j.spec) for j in DESIRED.jumps] + [LiveRule("INPUT", JUMP_IN)]
    p = plan_family(DESIRED, observed_of(DESIRED, jumps=jumps))
    assert (p.delete_jumps, p.insert_jumps, p.reload_chains) == (
        (LiveRule("INPUT", JUMP_IN), LiveRule("INPUT", JUMP_IN)), (Rule("INPUT", JUMP_IN),), ())


def test_jump_on_another_nic_replaced():
    jumps = [LiveRule(j.chain, j.spec.replace("eth1", "eth0")) if j.chain == "FORWARD"
             else LiveRule(j.chain, j.spec) for j in DESIRED.jumps]
    p = plan_family(DESIRED, observed_of(DESIRED, jumps=jumps))
    assert restore_text(p, DESIRED) == (
        "*filter\n-D FORWARD -i eth0 -j HOSTPREP-IN\n-I FORWARD 1 -i eth1 -j HOSTPREP-IN\nCOMMIT\n")


def test_stale_jump_in_a_foreign_chain_deleted():
    obs = observed_of(DESIRED, extra_chains=("DOCKER-USER",),
                      after=(LiveRule("DOCKER-USER", "-j HOSTPREP-IN"), LiveRule("DOCKER-USER", "-j RETURN")))
    p = plan_family(DESIRED, obs)
    assert restore_text(p, DESIRED) == "*filter\n-D DOCKER-USER -j HOSTPREP-IN\nCOMMIT\n"


def test_restore_text_small_case_exact():
    rs = small_ruleset()
    obs = Observed(4, BUILTINS, (LiveRule("INPUT", "-i lo -j ACCEPT"),))
    assert restore_text(plan_family(rs, obs), rs) == (
        "*filter\n"
        ":HOSTPREP-IN - [0:0]\n"
        ":HOSTPREP-DENY - [0:0]\n"
        "-A HOSTPREP-IN -j HOSTPREP-DENY\n"
        '-A HOSTPREP-DENY -m comment --comment "hostprep deny: x" -j DROP\n'
        "-I INPUT 1 -i eth1 -j HOSTPREP-IN\n"
        "COMMIT\n"
    )


def test_several_jumps_in_one_chain_inserted_in_order():
    rs = small_ruleset()
    two = Ruleset(4, rs.chains, (Rule("INPUT", JUMP_IN), Rule("INPUT", "-i eth2 -j HOSTPREP-IN")))
    p = plan_family(two, observed_of(rs, jumps=()))
    # each "-I INPUT 1" goes on top, so the last inserted ends up first
    assert [ln for ln in restore_text(p, two).splitlines() if ln.startswith("-I")] == [
        "-I INPUT 1 -i eth2 -j HOSTPREP-IN", "-I INPUT 1 -i eth1 -j HOSTPREP-IN"]


def test_flush_deletes_our_jumps_and_chains_and_names_no_foreign_chain():
    obs = observed_of(DESIRED, extra_chains=("DOCKER-USER", "f2b-sshd"),
                      before=(LiveRule("INPUT", "-j f2b-sshd"),),
                      after=(LiveRule("INPUT", "-i lo -j ACCEPT"), LiveRule("DOCKER-USER", "-j RETURN"),
                             LiveRule("f2b-sshd", "-s 203.0.113.9/32 -j REJECT")))
    text = restore_text(plan_family(None, obs), None)
    names = [c.name for c in DESIRED.chains]
    assert text == (
        "*filter\n"
        "-D INPUT -i eth1 -j HOSTPREP-IN\n"
        "-D FORWARD -i eth1 -j HOSTPREP-IN\n"
        "-D OUTPUT -o eth1 -j HOSTPREP-OUT\n"
        "-D OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype ! --src-type LOCAL -m conntrack "
        "--ctstate NEW -j HOSTPREP-CONTAINERS\n"
        + "".join(f"-F {n}\n" for n in names)
        + "".join(f"-X {n}\n" for n in names)
        + "COMMIT\n"
    )


def test_flush_of_nothing_is_empty():
    obs = Observed(4, BUILTINS + ("DOCKER-USER",), (LiveRule("INPUT", "-i lo -j ACCEPT"),))
    p = plan_family(None, obs)
    assert (p, restore_text(p, None)) == (FamilyPlan(4), "*filter\nCOMMIT\n")


def test_foreign_rule_without_target_is_left_alone():
    obs = observed_of(DESIRED, after=(LiveRule("INPUT", "-s 203.0.113.9/32"),))
    assert plan_family(DESIRED, obs) == FamilyPlan(4)


# -- parse_save and Observed -----------------------------------------------------------

SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 21 10:00:00 2026
*nat
:PREROUTING ACCEPT [1:60]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i eth1 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.88.0.2:8443
COMMIT
# Completed on Sat Nov 21 10:00:00 2026
*filter
:INPUT ACCEPT [1000:64000]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [900:72000]
:DOCKER-USER - [0:0]
:HOSTPREP-IN - [0:0]
:HOSTPREP-DENY - [0:0]
[12:345] -A INPUT -i eth1 -j HOSTPREP-IN
[3:180] -A INPUT -i lo -j ACCEPT
[0:0] -A DOCKER-USER -j HOSTPREP-IN
[0:0] -A DOCKER-USER -j RETURN
[12:345] -A HOSTPREP-IN -j HOSTPREP-DENY
[9:540] -A HOSTPREP-DENY -m comment --comment "hostprep deny: default deny" -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
COMMIT
"""


def test_parse_save_chains_rules_counters():
    obs = parse_save(SAVE, 4)
    assert obs == Observed(4, ("INPUT", "FORWARD", "OUTPUT", "DOCKER-USER", "HOSTPREP-IN", "HOSTPREP-DENY"), (
        LiveRule("INPUT", "-i eth1 -j HOSTPREP-IN", Counter(12, 345)),
        LiveRule("INPUT", "-i lo -j ACCEPT", Counter(3, 180)),
        LiveRule("DOCKER-USER", "-j HOSTPREP-IN", Counter(0, 0)),
        LiveRule("DOCKER-USER", "-j RETURN", Counter(0, 0)),
        LiveRule("HOSTPREP-IN", "-j HOSTPREP-DENY", Counter(12, 345)),
        LiveRule("HOSTPREP-DENY", '-m comment --comment "hostprep deny: default deny" -j DROP', Counter(9, 540)),
    ))


def test_parse_save_without_counters():
    obs = parse_save("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i eth1 -j HOSTPREP-IN\nCOMMIT\n", 4)
    assert obs.rules == (LiveRule("INPUT", "-i eth1 -j HOSTPREP-IN", Counter(0, 0)),)


def test_parse_save_without_filter_table_is_empty():
    assert parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j ACCEPT\nCOMMIT\n", 6) == Observed(6)


def test_quoted_comment_kept_verbatim_and_target_found():
    rule = parse_save(SAVE, 4).chain_rules("HOSTPREP-DENY")[0]
    assert (rule.spec, Rule(rule.chain, rule.spec).target) == (
        '-m comment --comment "hostprep deny: default deny" -j DROP', "DROP")


def test_observed_our_chains_and_jumps():
    obs = parse_save(SAVE, 4)
    assert (obs.our_chains, [(r.chain, r.spec) for r in obs.our_jumps]) == (
        ("HOSTPREP-IN", "HOSTPREP-DENY"),
        [("INPUT", "-i eth1 -j HOSTPREP-IN"), ("DOCKER-USER", "-j HOSTPREP-IN")])


def test_observed_foreign():
    assert parse_save(SAVE, 4).foreign() == (
        ("INPUT", "FORWARD", "OUTPUT", "DOCKER-USER"),
        (("INPUT", "-i lo -j ACCEPT"), ("DOCKER-USER", "-j RETURN")),
    )


def test_ruleset_from_observed_keeps_builtin_jumps_only():
    rs = ruleset_from_observed(parse_save(SAVE, 4))
    assert (rs.jumps, rs.chain("HOSTPREP-IN").specs, [c.name for c in rs.chains]) == (
        (Rule("INPUT", "-i eth1 -j HOSTPREP-IN"),), ("-j HOSTPREP-DENY",), ["HOSTPREP-IN", "HOSTPREP-DENY"])


def test_counter_addition():
    assert Counter(1, 100) + Counter(2, 50) == Counter(3, 150)
