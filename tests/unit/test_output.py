"""What status and the change reports say (issue 15, items 3 to 5): the verdict, the words
of a change as actions, what the next boot loads; pure functions, no root."""

from __future__ import annotations

import io

from rich.console import Console

from hostprep import render
from hostprep.cli import output
from hostprep import status as statusmod
from hostprep.model import BUILTIN_CHAINS, Policy
from hostprep.observed import LiveRule, LiveState, NftObserved, Observed
from hostprep.plan import ApplyPlan, NftPlan, plan_change, plan_family

DESIRED = render.desired(Policy("eth1"))


def live_of(ruleset) -> Observed:
    """The Observed a kernel holding exactly ``ruleset`` (and an empty built-in part) reports."""
    rules = [LiveRule(j.chain, j.spec) for j in ruleset.jumps]
    rules += [LiveRule(c.name, r.spec) for c in ruleset.chains for r in c.rules]
    return Observed(ruleset.family, tuple(BUILTIN_CHAINS) + tuple(c.name for c in ruleset.chains), tuple(rules))


def empty() -> LiveState:
    return LiveState({4: Observed(4, tuple(BUILTIN_CHAINS)), 6: Observed(6, tuple(BUILTIN_CHAINS))}, None)


def test_first_apply_reads_as_actions():
    plan = plan_change(DESIRED, empty(), None)
    v4 = sum(len(c.rules) for c in DESIRED.v4.chains)
    v6 = sum(len(c.rules) for c in DESIRED.v6.chains)
    assert plan.actions() == [
        f"IPv4: added 13 chains ({v4} rules)", "IPv4: added the jumps from INPUT, FORWARD, OUTPUT",
        f"IPv6: added 13 chains ({v6} rules)", "IPv6: added the jumps from INPUT, FORWARD, OUTPUT",
        "loaded the nft ingress table on eth1"]
    assert plan.summary() == f"added {v4 + v6} rules in 26 new chains, 8 jumps and the nft ingress table"
    # --dry-run's plan keeps the wording of a difference
    assert plan.notes()[0] == "IPv4: chain HOSTPREP-IN missing"


def test_flush_reads_as_actions_one_per_line():
    snap = LiveState({4: live_of(DESIRED.v4), 6: live_of(DESIRED.v6)},
                    NftObserved("eth1", "table netdev hostprep {}", {}))
    plan = plan_change(None, snap, None)
    v4 = sum(len(c.rules) for c in DESIRED.v4.chains)
    v6 = sum(len(c.rules) for c in DESIRED.v6.chains)
    assert plan.actions() == [
        f"IPv4: removed {v4} rules in 13 chains", "IPv4: removed the jumps from INPUT, FORWARD, OUTPUT",
        f"IPv6: removed {v6} rules in 13 chains", "IPv6: removed the jumps from INPUT, FORWARD, OUTPUT",
        "removed the nft ingress table on eth1"]
    assert plan.summary() == f"removed {v4 + v6} rules in 26 chains, 8 jumps and the nft ingress table"


def test_one_chain_changed_by_hand_is_named():
    spoof = DESIRED.v4.chain("HOSTPREP-SPOOF")
    live = live_of(DESIRED.v4)
    live = Observed(4, live.chains, tuple(r for r in live.rules if (r.chain, r.spec) != ("HOSTPREP-SPOOF",
                                                                                          spoof.rules[0].spec)))
    fplan = plan_family(DESIRED.v4, live)
    plan = ApplyPlan(DESIRED, {4: fplan}, {}, NftPlan("none"), LiveState({4: live}, None))
    assert plan.actions() == ["IPv4: replaced chain HOSTPREP-SPOOF (9 rules)"]
    assert fplan.notes == ("chain HOSTPREP-SPOOF differs",)
    assert plan.summary() == "added 9 rules; removed 8 rules"


def report(**kw) -> dict:
    base = {"problems": [], "last_apply": {"time": "2026-12-05T19:39:53+01:00", "settings": {}},
            "transaction": {"pending": None}, "backend": "nft", "nic": {"name": "eth1"}, "containers": []}
    base.update(kw)
    return base


def test_verdict_from_the_problems():
    assert statusmod.verdict(report())["state"] == "protected"
    assert statusmod.verdict(report(problems=["kernel: net.ipv4.tcp_rfc1337 drift: wanted 1, live value 0",
                                              "boot persistence: out of date: x (run 'hostprep apply')"]))[
        "state"] == "protected"
    assert statusmod.verdict(report(problems=["IPv4: chain HOSTPREP-SSH differs"]))["state"] == "not protected"
    assert statusmod.verdict(report(last_apply=None))["state"] == "not protected"
    pending = {"id": "20261205T184049-1-abc", "command": "hostprep apply"}
    assert statusmod.verdict(report(transaction={"pending": pending}, problems=[
        "change 20261205T184049-1-abc (hostprep apply) waits for 'hostprep confirm' until x (9 s left); "
        "then it is rolled back"]))["state"] == "pending"


def test_verdict_line():
    r = report(problems=["kernel: net.ipv4.tcp_rfc1337 drift: wanted 1, live value 0"])
    r["verdict"] = statusmod.verdict(r)
    assert output.verdict_line(r).plain == ("protected: eth1, nftables, 0 containers, applied "
                                            "2026-12-05 18:39 UTC\n  1 problem below")


def test_limits_as_an_admin_reads_them():
    assert output.limits_text({"connlimit_above": 10, "hash_upto": 6, "hash_burst": 8}) == "10 conn, 6/s burst 8"
    assert (output.plural(1, "rule"), output.plural(2, "rule"), output.plural(1, "container")) == \
        ("1 rule", "2 rules", "1 container")


def persistence(kernel_applied: bool) -> list[str]:
    r = {"persistence": {"installed": True, "enabled": True, "up_to_date": True, "nic_unit": None,
                         "iptables_dropins": [], "matches_live": None},
         "transaction": {}, "kernel": {"applied": kernel_applied}}
    return [t.plain for t in output.persistence_lines(r)]


def test_next_boot_after_a_flush_names_the_kernel_profile_only_when_applied():
    assert persistence(False) == ["boot persistence: hostprep.service enabled, up to date",
                                  "  the next boot loads no firewall rules (nothing applied)"]
    assert persistence(True)[1] == "  the next boot loads no firewall rules (nothing applied) and re-applies " \
                                   "the kernel profile"


def test_state_words_are_coloured_on_a_terminal_only(monkeypatch):
    import io
    for env, want in (({}, True), ({"NO_COLOR": "1"}, False)):
        monkeypatch.delenv("NO_COLOR", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        buf = io.StringIO()
        Console(file=buf, force_terminal=True, width=80, markup=False).print(output.state_text("live"))
        assert ("\x1b[32m" in buf.getvalue()) == want
    buf = io.StringIO()
    Console(file=buf, width=80, markup=False).print(output.state_text("MISSING"))
    assert buf.getvalue() == "MISSING\n"


def test_selinux_warning_once_after_the_work_never_before_an_input_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from hostprep import cli
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    monkeypatch.setenv("HOSTPREP_ROOT", str(root))
    monkeypatch.setenv("HOSTPREP_SELINUXFS", str(tmp_path / "no-selinuxfs"))
    res = CliRunner().invoke(cli.app, ["apply", "--dry-run", "-i", "nosuchnic0", "-y", "--ignore-selinux"])
    assert (res.exit_code, res.output.count("SELinux"), res.output.startswith("error: -i/--interface: ")) == \
        (2, 0, True), res.output


def test_selftest_groups_passed_and_failed_in_the_order_they_ran():
    from hostprep import selftest
    probes = [{"phase": "limits", "from": "inet", "ok": True}, {"phase": "base", "from": "admin", "ok": False},
              {"phase": "base", "from": "inet", "ok": True}, {"phase": "base", "from": "inet", "ok": True}]
    assert selftest.group_results({"probes": probes}) == [
        ("base probes from the internet peer", 2, 0), ("base probes from the admin peer", 0, 1),
        ("limits probes from the internet peer", 1, 0)]


KEYS = [{"key": "net.ipv4.tcp_syncookies", "desired": "1", "live": "1", "source": "x", "state": "ok", "detail": ""},
        {"key": "kernel.sysrq", "desired": "0", "live": "16", "source": None, "state": "machine-wide", "detail": "m"}]


def test_kernel_keys_in_one_line_unless_verbose_or_drifting():
    def text(keys, verbose):
        buf = io.StringIO()
        console = Console(file=buf, width=80, markup=False)
        report = {"verdict": {"state": "protected", "problems": 0, "firewall_problems": 0}, "backend": "nft",
                  "nic": None, "last_apply": None, "problems": [], "warnings": [], "families": {},
                  "kernel": {"applied": True, "keys": keys}}
        output.print_status(console, console, report, verbose=verbose)
        return buf.getvalue()
    assert "kernel profile: 1 of 2 keys live (1 machine-wide); -v lists them\n" in text(KEYS, False)
    assert ("kernel.sysrq" in text(KEYS, False), "kernel.sysrq" in text(KEYS, True)) == (False, True)
    drift = KEYS + [dict(KEYS[0], key="net.ipv4.tcp_rfc1337", live="0", state="drift", detail="live value 0")]
    assert "net.ipv4.tcp_rfc1337" in text(drift, False)


def test_a_long_address_is_folded_not_cut_at_80_columns(monkeypatch):
    from hostprep import nic
    buf = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=buf, width=40, markup=False))
    monkeypatch.setattr(output, "err", Console(file=io.StringIO(), width=40, markup=False))
    long6 = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff/64"
    output.show_nic(nic.NicInfo("eth1", True, "up", "02:00:00:00:00:01", 1500, 1000, ("198.51.100.10/24",),
                                (long6,), False))
    assert ("…" in buf.getvalue(), "".join(ln.strip("│ ") for ln in buf.getvalue().splitlines()
                                           if "2001" in ln or "ffff" in ln or "eeee" in ln).count("ffff/64")) == (False, 1)


def test_status_names_a_change_the_confirm_timer_rolled_back():
    tx = {"pending": None, "rollback_available": None,
          "rolled_back": {"id": "20260101T000000-1", "command": "hostprep apply -i eth1 --confirm 60",
                          "why": "deadline passed without 'hostprep confirm'", "time": "2026-01-01T00:01:00"}}
    assert [line.plain for line in output.transaction_lines(tx)] == [
        "ROLLED BACK: change 20260101T000000-1 (hostprep apply -i eth1 --confirm 60) was rolled back at "
        "2026-01-01T00:01:00 (deadline passed without 'hostprep confirm'); apply it again if you want it"]
