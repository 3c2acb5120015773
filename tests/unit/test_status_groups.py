"""status: a group's packet counters count its own rules, not jumps that pass packets on."""

from __future__ import annotations

import ipaddress

from hostprep import render, status
from hostprep.model import PingSource, Policy
from hostprep.plan import plan_family
from hostprep.observed import parse_save


def test_icmp_group_does_not_count_its_jump_into_the_spoof_group():
    # With -p and the spoof group, HOSTPREP-ICMP jumps to HOSTPREP-SPOOF before the
    # allow-list: 5 echo requests passed that jump, 2 were allowed, 3 dropped as other
    # icmp.  The icmp group judged 5 packets, not 10.
    desired = render.desired(Policy("eth1", ping=(PingSource("203.0.113.7",
                                                             (ipaddress.ip_network("203.0.113.7"),)),))).v4
    save = "*filter\n:HOSTPREP-ICMP - [0:0]\n:HOSTPREP-SPOOF - [0:0]\n" + "".join(
        f"[{n}:{n * 84}] -A HOSTPREP-ICMP {spec}\n" for n, spec in zip((5, 2, 3), desired.chain("HOSTPREP-ICMP").specs)
    ) + "COMMIT\n"
    observed = parse_save(save, 4)
    report = status._group_report("icmp", 4, desired, observed, plan_family(desired, observed))
    assert (report["packets"], report["bytes"]) == (5, 5 * 84)


def test_container_report_shows_source_prefix_and_limiter_bounds():
    from hostprep.cli import output
    from hostprep.model import Container, Limits
    c6 = Container("ids", "ids", (8553,), ipaddress.ip_address("2001:db8::10"), Limits(6, 2, 4, 1, 1))
    c4 = Container("fin", "finesse", (8445,), ipaddress.ip_address("192.0.2.10"), Limits(10, 6, 8, 1, 1),
                   ipv6_source_prefix=128)
    reps = [status._container_report(c, None, render.desired(Policy("eth1"), (c,)).ruleset(c.family))
            for c in (c6, c4)]
    bounds = {"htable_size": 16384, "htable_max": 131072, "htable_expire_ms": 2000}
    assert [(r["source_prefix"], r["limiter"]) for r in reps] == [(64, bounds), (32, bounds)]
    assert [str(t) for t in output.container_state(reps[0])][2:] == [
        "  limiter: max 131072 sources/port, 16384 buckets, idle 2 s, source /64"]
    assert [output.container_opening(r).split("; ")[1] for r in reps] == [
        "per /64 source 6 conn, 2/s burst 4", "per source 10 conn, 6/s burst 8"]
