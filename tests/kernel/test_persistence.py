"""Boot persistence proven in namespaces: the installed units' commands, run as systemd would run them.

``hostprep apply`` installs etc/systemd/system/hostprep.service, hostprep-nic@.service
and the iptables-services drop-ins under the test's HOSTPREP_ROOT.  These tests
do not trust the Python entry points: they read the installed unit files, take
their ``Environment=`` lines and the ``ExecStart=`` (``ExecStartPost=``) command
line, and run exactly that command with exactly that environment (``env -i``,
systemd's default PATH, working directory /; PYTHONPATH only names this source
tree, see SOURCE) inside a network namespace:

1. a reboot: a FRESH sandbox (its own namespaces, the same addresses, no rule
   loaded) gets the boot unit's command and must end with the very kernel state
   of the sandbox where apply and ``container up`` ran (hostprep's chains and
   jumps of both families, ipsets, nft table), ``status`` 0, and real packets;
2. a late NIC: the boot unit runs where eth1 does not exist yet; the rules match
   it by name, so when eth1 appears it is closed from its first packet; the
   hostprep-nic@ unit then adds the fragment table on it;
3. ``systemctl restart iptables`` of iptables-services (iptables-restore of
   /etc/sysconfig/iptables WITHOUT --noflush deletes every chain of the filter
   table): the drop-in's ExecStartPost puts hostprep's chains back, and keeps
   the sysconfig rules;
4. a change still waiting for ``hostprep confirm`` at boot is rolled back;
5. ``flush --persistent`` removes exactly the persistence files;
6. the fail-safe: the ExecStartPre= lines alone (hostprep boot cannot run) close
   the external NIC but for established traffic and neighbour discovery, status
   says the fail-safe is live, and hostprep boot replaces it.

Namespaces beyond the ``host`` fixture's sandbox are made by the ``spare``
fixture and deleted by name at teardown, even when the test fails; a rollback
watcher a test made hostprep start is killed by its PID at teardown.
Every test runs on both firewall variants (nft and legacy) through ``host``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bgproc import watcher_alive

from hostprep.runner import Runner
from hostprep.sandbox import HOST_EXT4, HOST_EXT6, INET4, INET6, INET_EXTRA4, Sandbox
from tests.helpers import ANSWER, QUIET, env_file, tcp

SRC_A, SRC_B = INET_EXTRA4          # 203.0.113.7 (the -p host), 203.0.113.8
# What systemd (252, Debian and RHEL 9) gives a system service as PATH; nothing else is inherited.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_DIR = "etc/systemd/system"
BOOT = [sys.executable, "-m", "hostprep", "boot"]
FRAG_RULE = "hostprep ddos: ipv4 fragment"
_counter = itertools.count()

# /etc/sysconfig/iptables and ip6tables as iptables-services ships them on RHEL 9.
SYSCONFIG = {4: """# sample configuration for iptables service
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p icmp -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT
-A INPUT -j REJECT --reject-with icmp-host-prohibited
-A FORWARD -j REJECT --reject-with icmp-host-prohibited
COMMIT
""", 6: """# sample configuration for ip6tables service
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT
-A INPUT -d fe80::/64 -p udp -m udp --dport 546 -m state --state NEW -j ACCEPT
-A INPUT -j REJECT --reject-with icmp6-adm-prohibited
-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
"""}


# --------------------------------------------------------------------------- unit files

NATIVE = True      # runs on the native nft backend too (conftest.variant)


@dataclasses.dataclass(frozen=True)
class UnitCommand:
    """One Exec*= line of an installed unit, as systemd would run it."""

    raw: str                  # the value as written (prefixes included)
    argv: list[str]
    env: dict[str, str]       # the unit's Environment= assignments, in order


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment of a unit file or drop-in, in order."""
    out, section = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep == "=", f"{path}: not an assignment: {line!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def unit_command(path: Path, key: str, instance: str | None = None) -> UnitCommand:
    """The single ``key=`` command of ``path`` with the file's environment (%i/%I expanded)."""
    cmds = unit_commands(path, key, instance)
    assert len(cmds) == 1, f"{path}: {key}= lines: {[c.raw for c in cmds]}"
    return cmds[0]


def unit_commands(path: Path, key: str, instance: str | None = None) -> list[UnitCommand]:
    """Every ``key=`` command of ``path``, in the order systemd runs them, with the file's environment."""
    entries = unit_entries(path)
    values = [v for s, k, v in entries if s == "Service" and k == key]

    def expand(text: str) -> str:
        if instance is None:
            assert "%" not in text, text
            return text
        return text.replace("%%", "\0").replace("%i", instance).replace("%I", instance).replace("\0", "%")

    env: dict[str, str] = {}
    for s, k, v in entries:
        if s == "Service" and k == "Environment":
            for assignment in shlex.split(expand(v)):
                name, sep, value = assignment.partition("=")
                assert sep == "=", assignment
                env[name] = value
    return [UnitCommand(expand(v), shlex.split(expand(v).lstrip("-@:+!")), env) for v in values]


# The unit's interpreter is the venv's, which may hold an installed copy of another hostprep
# (the venv is shared between checkouts): the code under test is this source tree.
SOURCE = str(Path(__file__).resolve().parents[2])


def run_as_systemd(ns: str, cmd: UnitCommand, timeout: float = 120) -> subprocess.CompletedProcess:
    """``cmd`` in namespace ``ns`` with only the unit's environment, from /, as systemd starts it
    (plus PYTHONPATH naming this source tree, see SOURCE)."""
    env = [f"PATH={SERVICE_PATH}", f"PYTHONPATH={SOURCE}", *[f"{k}={v}" for k, v in cmd.env.items()]]
    return subprocess.run(["ip", "netns", "exec", ns, "env", "-i", *env, *cmd.argv], capture_output=True,
                          text=True, timeout=timeout, cwd="/")


def boot_unit(host) -> UnitCommand:
    return unit_command(host.root / UNIT_DIR / "hostprep.service", "ExecStart")


def failsafe_lines(host, families=(4, 6)) -> list[str]:
    """The Exec lines that load the fail-safe, as apply writes them ('-': a failure is ignored):
    through /bin/sh, skipped when the jump from INPUT into it is live (two units load it at boot)."""
    from hostprep.persist import failsafe_tool
    out = []
    for fam in families:
        restore = failsafe_tool("nft" if host.native else host.variant, fam)
        out.append(f"-/bin/sh -c '{restore.removesuffix('-restore')} -w -C INPUT -i eth1 -j HOSTPREP-FAILSAFE "
                   f"2>/dev/null || exec {restore} --noflush {host.root}/etc/hostprep/failsafe.v{fam}.rules'")
    return out


def start_unit(ns: str, path: Path, instance: str | None = None) -> subprocess.CompletedProcess:
    """``systemctl start``: every ExecStartPre= in order (a failure stops the start unless the line has '-'),
    then ExecStart=; returns the result of ExecStart."""
    for cmd in unit_commands(path, "ExecStartPre", instance):
        res = run_as_systemd(ns, cmd)
        assert res.returncode == 0 or cmd.raw.startswith("-"), res.stdout + res.stderr
    return run_as_systemd(ns, unit_command(path, "ExecStart", instance))


def run_all(ns: str, cmds: list[UnitCommand]) -> list[subprocess.CompletedProcess]:
    """Several Exec lines of one kind (ExecStartPost=...), in order, as systemd runs them."""
    out = []
    for cmd in cmds:
        out.append(run_as_systemd(ns, cmd))
        assert out[-1].returncode == 0 or cmd.raw.startswith("-"), out[-1].stdout + out[-1].stderr
    return out


def unit_env(host) -> dict[str, str]:
    """What apply wrote into the units: the environment of the hostprep that ran apply."""
    return {"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend,
            "HOSTPREP_SELINUXFS": str(host.selinuxfs), "HOSTPREP_LOCK_TIMEOUT": "30"}


def status_as_systemd(ns: str, host) -> subprocess.CompletedProcess:
    """``hostprep status`` with the boot unit's environment (what an admin sees after the boot)."""
    unit = boot_unit(host)
    return run_as_systemd(ns, UnitCommand("", [sys.executable, "-m", "hostprep", "status"], unit.env))


# --------------------------------------------------------------------------- kernel state

def tool(variant: str, family: int, kind: str) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{'nft' if variant == 'native' else variant}-{kind}"


def save(host, ns: str, family: int) -> list[str]:
    """iptables-save -t filter of ``ns`` without counters, comments or policy counters."""
    text = host.run(ns, [tool(host.variant, family, "save"), "-t", "filter"]).stdout
    text = re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", text, flags=re.M)
    return [ln for ln in text.splitlines() if not ln.startswith("#")]


def hostprep_lines(lines: list[str]) -> list[str]:
    """hostprep's chains (declarations and rules) and the jumps into them, in iptables-save order."""
    return [ln for ln in lines if ln.startswith(":HOSTPREP-") or (ln.startswith("-A ") and "HOSTPREP-" in ln)]


def foreign_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln not in hostprep_lines(lines)]


def nft_table(host, ns: str) -> str | None:
    """``nft list table netdev hostprep`` of ``ns`` without counters; None when there is no such table
    (the native backend: both of its tables, conftest.Host.nft_state)."""
    if host.native:
        return host.nft_state(ns)
    res = host.run(ns, ["nft", "list", "table", "netdev", "hostprep"], check=False)
    if res.returncode != 0:
        return None
    return re.sub(r"counter packets \d+ bytes \d+", "counter", res.stdout)


def ipsets(host, ns: str) -> dict[str, list[str]]:
    """``ipset save`` of ``ns``: set name -> its lines, sorted (members print in hash order), without
    the random ``initval`` of the hash (a property of one kernel object, not of the set)."""
    out: dict[str, list[str]] = {}
    for ln in host.run(ns, ["ipset", "save"]).stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 2:
            out.setdefault(parts[1], []).append(re.sub(r" initval 0x[0-9a-f]+", "", ln))
    return {k: sorted(v) for k, v in out.items()}


def kernel_state(host, ns: str) -> dict:
    """hostprep's part of the kernel of ``ns``: chains and jumps of both families, ipsets, nft table."""
    return {"v4": hostprep_lines(save(host, ns, 4)), "v6": hostprep_lines(save(host, ns, 6)),
            "ipset": ipsets(host, ns), "nft": nft_table(host, ns)}


EMPTY = {"v4": [], "v6": [], "ipset": {}, "nft": None}


def outcomes(results: list[dict]) -> list[str | None]:
    return [r["reply"] if r["answered"] else None for r in results]


def journal(host) -> list[list[str]]:
    p = host.root / "var/log/hostprep/journal.log"
    return [ln.split("\t") for ln in p.read_text().splitlines()] if p.is_file() else []


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------------- extra namespaces

class Spare:
    """Namespaces a test makes besides the ``host`` fixture's sandbox, and watchers to stop."""

    def __init__(self) -> None:
        self.boxes: list[Sandbox] = []
        self.watchers: list[tuple[int, str]] = []
        self.runner = Runner()

    def _name(self) -> str:
        return f"hpp{os.getpid()}x{next(_counter)}"

    def sandbox(self) -> Sandbox:
        """A second full sandbox (same addresses as the first), nothing loaded."""
        box = Sandbox(self._name())
        box.create(self.runner)           # deletes what it made if it fails half way
        self.boxes.append(box)
        return box

    def bare(self) -> Sandbox:
        """Only the host namespace (lo up), no NIC at all; ``box.inet`` is made later by the test."""
        box = Sandbox(self._name())
        assert box.exists(self.runner) == []
        self.boxes.append(box)
        self.runner.run(["ip", "netns", "add", box.host], mutates=True)
        self.runner.run(["ip", "-n", box.host, "link", "set", "lo", "up"], mutates=True)
        return box

    def watch(self, p: dict) -> None:
        if p.get("watcher_pid"):
            self.watchers.append((p["watcher_pid"], p["id"]))

    def cleanup(self) -> None:
        for pid, cid in self.watchers:
            if watcher_alive(pid, cid):
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not watcher_alive(pid, cid), 5)
        for box in self.boxes:
            box.destroy(self.runner)      # by name: host, -inet, -admin where they exist


@pytest.fixture
def spare():
    s = Spare()
    try:
        yield s
    finally:
        s.cleanup()


def apply_with_containers(host, tmp_path: Path) -> None:
    """-p SRC_A and two containers (each with its exempt ipset)."""
    host.apply("-p", SRC_A)
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS=SRC_B)
    fin = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse", IPTABLES_CONNECTION_LIMIT_ABOVE=1000)
    ids = env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids")
    host.hostprep("container", "up", "fin", "--env", str(fin), "--core", str(core))
    host.hostprep("container", "up", "ids", "--env", str(ids))


# --------------------------------------------------------------------------- 1. reboot

def test_boot_unit_rebuilds_the_same_state_in_a_fresh_sandbox(host, tmp_path, spare):
    apply_with_containers(host, tmp_path)
    a = kernel_state(host, host.box.host)
    # fin's and ids' exempt sets (ipsets, or the native table's interval sets)
    assert (a["nft"].count("\nset hostprep-") if host.native else len(a["ipset"])) == 2
    assert a["nft"] is not None and (host.native or (a["v4"] != [] and a["v6"] != []))
    unit = boot_unit(host)
    assert (unit.argv, unit.env) == (BOOT, unit_env(host))

    # The "rebooted" host: a second sandbox, same addresses, nothing loaded; it is wide open.
    b = spare.sandbox()
    hb = dataclasses.replace(host, box=b)
    assert kernel_state(hb, b.host) == EMPTY
    assert outcomes(hb.probe(b.inet, [tcp(HOST_EXT4, 8446, ANSWER), tcp(HOST_EXT6, 8446, ANSWER)])) == ["RA", "RA"]

    # systemctl start hostprep: the fail-safe first, then hostprep boot, which replaces it
    res = start_unit(b.host, host.root / UNIT_DIR / "hostprep.service")
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.splitlines()[-1]
    assert (last.startswith("hostprep boot: hardening on eth1: "), last.endswith(" (2 containers)")) \
        == (True, True), res.stdout
    assert kernel_state(hb, b.host) == a
    st = status_as_systemd(b.host, host)
    assert (st.returncode, st.stdout.splitlines()[-1]) == (0, "everything desired is live"), st.stdout + st.stderr

    # Real packets in B: the closed port and SSH are dropped, the container port is open, -p pings.
    deny = hb.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")
    within = hb.counter(4, "HOSTPREP-C-fin", '"hostprep containers: fin within rate"')
    got = hb.probe(b.inet, [tcp(HOST_EXT4, 8446), tcp(HOST_EXT4, 22), tcp(HOST_EXT6, 8446),
                            tcp(HOST_EXT4, 8445, ANSWER),
                            {"kind": "icmp", "dst": HOST_EXT4, "src": SRC_A, "timeout": ANSWER},
                            {"kind": "icmp", "dst": HOST_EXT4, "src": INET4, "timeout": QUIET}])
    assert outcomes(got) == [None, None, None, "RA", "icmp 0/0", None]
    assert hb.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny") - deny == 1
    assert hb.counter(4, "HOSTPREP-C-fin", '"hostprep containers: fin within rate"') - within == 1


# --------------------------------------------------------------------------- 2. late NIC

def test_late_nic_closed_from_its_first_packet_then_fragment_table(host, spare):
    host.apply("-p", SRC_A)
    a = kernel_state(host, host.box.host)
    assert a["nft"] is not None and '"eth1"' in a["nft"]

    c = spare.bare()
    hc = dataclasses.replace(host, box=c)
    eth1_mac = host.run(host.box.host, ["cat", "/sys/class/net/eth1/address"]).stdout.strip()
    res = start_unit(c.host, host.root / UNIT_DIR / "hostprep.service")
    # No udev runs here, so "after udev settled" is now: the missing NIC fails the boot loudly
    # (exit 1), and its rules are loaded all the same (the fail-safe is replaced by them).
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == (
        "hostprep boot: external NIC eth1 is not present yet: its rules are loaded (they match it by name); "
        "the fragment table follows when it appears (hostprep-nic@eth1)")
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("hostprep boot: FAILED: ")] == [
        f"hostprep boot: FAILED: external NIC eth1 is not present (no device has its MAC {eth1_mac}); bring the "
        "NIC back under its name (see 'ip -br link'), or run 'hostprep apply -i <external NIC>'"]
    # no fragment table yet (the native backend's inet table is in: it matches the NIC by name)
    assert kernel_state(hc, c.host) == (dict(a, nft=a["nft"][a["nft"].index("table inet hostprep"):])
                                        if host.native else dict(a, nft=None))

    # eth1 appears (a veth into the peer namespace, the sandbox's addresses); nothing of hostprep runs.
    ip = Runner()
    ip.run(["ip", "netns", "add", c.inet], mutates=True)
    for argv in (["ip", "-n", c.inet, "link", "set", "lo", "up"],
                 ["ip", "link", "add", "eth1", "netns", c.host, "type", "veth", "peer", "name", "eth0",
                  "netns", c.inet],
                 ["ip", "-n", c.host, "addr", "add", f"{HOST_EXT4}/24", "dev", "eth1"],
                 ["ip", "-n", c.host, "addr", "add", f"{HOST_EXT6}/64", "dev", "eth1", "nodad"],
                 ["ip", "-n", c.inet, "addr", "add", f"{INET4}/24", "dev", "eth0"],
                 ["ip", "-n", c.inet, "addr", "add", f"{INET6}/64", "dev", "eth0", "nodad"],
                 ["ip", "-n", c.inet, "addr", "add", f"{SRC_A}/32", "dev", "eth0"],
                 ["ip", "-n", c.host, "link", "set", "eth1", "up"],
                 ["ip", "-n", c.inet, "link", "set", "eth0", "up"],
                 ["ip", "-n", c.host, "route", "add", "default", "via", INET4]):
        ip.run(argv, mutates=True)
    deny = lambda: hc.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny")  # noqa: E731
    ssh = lambda: hc.counter(4, "HOSTPREP-SSH", "hostprep ssh: no ssh in")  # noqa: E731
    deny6 = lambda: hc.counter(6, "HOSTPREP-DENY")  # noqa: E731
    before = (deny(), ssh(), deny6())
    got = hc.probe(c.inet, [tcp(HOST_EXT4, 8446), tcp(HOST_EXT4, 22), tcp(HOST_EXT6, 8446)])
    assert outcomes(got) == [None, None, None]
    assert (deny() - before[0], ssh() - before[1], deny6() - before[2]) == (1, 1, 1)
    # No fragment table yet: a fragmented ping of the -p host is reassembled and answered.
    frag = hc.probe1(c.inet, kind="frag", dst=HOST_EXT4, src=SRC_A, timeout=ANSWER)
    assert (frag["answered"], frag["fragments"]) == (True, 3)

    # What systemd starts when the device appears: hostprep-nic@eth1.service.
    nic = unit_command(host.root / UNIT_DIR / "hostprep-nic@.service", "ExecStart", instance="eth1")
    assert (nic.argv, nic.env) == (BOOT, unit_env(host))
    res = run_as_systemd(c.host, nic)
    assert res.returncode == 0, res.stdout + res.stderr
    # a new veth has a new random MAC: noted, not an error (a re-created virtual NIC looks the same)
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("hostprep boot: warning: ")] == [
        "hostprep boot: warning: external NIC eth1 has MAC " + hc.run(c.host, ["cat", "/sys/class/net/eth1/address"])
        .stdout.strip() + f", not {eth1_mac} as at apply; both are random addresses (a virtual NIC), so a "
        "re-created device cannot be told from another one; run 'hostprep apply -i eth1' if eth1 is the right NIC"]
    assert kernel_state(hc, c.host) == a                     # the fragment table, on eth1, as in A
    frag = hc.probe1(c.inet, kind="frag", dst=HOST_EXT4, src=SRC_A, timeout=QUIET)
    assert (frag["answered"], frag["fragments"]) == (False, 3)
    assert hc.nft_counter(FRAG_RULE) == 3
    st = status_as_systemd(c.host, host)
    assert (st.returncode, st.stdout.splitlines()[-1]) == (0, "everything desired is live"), st.stdout + st.stderr


# --------------------------------------------------------------------------- 3. iptables-services

def restart_iptables_services(host, tmp_path: Path) -> None:
    """What iptables.init start does: iptables-restore of /etc/sysconfig/ip(6)tables, without --noflush."""
    for fam in (4, 6):
        conf = tmp_path / "sysconfig" / ("iptables" if fam == 4 else "ip6tables")
        conf.parent.mkdir(exist_ok=True)
        conf.write_text(SYSCONFIG[fam])
        host.run(host.box.host, [tool(host.variant, fam, "restore"), str(conf)])


@pytest.mark.parametrize("service", ["iptables", "ip6tables"])
def test_iptables_services_restart_then_dropin_puts_chains_back(host, tmp_path, service):
    apply_with_containers(host, tmp_path)
    before = kernel_state(host, host.box.host)
    restart_iptables_services(host, tmp_path)
    flushed = kernel_state(host, host.box.host)
    assert flushed == dict(before, v4=[], v6=[])             # chains gone; sets and nft table untouched
    sysconfig = {fam: save(host, host.box.host, fam) for fam in (4, 6)}
    if host.native:
        # iptables-services flushes iptables only: the native tables still judge every packet, so
        # SSH on the external NIC stays dropped even before the drop-in runs.
        assert outcomes(host.probe(host.box.inet, [tcp(HOST_EXT4, 22), tcp(HOST_EXT6, 22)])) == [None, None]
        cmds = unit_commands(host.root / UNIT_DIR / f"{service}.service.d/hostprep.conf", "ExecStartPost")
        for res in run_all(host.box.host, cmds):
            assert res.returncode == 0, res.stdout + res.stderr
        assert kernel_state(host, host.box.host) == before       # the fail-safe went again, nft as it was
        for fam in (4, 6):
            assert foreign_lines(save(host, host.box.host, fam)) == foreign_lines(sysconfig[fam])
        return
    # The file alone is in force: SSH on the external NIC is accepted (no sshd: RST).
    assert outcomes(host.probe(host.box.inet, [tcp(HOST_EXT4, 22, ANSWER), tcp(HOST_EXT6, 22, ANSWER)])) \
        == ["RA", "RA"]

    cmds = unit_commands(host.root / UNIT_DIR / f"{service}.service.d/hostprep.conf", "ExecStartPost")
    # the fail-safe of the family the service flushed, then boot; '-': a failure does not fail iptables
    assert [c.raw for c in cmds] == failsafe_lines(host, (4 if service == "iptables" else 6,)) \
        + ["-" + " ".join(BOOT)]
    dropin = cmds[-1]
    assert (dropin.argv, dropin.env) == (BOOT, unit_env(host))     # the same environment, lock timeout too
    failsafe, res = run_all(host.box.host, cmds)
    assert failsafe.returncode == 0, failsafe.stdout + failsafe.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    assert kernel_state(host, host.box.host) == before        # the fail-safe is replaced
    for fam in (4, 6):
        after = save(host, host.box.host, fam)
        assert foreign_lines(after) == foreign_lines(sysconfig[fam])         # the sysconfig rules stay
        assert [ln for ln in after if ln.startswith("-A INPUT ")][0] == "-A INPUT -i eth1 -j HOSTPREP-IN"
    ssh = (host.counter(4, "HOSTPREP-SSH", "hostprep ssh: no ssh in"), host.counter(6, "HOSTPREP-SSH"))
    assert outcomes(host.probe(host.box.inet, [tcp(HOST_EXT4, 22), tcp(HOST_EXT6, 22)])) == [None, None]
    assert (host.counter(4, "HOSTPREP-SSH", "hostprep ssh: no ssh in") - ssh[0],
            host.counter(6, "HOSTPREP-SSH") - ssh[1]) == (1, 1)


# --------------------------------------------------------------------------- 4. pending confirmation

def mark_armed_in_an_earlier_boot(pending: Path) -> None:
    p = json.loads(pending.read_text())
    assert len(p["boot_id"]) == 36                       # /proc/sys/kernel/random/boot_id of this boot
    p["boot_id"] = "00000000-0000-0000-0000-000000000000"
    pending.write_text(json.dumps(p))


def test_unconfirmed_change_is_rolled_back_at_boot(host, spare):
    host.apply("-e")
    s0 = kernel_state(host, host.box.host)
    settings0 = (host.root / "etc/hostprep/settings.json").read_text()
    assert s0["nft"] is None or "table netdev hostprep" not in s0["nft"]     # -e: no fragment table
    host.apply("-p", SRC_A, "--confirm", "60")
    pending = host.root / "var/lib/hostprep/pending.json"
    p = json.loads(pending.read_text())
    spare.watch(p)
    assert (p["mechanism"], watcher_alive(p["watcher_pid"], p["id"])) == ("process", True)
    s1 = kernel_state(host, host.box.host)
    assert s1 != s0 and s1["nft"] is not None

    # Reboot without confirming: a fresh sandbox, the same state root, and the
    # change armed in an earlier boot (the machine's boot id cannot change here).
    mark_armed_in_an_earlier_boot(pending)
    b = spare.sandbox()
    hb = dataclasses.replace(host, box=b)
    res = run_as_systemd(b.host, boot_unit(host))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == (f"hostprep boot: change {p['id']} ({p['command']}) was not confirmed "
                                          "before the reboot: rolled back")
    assert kernel_state(hb, b.host) == s0
    assert pending.exists() is False
    assert (host.root / "etc/hostprep/settings.json").read_text() == settings0
    rolled = [f for f in journal(host) if f[2] == "hostprep boot" and f[3].startswith("rolled back change ")]
    assert len(rolled) == 1 and rolled[0][3].startswith(f"rolled back change {p['id']} ({p['command']}), ")
    assert rolled[0][4] == "ok"
    assert wait_for(lambda: not watcher_alive(p["watcher_pid"], p["id"]), 5)
    st = status_as_systemd(b.host, host)
    assert (st.returncode, st.stdout.splitlines()[-1]) == (0, "everything desired is live"), st.stdout + st.stderr
    # Real packets: the -p host's ping is dropped again (the change is gone).
    assert outcomes(hb.probe(b.inet, [{"kind": "icmp", "dst": HOST_EXT4, "src": SRC_A, "timeout": QUIET}])) \
        == [None]


def test_boot_rollback_journal_gives_the_reason(host):
    host.apply("-e")
    host.apply("-p", SRC_A, "--confirm", "60")
    p = json.loads((host.root / "var/lib/hostprep/pending.json").read_text())
    mark_armed_in_an_earlier_boot(host.root / "var/lib/hostprep/pending.json")
    try:
        res = run_as_systemd(host.box.host, boot_unit(host))
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        if watcher_alive(p["watcher_pid"], p["id"]):
            os.kill(p["watcher_pid"], signal.SIGTERM)
    rolled = [f[3] for f in journal(host) if f[2] == "hostprep boot" and f[3].startswith("rolled back change ")]
    head = f"rolled back change {p['id']} ({p['command']}), "
    assert len(rolled) == 1 and rolled[0].startswith(head), rolled
    assert rolled[0][len(head):].split(": ", 1)[0] == "it was not confirmed before the reboot"


def test_iptables_restart_during_confirm_window_keeps_the_pending_change(host, tmp_path, spare):
    host.apply("-e")
    host.apply("-p", SRC_A, "--confirm", "60")
    pending = host.root / "var/lib/hostprep/pending.json"
    p = json.loads(pending.read_text())
    spare.watch(p)
    live = kernel_state(host, host.box.host)
    restart_iptables_services(host, tmp_path)
    res = run_all(host.box.host, unit_commands(host.root / UNIT_DIR / "iptables.service.d/hostprep.conf",
                                               "ExecStartPost"))[-1]
    assert res.returncode == 0, res.stdout + res.stderr
    assert (pending.exists(), watcher_alive(p["watcher_pid"], p["id"])) == (True, True)
    assert kernel_state(host, host.box.host) == live


# --------------------------------------------------------------------------- 5. flush --persistent

def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


PERSISTENCE = {
    "etc/systemd/system/hostprep.service",
    "etc/systemd/system/hostprep-nic@.service",
    "etc/systemd/system/multi-user.target.wants/hostprep.service",
    "etc/systemd/system/sys-subsystem-net-devices-eth1.device.wants",
    "etc/systemd/system/sys-subsystem-net-devices-eth1.device.wants/hostprep-nic@eth1.service",
    "etc/systemd/system/iptables.service.d/hostprep.conf",
    "etc/systemd/system/ip6tables.service.d",
    "etc/systemd/system/ip6tables.service.d/hostprep.conf",
}
FAILSAFE_FILES = {"etc/hostprep/failsafe.v4.rules", "etc/hostprep/failsafe.v6.rules"}
FOREIGN = {   # an admin's own files beside hostprep's: flush --persistent must leave them (and their dirs)
    "etc/systemd/system/multi-user.target.wants/sshd.service": "/usr/lib/systemd/system/sshd.service",
    "etc/systemd/system/iptables.service.d/local.conf": "[Service]\nEnvironment=FOO=1\n",
    "etc/systemd/system/other.service": "[Service]\nExecStart=/bin/true\n",
}


def test_flush_persistent_removes_exactly_the_persistence_files(host):
    host.apply()
    etc = host.root / "etc"
    for rel, content in FOREIGN.items():
        path = host.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("/"):
            path.symlink_to(content)
        else:
            path.write_text(content)
    before = tree(etc)
    st = host.hostprep("status", check=False)
    # two lines at 80 columns (issue 15, item 3)
    assert st.stdout.count("boot persistence: hostprep.service enabled, up to date\n"
                           "  hostprep-nic@eth1.service, iptables-services drop-ins (iptables, ip6tables)\n") == 1, \
        st.stdout
    assert {p for p in FAILSAFE_FILES if (host.root / p).is_file()} == FAILSAFE_FILES
    res = host.hostprep("flush", "--persistent")
    assert res.stdout.splitlines()[-1] == "boot persistence removed: 8 files"
    assert {p for p in FAILSAFE_FILES if (host.root / p).exists()} == set()
    assert tree(etc) == before - {p[len("etc/"):] for p in PERSISTENCE | FAILSAFE_FILES}
    assert tree(etc) == {
        "hostprep", "hostprep/settings.json", "logrotate.d", "logrotate.d/hostprep", "selinux", "selinux/config",
        "systemd", "systemd/system", "systemd/system/other.service", "systemd/system/multi-user.target.wants",
        "systemd/system/multi-user.target.wants/sshd.service", "systemd/system/iptables.service.d",
        "systemd/system/iptables.service.d/local.conf"}
    for rel, content in FOREIGN.items():
        path = host.root / rel
        assert (os.readlink(path) if path.is_symlink() else path.read_text()) == content
    assert [f[3] for f in journal(host) if f[2] == "hostprep flush --persistent"][-1] == \
        "boot persistence removed (8 files)"
    st = host.hostprep("status", check=False)
    assert "boot persistence: not installed" in st.stdout.splitlines(), st.stdout
    again = host.hostprep("flush", "--persistent")
    assert again.stdout.splitlines()[-1] == "boot persistence: nothing installed"
    assert tree(etc) == before - {p[len("etc/"):] for p in PERSISTENCE | FAILSAFE_FILES}


# --------------------------------------------------------------------------- 6. the fail-safe

FAILSAFE_DENY = '"hostprep failsafe: default deny"'
FAILSAFE_EST = '"hostprep failsafe: established"'


def test_failsafe_holds_the_nic_when_hostprep_cannot_run_then_boot_replaces_it(host, tmp_path, spare):
    apply_with_containers(host, tmp_path)
    a = kernel_state(host, host.box.host)
    service = host.root / UNIT_DIR / "hostprep.service"
    pre = unit_commands(service, "ExecStartPre")
    assert [c.raw for c in pre] == failsafe_lines(host)
    # /bin/sh, the iptables check and restore tools and the file: no Python in these lines
    assert [c.argv[:2] for c in pre] == [["/bin/sh", "-c"]] * 2
    assert [c.argv[2].split(" || exec ")[1].split()[1:] for c in pre] == [
        ["--noflush", f"{host.root}/etc/hostprep/failsafe.v{f}.rules"] for f in (4, 6)]
    assert not any("python" in c.raw or "hostprep " in c.raw for c in pre)

    # The "rebooted" host is open (a closed port and the container port answer) ...
    b = spare.sandbox()
    hb = dataclasses.replace(host, box=b)
    assert outcomes(hb.probe(b.inet, [tcp(HOST_EXT4, 8446, ANSWER), tcp(HOST_EXT4, 8445, ANSWER)])) == ["RA", "RA"]
    # ... then systemd runs the ExecStartPre= lines; ExecStart (hostprep boot) cannot run (say the
    # interpreter went away in an upgrade): nothing else is loaded.  At a real boot the iptables
    # service's drop-in (After= orders hostprep.service behind it) ran the same lines before:
    # run twice, the fail-safe is there once (its jumps are not inserted again).
    for _ in range(2):
        for cmd in pre:
            res = run_as_systemd(b.host, cmd)
            assert res.returncode == 0, res.stdout + res.stderr
    for fam in (4, 6):
        assert [ln for ln in save(hb, b.host, fam) if ln.startswith(("-A INPUT ", "-A FORWARD "))] == [
            "-A INPUT -i eth1 -j HOSTPREP-FAILSAFE", "-A FORWARD -i eth1 -j HOSTPREP-FAILSAFE"]

    # Real packets: closed port, SSH, the container's port (v4 and v6) and ping get nothing back ...
    deny4 = hb.xt_counter(4, "HOSTPREP-FAILSAFE", FAILSAFE_DENY)
    deny6 = hb.xt_counter(6, "HOSTPREP-FAILSAFE", FAILSAFE_DENY)
    got = hb.probe(b.inet, [tcp(HOST_EXT4, 8446), tcp(HOST_EXT4, 22), tcp(HOST_EXT4, 8445), tcp(HOST_EXT6, 8446),
                            {"kind": "icmp", "dst": HOST_EXT4, "src": SRC_A, "timeout": QUIET}])
    assert outcomes(got) == [None, None, None, None, None]
    assert (hb.xt_counter(4, "HOSTPREP-FAILSAFE", FAILSAFE_DENY) - deny4,
            hb.xt_counter(6, "HOSTPREP-FAILSAFE", FAILSAFE_DENY) - deny6) == (4, 1)
    # ... while the host's own connections get their replies (the peer's RST to a closed port is
    # the reply of a tracked connection) ...
    est4 = hb.xt_counter(4, "HOSTPREP-FAILSAFE", FAILSAFE_EST)
    est6 = hb.xt_counter(6, "HOSTPREP-FAILSAFE", FAILSAFE_EST)
    out = hb.probe(b.host, [{"kind": "connect", "dst": INET4, "port": 9, "timeout": ANSWER},
                            {"kind": "connect", "dst": INET6, "port": 9, "timeout": ANSWER}])
    assert [r["reply"] for r in out] == ["refused", "refused"]
    assert (hb.xt_counter(4, "HOSTPREP-FAILSAFE", FAILSAFE_EST) - est4,
            hb.xt_counter(6, "HOSTPREP-FAILSAFE", FAILSAFE_EST) - est6) == (1, 1)
    # ... and IPv6 neighbour discovery works (a neighbour solicitation gets its advertisement).
    assert hb.probe1(b.inet, kind="ns", src=INET6, iface="eth0", dst=HOST_EXT6, timeout=ANSWER)["answered"] is True

    # status says the fail-safe is what is live.
    st = status_as_systemd(b.host, host)
    assert st.returncode == 1
    assert "fail-safe: LIVE on IPv4, IPv6 (HOSTPREP-FAILSAFE; 'hostprep boot' replaces it with the hardening)" \
        in st.stdout.splitlines(), st.stdout
    assert "difference: the FAIL-SAFE is live (IPv4, IPv6: chain HOSTPREP-FAILSAFE)" in st.stderr, st.stderr
    js = run_as_systemd(b.host, UnitCommand("", [sys.executable, "-m", "hostprep", "status", "--json"],
                                            boot_unit(host).env))
    assert json.loads(js.stdout)["failsafe"] == {"live": [4, 6], "installed": [4, 6]}

    # hostprep boot runs at last: the fail-safe is replaced by exactly the recorded state.
    res = run_as_systemd(b.host, boot_unit(host))
    assert res.returncode == 0, res.stdout + res.stderr
    assert kernel_state(hb, b.host) == a
    st = status_as_systemd(b.host, host)
    assert (st.returncode, st.stdout.splitlines()[-1]) == (0, "everything desired is live"), st.stdout + st.stderr
    assert outcomes(hb.probe(b.inet, [tcp(HOST_EXT4, 8445, ANSWER), tcp(HOST_EXT4, 8446)])) == ["RA", None]


def test_apply_replaces_a_live_failsafe(host):
    host.apply()
    before = kernel_state(host, host.box.host)
    # the fail-safe loaded over the hardening (a failed boot unit, then the admin runs apply)
    run_all(host.box.host, unit_commands(host.root / UNIT_DIR / "hostprep.service", "ExecStartPre"))
    assert [ln for ln in save(host, host.box.host, 4) if ln.startswith("-A INPUT ")][0] == \
        "-A INPUT -i eth1 -j HOSTPREP-FAILSAFE"
    st = host.hostprep("status", "--json", check=False)
    assert (st.returncode, json.loads(st.stdout)["failsafe"]["live"]) == (1, [4, 6])
    host.apply()
    assert kernel_state(host, host.box.host) == before
    st = host.hostprep("status", "--json", check=False)
    assert (st.returncode, json.loads(st.stdout)["failsafe"]) == (0, {"live": [], "installed": [4, 6]})
