"""fail2ban for the proxy's brute-force blocks (``container up --fail2ban``, issue 14), with real packets.

A real fail2ban (the distribution's package) runs inside the sandbox host namespace,
with its configuration copied into the test's HOSTPREP_ROOT (socket, pid file,
database and log under that root too; Debian's defaults-debian.conf, which enables the
sshd jail, left out).  The proxy user is ``nobody`` (uid 65534, listed with a home in
a temporary directory in ROOT/etc/passwd, the seam hostprep/fail2ban.py documents);
its working directory holds the proxy's logs.  A line appended to blocking.log must
make a probe from that address to the container's port go unanswered within a few
seconds while another source still gets its answer (RST: nobody listens), and the
address must get in again after the short test bantime.  Every test runs on both
iptables variants (ipsets) and on the native nft backend (``NATIVE``: nft sets ``flags
timeout`` in table inet hostprep_ban, fail2ban's nft action); the sets are read the way
each backend keeps them (``ipset save`` / ``nft -j list table inet hostprep_ban``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hostprep.model import SET_PREFIX
from hostprep.observed import parse_nft_json
from hostprep.runner import Runner
from hostprep.sandbox import HOST_EXT4, HOST_EXT6, INET_EXTRA4, INET_EXTRA6, Sandbox

NATIVE = True
LEGACY = False     # conftest.variant: iptables-nft stands for both iptables variants here
LEGACY_WHY = ("the iptables variant changes only the tool hostprep runs in this module; its rules, "
              "reading and boot files are proven on iptables-legacy by the hardening, containers, "
              "persistence, boot, switch, synproxy and selftest modules")

SRC_A, SRC_B = INET_EXTRA4
SRC6_A, SRC6_B = INET_EXTRA6
QUIET, ANSWER = 0.5, 1.0
UID = 65534

if shutil.which("fail2ban-client") is None:
    pytest.skip("fail2ban is not installed (sh scripts/install.sh --test installs it)", allow_module_level=True)


def tcp(dst: str, dport: int, timeout: float, src: str) -> dict:
    return {"kind": "tcp", "dst": dst, "dport": dport, "timeout": timeout, "src": src}


class Proxy:
    """The proxy user's tree and the sandbox's fail2ban."""

    def __init__(self, host, home: Path) -> None:
        self.host, self.home = host, home
        self.conf = host.root / "etc/fail2ban"

    def wd(self, name: str) -> Path:
        return self.home / "reverse_proxy" / name

    def make_wd(self, name: str) -> Path:
        logs = self.wd(name) / "logs"
        logs.mkdir(parents=True)
        for f in ("access.log", "error.log", "blocking.log", "openresty_launcher.log"):
            (logs / f).write_text("")
        for p in [self.home, self.home / "reverse_proxy", self.wd(name), logs, *logs.iterdir()]:
            os.chown(p, UID, UID)
        return self.wd(name)

    def env(self, name: str, **values) -> Path:
        path = self.home / f"{name}.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        os.chown(path, UID, UID)
        return path

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.host.run(self.host.box.host, ["fail2ban-client", "-c", str(self.conf), *args], check=check)

    def start(self) -> None:
        self.client("-x", "start")
        for _ in range(50):
            if self.client("ping", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("fail2ban did not start: " + (self.host.root / "var/log/fail2ban.log").read_text())

    def stop(self) -> None:
        self.client("stop", check=False)
        pid = self.host.root / "run/fail2ban/fail2ban.pid"
        if pid.is_file():
            try:
                os.kill(int(pid.read_text().strip()), 9)     # only the server this test started
            except (OSError, ValueError):
                pass

    def block(self, name: str, ip: str) -> None:
        """What the proxy's Lua writes when it blocks ``ip`` (the guide's line)."""
        with open(self.wd(name) / "logs/blocking.log", "a") as fh:
            fh.write(f"{ip} will be blocked for 30 minutes for exceeding retry limit.\n")

    def answered(self, dst: str, port: int, src: str, timeout: float = QUIET) -> bool:
        return self.host.probe1(self.host.box.inet, **tcp(dst, port, timeout, src))["answered"]

    def until(self, want: bool, dst: str, port: int, src: str, seconds: float = 10.0) -> float:
        """Seconds until a probe from ``src`` is answered (want) / unanswered (not want)."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if self.answered(dst, port, src, ANSWER if want else QUIET) == want:
                return time.monotonic() - start
            time.sleep(0.3)
        raise AssertionError(f"{src} -> {dst}:{port} still {'un' if want else ''}answered after {seconds} s; "
                             + self.client("status", check=False).stdout
                             + (self.host.root / "var/log/fail2ban.log").read_text()[-3000:])


def ban_table(host) -> dict[str, frozenset[str]] | None:
    """The native backend's ban sets and their members (None: no table inet hostprep_ban)."""
    res = host.run(host.box.host, ["nft", "-j", "list", "table", "inet", "hostprep_ban"], check=False)
    if res.returncode != 0:
        return None
    return parse_nft_json(res.stdout, (4, 6), SET_PREFIX).sets


def members(host, name: str) -> list[str]:
    if host.native:
        return sorted(m.split("/")[0] for m in (ban_table(host) or {}).get(name, ()))
    res = host.run(host.box.host, ["ipset", "save", name], check=False)
    return sorted(ln.split()[2] for ln in res.stdout.splitlines() if ln.startswith("add "))


def hostprep_sets(host) -> list[str]:
    """hostprep's sets where the backend keeps the bans (ipsets; the native ban table)."""
    if host.native:
        return sorted(ban_table(host) or {})
    res = host.run(host.box.host, ["ipset", "list", "-n"])
    return sorted(n for n in res.stdout.split() if n.startswith("hostprep-"))


FOREIGN_JAIL = "[foreign-ssh]\nenabled = false\nfilter = sshd\nlogpath = /nonexistent/auth.log\n"


@pytest.fixture
def proxy(host):
    conf = host.root / "etc/fail2ban"
    shutil.copytree("/etc/fail2ban", conf, ignore=shutil.ignore_patterns("defaults-debian.conf"))
    for d in ("run/fail2ban", "var/lib/fail2ban", "var/log"):
        (host.root / d).mkdir(parents=True, exist_ok=True)
    (conf / "fail2ban.d/sandbox.local").write_text(
        "[Definition]\n"
        f"logtarget = {host.root}/var/log/fail2ban.log\n"
        f"socket = {host.root}/run/fail2ban/fail2ban.sock\n"
        f"pidfile = {host.root}/run/fail2ban/fail2ban.pid\n"
        f"dbfile = {host.root}/var/lib/fail2ban/fail2ban.sqlite3\n")
    (conf / "jail.d/foreign.local").write_text(FOREIGN_JAIL)
    base = Path(tempfile.mkdtemp(prefix="hpf2b-", dir="/tmp"))
    os.chmod(base, 0o755)       # logrotate works there as the proxy user ('su'): it must get in
    home = base / "home"
    home.mkdir()
    (host.root / "etc").mkdir(parents=True, exist_ok=True)
    (host.root / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\nnobody:x:{UID}:{UID}::{home}:/bin/sh\n")
    (host.root / "etc/group").write_text(f"root:x:0:\nnogroup:x:{UID}:\n")
    p = Proxy(host, home)
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(base, ignore_errors=True)


def up_f2b(host, proxy, name: str, *extra: str, installer: Path | None = None, **values) -> None:
    env = proxy.env(name, TEMPLATE_TYPE="finesse", **values)
    args = ["container", "up", name, "--env", str(env), "--fail2ban", *extra]
    if installer is not None:
        args += ["--installer", str(installer)]
    res = host.hostprep(*args)
    assert f"fail2ban: {name}: " in res.stdout, res.stdout + res.stderr


def test_ban_from_blocking_log_v4_and_v6_then_expires(host, proxy):
    host.apply()
    proxy.make_wd("finesse")
    proxy.make_wd("fin6")
    proxy.start()
    # 8 s: long enough for the checks below under load (each probe is a process start), short
    # enough to watch the bans end
    up_f2b(host, proxy, "finesse", NGX_CLIENT_BLOCK_DURATION=8)
    inst6 = proxy.env("fin6-installer", PROXY_BINDING_IP=HOST_EXT6)
    up_f2b(host, proxy, "fin6", installer=inst6, NGX_CLIENT_BLOCK_DURATION=8)
    # the configuration test passes with hostprep's jail, filter and action in place
    assert proxy.client("-t").returncode == 0
    status = proxy.client("status").stdout
    assert "hostprep-finesse" in status and "hostprep-fin6" in status
    # before: both sources are answered (RST: nobody listens on 8445)
    assert (proxy.answered(HOST_EXT4, 8445, SRC_A, ANSWER), proxy.answered(HOST_EXT4, 8445, SRC_B, ANSWER)) == \
        (True, True)
    proxy.block("finesse", SRC_A)
    proxy.until(False, HOST_EXT4, 8445, SRC_A, seconds=10)     # "within a few seconds" (issue 14)
    assert proxy.answered(HOST_EXT4, 8445, SRC_B, ANSWER) is True
    ban4 = [n for n in hostprep_sets(host) if n.endswith("-bn4")]
    assert len(ban4) == 1 and members(host, ban4[0]) == [SRC_A]
    report = json.loads(host.hostprep("status", "--json", check=False).stdout)["fail2ban"]
    assert report["running"] is True and sorted(report["jails"]) == ["hostprep-fin6", "hostprep-finesse"]
    row = next(r for r in report["containers"] if r["name"] == "finesse")
    assert (row["bans"], row["newest"], row["jail"], row["jail_loaded"]) == (1, SRC_A, True, True)
    # the same for an IPv6 client of the IPv6 container
    assert proxy.answered(HOST_EXT6, 8445, SRC6_A, ANSWER) is True
    proxy.block("fin6", SRC6_A)
    proxy.until(False, HOST_EXT6, 8445, SRC6_A, seconds=6)
    assert proxy.answered(HOST_EXT6, 8445, SRC6_B, ANSWER) is True
    ban6 = [n for n in hostprep_sets(host) if n.endswith("-bn6")]
    assert len(ban6) == 1 and members(host, ban6[0]) == [SRC6_A]
    # after the bantime (8 s) both get in again
    proxy.until(True, HOST_EXT4, 8445, SRC_A, seconds=20)
    proxy.until(True, HOST_EXT6, 8445, SRC6_A, seconds=20)
    assert members(host, ban4[0]) == [] and members(host, ban6[0]) == []


def test_bans_survive_apply_reup_and_rotation_flush_removes_everything(host, proxy):
    host.apply()
    proxy.make_wd("finesse")
    foreign = (proxy.conf / "jail.d/foreign.local").read_bytes()
    jail_conf = (proxy.conf / "jail.conf").read_bytes()
    proxy.start()
    up_f2b(host, proxy, "finesse", NGX_CLIENT_BLOCK_DURATION=600)
    proxy.block("finesse", SRC_A)
    proxy.until(False, HOST_EXT4, 8445, SRC_A, seconds=4)
    ban = next(n for n in hostprep_sets(host) if n.endswith("-bn4"))
    log = (host.root / "var/log/hostprep/iptables_logs/finesse.log").read_text()
    assert f"# ipset {ban}: ban set (fail2ban's bans; kept across reloads)\n" in log
    # a reload of hostprep's rules (another setting) keeps the ban set and its member
    host.apply("-p", "198.51.100.9")
    assert members(host, ban) == [SRC_A] and proxy.answered(HOST_EXT4, 8445, SRC_A) is False
    # so does a re-up with other limits and bantime (the container's chain reloaded, the jail
    # rewritten, fail2ban reloaded)
    up_f2b(host, proxy, "finesse", NGX_CLIENT_BLOCK_DURATION=900, IPTABLES_HASH_LIMIT_BURST=7)   # narrower: no -y
    assert "bantime  = 900" in (proxy.conf / "jail.d/hostprep-finesse.local").read_text()
    assert members(host, ban) == [SRC_A] and proxy.answered(HOST_EXT4, 8445, SRC_A) is False
    assert proxy.answered(HOST_EXT4, 8445, SRC_B, ANSWER) is True
    # logrotate (copytruncate) with hostprep's file, forced; then fail2ban still reads the log
    lr = host.root / "etc/logrotate.d/hostprep-proxy-finesse"
    res = subprocess.run(["logrotate", "-f", "-s", str(host.root / "logrotate.state"), str(lr)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    logs = proxy.wd("finesse") / "logs"
    assert (logs / "blocking.log").stat().st_size == 0 and (logs / "blocking.log.1").is_file()
    # fail2ban polls once a second and sees the file shrink (size below its position): it reads
    # from the start.  (A rotation and a new line of the old file's size within one poll is seen
    # at fail2ban's first-line check, within 30 s: README.)
    time.sleep(2)
    proxy.block("finesse", SRC_B)
    proxy.until(False, HOST_EXT4, 8445, SRC_B, seconds=6)
    assert members(host, ban) == sorted([SRC_A, SRC_B])
    report = json.loads(host.hostprep("status", "--json", check=False).stdout)["fail2ban"]
    assert [(r["name"], r["bans"], r["newest"]) for r in report["containers"]] == [("finesse", 2, SRC_B)]
    text = host.hostprep("status", check=False).stdout
    assert "fail2ban: running, hostprep jails: hostprep-finesse\n" in text, text
    assert f"  finesse: 2 addresses banned (newest {SRC_B})\n" in text, text
    # flush: no hostprep jail, filter, action, logrotate file or ban set; other files byte-identical
    host.hostprep("flush")
    assert sorted(p.name for p in (proxy.conf / "jail.d").iterdir()) == ["foreign.local"]
    assert not (proxy.conf / "filter.d/hostprep-proxy.conf").exists()
    assert not (proxy.conf / "action.d/hostprep-ban.conf").exists()
    assert not lr.exists()
    assert hostprep_sets(host) == []
    assert (proxy.conf / "jail.d/foreign.local").read_bytes() == foreign
    assert (proxy.conf / "jail.conf").read_bytes() == jail_conf
    assert "hostprep-finesse" not in proxy.client("status").stdout
    journal = (host.root / "var/log/hostprep/journal.log").read_text()
    assert "fail2ban finesse: wrote" in journal and "fail2ban: removed" in journal


def test_down_removes_the_jail_and_its_set_other_container_keeps_its_own(host, proxy):
    host.apply()
    proxy.make_wd("finesse")
    proxy.make_wd("ids")
    proxy.start()
    up_f2b(host, proxy, "finesse")
    env = proxy.env("ids", TEMPLATE_TYPE="ids")
    host.hostprep("container", "up", "ids", "--env", str(env), "--fail2ban")
    assert len([n for n in hostprep_sets(host) if n.endswith("-bn4")]) == 2
    host.hostprep("container", "down", "ids")
    assert sorted(p.name for p in (proxy.conf / "jail.d").iterdir()) == ["foreign.local", "hostprep-finesse.local"]
    assert not (host.root / "etc/logrotate.d/hostprep-proxy-ids").exists()
    assert len([n for n in hostprep_sets(host) if n.endswith("-bn4")]) == 1
    status = proxy.client("status").stdout
    assert "hostprep-finesse" in status and "hostprep-ids" not in status
    # a plain re-up remembers --fail2ban
    host.hostprep("container", "up", "finesse")
    assert (proxy.conf / "jail.d/hostprep-finesse.local").is_file()
    # --no-fail2ban drops it (lifting its bans widens access: refused without -y and a terminal) ...
    res = host.hostprep("container", "up", "finesse", "--no-fail2ban", check=False)
    assert res.returncode == 2 and "WIDENS ACCESS: finesse: fail2ban off" in res.stderr, res.stderr
    assert (proxy.conf / "jail.d/hostprep-finesse.local").is_file()
    # ... with -y: jail and set gone, ports still open
    res = host.hostprep("container", "up", "finesse", "--no-fail2ban", "-y")
    assert "fail2ban: finesse: removed" in res.stdout
    assert not (proxy.conf / "jail.d/hostprep-finesse.local").exists()
    assert [n for n in hostprep_sets(host) if n.endswith("-bn4")] == []
    assert proxy.answered(HOST_EXT4, 8445, SRC_A, ANSWER) is True


def ban_by_hand(host, name: str, ip: str) -> None:
    """An address put into a ban set the way fail2ban's action puts it (fail2ban itself never bans a
    load balancer: ignoreip; this is the firewall's own guard)."""
    if host.native:
        host.run(host.box.host, ["nft", f"add element inet hostprep_ban {name} {{ {ip} timeout 600s }}"])
    else:
        host.run(host.box.host, ["ipset", "-exist", "add", name, ip, "timeout", "600"])


def test_bans_survive_other_containers_down_up_and_a_rollback_lb_never_dropped(host, proxy):
    host.apply()
    proxy.make_wd("finesse")
    proxy.make_wd("ids")
    proxy.start()
    # SRC_B is finesse's load balancer: never dropped by the ban rule, even when it is in the set
    core = proxy.env("core", NGX_LOAD_BALANCER_IPS=SRC_B)
    up_f2b(host, proxy, "finesse", "--core", str(core), NGX_CLIENT_BLOCK_DURATION=600)
    assert f"ignoreip = 127.0.0.1/8 ::1 {SRC_B}/32\n" in (proxy.conf / "jail.d/hostprep-finesse.local").read_text()
    proxy.block("finesse", SRC_A)
    proxy.until(False, HOST_EXT4, 8445, SRC_A)
    ban = next(n for n in hostprep_sets(host) if n.endswith("-bn4"))
    ban_by_hand(host, ban, SRC_B)
    assert members(host, ban) == sorted([SRC_A, SRC_B])
    assert (proxy.answered(HOST_EXT4, 8445, SRC_A), proxy.answered(HOST_EXT4, 8445, SRC_B, ANSWER)) == (False, True)
    st = host.hostprep("status", "--json", check=False)
    report = json.loads(st.stdout)
    assert (st.returncode, report["problems"]) == (0, []), st.stdout
    assert [(r["name"], r["bans"], r["set_present"]) for r in report["fail2ban"]["containers"]] == [("finesse", 2, True)]
    # another container with fail2ban comes and goes: finesse's bans stay, and are enforced
    env = proxy.env("ids", TEMPLATE_TYPE="ids")
    host.hostprep("container", "up", "ids", "--env", str(env), "--fail2ban")
    assert len([n for n in hostprep_sets(host) if n.endswith("-bn4")]) == 2
    assert members(host, ban) == sorted([SRC_A, SRC_B]) and proxy.answered(HOST_EXT4, 8445, SRC_A) is False
    host.hostprep("container", "down", "ids")
    assert [n for n in hostprep_sets(host) if n.endswith("-bn4")] == [ban]
    assert members(host, ban) == sorted([SRC_A, SRC_B]) and proxy.answered(HOST_EXT4, 8445, SRC_A) is False
    # a change rolled back (another -p, then 'hostprep rollback'): the bans are not part of it
    host.apply("-p", "198.51.100.9", "--confirm", "300")
    res = host.hostprep("rollback")
    assert "rolled back" in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    assert members(host, ban) == sorted([SRC_A, SRC_B])
    assert (proxy.answered(HOST_EXT4, 8445, SRC_A), proxy.answered(HOST_EXT4, 8445, SRC_B, ANSWER)) == (False, True)
    st = host.hostprep("status", check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "  finesse: 2 addresses banned" in st.stdout, st.stdout


@pytest.mark.parametrize("wd, words", [
    ("reverse_proxy/finesse", "is not an absolute path"),
    ("{home}/reverse proxy/finesse", "a character a fail2ban or logrotate file cannot carry"),
    ("{home}/reverse_proxy/fin%(x)s", "a character a fail2ban or logrotate file cannot carry"),
    ("/var/log", "is outside nobody's tree"),
    ("{home}/../../etc", "a character a fail2ban or logrotate file cannot carry"),
])
def test_bad_working_dir_one_line_nothing_written(host, proxy, wd, words, variant):
    if variant == "legacy":
        pytest.skip("input checks before any rule: one variant is enough")
    host.apply()
    proxy.make_wd("finesse")
    inst = proxy.env("installer", HOST_WORKING_DIR=wd.format(home=proxy.home))
    env = proxy.env("finesse", TEMPLATE_TYPE="finesse")
    def written() -> list[tuple[str, bytes]]:
        """What up could write: fail2ban's and logrotate's files, the container records."""
        return sorted((str(p), p.read_bytes()) for d in ("etc/fail2ban", "etc/logrotate.d", "var/lib/hostprep/containers")
                      for p in (host.root / d).rglob("*") if p.is_file())

    before = written()
    res = host.hostprep("container", "up", "finesse", "--env", str(env), "--installer", str(inst), "--fail2ban",
                        check=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "HOST_WORKING_DIR" in lines[0] and words in lines[0], \
        res.stderr
    assert written() == before
    assert hostprep_sets(host) == []


def test_fail2ban_missing_is_refused_naming_the_package(host, proxy, variant):
    if variant == "legacy":
        pytest.skip("input checks before any rule: one variant is enough")
    host.apply()
    proxy.make_wd("finesse")
    shutil.rmtree(proxy.conf)
    env = proxy.env("finesse", TEMPLATE_TYPE="finesse")
    res = host.hostprep("container", "up", "finesse", "--env", str(env), "--fail2ban", check=False)
    assert res.returncode != 0 and "fail2ban is not installed" in res.stderr
    assert "fail2ban-server" in res.stderr and "fail2ban on Debian" in res.stderr
    assert not (host.root / "var/lib/hostprep/containers/finesse.json").exists()


_boxes = itertools.count()


@pytest.fixture
def rebooted():
    """A second sandbox (same addresses, nothing loaded): the host after a reboot."""
    made: list[Sandbox] = []

    def make() -> Sandbox:
        box = Sandbox(f"hpf{os.getpid()}x{next(_boxes)}")
        box.create(Runner())
        made.append(box)
        return box
    try:
        yield make
    finally:
        for box in made:
            box.destroy(Runner())


@pytest.mark.parametrize("first", ["hostprep", "fail2ban"])
def test_at_boot_fail2ban_restores_its_ban_into_hostprep_set_in_either_order(host, proxy, rebooted, first):
    host.apply()
    proxy.make_wd("finesse")
    proxy.start()
    up_f2b(host, proxy, "finesse", NGX_CLIENT_BLOCK_DURATION=600)
    proxy.block("finesse", SRC_A)
    proxy.until(False, HOST_EXT4, 8445, SRC_A)
    proxy.stop()                                  # the server goes down with the host; its database stays
    # the "rebooted" host: nothing loaded, wide open
    hb = dataclasses.replace(host, box=rebooted())
    assert hostprep_sets(hb) == []
    again = Proxy(hb, proxy.home)
    try:
        if first == "fail2ban":
            # fail2ban restores the ban: the action's actionstart creates the set (same parameters)
            again.start()
            for _ in range(50):
                if hostprep_sets(hb):
                    break
                time.sleep(0.2)
        res = hb.hostprep("boot")
        assert res.stdout.splitlines()[-1].endswith("(1 container)"), res.stdout + res.stderr
        ban = [n for n in hostprep_sets(hb) if n.endswith("-bn4")]
        assert len(ban) == 1
        if first == "hostprep":
            assert members(hb, ban[0]) == []     # created empty by boot, then fail2ban fills it
            again.start()
        again.until(False, HOST_EXT4, 8445, SRC_A)
        assert members(hb, ban[0]) == [SRC_A]
        assert again.answered(HOST_EXT4, 8445, SRC_B, ANSWER) is True
        st = hb.hostprep("status", check=False)
        assert st.returncode == 0, st.stdout + st.stderr
    finally:
        again.stop()


LEFTOVER_BAN_TABLE = """table inet hostprep_ban {
	set hostprep-leftover-bn4 {
		type ipv4_addr
		flags timeout
	}
	chain input {
		type filter hook input priority -10; policy accept;
		ip saddr @hostprep-leftover-bn4 drop
	}
}
"""


def test_the_ban_table_goes_with_a_switch_to_iptables_and_with_flush_on_iptables(host, proxy):
    """Review finding 3.  Native: apply --backend iptables-nft removes inet hostprep_ban with
    inet hostprep (after the iptables rules are in and read back) and fail2ban's action becomes the
    ipset one.  iptables: a ban table left behind (by a switch before the fix) is named by status
    and removed by flush."""
    host.apply()
    if host.native:
        proxy.make_wd("finesse")
        proxy.start()
        up_f2b(host, proxy, "finesse", NGX_CLIENT_BLOCK_DURATION=600)
        proxy.block("finesse", SRC_A)
        proxy.until(False, HOST_EXT4, 8445, SRC_A, seconds=4)
        assert ban_table(host) is not None
        res = host.apply("--backend", "iptables-nft")
        assert "nft: table inet hostprep_ban" in " ".join(res.stdout.split()), res.stdout
        assert ban_table(host) is None
        assert "ipset" in (proxy.conf / "action.d/hostprep-ban.conf").read_text()
        # the ban is not carried over (README "Choosing a backend"): the new ipset is empty, SRC_A answered
        saved = host.run(host.box.host, ["ipset", "save"]).stdout.splitlines()
        bans = [ln.split()[1] for ln in saved if ln.startswith("create ") and ln.split()[1].endswith("-bn4")]
        assert len(bans) == 1 and not [ln for ln in saved if ln.startswith(f"add {bans[0]} ")], saved
        assert proxy.answered(HOST_EXT4, 8445, SRC_A, ANSWER) is True
        host.hostprep("flush", env={"HOSTPREP_BACKEND": "iptables-nft"})
    else:
        host.run(host.box.host, ["nft", "-f", "-"], input=LEFTOVER_BAN_TABLE)
        assert ban_table(host) is not None
        problems = json.loads(host.hostprep("status", "--json", check=False).stdout)["problems"]
        assert any("nft: table inet hostprep_ban" in p for p in problems), problems
        host.hostprep("flush")
        assert ban_table(host) is None
