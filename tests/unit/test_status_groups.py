"""status: a group's packet counters count its own rules, not jumps that pass packets on."""

from __future__ import annotations

import ipaddress

from hostprep import render, status
from hostprep.model import PingSource, Policy
from hostprep.plan import parse_save, plan_family


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
