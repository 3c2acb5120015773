"""Per-container port rules: rendering (rules/container.rules.j2), ipset planning and
scripts, container_lines, check_conflicts, and the Container model round trip.

One assertion per feature of the rule shape (reference §3.3), stated by hand.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from pathlib import Path

import pytest

from hostprep import envfiles, render
from hostprep.observed import LiveState
from hostprep.ops import check_conflicts, container_lines
from hostprep.errors import InputError
from hostprep.model import (CONTAINER_DISPATCH, Container, Desired, EnvFile, IpSet, Limits, Policy,
                            Ruleset)
from hostprep.plan import TEMP_SUFFIX, SetPlan, ipset_fill_script, ipset_swap_script, plan_sets
from hostprep.observed import parse_ipset_save, parse_save

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "env"
POLICY = Policy("eth1")
BASE = render.desired(POLICY)
SYN = "-m tcp --tcp-flags FIN,SYN,RST,ACK SYN"


def nets(*values: str) -> tuple:
    return tuple(ipaddress.ip_network(v) for v in values)


def make(name: str = "finesse", template: str = "finesse", ports=(8445,), dest: str = "192.0.2.10",
         limits: Limits = Limits(10, 6, 8, 1, 1), **kw) -> Container:
    return Container(name, template, tuple(ports), ipaddress.ip_address(dest), limits, **kw)


def specs(d: Desired, c: Container) -> tuple[str, ...]:
    chain = d.ruleset(c.family).chain(c.chain)
    assert chain is not None
    return chain.specs


def option(spec: str, name: str) -> str | None:
    toks = shlex.split(spec)
    return toks[toks.index(name) + 1] if name in toks else None


def kind(spec: str) -> str:
    """The part of the comment after the container name: 'load balancer', 'connlimit log', ..."""
    comment = option(spec, "--comment") or ""
    return comment.split(": ", 1)[1].split(" ", 1)[1]


def chain_specs(rs: Ruleset) -> dict[str, tuple[str, ...]]:
    return {c.name: c.specs for c in rs.chains}


FIN = make(load_balancers=nets("198.51.100.0/24"), exempt=nets("203.0.113.7"))
CUIC = make("cuic", "cuic_12.6(1)", (8444, 8447), "192.0.2.11", Limits(6, 2, 4, 1, 1),
            load_balancers=nets("198.51.100.0/24"), exempt=nets("203.0.113.7"))
IDS6 = make("ids", "ids", (8553,), "2001:db8::10", Limits(6, 2, 4, 1, 1),
            load_balancers=nets("198.51.100.0/24", "2001:db8:1::/64"),
            exempt=nets("127.0.0.1", "2001:db8::7"))


@pytest.fixture(scope="module")
def three() -> Desired:
    return render.desired(POLICY, (FIN, CUIC, IDS6))


# -- rendering --------------------------------------------------------------------

def test_dispatch_rule_per_container_on_the_original_destination(three):
    # One rule per container, ordered by container name (whatever order they came up in).
    assert {f: three.ruleset(f).chain(CONTAINER_DISPATCH).specs for f in (4, 6)} == {
        4: ("-m conntrack --ctorigdst 192.0.2.11 -j HOSTPREP-C-cuic",
            "-m conntrack --ctorigdst 192.0.2.10 -j HOSTPREP-C-finesse"),
        6: ("-m conntrack --ctorigdst 2001:db8::10 -j HOSTPREP-C-ids",),
    }


def test_rules_per_port_in_order(three):
    assert [(option(s, "--ctorigdstport"), kind(s), shlex.split(s)[-1] if "-j LOG" not in s else "LOG")
            for s in specs(three, CUIC)] == [
        (p, k, t) for p in ("8444", "8447") for k, t in (
            ("load balancer", "ACCEPT"), ("exempt", "ACCEPT"), ("connlimit log", "LOG"),
            ("connlimit drop", "DROP"), ("within rate", "ACCEPT"), ("rate log", "LOG"), ("rate drop", "DROP"))]


def test_load_balancer_set_accepted_first(three):
    assert specs(three, FIN)[0] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 -m set --match-set {FIN.set_name('lb')} src "
        '-m comment --comment "hostprep containers: finesse load balancer" -j ACCEPT')


def test_exempt_set_accepted_second(three):
    assert specs(three, FIN)[1] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 -m set --match-set {FIN.set_name('ex')} src "
        '-m comment --comment "hostprep containers: finesse exempt" -j ACCEPT')


def test_connlimit_log(three):
    assert specs(three, FIN)[2] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 {SYN} -m connlimit --connlimit-above 10 "
        "--connlimit-mask 32 --connlimit-saddr -m limit --limit 1/min --limit-burst 1 "
        '-m comment --comment "hostprep containers: finesse connlimit log" '
        '-j LOG --log-prefix "Exceeded 8445 connlimit "')


def test_connlimit_drop(three):
    assert specs(three, FIN)[3] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 {SYN} -m connlimit --connlimit-above 10 "
        "--connlimit-mask 32 --connlimit-saddr "
        '-m comment --comment "hostprep containers: finesse connlimit drop" -j DROP')


def test_hashlimit_accept(three):
    assert specs(three, FIN)[4] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 {SYN} -m hashlimit --hashlimit-upto 6/sec "
        f"--hashlimit-burst 8 --hashlimit-mode srcip,dstport --hashlimit-name {FIN.hashlimit_name(8445)} "
        "--hashlimit-htable-size 16384 --hashlimit-htable-max 131072 --hashlimit-htable-expire 2000 "
        '-m comment --comment "hostprep containers: finesse within rate" -j ACCEPT')


def test_rate_log(three):
    assert specs(three, FIN)[5] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 {SYN} -m limit --limit 1/min --limit-burst 1 "
        '-m comment --comment "hostprep containers: finesse rate log" '
        '-j LOG --log-prefix "Exceeded 8445 hashlimit "')


def test_rate_drop_last(three):
    assert specs(three, FIN)[6:] == (
        f"-p tcp -m conntrack --ctorigdstport 8445 {SYN} "
        '-m comment --comment "hostprep containers: finesse rate drop" -j DROP',)


def test_limits_reach_the_rules():
    c = make(limits=Limits(30, 20, 25, 5, 3))
    s = specs(render.desired(POLICY, (c,)), c)
    assert [(option(x, "--connlimit-above"), option(x, "--hashlimit-upto"), option(x, "--hashlimit-burst"),
             option(x, "--limit"), option(x, "--limit-burst")) for x in s] == [
        ("30", None, None, "5/min", "3"), ("30", None, None, None, None), (None, "20/sec", "25", None, None),
        (None, None, None, "5/min", "3"), (None, None, None, None, None)]


def test_ipv6_connlimit_mask_is_64_by_default(three):
    assert [option(s, "--connlimit-mask") for s in specs(three, IDS6) if "connlimit" in s] == ["64", "64"]


def test_ipv6_hashlimit_srcmask_is_64_ipv4_writes_none(three):
    """iptables-save omits --hashlimit-srcmask 32 for IPv4 (its default) and prints 64 for IPv6 after
    the table options: written the same way."""
    assert ([option(s, "--hashlimit-srcmask") for s in specs(three, IDS6) if "--hashlimit-name" in s],
            [option(s, "--hashlimit-srcmask") for s in specs(three, FIN) if "--hashlimit-name" in s],
            [option(s, "--connlimit-mask") for s in specs(three, FIN) if "connlimit" in s]) == (
        ["64"], [None], ["32", "32"])
    assert specs(three, IDS6)[-3].split(" -m comment")[0].endswith(
        "--hashlimit-htable-size 16384 --hashlimit-htable-max 131072 --hashlimit-htable-expire 2000 "
        "--hashlimit-srcmask 64")


def test_ipv6_source_prefix_property_reaches_both_limits():
    """/128 is hashlimit's IPv6 default, which iptables-save leaves out: not written; /56 is."""
    c56 = make("ids", "ids", (8553,), "2001:db8::10", ipv6_source_prefix=56)
    assert [option(x, "--hashlimit-srcmask") for x in specs(render.desired(POLICY, (c56,)), c56)
            if "--hashlimit-name" in x] == ["56"]
    c = make("ids", "ids", (8553,), "2001:db8::10", ipv6_source_prefix=128)
    s = specs(render.desired(POLICY, (c,)), c)
    assert ([option(x, "--connlimit-mask") for x in s if "connlimit" in x],
            [option(x, "--hashlimit-srcmask") for x in s if "--hashlimit-name" in x]) == (["128", "128"], [None])


@pytest.mark.parametrize("value", [47, 129, 0, True, "64"])
def test_ipv6_source_prefix_outside_48_128_refused(value):
    with pytest.raises(InputError) as err:
        make("ids", "ids", (8553,), "2001:db8::10", ipv6_source_prefix=value)
    assert (err.value.field, err.value.problem) == ("HOSTPREP_IPV6_SOURCE_PREFIX", f"{value!r} is outside 48..128")


def test_ipv6_source_prefix_from_the_component_env(tmp_path):
    inst = tmp_path / "installer.env"
    inst.write_text("PROXY_BINDING_IP=2001:db8::10\n")
    env = tmp_path / "finesse.env"
    got = []
    for line in ("", "HOSTPREP_IPV6_SOURCE_PREFIX=56\n", "HOSTPREP_IPV6_SOURCE_PREFIX=128\n"):
        env.write_text("TEMPLATE_TYPE=finesse\n" + line)
        got.append(envfiles.load_container("fin6", env, None, inst, "eth1", ["2001:db8::10/64"]).ipv6_source_prefix)
    assert got == [64, 56, 128]
    for bad in ("47", "129", "/64", "64x"):
        env.write_text(f"TEMPLATE_TYPE=finesse\nHOSTPREP_IPV6_SOURCE_PREFIX={bad}\n")
        with pytest.raises(InputError) as err:
            envfiles.load_container("fin6", env, None, inst, "eth1", ["2001:db8::10/64"])
        assert (err.value.field, err.value.problem, err.value.fix) == (
            f"HOSTPREP_IPV6_SOURCE_PREFIX in {env}", f"is not in expected format. Input Provided= {bad!r}",
            "Expected Format <Integer> from 48 to 128 (a prefix length). Eg. 64")


def test_limiter_bounds_explicit_and_expiry_follows_the_refill_time():
    """Expiry: ceil(burst / rate) seconds, the time an idle source's bucket takes to be full again, at
    least 2 s (iptables-save omits an expiry of 1000 ms); then 3 s (rate 1, burst 3)."""
    assert [make(limits=Limits(10, upto, burst, 1, 1)).limiter.as_dict() for upto, burst in
            ((6, 8), (2, 4), (20, 25), (1, 10000), (1000, 1), (1, 3))] == [
        {"htable_size": 16384, "htable_max": 131072, "htable_expire_ms": ms}
        for ms in (2000, 2000, 2000, 10_000_000, 2000, 3000)]


def test_hashlimit_name_changes_with_every_table_option():
    """The kernel keeps a table's options under its name: a new option set needs a new name."""
    base = make(dest="2001:db8::10")
    names = {base.hashlimit_name(443), make(dest="2001:db8::10", ipv6_source_prefix=128).hashlimit_name(443),
             make(dest="2001:db8::10", limits=Limits(10, 6, 9, 1, 1)).hashlimit_name(443),
             make(dest="2001:db8::10", limits=Limits(10, 7, 8, 1, 1)).hashlimit_name(443)}
    assert (len(names), make(dest="2001:db8::10", limits=Limits(99, 6, 8, 5, 5)).hashlimit_name(443)) == (
        4, base.hashlimit_name(443))


def test_restricted_accepts_load_balancers_then_drops(three):
    c = make(restricted=True, load_balancers=nets("198.51.100.0/24"), exempt=nets("203.0.113.7"),
             ports=(8445, 8446))
    assert specs(render.desired(POLICY, (c,)), c) == tuple(
        s for p in (8445, 8446) for s in (
            f"-p tcp -m conntrack --ctorigdstport {p} -m set --match-set {c.set_name('lb')} src "
            '-m comment --comment "hostprep containers: finesse load balancer" -j ACCEPT',
            f"-p tcp -m conntrack --ctorigdstport {p} "
            '-m comment --comment "hostprep containers: finesse restricted to load balancers" -j DROP'))


def test_no_set_rules_and_no_sets_when_lists_are_empty():
    c = make()
    d = render.desired(POLICY, (c,))
    assert ([kind(s) for s in specs(d, c)], d.sets) == (
        ["connlimit log", "connlimit drop", "within rate", "rate log", "rate drop"], ())


def test_only_exempt_list_gives_only_exempt_rule_and_set():
    c = make(exempt=nets("203.0.113.7"))
    d = render.desired(POLICY, (c,))
    assert ([kind(s) for s in specs(d, c)][:2], [s.name for s in d.sets]) == (
        ["exempt", "connlimit log"], [c.set_name("ex")])


def test_hardening_off_renders_nothing_and_no_sets():
    c = make(hardening=False, load_balancers=nets("198.51.100.0/24"), exempt=nets("203.0.113.7"))
    d = render.desired(POLICY, (c,))
    assert ({f: chain_specs(d.ruleset(f)) for f in (4, 6)}, d.sets, render.container_text((c,), 4).count("-A ")) \
        == ({f: chain_specs(BASE.ruleset(f)) for f in (4, 6)}, (), 0)


def test_hardening_off_container_is_still_listed_in_desired():
    c = make(hardening=False)
    assert render.desired(POLICY, (c,)).containers == (c,)


def test_ipv6_container_only_in_the_v6_ruleset():
    d = render.desired(POLICY, (IDS6,))
    assert (chain_specs(d.v4), d.v6.chain(IDS6.chain) is not None) == (chain_specs(BASE.v4), True)


def test_ipv6_container_sets_hold_only_its_v6_networks(three):
    assert [(s.name, s.family, s.members) for s in three.sets if s.name.startswith(f"hostprep-{IDS6.key}")] == [
        (f"hostprep-{IDS6.key}-lb6", 6, nets("2001:db8:1::/64")),
        (f"hostprep-{IDS6.key}-ex6", 6, nets("2001:db8::7"))]


def test_ipv4_container_sets_hold_only_its_v4_networks():
    c = make(load_balancers=nets("2001:db8:1::/64", "198.51.100.0/24"), exempt=nets("2001:db8::7", "203.0.113.7"))
    assert [(s.name, s.family, s.members) for s in c.sets()] == [
        (f"hostprep-{c.key}-lb4", 4, nets("198.51.100.0/24")), (f"hostprep-{c.key}-ex4", 4, nets("203.0.113.7"))]


def test_set_of_other_family_only_list_is_not_made():
    c = make(load_balancers=nets("2001:db8:1::/64"))
    d = render.desired(POLICY, (c,))
    assert (d.sets, [kind(s) for s in specs(d, c)][0]) == ((), "connlimit log")


def test_set_members_sorted_and_unique():
    c = make(exempt=nets("203.0.113.9", "198.51.100.0/24", "203.0.113.10"))
    assert c.sets()[0].members == nets("198.51.100.0/24", "203.0.113.10", "203.0.113.9")


def test_chain_name_of_a_63_char_name_is_28_chars():
    c = make("f" * 63)
    assert (len(c.chain), c.chain) == (28, f"HOSTPREP-C-ffffffff-{c.key}")


def test_chain_name_of_a_17_char_name_is_kept():
    assert make("finesse-side-a-01").chain == "HOSTPREP-C-finesse-side-a-01"


def test_chain_names_unique_for_long_names_sharing_a_prefix():
    a = make("finesse-side-a-proxy-container-1", ports=(8445,))
    b = make("finesse-side-a-proxy-container-2", ports=(8446,))
    d = render.desired(POLICY, (a, b))
    targets = [r.target for r in d.v4.chain(CONTAINER_DISPATCH).rules]
    assert (a.chain != b.chain, a.chain[:20] == b.chain[:20], targets) == (True, True, [a.chain, b.chain])


def test_chain_name_of_short_name_does_not_collide_with_shortened_long_name():
    long = make("finesse-side-a-proxy-container")
    short = make(f"finesse--{long.key}", dest="192.0.2.11")
    assert (len(short.name), long.chain != short.chain) == (17, True)


def test_set_names_at_most_31_chars():
    lists = dict(load_balancers=nets("198.51.100.0/24", "2001:db8:1::/64"), exempt=nets("203.0.113.7", "2001:db8::7"))
    names = [s.name for dest in ("192.0.2.10", "2001:db8::10") for s in make("s" * 63, dest=dest, **lists).sets()]
    assert [(len(n), len(n + TEMP_SUFFIX) <= 31) for n in names] == [(21, True)] * 4


def test_hashlimit_names_short_and_unique_per_container_dest_and_port():
    cs = [make("finesse", ports=(8445, 65535)), make("finesse", ports=(8445, 65535), dest="192.0.2.11"),
          make("finesse-b", ports=(8445, 65535)), make("f" * 63, ports=(8445, 65535), dest="2001:db8::10")]
    names = [c.hashlimit_name(p) for c in cs for p in c.ports]
    assert (max(len(n) for n in names), len(set(names))) == (15, 8)


def test_hashlimit_name_used_once_per_rule_set(three):
    found = [option(s, "--hashlimit-name") for f in (4, 6) for ch in three.ruleset(f).chains for s in ch.specs
             if "--hashlimit-name" in s]
    assert sorted(found) == sorted([FIN.hashlimit_name(8445), CUIC.hashlimit_name(8444), CUIC.hashlimit_name(8447),
                                    IDS6.hashlimit_name(8553)])


def test_hashlimit_name_unambiguous_between_name_and_dest():
    # 92.0.2.10 is not a documentation address; it only has to be a string suffix of one.
    assert make("c1", dest="92.0.2.10").hashlimit_name(443) != make("c", dest="192.0.2.10").hashlimit_name(443)


def test_every_container_rule_comment_names_group_and_container(three):
    bad = [(c.name, s) for c in (FIN, CUIC, IDS6) for s in specs(three, c)
           if not (option(s, "--comment") or "").startswith(f"hostprep containers: {c.name} ")]
    assert bad == []


def _every_sample(tmp: Path) -> tuple[Container, ...]:
    """One container per sample env file, IPv4 and IPv6 binding addresses, short and long names."""
    out = []
    addrs = ["192.0.2.10/24", "192.0.2.11/24", "192.0.2.12/24", "192.0.2.13/24", "192.0.2.14/24",
             "192.0.2.15/24", "192.0.2.16/24", "2001:db8::10/64", "2001:db8::11/64"]
    for i, (env, dest) in enumerate([("finesse.env", "192.0.2.10"), ("ids.env", "192.0.2.11"),
                                     ("cuic.env", "192.0.2.12"), ("cuic_12.6.1.env", "192.0.2.13"),
                                     ("livedata.env", "192.0.2.14"), ("livedata_12.6.1.env", "2001:db8::10"),
                                     ("chat.env", "192.0.2.15"), ("cloudconnect.env", "192.0.2.16"),
                                     ("idp.env", "2001:db8::11")]):
        installer = tmp / f"installer-{i}.env"
        installer.write_text(f"PROXY_BINDING_IP={dest}\n")
        name = env[:-len(".env")].replace(".", "-") + "-" + "x" * (i * 7)
        out.append(envfiles.load_container(name, FIX / env, FIX / "core.env", installer, "eth1", addrs))
    return tuple(out)


def test_every_sample_renders_and_parses_into_the_model(tmp_path):
    cs = _every_sample(tmp_path)
    d = render.desired(POLICY, cs)     # raises if any line does not parse into the model
    counts = {c.name: len(specs(d, c)) for c in cs}
    expected = {c.name: len(c.ports) * ((1 if c.networks("ex") else 0) + 5) for c in cs}
    assert (counts, len(d.v4.chain(CONTAINER_DISPATCH).rules), len(d.v6.chain(CONTAINER_DISPATCH).rules),
            sorted(len(c.chain) <= 28 for c in cs)) == (expected, 7, 2, [True] * 9)


def test_every_rendered_line_is_in_the_model(three):
    lines = [ln for f in (4, 6) for ln in render.container_text((FIN, CUIC, IDS6), f).splitlines()
             if ln.strip() and not ln.startswith("#")]
    model = {r.line() for f in (4, 6) for ch in three.ruleset(f).chains for r in ch.rules} | \
            {f":{ch.name} - [0:0]" for f in (4, 6) for ch in three.ruleset(f).chains}
    assert ([ln for ln in lines if ln not in model], len(lines)) == ([], (2 + 1 + 7 + 1 + 2 * 7) + (1 + 1 + 7))


# -- ipset planning and scripts ---------------------------------------------------

LB = IpSet("hostprep-0123abcd-lb4", 4, nets("198.51.100.0/24", "203.0.113.7"))
EX6 = IpSet("hostprep-0123abcd-ex6", 6, nets("2001:db8::7", "2001:db8:1::/64"))
LIVE = {LB.name: frozenset({"198.51.100.0/24", "203.0.113.7/32"}),
        EX6.name: frozenset({"2001:db8::7/128", "2001:db8:1::/64"})}


def test_plan_sets_creates_missing():
    assert plan_sets((LB, EX6), {}) == SetPlan((LB, EX6), (), ())


def test_plan_sets_equal_is_empty():
    p = plan_sets((LB, EX6), LIVE)
    assert (p, p.empty) == (SetPlan(), True)


def test_plan_sets_replaces_sets_whose_members_differ():
    live = dict(LIVE, **{LB.name: frozenset({"198.51.100.0/24"})})
    assert plan_sets((LB, EX6), live) == SetPlan((), (LB,), ())


def test_plan_sets_replaces_a_set_emptied_in_the_kernel():
    assert plan_sets((LB,), {LB.name: frozenset()}) == SetPlan((), (LB,), ())


def test_plan_sets_destroys_unwanted_and_leftover_temporary_sets_sorted():
    live = dict(LIVE, **{"hostprep-ffff0000-lb4": frozenset(), LB.name + TEMP_SUFFIX: frozenset()})
    assert plan_sets((EX6,), live) == SetPlan((), (), ("hostprep-0123abcd-lb4", "hostprep-0123abcd-lb4-n",
                                                         "hostprep-ffff0000-lb4"))


def test_plan_sets_nothing_wanted_destroys_all():
    assert plan_sets((), LIVE) == SetPlan((), (), tuple(sorted(LIVE)))


def test_plan_sets_mixed_and_notes():
    live = {LB.name: frozenset({"203.0.113.7/32"}), "hostprep-ffff0000-ex4": frozenset()}
    p = plan_sets((LB, EX6), live)
    assert (p, p.notes()) == (SetPlan((EX6,), (LB,), ("hostprep-ffff0000-ex4",)), [
        "ipset hostprep-0123abcd-ex6 missing", "ipset hostprep-0123abcd-lb4 members differ",
        "ipset hostprep-ffff0000-ex4 not wanted"])


def test_ipset_fill_script():
    assert ipset_fill_script((LB, EX6)) == (
        "create hostprep-0123abcd-lb4 hash:net family inet hashsize 1024 maxelem 65536\n"
        "add hostprep-0123abcd-lb4 198.51.100.0/24\n"
        "add hostprep-0123abcd-lb4 203.0.113.7/32\n"
        "create hostprep-0123abcd-ex6 hash:net family inet6 hashsize 1024 maxelem 65536\n"
        "add hostprep-0123abcd-ex6 2001:db8::7/128\n"
        "add hostprep-0123abcd-ex6 2001:db8:1::/64\n")


def test_ipset_fill_script_into_temporary_sets():
    assert ipset_fill_script((LB, EX6), TEMP_SUFFIX) == (
        "create hostprep-0123abcd-lb4-n hash:net family inet hashsize 1024 maxelem 65536 -exist\n"
        "flush hostprep-0123abcd-lb4-n\n"
        "add hostprep-0123abcd-lb4-n 198.51.100.0/24\n"
        "add hostprep-0123abcd-lb4-n 203.0.113.7/32\n"
        "create hostprep-0123abcd-ex6-n hash:net family inet6 hashsize 1024 maxelem 65536 -exist\n"
        "flush hostprep-0123abcd-ex6-n\n"
        "add hostprep-0123abcd-ex6-n 2001:db8::7/128\n"
        "add hostprep-0123abcd-ex6-n 2001:db8:1::/64\n")


def test_ipset_fill_script_grows_maxelem_for_big_lists():
    first = int(ipaddress.ip_address("198.18.0.0"))
    big = IpSet("hostprep-0123abcd-ex4", 4, tuple(ipaddress.ip_network(first + i) for i in range(40000)))
    lines = ipset_fill_script((big,)).splitlines()
    assert (lines[0], len(lines)) == (
        "create hostprep-0123abcd-ex4 hash:net family inet hashsize 1024 maxelem 80000", 40001)


def test_ipset_swap_script():
    assert (ipset_swap_script((LB, EX6)), ipset_swap_script(())) == (
        "swap hostprep-0123abcd-lb4-n hostprep-0123abcd-lb4\nswap hostprep-0123abcd-ex6-n hostprep-0123abcd-ex6\n",
        "")


SAVE = """\
create f2b-sshd hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x5d1c2b3a
add f2b-sshd 198.51.100.99
create hostprep-0123abcd-lb4 hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1c2a3b4d
add hostprep-0123abcd-lb4 203.0.113.7
add hostprep-0123abcd-lb4 198.51.100.0/24
create hostprep-0123abcd-ex6 hash:net family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0x0a0b0c0d
add hostprep-0123abcd-ex6 2001:db8::7
add hostprep-0123abcd-ex6 2001:db8:1::/64
create hostprep-ffff0000-ex4 hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x01020304
"""


def test_parse_ipset_save_members_without_prefix_get_it():
    assert parse_ipset_save(SAVE, "hostprep-") == dict(LIVE, **{"hostprep-ffff0000-ex4": frozenset()})


def test_parsed_save_of_the_same_sets_plans_nothing():
    assert plan_sets((LB, EX6), {k: v for k, v in parse_ipset_save(SAVE, "hostprep-").items()
                                 if k != "hostprep-ffff0000-ex4"}).empty is True


def test_parse_ipset_save_empty():
    assert parse_ipset_save("", "hostprep-") == {}


def test_scoped_ipv6_value_cannot_reach_the_ipset_script(tmp_path):
    # ipaddress accepts "addr%<any text>"; such an item is refused before it can
    # inject a line ("destroy f2b-sshd") into the ipset restore script.
    core = tmp_path / "core.env"
    core.write_text('NGX_LOAD_BALANCER_IPS="2001:db8::7%x\\ndestroy f2b-sshd"\n')
    inst = tmp_path / "installer.env"
    inst.write_text("PROXY_BINDING_IP=2001:db8::10\n")
    with pytest.raises(InputError) as err:
        envfiles.load_container("finesse", FIX / "finesse.env", core, inst, "eth1", ["2001:db8::10/64"])
    assert "should contain only IP addresses" in err.value.problem


# -- container_lines and check_conflicts -------------------------------------------

def test_container_lines_from_desired(three):
    assert container_lines(three, CUIC) == (
        ["-A HOSTPREP-CONTAINERS -m conntrack --ctorigdst 192.0.2.11 -j HOSTPREP-C-cuic"]
        + [f"-A HOSTPREP-C-cuic {s}" for s in specs(three, CUIC)])


def test_container_lines_of_an_ipv6_container_from_desired(three):
    assert container_lines(three, IDS6) == (
        ["-A HOSTPREP-CONTAINERS -m conntrack --ctorigdst 2001:db8::10 -j HOSTPREP-C-ids"]
        + [f"-A HOSTPREP-C-ids {s}" for s in specs(three, IDS6)])


def test_container_lines_of_a_container_with_hardening_off_are_empty():
    c = make(hardening=False)
    assert container_lines(render.desired(POLICY, (c,)), c) == []


def test_container_lines_from_a_snapshot_equal_those_from_desired(three):
    text = "*filter\n" + "".join(f":{ch.name} - [0:0]\n" for ch in three.v4.chains) + "".join(
        f"[3:180] {r.line()}\n" for ch in three.v4.chains for r in ch.rules) + "COMMIT\n"
    snap = LiveState({4: parse_save(text, 4)}, None)
    assert (container_lines(snap, FIN), container_lines(snap, IDS6)) == (container_lines(three, FIN), [])


def test_conflict_same_dest_and_port_refused():
    idp = make("idp", "idp-adfs3", (443,), limits=Limits(8, 4, 6, 1, 1))
    with pytest.raises(InputError) as info:
        check_conflicts(make("cuic", "cuic", (443,), limits=Limits(6, 2, 4, 1, 1)), {"idp": idp})
    e = info.value
    assert (e.field, e.problem, e.fix) == (
        "cuic", "port 443 on 192.0.2.10 is already opened for container idp",
        "every host+port pair must be unique: use another PROXY_BINDING_IP or port")


def test_conflict_lists_every_shared_port_sorted():
    other = make("ld", "livedata_12.6(1)", (12008, 12005))
    with pytest.raises(InputError) as info:
        check_conflicts(make("ld2", "livedata_12.6(1)", (12005, 12008)), {"ld": other})
    assert info.value.problem == "port 12005, 12008 on 192.0.2.10 is already opened for container ld"


def test_conflict_different_dest_same_port_allowed():
    assert check_conflicts(make("cuic", ports=(443,), dest="192.0.2.11"),
                           {"idp": make("idp", ports=(443,)), "v6": make("v6", ports=(443,), dest="2001:db8::10")}
                           ) is None


def test_conflict_same_dest_other_port_allowed():
    assert check_conflicts(make("ids", ports=(8553,)), {"finesse": make()}) is None


@pytest.mark.parametrize("mine,theirs", [(False, True), (True, False), (False, False)])
def test_conflict_ignored_when_hardening_is_off(mine, theirs):
    assert check_conflicts(make("a", hardening=mine), {"b": make("b", hardening=theirs)}) is None


# -- the model: Limits, Container, round trip ---------------------------------------

def test_container_round_trip_through_dict_and_json():
    c = make("cuic", "cuic_12.6(1)", (8444, 8447), "2001:db8::10", Limits(6, 2, 4, 3, 2), hardening=True,
             restricted=True, load_balancers=nets("198.51.100.0/24", "2001:db8:1::/64"),
             exempt=nets("127.0.0.1", "2001:db8::7"),
             files=(EnvFile("/opt/proxy/cuic.env", "ab" * 32, "env", 10, 1.5),
                    EnvFile("/opt/proxy/core.env", "cd" * 32, "core", 20, 2.5)))
    assert (Container.from_dict(c.as_dict()), Container.from_dict(json.loads(json.dumps(c.as_dict())))) == (c, c)


def test_container_as_dict():
    c = make(load_balancers=nets("198.51.100.0/24"), exempt=nets("203.0.113.7"),
             files=(EnvFile("/opt/proxy/finesse.env", "ab" * 32, "env", 120, 1700000000.5),))
    assert c.as_dict() == {
        "name": "finesse", "template": "finesse", "ports": [8445], "dest": "192.0.2.10",
        "limits": {"connlimit_above": 10, "hash_upto": 6, "hash_burst": 8, "log_limit": 1, "log_burst": 1},
        "hardening": True, "restricted": False, "load_balancers": ["198.51.100.0/24"],
        "exempt": ["203.0.113.7/32"], "files": [{"path": "/opt/proxy/finesse.env", "role": "env", "size": 120,
                                                 "mtime": 1700000000.5, "hmac": "ab" * 32, "sha256": ""}],
        "ipv6_source_prefix": 64}


def test_container_record_before_the_prefix_key_reads_as_64():
    d = make(dest="2001:db8::10", ipv6_source_prefix=128).as_dict()
    del d["ipv6_source_prefix"]
    assert (Container.from_dict(d).ipv6_source_prefix, Container.from_dict(d).source_prefix) == (64, 64)


def test_legacy_record_files_get_roles_and_lose_the_plain_hash():
    """Records written before roles: env first, core/installer by name; the sha256 is dropped."""
    d = make().as_dict()
    d["files"] = [{"path": "/opt/proxy/finesse.env", "sha256": "ab" * 32},
                  {"path": "/opt/proxy/core.env", "sha256": "cd" * 32},
                  {"path": "/opt/proxy/other.env", "sha256": "ef" * 32}]
    c = Container.from_dict(d)
    assert c.files == (EnvFile("/opt/proxy/finesse.env", "", "env"), EnvFile("/opt/proxy/core.env", "", "core"),
                       EnvFile("/opt/proxy/other.env", "", ""))
    assert [f["sha256"] for f in c.as_dict()["files"]] == ["", "", ""]      # kept empty, for older readers


def test_container_from_dict_without_files():
    d = make().as_dict()
    del d["files"]
    assert Container.from_dict(d) == make()


def test_loaded_sample_round_trips(tmp_path):
    c = _every_sample(tmp_path)[7]
    assert (c.template, Container.from_dict(c.as_dict())) == ("cloudconnect", c)


@pytest.mark.parametrize("args", [(0, 6, 8, 1, 1), (10, 0, 8, 1, 1), (65536, 6, 8, 1, 1), (10, 10001, 8, 1, 1),
                                  (10, 6, 8, 1, True), (10, 6, "8", 1, 1)])
def test_limits_out_of_range_refused(args):
    with pytest.raises(InputError):
        Limits(*args)


@pytest.mark.parametrize("kw,field", [
    (dict(ports=(0,)), "finesse"), (dict(ports=(65536,)), "finesse"), (dict(ports=(True,)), "finesse"),
    (dict(ports=(8445, 8445)), "finesse"), (dict(ports=()), "finesse"), (dict(name="a;b"), "NAME"),
    (dict(restricted=True), "NGX_TRAFFIC_RESTRICTED"),
])
def test_container_invariants(kw, field):
    with pytest.raises(InputError) as info:
        make(**kw)
    assert info.value.field == field


def test_container_without_ports_allowed_when_hardening_is_off():
    assert make(ports=(), hardening=False).ports == ()


def test_ipset_name_must_be_ours_and_short():
    with pytest.raises(InputError):
        IpSet("f2b-sshd", 4, ())
    with pytest.raises(InputError):
        IpSet("hostprep-" + "x" * 23, 4, ())


@pytest.mark.parametrize("per_minute,printed", [(1, "1/min"), (59, "59/min"), (60, "1/sec"), (90, "90/min"),
                                                (120, "2/sec")])
def test_log_limit_rendered_as_iptables_save_prints_it(per_minute, printed):
    # iptables-save prints 60/min as 1/sec: the rules must be written that way, or
    # the plan would see a difference after every load.
    assert Limits(10, 6, 8, per_minute, 1).log_rate == printed
