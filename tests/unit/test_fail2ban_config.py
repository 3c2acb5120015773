"""fail2ban and logrotate for the proxy (hostprep/fail2ban.py, rules/ban.rules.j2, fail2ban.d/): no root.

The ban rules and the ban set in the model, render and plan; the jail's inputs
validated (one line, the field and the fix); the rendered files checked by the
tools that read them: fail2ban-regex against the proxy's documented line,
fail2ban-client -t on a copy of the host's configuration, logrotate -d.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hostprep import fail2ban as f2b
from hostprep import plan as planmod
from hostprep import render
from hostprep.errors import HostprepError, InputError
from hostprep.model import BanSet, Container, Limits, Policy, is_ban_set
from hostprep.snapshot import Snapshot, snapshot_target

DEST = ipaddress.ip_address("198.51.100.10")
DEST6 = ipaddress.ip_address("2001:db8:1::10")


def container(name="finesse", dest=DEST, fail2ban=True, lbs=(), ports=(8445,)) -> Container:
    return Container(name, "finesse", ports, dest, Limits(10, 6, 8, 1, 1), load_balancers=tuple(
        ipaddress.ip_network(n) for n in lbs), fail2ban=fail2ban)


POLICY = Policy("eth1")


# -- model, render, plan -------------------------------------------------------------------------

def test_ban_rules_first_in_dispatcher_per_port_with_original_destination():
    c = container(lbs=("192.0.2.10",), ports=(8445, 8446))
    rs = render.desired(POLICY, (c,)).ruleset(4)
    ban = c.ban_set().name
    assert rs.chain("HOSTPREP-IN").specs[:2] == ("-p tcp -j HOSTPREP-BAN", "-j HOSTPREP-FAST")
    assert rs.chain("HOSTPREP-BAN").specs == tuple(
        f"-p tcp -m set --match-set {ban} src -m set ! --match-set {c.set_name('lb')} src -m conntrack "
        f"--ctorigdst 198.51.100.10 --ctorigdstport {p} -m comment --comment \"hostprep bans: finesse\" -j DROP"
        for p in (8445, 8446))
    # IPv6 has no container: no ban chain there
    assert render.desired(POLICY, (c,)).ruleset(6).chain("HOSTPREP-BAN") is None


def test_without_fail2ban_the_ruleset_is_exactly_as_before():
    on, off = render.desired(POLICY, (container(),)), render.desired(POLICY, (container(fail2ban=False),))
    strip = [ch for ch in on.v4.chains if ch.name != "HOSTPREP-BAN"]
    assert off.v4.chains == tuple(dataclasses.replace(ch, rules=tuple(
        r for r in ch.rules if r.spec != "-p tcp -j HOSTPREP-BAN")) for ch in strip)
    assert off.bans == () and on.bans == (container().ban_set(),)


def test_ipv6_container_gets_an_inet6_ban_set():
    c = container("fin6", DEST6)
    ban = c.ban_set()
    assert (ban.family, ban.name.endswith("-bn6"), is_ban_set(ban.name)) == (6, True, True)
    assert ban.create_line() == (f"create {ban.name} hash:ip family inet6 hashsize 1024 maxelem 65536 timeout 0")
    assert render.desired(POLICY, (c,)).ruleset(6).chain("HOSTPREP-IN").specs[0] == "-p tcp -j HOSTPREP-BAN"


def test_hardening_off_has_no_ban_set():
    assert dataclasses.replace(container(), hardening=False).ban_set() is None


def test_plan_creates_a_missing_ban_set_and_never_refills_one():
    ban = container().ban_set()
    assert planmod.plan_sets((ban,), {}).create == (ban,)
    live = {ban.name: frozenset({"203.0.113.7/32"})}
    p = planmod.plan_sets((ban,), live)
    assert (p.create, p.replace, p.destroy) == ((), (), ())
    assert planmod.plan_sets((), live).destroy == (ban.name,)
    assert planmod.ipset_fill_script((ban,)) == ban.create_line() + "\n"


def test_record_keeps_fail2ban_and_older_records_read_as_off():
    c = container()
    assert Container.from_dict(c.as_dict()) == c
    d = container(fail2ban=False).as_dict()
    assert "fail2ban" not in d and Container.from_dict(d).fail2ban is False


def test_rollback_snapshot_puts_a_ban_set_back_empty_never_with_old_members():
    ban = container().ban_set()
    snap = {"firewall": {}, "sets": {ban.name: {"family": 4, "members": []}}, "nft": None}
    assert snapshot_target(Snapshot.from_dict(dict(snap, version=1, files={}))).sets == (BanSet(ban.name, 4),)


# -- resolving a container's jail -----------------------------------------------------------------

@pytest.fixture
def tree(tmp_path, monkeypatch):
    """ROOT/etc/passwd with the proxy user (uid 4242, home tmp/home/proxy) owning the env files."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    home = tmp_path / "home/proxy"
    (home / "reverse_proxy/finesse/logs").mkdir(parents=True)
    (home / "reverse_proxy/finesse/logs/blocking.log").write_text("")
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\nproxy:x:4242:4242::{home}:/bin/sh\n")
    (root / "etc/group").write_text("proxygrp:x:4242:\n")
    monkeypatch.setattr(f2b, "_owner", lambda path: 4242)
    return root, home


def env(tmp_path: Path, name: str, **values) -> Path:
    p = tmp_path / name
    p.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return p


def test_default_working_dir_is_the_installers_under_the_proxy_users_home(tree, tmp_path):
    root, home = tree
    s = f2b.resolve(container(), env(tmp_path, "f.env", TEMPLATE_TYPE="finesse"), None, None, root)
    assert (s.working_dir, s.user.name, s.user.group, s.bantime, s.findtime) == (
        home / "reverse_proxy/finesse", "proxy", "proxygrp", 1800, 180)
    assert s.logpath == f"{home}/reverse_proxy/finesse/logs/blocking.log"
    assert (s.set4, s.set6) == (container().ban_set().name, "")


def test_working_dir_and_bantime_from_the_env_files(tree, tmp_path):
    root, home = tree
    (home / "wd/logs").mkdir(parents=True)
    (home / "wd/logs/blocking.log").write_text("")
    s = f2b.resolve(container(lbs=("192.0.2.10",)), env(tmp_path, "f.env", NGX_CLIENT_BLOCK_DURATION="600"),
                    env(tmp_path, "core.env"), env(tmp_path, "installer.env", HOST_WORKING_DIR=f"{home}/wd/"), root)
    assert (s.working_dir, s.bantime, s.ignore) == (home / "wd", 600, ("127.0.0.1/8", "::1", "192.0.2.10/32"))
    text = f2b.jail_text(s)
    assert f"logpath  = {home}/wd/logs/blocking.log tail\n" in text and "bantime  = 600\n" in text
    assert "ignoreip = 127.0.0.1/8 ::1 192.0.2.10/32\n" in text
    assert f'action   = hostprep-ban[set4="{s.set4}", set6="", timeout="600"]\n' in text


@pytest.mark.parametrize("value, words", [
    ("reverse_proxy/finesse", "is not an absolute path"),
    ("{home}/reverse proxy", "cannot carry"),
    ("{home}/a%(b)s", "cannot carry"),
    ("{home}/a*", "cannot carry"),
    ("{home}/a\\nb", "cannot carry"),
    ("{home}/../proxy/reverse_proxy/finesse", "cannot carry"),
    ("/var/log", "is outside proxy's tree"),
    ("{home}/missing", "does not exist"),
])
def test_bad_working_dir_is_one_line_naming_the_field(tree, tmp_path, value, words):
    root, home = tree
    inst = env(tmp_path, "installer.env", HOST_WORKING_DIR='"' + value.format(home=home) + '"')
    with pytest.raises(InputError) as err:
        f2b.resolve(container(), env(tmp_path, "f.env"), None, inst, root)
    line = err.value.line()
    assert "\n" not in line and f"HOST_WORKING_DIR in {inst}" in line and words in line, line


def test_symlink_leading_out_of_the_tree_is_refused(tree, tmp_path):
    root, home = tree
    (tmp_path / "elsewhere/logs").mkdir(parents=True)
    (tmp_path / "elsewhere/logs/blocking.log").write_text("")
    (home / "link").symlink_to(tmp_path / "elsewhere")
    inst = env(tmp_path, "installer.env", HOST_WORKING_DIR=f"{home}/link")
    with pytest.raises(InputError, match="outside proxy's tree .* resolves to"):
        f2b.resolve(container(), env(tmp_path, "f.env"), None, inst, root)


def test_root_owned_env_files_name_no_proxy_user(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setattr(f2b, "_owner", lambda path: 0)
    with pytest.raises(InputError, match="is owned by root: .*chown the env files to the proxy user"):
        f2b.resolve(container(), env(tmp_path, "f.env"), None, None, root)


@pytest.mark.parametrize("value", ["0", "-5", "30m", "99999999999"])
def test_bad_block_duration(tree, tmp_path, value):
    root, _ = tree
    with pytest.raises(InputError, match="NGX_CLIENT_BLOCK_DURATION in .* is not in expected format"):
        f2b.resolve(container(), env(tmp_path, "f.env", NGX_CLIENT_BLOCK_DURATION=value), None, None, root)


class NoFail2ban:
    """A runner on a host without fail2ban-client (which() is all require_installed asks)."""

    @staticmethod
    def which(name: str) -> None:
        return None


def test_missing_fail2ban_names_the_packages(tmp_path):
    with pytest.raises(HostprepError) as err:
        f2b.require_installed(NoFail2ban(), f2b.Files(tmp_path))
    assert "fail2ban is not installed" in err.value.line() and "fail2ban-server" in err.value.line() \
        and "fail2ban on Debian" in err.value.line()


# -- the files, as the tools that read them see them -----------------------------------------------

BLOCKED_LINES = [
    "203.0.113.7 will be blocked for 30 minutes for exceeding retry limit.",
    "2001:db8:f::7 will be blocked for 30 minutes for exceeding retry limit.",
]


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed")
def test_filter_matches_the_proxys_lines_ipv4_and_ipv6(tmp_path):
    log = tmp_path / "blocking.log"
    log.write_text("\n".join(BLOCKED_LINES + ["203.0.113.9 login failed for user admin"]) + "\n")
    flt = tmp_path / "hostprep-proxy.conf"
    flt.write_text(f2b.filter_text())
    res = subprocess.run(["fail2ban-regex", "--print-all-matched", str(log), str(flt)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Lines: 3 lines, 0 ignored, 2 matched, 1 missed" in res.stdout, res.stdout
    matched = [ln.strip(" |`-") for ln in res.stdout.split("Matched line(s):")[1].splitlines() if "will be" in ln]
    assert matched == BLOCKED_LINES


@pytest.mark.skipif(shutil.which("fail2ban-client") is None or not Path("/etc/fail2ban/jail.conf").is_file(),
                    reason="fail2ban is not installed")
@pytest.mark.parametrize("kind", ["ipset", "nft"])
def test_config_test_passes_with_hostprep_files_in_a_copy_of_the_hosts_config(tree, tmp_path, kind):
    root, home = tree
    shutil.copytree("/etc/fail2ban", root / "etc/fail2ban", ignore=shutil.ignore_patterns("defaults-debian.conf"))
    s = f2b.resolve(container(), env(tmp_path, "f.env"), None, None, root)
    files = f2b.Files(root)
    written = f2b.write(s, files, kind)
    assert files.action.read_text() == f2b.action_text(kind)
    assert sorted(written) == sorted(map(str, (files.jail("finesse"), files.filter, files.action,
                                               files.logrotate("finesse"))))
    res = subprocess.run(f2b.client(files, "-t"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f2b.write(s, files, kind) == []    # unchanged: nothing rewritten
    assert f2b.remove("finesse", files) == [str(files.jail("finesse")), str(files.logrotate("finesse"))]
    assert f2b.remove_all(files) == [str(files.filter), str(files.action)]


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_debug_run_rotates_the_four_logs_with_copytruncate_as_the_proxy_user(tmp_path, monkeypatch):
    """logrotate switches to the proxy user ('su'), who must be able to get in: not below pytest's 0700 tmp."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="hpf2b-unit-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        _logrotate_debug_run(base, tmp_path, monkeypatch, nobody)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _logrotate_debug_run(base, tmp_path, monkeypatch, nobody):
    group = grp.getgrgid(nobody.pw_gid).gr_name
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    home = base / "home"
    logs = home / "reverse_proxy/finesse/logs"
    logs.mkdir(parents=True)
    for f in f2b.LOGS:
        (logs / f).write_text("line\n")
    (root / "etc/passwd").write_text(f"nobody:x:{nobody.pw_uid}:{nobody.pw_gid}::{home}:/bin/sh\n")
    (root / "etc/group").write_text(f"{group}:x:{nobody.pw_gid}:\n")
    monkeypatch.setattr(f2b, "_owner", lambda path: nobody.pw_uid)
    s = f2b.resolve(container(), env(tmp_path, "f.env"), None, None, root)
    conf = tmp_path / "hostprep-proxy-finesse"
    conf.write_text(f2b.logrotate_text(s))
    os.chmod(conf, 0o644)
    res = subprocess.run(["logrotate", "-d", "-f", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                         text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert [ln for ln in out.splitlines() if ln.startswith("error")] == []
    assert [ln for ln in out.splitlines() if ln.startswith("rotating log ")] == [
        f"rotating log {logs}/{f}, log->rotateCount is 14" for f in f2b.LOGS]
    assert out.count("copying ") == 4 and out.count("truncating ") == 4, out
    assert f"switching euid from 0 to {nobody.pw_uid} and egid from 0 to {nobody.pw_gid}" in out, out


def test_switching_fail2ban_off_widens_access_on_it_narrows():
    assert planmod.container_widening(container(), container(fail2ban=False)) == [
        "fail2ban off (--no-fail2ban): the addresses banned for brute force get in again"]
    assert planmod.container_widening(container(fail2ban=False), container()) == []


def _status_root(tmp_path: Path) -> f2b.Files:
    files = f2b.Files(tmp_path)
    (files.conf_dir / "jail.d").mkdir(parents=True)
    (files.conf_dir / "jail.conf").write_text("")
    files.jail("finesse").write_text("[hostprep-finesse]\n")
    return files


def test_status_counts_the_set_and_names_the_newest_ban(tmp_path, fake_runner):
    files = _status_root(tmp_path)
    c = container()
    listed = "203.0.113.7 \t2026-12-05 20:00:00 + 600 = 2026-12-05 20:10:00\n" \
             "203.0.113.8 \t2026-12-05 20:01:00 + 600 = 2026-12-05 20:11:00\n"
    runner = fake_runner({tuple(f2b.client(files, "get", "hostprep-finesse", "banip", "--with-time")): (0, listed, "")})
    live = {c.ban_set().name: frozenset({"203.0.113.7/32", "203.0.113.8/32"}), "hostprep-0badc0de-bn6": frozenset()}
    report = f2b.collect(runner, files, [c, container("other", fail2ban=False)], live)
    assert report == {"installed": True, "running": True, "jails": ["hostprep-finesse"], "stray_sets": [
        "hostprep-0badc0de-bn6"], "containers": [{"name": "finesse", "jail": True, "jail_loaded": True,
                                                   "set": c.ban_set().name, "set_present": True, "bans": 2,
                                                   "newest": "203.0.113.8"}],
                      "action": None, "action_wanted": None}
    assert (f2b.problems(report), f2b.warnings(report)) == ([], [])


def test_status_fail2ban_stopped_is_a_warning_a_missing_jail_a_problem(tmp_path, fake_runner):
    files = _status_root(tmp_path)
    files.jail("finesse").unlink()
    runner = fake_runner({tuple(f2b.client(files, "ping")): (255, "", "Failed to access socket path")})
    report = f2b.collect(runner, files, [container()], {})
    assert (report["running"], report["containers"][0]["bans"], report["containers"][0]["newest"]) == (False, 0, None)
    assert f2b.problems(report) == ["fail2ban: the jail of finesse is missing (run 'hostprep container up finesse')"]
    assert f2b.warnings(report) == ["fail2ban is not running: the addresses the proxy blocks are not banned in the "
                                    "firewall (start it: systemctl start fail2ban)"]


def test_status_asks_no_server_when_no_container_uses_fail2ban(tmp_path, fake_runner):
    files = f2b.Files(tmp_path)
    runner = fake_runner()
    assert f2b.collect(runner, files, [container(fail2ban=False)], {}) == {
        "installed": False, "running": None, "jails": [], "containers": [], "stray_sets": [], "action": None,
        "action_wanted": None}
    assert runner.calls == []


def test_reload_only_when_the_server_runs_and_a_failure_is_one_line(tmp_path, fake_runner):
    files = f2b.Files(tmp_path)
    down = fake_runner({tuple(f2b.client(files, "ping")): (255, "", "Failed to access socket path")})
    assert f2b.reload(down, files) == "fail2ban is not running: it reads the jail when it starts"
    assert [c[0] for c in down.calls] == [f2b.client(files, "ping")]
    up = fake_runner()
    assert f2b.reload(up, files) == "fail2ban reloaded"
    assert up.calls[-1] == (f2b.client(files, "reload"), None, True)
    bad = fake_runner({tuple(f2b.client(files, "reload")): (255, "", "ERROR  Found no accessible config files\n")})
    assert f2b.reload(bad, files) == ("fail2ban-client reload FAILED (ERROR  Found no accessible config files): "
                                      "see fail2ban's log")


# -- the native nft backend's ban action (fail2ban.d/action-nft.conf) ---------------------------------

def _action(kind: str) -> dict[str, str]:
    """The [Definition] lines of the ban action of ``kind``, by name."""
    text = f2b.action_text(kind).split("[Definition]\n", 1)[1].split("\n[Init]", 1)[0]
    return dict(ln.split(" = ", 1) for ln in text.splitlines() if " = " in ln)


def test_the_action_follows_the_backend():
    assert (f2b.ban_kind("nftables"), f2b.ban_kind("nft"), f2b.ban_kind("legacy")) == ("nft", "ipset", "ipset")
    assert "ipset" in _action("ipset")["actionban"] and "nft" not in _action("ipset")["actionban"]
    assert "ipset" not in f2b.action_text("nft").split("[Definition]")[1]


@pytest.mark.parametrize("family, tags", [(4, {"<banset>": "{name}", "<settype>": "ipv4_addr"}),
                                          (6, {"<banset>": "{name}", "<settype>": "ipv6_addr"})])
def test_nft_actionstart_declares_the_set_with_hostprep_own_line(family, tags):
    """Either may create the set first at boot: fail2ban's line and hostprep's are the same."""
    c = container(dest=DEST if family == 4 else DEST6)
    ban = c.ban_set()
    start = _action("nft")["actionstart"]
    for tag, value in tags.items():
        start = start.replace(tag, value.format(name=ban.name))
    assert start == (f"if [ -n \"{ban.name}\" ]; then nft 'add table inet hostprep_ban; "
                     f"{render.ban_set_line(ban)}'; fi")
    assert f"\n{render.ban_set_line(ban)}\n" in render.ban_nft_text("eth1", (c,))


def test_nft_ban_and_unban_are_one_transaction_each_and_never_fail_on_a_missing_element():
    a = _action("nft")
    el = "inet hostprep_ban <banset> { <ip> }"
    assert a["actionban"] == ("if [ -n \"<banset>\" ]; then nft 'add element " + el + "; delete element " + el
                              + "; add element inet hostprep_ban <banset> { <ip> timeout <timeout>s }'; fi")
    assert a["actionunban"] == ("if [ -n \"<banset>\" ]; then nft 'add element " + el + "; delete element " + el
                                + "'; fi")
    assert a["actionflush"] == 'if [ -n "<banset>" ]; then nft flush set inet hostprep_ban <banset>; fi'
    assert a["actioncheck"] == 'if [ -n "<banset>" ]; then nft list set inet hostprep_ban <banset> >/dev/null; fi'


def test_follow_backend_rewrites_only_where_hostprep_has_a_jail(tree, tmp_path):
    root, _ = tree
    files = f2b.Files(root)
    assert f2b.follow_backend(files, "nft") is False            # no jail: nothing written
    assert not files.action.exists()
    s = f2b.resolve(container(), env(tmp_path, "f.env"), None, None, root)
    f2b.write(s, files, "ipset")
    assert (f2b.follow_backend(files, "nft"), files.action.read_text()) == (True, f2b.action_text("nft"))
    assert f2b.follow_backend(files, "nft") is False            # already the nft action


def test_status_says_when_the_ban_action_is_not_the_backends(tree, tmp_path):
    """After a rolled-back switch the action on disk may be the other backend's: the bans would go
    where no rule looks.  status says so (a problem: exit 1), apply and boot put the right one back."""
    root, _ = tree
    files = f2b.Files(root)
    f2b.write(f2b.resolve(container(), env(tmp_path, "f.env"), None, None, root), files, "ipset")

    class Stopped:
        @staticmethod
        def which(name):
            return None
    ok = f2b.collect(Stopped(), files, [container()], {}, "ipset")
    assert (ok["action"], ok["action_wanted"], f2b.problems(ok)) == ("ipset", "ipset", [])
    bad = f2b.collect(Stopped(), files, [container()], {}, "nft")
    assert f2b.problems(bad) == ["fail2ban: action.d/hostprep-ban.conf is the ipset version, this host's backend "
                                 "needs the nft one: its bans are not enforced (run 'hostprep apply')"]
    files.action.write_text(f2b.action_text("nft") + "# edited\n")
    assert f2b.collect(Stopped(), files, [container()], {}, "nft")["action"] is None
