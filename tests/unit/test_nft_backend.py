"""The native nftables backend (issue 13): the one script, its per-family view, the choice of
backend by name, and ONE ``nft -f`` per change (counted with a fake nft binary)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hostprep import ops, render
from hostprep.backend import (NATIVE, IptablesBackend, NftBackend, for_host, name_of, resolve_choice)
from hostprep.errors import CommandFailed, InputError
from hostprep.model import Container, Limits, PingSource, Policy
from hostprep.observed import parse_nft_json
from hostprep.plan import SetPlan, plan_sets, wanted_sets
from hostprep.paths import Paths
from hostprep.state import Store
from tests.helpers import FakeNft

NET = ipaddress.ip_network


def container(name="finesse", dest="203.0.113.10", ports=(443, 8445), **kw) -> Container:
    return Container(name, "finesse", ports, ipaddress.ip_address(dest), Limits(10, 6, 8, 60, 5), **kw)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "proc/sys/net/ipv6").mkdir(parents=True)
    (tmp_path / "sys/class/net/eth1").mkdir(parents=True)       # the external NIC is present
    return tmp_path / "proc"


def backend(fake, proc: Path) -> NftBackend:
    return NftBackend(fake, proc=proc, sys_net=proc.parent / "sys/class/net")


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)


# -- the script ----------------------------------------------------------------------------

def test_the_script_replaces_both_tables_in_one_file():
    text = render.nft_backend_text(Policy("eth1"))
    assert text.startswith("table inet hostprep\ndelete table inet hostprep\n"
                           "table netdev hostprep\ndelete table netdev hostprep\n")
    assert text.count("\ntable inet hostprep {") == 1 and text.count("\ntable netdev hostprep {") == 1
    assert 'type filter hook ingress device "eth1" priority -500; policy accept;' in text


def test_skip_ddos_leaves_the_ingress_table_out_but_still_deletes_it():
    text = render.nft_backend_text(Policy("eth1", skip_ddos=True))
    assert ("table netdev hostprep {" in text, "delete table netdev hostprep" in text, "HOSTPREP-DDOS" in text) == \
        (False, True, False)


def test_the_view_has_the_chains_of_the_iptables_rules():
    pol = Policy("eth1", ping=(PingSource("198.51.100.0/24", (NET("198.51.100.0/24"),)),))
    cs = (container(), container("f6", "2001:db8::10", (443,), load_balancers=(NET("2001:db8:1::/48"),)))
    ipt, nft = render.desired(pol, cs), render.nft_desired(render.desired(pol, cs))
    for fam in (4, 6):
        assert [c.name for c in nft.ruleset(fam).chains] == [c.name for c in ipt.ruleset(fam).chains]
        # the same jumps from the base chains; the cookie's SYN in OUTPUT matched by fib, not addrtype
        assert [(j.chain, j.target) for j in nft.ruleset(fam).jumps] == \
            [(j.chain, j.target) for j in ipt.ruleset(fam).jumps]
        assert [j.spec for j in nft.ruleset(fam).jumps if j.chain == "OUTPUT"] == \
            ["-o eth1 -j HOSTPREP-OUT", "-j HOSTPREP-CONTAINERS"]
        # the same comments, in the same order, chain by chain (nft has more: the SYN without MSS,
        # and the drop of a source its full connection-count set could not take)
        for chain in ipt.ruleset(fam).chains:
            want = [s for s in chain.specs if "--comment" in s]
            got = [s for s in nft.ruleset(fam).chain(chain.name).specs if "--comment" in s]
            comments = [g.split('"')[1] for g in got]
            assert [w.split('"')[1] for w in want] == [c for i, c in enumerate(comments)
                                                      if not (c == "hostprep ddos: odd mss" and i and
                                                              comments[i - 1] == c)
                                                      and not c.endswith(" connlimit full")], chain.name
        assert sum(s.endswith('connlimit full" -j DROP') for c in nft.ruleset(fam).chains for s in c.specs) == \
            sum(len(c.ports) for c in cs if c.family == fam)


def test_exempt_addresses_in_a_hash_set_networks_in_an_interval_set():
    c = container(ports=(443,), exempt=(NET("192.0.2.0/25"), NET("192.0.2.128/25"), NET("192.0.2.7/32"),
                                        NET("198.51.100.9/32"), NET("198.51.100.8/32")))
    text = render.nft_backend_text(Policy("eth1"), (c,))
    ex = c.set_name("ex")
    # the addresses (one inside 192.0.2.0/24 left to it; adjacent ones not merged) in a set
    # without flags: a hash lookup; the networks merged in an interval set
    assert (f"set {ex}.addr {{\n\t\ttype ipv4_addr\n"
            f"\t\telements = {{ 198.51.100.8, 198.51.100.9 }}\n\t}}") in text
    assert (f"set {ex}.net {{\n\t\ttype ipv4_addr\n\t\tflags interval\n"
            f"\t\telements = {{ 192.0.2.0/24 }}\n\t}}") in text
    # the addresses looked up first, then the networks, both the one exempt rule
    m = "meta l4proto tcp ct original proto-dst 443 ip saddr"
    assert (f"\t\t{m} @{ex}.addr counter accept comment \"hostprep containers: finesse exempt\"\n"
            f"\t\t{m} @{ex}.net counter accept comment \"hostprep containers: finesse exempt\"\n") in text
    d = render.nft_desired(render.desired(Policy("eth1"), (c,)))
    assert [(s.name, [str(m) for m in s.members]) for s in d.sets] == \
        [(ex, ["192.0.2.0/24", "198.51.100.8/31"])]
    # the view (what plan, status and the container log see): one exempt rule, as on iptables
    specs = d.ruleset(4).chain("HOSTPREP-C-finesse").specs
    assert specs.count('-m comment --comment "hostprep containers: finesse exempt" -j ACCEPT') == 1
    ipt = render.desired(Policy("eth1"), (c,)).ruleset(4).chain("HOSTPREP-C-finesse").specs
    assert [s.split('"')[1] for s in specs if not s.endswith('connlimit full" -j DROP')] == \
        [s.split('"')[1] for s in ipt if "--comment" in s]


@pytest.mark.parametrize("members, parts", [
    (("192.0.2.7/32",), [".addr"]), (("192.0.2.0/24",), [".net"]), (("192.0.2.0/24", "192.0.2.9/32"), [".net"])])
def test_a_part_without_members_is_left_out(members, parts):
    c = container(ports=(443,), load_balancers=tuple(NET(m) for m in members))
    assert [p.name for p in render.nft_set_parts(c, "lb")] == [c.set_name("lb") + x for x in parts]
    text = render.nft_backend_text(Policy("eth1"), (c,))
    assert text.count(" load balancer\"\n") == len(parts)
    assert text.count(f"set {c.set_name('lb')}") == len(parts)


def test_ipv6_addresses_are_the_128s():
    c = container("f6", "2001:db8::10", (443,), exempt=(NET("2001:db8::7/128"), NET("2001:db8:1::/48")))
    assert [(p.name, p.interval, p.members) for p in render.nft_set_parts(c, "ex")] == [
        (c.set_name("ex") + ".addr", False, ("2001:db8::7",)),
        (c.set_name("ex") + ".net", True, ("2001:db8:1::/48",))]


def test_limits_are_bounded_dynamic_sets_and_ct_count():
    c = container(ports=(443,))
    text = render.nft_backend_text(Policy("eth1"), (c,))
    b = c.limiter
    assert (f"set cl4_{c.key}_443 {{\n\t\ttype ipv4_addr\n\t\tsize {b.htable_max}\n\t\tflags dynamic\n\t}}") in text
    assert (f"set rl4_{c.key}_443 {{\n\t\ttype ipv4_addr\n\t\tsize {b.htable_max}\n\t\tflags dynamic,timeout\n"
            f"\t\ttimeout {b.htable_expire_ms}ms\n\t}}") in text
    # the count is evaluated once per SYN (two rules adding one connection counted it twice)
    assert f"add @cl4_{c.key}_443 {{ ip saddr ct count over 10 }} counter jump HOSTPREP-C-finesse-v4.cl443\n" in text
    assert text.count("ct count over") == 1
    assert ('\tchain HOSTPREP-C-finesse-v4.cl443 {\n\t\tlimit rate 1/second burst 5 packets counter log prefix '
            '"Exceeded 443 connlimit " comment "hostprep containers: finesse connlimit log"\n\t\tcounter drop comment '
            '"hostprep containers: finesse connlimit drop"\n\t}') in text
    assert f"update @rl4_{c.key}_443 {{ ip saddr limit rate 6/second burst 8 packets }} counter accept" in text


@pytest.mark.parametrize("prefix, key", [(64, "ip6 saddr & ffff:ffff:ffff:ffff::"), (48, "ip6 saddr & ffff:ffff:ffff::"),
                                         (128, "ip6 saddr")])
def test_ipv6_sources_are_keyed_by_their_prefix(prefix, key):
    c = container("f6", "2001:db8::10", (443,), ipv6_source_prefix=prefix)
    text = render.nft_backend_text(Policy("eth1"), (c,))
    assert f"add @cl6_{c.key}_443 {{ {key} ct count over 10 }}" in text
    assert f"update @rl6_{c.key}_443 {{ {key} limit rate 6/second" in text


def test_restricted_container_has_no_limiter_sets():
    c = container(restricted=True, load_balancers=(NET("192.0.2.0/24"),))
    text = render.nft_backend_text(Policy("eth1"), (c,))
    assert ("set cl4_" in text, "restricted to load balancers\"" in text) == (False, True)


# -- reading back --------------------------------------------------------------------------

def test_parse_json_sets_counters_device():
    fake = FakeNft()
    c = container(exempt=(NET("192.0.2.0/24"), NET("198.51.100.9/32")))
    fake.tables = FakeNft.apply(render.nft_backend_text(Policy("eth1"), (c,)), {})
    table = parse_nft_json(fake.json("inet hostprep"), (4, 6), "hostprep-")
    assert table.device == "eth1"
    # NAME.addr and NAME.net read back as the one list NAME
    assert table.sets == {c.set_name("ex"): frozenset({"192.0.2.0/24", "198.51.100.9/32"})}
    assert [r.spec for r in table.observed[4].chain_rules("INPUT")] == ["-i eth1 -j HOSTPREP-IN"]
    # and the jump for the SYN synproxy sends for a valid cookie (the ddos group)
    assert [r.spec for r in table.observed[6].chain_rules("OUTPUT")] == ["-o eth1 -j HOSTPREP-OUT",
                                                                         "-j HOSTPREP-CONTAINERS"]
    # and their two rules as the one exempt rule of each port, as the script's view has it
    want = render.nft_desired(render.desired(Policy("eth1"), (c,)))
    assert [r.spec for r in table.observed[4].chain_rules("HOSTPREP-C-finesse")] == \
        list(want.ruleset(4).chain("HOSTPREP-C-finesse").specs)
    assert sum("finesse exempt" in r.spec for r in table.observed[4].chain_rules("HOSTPREP-C-finesse")) == 2
    # the plan compares the list read back with the list wanted: nothing to do
    assert plan_sets(wanted_sets(want), table.sets) == SetPlan()


def test_parse_json_merges_the_two_sets_of_a_list_and_sums_the_counters_of_its_rule():
    import json
    ex = "hostprep-0123abcd-ex4"
    m = {"protocol": "ip", "field": "saddr"}

    def rule(part, packets):
        return {"rule": {"chain": "HOSTPREP-C-fin-v4", "comment": "hostprep containers: fin exempt", "expr": [
            {"match": {"op": "==", "left": {"payload": m}, "right": f"@{ex}{part}"}},
            {"counter": {"packets": packets, "bytes": 60 * packets}}, {"accept": None}]}}
    data = {"nftables": [
        {"set": {"name": ex + ".addr", "type": "ipv4_addr", "elem": ["192.0.2.7", "192.0.2.6", "198.51.100.1"]}},
        {"set": {"name": ex + ".net", "type": "ipv4_addr", "flags": ["interval"],
                 "elem": [{"prefix": {"addr": "203.0.113.0", "len": 24}},
                          {"range": ["198.51.100.2", "198.51.100.3"]}]}},
        {"chain": {"name": "HOSTPREP-C-fin-v4"}}, rule(".addr", 3), rule(".net", 4),
        {"rule": {"chain": "HOSTPREP-C-fin-v4", "comment": "hostprep containers: fin exempt",
                  "expr": [{"counter": {"packets": 1, "bytes": 60}}, {"accept": None}]}}]}
    table = parse_nft_json(json.dumps(data), (4,), "hostprep-")
    assert table.sets == {ex: frozenset({"192.0.2.6/31", "198.51.100.1/32", "198.51.100.2/31", "203.0.113.0/24"})}
    # the .net rule right after the .addr rule is the same rule; a third one (not a .net lookup) is not
    assert [(r.spec, r.counter.packets) for r in table.observed[4].chain_rules("HOSTPREP-C-fin")] == [
        ('-m comment --comment "hostprep containers: fin exempt" -j ACCEPT', 7),
        ('-m comment --comment "hostprep containers: fin exempt" -j ACCEPT', 1)]
    assert table.counters["hostprep containers: fin exempt"].packets == 8


def test_parse_json_shows_a_rule_hostprep_did_not_write_as_foreign():
    import json
    data = {"nftables": [{"chain": {"name": "HOSTPREP-DENY-v4"}},
                         {"rule": {"chain": "HOSTPREP-DENY-v4", "expr": [{"accept": None}]}}]}
    table = parse_nft_json(json.dumps(data), (4,), "hostprep-")
    assert table.observed[4].chain_rules("HOSTPREP-DENY")[0].spec.endswith("-j FOREIGN")


# -- one transaction per change ------------------------------------------------------------

def test_one_nft_f_per_change(tmp_path: Path, proc: Path):
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    pol = Policy("eth1")
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(pol), kernel=False)
    assert fake.mutating() == [["nft", "-f", "-"]]
    assert [a for a, _, _ in fake.calls if a[:2] == ["nft", "-c"]] == [["nft", "-c", "-f", "-"]]
    fake.calls.clear()
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(pol), kernel=False)
    assert fake.mutating() == []                    # nothing changed: nothing loaded
    c = container(exempt=tuple(NET(f"198.51.{i // 256}.{i % 256}/32") for i in range(1000)))
    fake.calls.clear()
    ops.container_up(be, store, c, "hostprep container up finesse")
    assert fake.mutating() == [["nft", "-f", "-"]]  # rules, both families and a 1,000-member set: one load
    fake.calls.clear()
    ops.flush(be, store, "hostprep flush")
    assert fake.mutating() == [["nft", "-f", "-"]]
    assert fake.tables == {}


def test_a_refused_transaction_changes_nothing_and_says_so(tmp_path: Path, proc: Path):
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    before = dict(fake.tables)
    fake.refuse = True
    fake.calls.clear()
    with pytest.raises(CommandFailed) as err:
        ops.apply(store, "hostprep apply -i eth1 -p 198.51.100.1", backend=be, kernel=False,
                  desired=render.desired(Policy("eth1", ping=(PingSource("198.51.100.1",
                                                                         (NET("198.51.100.1/32"),)),))))
    assert "the kernel refused the whole transaction, the previous rules are in place" in err.value.problem
    assert fake.tables == before
    assert [a for a, _, m in fake.calls if m] == [["nft", "-f", "-"]]   # the refused one; no undo was needed


def test_the_record_names_the_native_backend(tmp_path: Path, proc: Path):
    be = backend(FakeNft(), proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    assert (store.applied()["backend"], name_of(store.applied()["backend"])) == (NATIVE, "nft")


# -- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("given, canonical", [("nft", "nft"), ("iptables", "iptables"), ("legacy", "iptables-legacy"),
                                              ("iptables-nft", "iptables-nft"), (None, None), ("", None)])
def test_backend_names(given, canonical):
    assert resolve_choice(given) == canonical


def test_a_bad_backend_name_is_one_line():
    with pytest.raises(InputError) as err:
        resolve_choice("xtables")
    assert err.value.line() == ("--backend: 'xtables' is not a backend (use nft, iptables, iptables-nft or "
                                "iptables-legacy)")


def test_choosing(fake_runner, monkeypatch):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    assert type(for_host(runner, "nft")) is NftBackend
    assert (type(for_host(runner, "iptables")), for_host(runner, "iptables").name) == (IptablesBackend, "iptables-nft")
    assert for_host(runner, "legacy").name == "iptables-legacy"
    assert type(for_host(runner)) is NftBackend                             # auto: nft -c accepted the probe
    assert type(for_host(runner, remembered=NATIVE)) is NftBackend          # the last apply's backend
    assert type(for_host(runner, "iptables", remembered=NATIVE)) is IptablesBackend   # asked for wins
    monkeypatch.setenv("HOSTPREP_BACKEND", "nft")
    assert type(for_host(runner)) is NftBackend
    monkeypatch.setenv("HOSTPREP_BACKEND", "bogus")
    with pytest.raises(InputError) as err:
        for_host(runner)
    assert err.value.field == "HOSTPREP_BACKEND"


def test_without_the_nic_the_ingress_table_waits(tmp_path: Path, proc: Path):
    """Boot before the external NIC appears: an ingress hook on a missing device makes kernels
    before 6.x refuse the whole transaction, so the inet table loads alone."""
    fake = FakeNft()
    be = NftBackend(fake, proc=proc, sys_net=tmp_path / "empty")
    ops.apply(Store(Paths(tmp_path)), "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")),
              kernel=False)
    (script,) = [i for a, i, m in fake.calls if m]
    assert ("table inet hostprep {" in script, "table netdev hostprep {" in script) == (True, False)
    assert sorted(fake.tables) == ["inet hostprep"]


def test_fail2ban_ban_sets_live_in_a_table_no_change_deletes():
    lb = NET("198.51.100.77/32")
    c, c6 = container(fail2ban=True, load_balancers=(lb,)), container("fin6", "2001:db8::10", (8445,), fail2ban=True)
    d = render.nft_desired(render.desired(Policy("eth1"), (c, c6)))
    script = d.nft.script
    ban, ban6 = c.ban_set(), c6.ban_set()
    assert d.bans == (ban6, ban)      # created when missing, never refilled (plan.plan_sets)
    # declared, never deleted, flushed or refilled by a change: only its chains are flushed
    assert render.ban_set_line(ban) == (f"add set inet hostprep_ban {ban.name} "
                                        "{ type ipv4_addr; size 65536; flags timeout; }")
    assert f"\nadd table inet hostprep_ban\n{render.ban_set_line(ban)}\n{render.ban_set_line(ban6)}\n" in script
    assert ("delete table inet hostprep_ban" in script, "flush set" in script, "flush table" in script) == \
        (False, False, False)
    assert [ln for ln in script.splitlines() if ln.startswith("flush ")] == [
        f"flush chain inet hostprep_ban {n}" for n in ("input", "forward", "HOSTPREP-BAN-v4", "HOSTPREP-BAN-v6")]
    assert "add chain inet hostprep_ban input { type filter hook input priority -10; policy accept; }" in script
    # one drop per port, on the original destination, load balancers never dropped
    assert [ln.strip() for ln in script.splitlines() if 'comment "hostprep bans: ' in ln] == [
        f"ip saddr @{ban.name} ip saddr != {{ 198.51.100.77/32 }} meta l4proto tcp ct original ip daddr "
        f'203.0.113.10 ct original proto-dst {p} counter drop comment "hostprep bans: finesse"'
        for p in (443, 8445)] + [
        f"ip6 saddr @{ban6.name} meta l4proto tcp ct original ip6 daddr 2001:db8::10 ct original proto-dst 8445 "
        'counter drop comment "hostprep bans: fin6"']
    ban_part = script.split("add table inet hostprep_ban")[1].split(render.NFT_INGRESS_MARK)[0]
    # the ban table only drops (its base chains' policy accept is not final: hostprep's chains judge next)
    assert [ln for ln in ban_part.splitlines() if "accept" in ln and "policy accept;" not in ln] == []
    # before the ingress table (cut off while the NIC is absent), after inet hostprep
    assert script.index("add table inet hostprep_ban") > script.index("table inet hostprep {") and \
        script.index("add table inet hostprep_ban") < script.index(render.NFT_INGRESS_MARK)
    # the view: the iptables HOSTPREP-BAN chain, jumped to from INPUT and FORWARD after HOSTPREP-IN
    assert [r.spec for r in d.v4.jumps if r.chain == "INPUT"] == ["-i eth1 -j HOSTPREP-IN", "-i eth1 -j HOSTPREP-BAN"]
    assert d.v4.chain("HOSTPREP-BAN").specs == ('-m comment --comment "hostprep bans: finesse" -j DROP',) * 2
    assert d.v6.chain("HOSTPREP-BAN").specs == ('-m comment --comment "hostprep bans: fin6" -j DROP',)


def test_without_fail2ban_there_is_no_ban_part():
    text = render.nft_backend_text(Policy("eth1"), (container(),))
    assert "hostprep_ban" not in text and render.ban_nft_text("eth1", (container(),)) == ""


def _ban_plan(fake, proc, containers, live=None):
    from hostprep import engine
    be = backend(fake, proc)
    return be, engine.make_plan(be, render.desired(Policy("eth1"), containers), None, live)


def test_the_loaded_script_deletes_the_ban_table_only_when_no_ban_is_wanted(proc: Path):
    fake = FakeNft()
    be, plan = _ban_plan(fake, proc, (container(),))
    assert be.script(plan).endswith("table inet hostprep_ban\ndelete table inet hostprep_ban\n")
    be, plan = _ban_plan(fake, proc, (container(fail2ban=True),))
    assert "delete table inet hostprep_ban" not in be.script(plan)


def test_a_ban_set_and_chain_no_container_wants_are_deleted_after_the_flushes(proc: Path):
    """container down of one container with fail2ban: its set goes (as its ipset does), the others stay."""
    from hostprep.observed import LiveState, Observed
    fin, ids = container(fail2ban=True), container("ids", "2001:db8::10", (8553,), fail2ban=True)
    fake = FakeNft()
    _, plan = _ban_plan(fake, proc, (fin, ids))
    live = LiveState({4: Observed(4, ("INPUT", "FORWARD", "OUTPUT", "HOSTPREP-BAN")),
                      6: Observed(6, ("INPUT", "FORWARD", "OUTPUT", "HOSTPREP-BAN"))}, None,
                     {fin.ban_set().name: frozenset({"192.0.2.7/32"}), ids.ban_set().name: frozenset()})
    be, plan = _ban_plan(fake, proc, (fin,), live)
    script = be.script(plan)
    assert script.endswith("flush chain inet hostprep_ban HOSTPREP-BAN-v6\ndelete chain inet hostprep_ban "
                           f"HOSTPREP-BAN-v6\ndelete set inet hostprep_ban {ids.ban_set().name}\n")
    assert f"delete set inet hostprep_ban {fin.ban_set().name}" not in script
    assert script.index("flush chain inet hostprep_ban input") < script.index("delete set")


def test_undo_puts_the_ban_table_back_without_its_members(proc: Path):
    listing = ("table inet hostprep_ban {\n\tset hostprep-8cb2c724-bn4 {\n\t\ttype ipv4_addr\n\t\tsize 65536\n"
               "\t\tflags timeout\n\t}\n\n\tchain input {\n\t\ttype filter hook input priority filter - 10; "
               "policy accept;\n\t\tmeta nfproto ipv4 iifname \"eth1\" meta l4proto tcp counter jump HOSTPREP-BAN-v4"
               "\n\t}\n\n\tchain HOSTPREP-BAN-v4 {\n\t\tip saddr @hostprep-8cb2c724-bn4 counter drop comment "
               "\"hostprep bans: finesse\"\n\t}\n}\n")
    text = render.ban_restore_text(listing)
    declared, _, refill = text.partition("flush chain inet hostprep_ban input\nflush chain inet hostprep_ban "
                                         "HOSTPREP-BAN-v4\n")
    assert refill == listing and "jump" not in declared and "drop" not in declared
    assert "\t\ttype filter hook input priority filter - 10; policy accept;\n\t}" in declared
    assert ("flush set" in text, "delete" in text) == (False, False)
    assert render.ban_objects(text) == (["hostprep-8cb2c724-bn4"], ["input", "HOSTPREP-BAN-v4"])


def test_a_rollback_to_a_snapshot_loads_and_warns_nothing(tmp_path: Path, proc: Path):
    """A snapshot's target (txn rollback) has no policy: finish() must not need one."""
    from hostprep import engine, snapshot
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="test")        # nothing loaded yet
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    assert "inet hostprep" in fake.tables
    target = snapshot.snapshot_target(snap)
    plan = engine.make_plan(be, target, None)
    done = engine.load_verified(be, plan, target)
    assert (done.problems, done.warnings, fake.tables) == ([], [], {})


def test_bans_survive_every_change_in_one_nft_f_each_and_go_with_their_container(tmp_path: Path, proc: Path):
    """Over the fake nft: a member fail2ban added stays through apply, another container's up and
    down and a rollback to a snapshot; each change is one ``nft -f``; flush removes the table."""
    from hostprep import snapshot
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    assert "inet hostprep_ban" not in fake.tables
    fin, ids = container(fail2ban=True), container("ids", "203.0.113.11", (8553,), fail2ban=True)
    fake.calls.clear()
    ops.container_up(be, store, fin, "hostprep container up finesse")
    assert fake.mutating() == [["nft", "-f", "-"]]
    ban = fin.ban_set().name
    fake.ban(ban, "192.0.2.7")
    assert be.observe().sets[ban] == frozenset({"192.0.2.7/32"})

    def changed(what) -> None:
        fake.calls.clear()
        what()
        assert fake.mutating() == [["nft", "-f", "-"]]
        assert be.observe().sets[ban] == frozenset({"192.0.2.7/32"})

    pol = Policy("eth1", ping=(PingSource("198.51.100.0/24", (NET("198.51.100.0/24"),)),))
    changed(lambda: ops.apply(store, "hostprep apply -i eth1 -p ...", backend=be,
                              desired=render.desired(pol, (fin,)), kernel=False))
    changed(lambda: ops.container_up(be, store, ids, "hostprep container up ids"))
    assert sorted(n for n in be.observe().sets if n.endswith(("-bn4", "-bn6"))) == sorted([ban, ids.ban_set().name])
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="test")
    changed(lambda: ops.container_down(be, store, "ids", "hostprep container down ids"))
    assert ids.ban_set().name not in be.observe().sets
    # the snapshot taken with ids up: its set comes back empty, finesse's keeps its member
    changed(lambda: snapshot.restore(be, store, snap, sys_net=proc.parent / "sys/class/net"))
    assert be.observe().sets[ids.ban_set().name] == frozenset()
    fake.calls.clear()
    ops.flush(be, store, "hostprep flush")
    assert (fake.mutating(), fake.tables) == ([["nft", "-f", "-"]], {})


def test_apply_on_the_nft_backend_puts_the_nft_ban_action_in_place(tmp_path: Path, proc: Path):
    """A host whose jails were written on iptables (the ipset action): apply --backend nft rewrites
    action.d/hostprep-ban.conf to the nft version; without a hostprep jail nothing is written."""
    from hostprep import fail2ban as f2b
    store = Store(Paths(tmp_path))
    files = f2b.Files(tmp_path)
    be = backend(FakeNft(), proc)
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    assert not files.action.exists()
    files.jail("finesse").parent.mkdir(parents=True)
    files.jail("finesse").write_text("[hostprep-finesse]\n")
    files.action.parent.mkdir(parents=True)
    files.action.write_text(f2b.action_text("ipset"))
    ops.apply(store, "hostprep apply -i eth1 --backend nft", backend=be,
              desired=render.desired(Policy("eth1", skip_ddos=True)), kernel=False)
    assert files.action.read_text() == f2b.action_text("nft")
    assert "fail2ban: ban action for the nft backend written" in (tmp_path / "var/log/hostprep/journal.log").read_text()


def test_a_kernel_without_nft_synproxy_is_named_with_the_fix(tmp_path: Path, proc: Path):
    """nft -c fails quoting the SYN cookie rule (a kernel without CONFIG_NFT_SYNPROXY): one error
    naming it and the way out; nothing loaded."""
    from hostprep.runner import Result

    class NoSynproxy(FakeNft):
        def run(self, argv, *, input=None, check=True, mutates=False, cwd=None):
            if list(argv)[:3] == ["nft", "-c", "-f"]:
                self.calls.append((list(argv), input, mutates))
                return Result(tuple(argv), 1, "", "/dev/stdin:80:3-70: Error: Could not process rule: No such file or "
                              "directory\n\t\tcounter synproxy mss 1460 wscale 7 timestamp sack-perm comment \"x\"\n"
                              "\t\t^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n")
            return super().run(argv, input=input, check=check, mutates=mutates, cwd=cwd)

    fake = NoSynproxy()
    store = Store(Paths(tmp_path))
    with pytest.raises(CommandFailed) as err:
        ops.apply(store, "hostprep apply -i eth1", backend=backend(fake, proc),
                  desired=render.desired(Policy("eth1")), kernel=False)
    assert "this kernel has no nft synproxy, CONFIG_NFT_SYNPROXY" in err.value.problem
    assert err.value.fix.startswith("use --backend iptables on this host")
    assert (fake.tables, fake.mutating()) == ({}, [])


# -- the ban table across a switch, flush on iptables (review finding 3) ------------------------


def native_with_bans(tmp_path: Path, proc: Path, ban: bool = True):
    """A native host with a fail2ban container and (``ban``) one ban in its set."""
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    fin = container(fail2ban=True)
    ops.container_up(be, store, fin, "hostprep container up finesse")
    if ban:
        fake.ban(fin.ban_set().name, "192.0.2.7")
    return fake, be, store, fin


def test_the_ban_table_is_part_of_the_native_backend_and_goes_with_its_release(tmp_path: Path, proc: Path):
    fake, be, _, _ = native_with_bans(tmp_path, proc)
    assert be.part() == ["nft: table inet hostprep", "nft: table inet hostprep_ban"]
    fake.tables.pop("inet hostprep")            # a ban table left alone (an iptables host after the old switch)
    assert be.part() == ["nft: table inet hostprep_ban"]
    fake.calls.clear()
    be.release()
    assert fake.mutating() == [["nft", "-f", "-"]]
    assert "inet hostprep_ban" not in fake.tables and "inet hostprep" not in fake.tables and be.part() == []
    be.release()                                 # nothing left: still no error (each table declared first)


def test_a_switch_to_iptables_removes_the_ban_table_after_the_load_and_a_rollback_brings_it_back(
        tmp_path: Path, proc: Path, monkeypatch):
    """nft -> iptables: the ban table goes with inet hostprep, only after the iptables rules are in
    and read back; the snapshot (taken through the native backend, which holds hostprep) puts it back
    with its sets (empty: a snapshot holds no bans)."""
    from hostprep import engine, snapshot
    from tests.helpers import FakeKernel
    # (the ban after the snapshot: FakeNft lists a set's members with -t too, which nft does not)
    fake, nft, store, fin = native_with_bans(tmp_path, proc, ban=False)
    d = render.desired(Policy("eth1"), (fin,))
    ipt = FakeKernel(nft=None)          # iptables holds nothing of hostprep before the switch
    ipt.other_backends = [nft]
    snap = snapshot.take(ipt, store, firewall=True, kernel=False, command="hostprep apply --backend iptables")
    fake.ban(fin.ban_set().name, "192.0.2.7")
    assert snap.backend == NATIVE
    order: list[str] = []
    monkeypatch.setattr(engine, "verify", lambda b, want, keep_nft=False: (order.append("verify"), (b.observe(), []))[1])
    real_release = nft.release
    monkeypatch.setattr(nft, "release", lambda: (order.append("release"), real_release())[1])
    out = engine.converge(ipt, store, d, "hostprep apply --backend iptables-nft", recorded_nft=None)
    assert order == ["verify", "release"]
    assert "inet hostprep_ban" not in fake.tables and "inet hostprep" not in fake.tables
    assert out.summary.endswith("then removed nft: table inet hostprep; nft: table inet hostprep_ban")
    # the rollback of that switch: the native backend with its ban table, the ban set back (empty)
    snapshot.restore(nft, store, snap, sys_net=proc.parent / "sys/class/net")
    assert nft.part() == ["nft: table inet hostprep", "nft: table inet hostprep_ban"]
    assert nft.observe().sets[fin.ban_set().name] == frozenset()


def test_flush_on_iptables_removes_a_ban_table_left_behind(tmp_path: Path, proc: Path):
    from tests.helpers import FakeKernel
    fake, nft, store, _ = native_with_bans(tmp_path, proc)
    fake.tables.pop("inet hostprep")
    ipt = FakeKernel()
    ipt.other_backends = [nft]
    fake.calls.clear()
    ops.flush(ipt, store, "hostprep flush")
    assert fake.mutating() == [["nft", "-f", "-"]]
    assert "inet hostprep_ban" not in fake.tables
    assert "nft: table inet hostprep_ban" in (tmp_path / "var/log/hostprep/journal.log").read_text().splitlines()[-1]


def test_the_limiters_fill_is_read_with_a_ban_table_too(tmp_path: Path, proc: Path):
    """Review finding 6: with a fail2ban container the ban table is merged into the view; the
    limiters' entries (status's "bound reached") must stay, the same as without it."""
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    ops.container_up(be, store, container(), "hostprep container up finesse")
    without = be.observe().nft.limiters
    assert without and "inet hostprep_ban" not in fake.tables
    ops.container_up(be, store, container(fail2ban=True), "hostprep container up finesse --fail2ban")
    assert "inet hostprep_ban" in fake.tables
    assert be.observe().nft.limiters == without


# -- container commands never switch backends (review finding 5) ------------------------------


def test_container_up_and_down_refuse_another_backend_than_the_one_holding_hostprep(tmp_path: Path, proc: Path):
    """applied.json says nft (native); a container command on iptables (HOSTPREP_BACKEND=iptables-nft
    or --backend) is refused in one line naming both and the fix, before anything is touched."""
    from tests.helpers import FakeKernel
    fake = FakeNft()
    be = backend(fake, proc)
    store = Store(Paths(tmp_path))
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    ops.container_up(be, store, container(), "hostprep container up finesse")
    tables, registry = dict(fake.tables), store.containers()
    journal = (tmp_path / "var/log/hostprep/journal.log").read_text()
    ipt = FakeKernel(variant="nft")
    ipt.other_backends = [be]
    for call in (lambda: ops.container_up(ipt, store, container("ids", "203.0.113.11", (8553,)), "up ids"),
                 lambda: ops.container_down(ipt, store, "finesse", "down finesse"),
                 lambda: ops.container_up_plan(ipt, store, container("ids", "203.0.113.11", (8553,)))):
        with pytest.raises(InputError) as err:
            call()
        line = err.value.line()
        assert "\n" not in line and err.value.field == "--backend/HOSTPREP_BACKEND"
        assert "asks for the iptables-nft backend but hostprep is held by nft" in line
        assert "run 'hostprep apply --backend iptables-nft' to switch (it asks first)" in line
    assert (fake.tables, store.containers(), ipt.loads, ipt.nft_loads) == (tables, registry, [], 0)
    assert (tmp_path / "var/log/hostprep/journal.log").read_text() == journal
    # the backend holding hostprep: no refusal
    ops.container_down(be, store, "finesse", "hostprep container down finesse")
    assert store.containers() == {}


def test_the_cli_refuses_a_container_command_on_another_backend_in_one_line(tmp_path: Path, proc: Path,
                                                                             monkeypatch):
    """`HOSTPREP_BACKEND=nft hostprep container down finesse` on a host hardened with iptables-nft
    (nft meant iptables-nft before the native backend): one error line, exit 2, no nft -f, no
    iptables restore, the registry as it was."""
    from typer.testing import CliRunner
    from hostprep import cli
    from hostprep.cli import container as container_cli
    root = tmp_path / "root"
    store = Store(Paths(root))
    fake = FakeNft()
    be = backend(fake, proc)
    ops.apply(store, "hostprep apply -i eth1", backend=be, desired=render.desired(Policy("eth1")), kernel=False)
    ops.container_up(be, store, container(), "hostprep container up finesse")
    # the record of a host hardened with iptables-nft ("nft", as records always said)
    store.save_applied({**store.applied(), "backend": "nft"})
    tables = dict(fake.tables)
    fake.calls.clear()
    monkeypatch.setattr(container_cli, "Runner", lambda *a, **kw: fake)
    monkeypatch.setattr(container_cli, "need_root", lambda what: None)
    monkeypatch.setenv("HOSTPREP_ROOT", str(root))
    monkeypatch.setenv("HOSTPREP_BACKEND", "nft")
    res = CliRunner().invoke(cli.app, ["container", "down", "finesse"])
    assert res.exit_code == 2, res.output
    assert res.output == ("error: --backend/HOSTPREP_BACKEND: container down asks for the nft backend but hostprep "
                          "is held by iptables-nft (the last apply); container commands never switch backends "
                          "(run 'hostprep apply --backend nft' to switch (it asks first), or drop --backend / unset "
                          "HOSTPREP_BACKEND to stay on iptables-nft; nothing was changed)\n")
    assert (fake.mutating(), fake.tables, list(store.containers())) == ([], tables, ["finesse"])


def test_a_listing_is_made_loadable_again():
    """nft 1.0.6 lists ``meta l4proto tcp ct original proto-dst 8445 tcp flags ...`` without its
    ``meta l4proto tcp`` and then refuses that line: nft_loadable puts it back, once."""
    listed = ("\t\tct original proto-dst 8445 tcp flags syn / fin,syn,rst,ack counter drop\n"
              "\t\tmeta l4proto tcp ct original proto-dst 8445 ip saddr @x counter accept\n")
    fixed = render.nft_loadable(listed)
    assert fixed.splitlines() == [
        "\t\tmeta l4proto tcp ct original proto-dst 8445 tcp flags syn / fin,syn,rst,ack counter drop",
        "\t\tmeta l4proto tcp ct original proto-dst 8445 ip saddr @x counter accept"]
    assert render.nft_loadable(fixed) == fixed
