"""hostprep/persist.py: the boot units and the logrotate config, rendered and installed under a temp root.

No root needed: everything goes under ``tmp_path`` (``Paths(tmp_path)``), the
runner is a fake (under a test root no ``systemctl daemon-reload`` may run).
The rendered files are also checked by the real tools where they are installed:
``systemd-escape`` for the unit names, ``systemd-analyze verify`` for the unit
files (offline: it needs no running systemd) and ``logrotate -d`` for the
rotation config; each of these tests is skipped, with the reason, only when the
binary is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostprep import persist
from hostprep.errors import StateError
from hostprep.paths import Paths

BOOT = f"{sys.executable} -m hostprep boot"
UNIT_DIR = "etc/systemd/system"
ALL = [   # every path install() writes, in its order
    "etc/hostprep/failsafe.v4.rules",
    "etc/hostprep/failsafe.v6.rules",
    f"{UNIT_DIR}/hostprep.service",
    f"{UNIT_DIR}/multi-user.target.wants/hostprep.service",
    f"{UNIT_DIR}/hostprep-nic@.service",
    f"{UNIT_DIR}/sys-subsystem-net-devices-eth1.device.wants/hostprep-nic@eth1.service",
    "etc/logrotate.d/hostprep",
    f"{UNIT_DIR}/iptables.service.d/hostprep.conf",
    f"{UNIT_DIR}/ip6tables.service.d/hostprep.conf",
]
UNITS = [p for p in ALL if p != "etc/logrotate.d/hostprep"]     # what remove() takes away


@pytest.fixture
def paths(monkeypatch, tmp_path) -> Paths:
    """A temp root, with the environment apply would run in under it (root and backend)."""
    for key in persist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("HOSTPREP_ROOT", str(root))
    monkeypatch.setenv("HOSTPREP_BACKEND", "nft")
    return Paths(root)


@pytest.fixture
def runner(fake_runner):
    return fake_runner()


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order (comments and blank lines skipped)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, sep, value = line.partition("=")
        assert sep == "=" and section is not None, line
        out[section].setdefault(key, []).append(value)
    return out


def unit(paths: Paths, rel: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((paths.root / rel).read_text())


def env_lines(paths: Paths, *extra: str) -> list[str]:
    return [f"HOSTPREP_ROOT={paths.root}", "HOSTPREP_BACKEND=nft", *extra]


def failsafe_line(paths: Paths, family: int, variant: str = "nft", nic: str = "eth1") -> str:
    """The command that loads the fail-safe of one family (the unit's Exec line without its '-'):
    skipped when the jump from INPUT into it is live (loaded twice, its jumps would be doubled)."""
    restore = persist.failsafe_tool(variant, family)
    assert restore.endswith("-restore"), restore
    return (f"/bin/sh -c '{restore[:-len('-restore')]} -w -C INPUT -i {nic} -j HOSTPREP-FAILSAFE 2>/dev/null"
            f" || exec {restore} --noflush {paths.root}/etc/hostprep/failsafe.v{family}.rules'")


# --------------------------------------------------------------------------- rendered content

def test_install_writes_every_file_and_runs_nothing(paths, runner):
    changed = persist.install(paths, "eth1", runner)
    assert changed == [str(paths.root / p) for p in ALL]
    assert sorted(str(p.relative_to(paths.root)) for p in paths.root.rglob("*")
                  if p.is_file() or p.is_symlink()) == sorted(ALL)
    assert runner.calls == []              # no daemon-reload under a test root


def test_boot_service_unit(paths, runner):
    persist.install(paths, "eth1", runner)
    u = unit(paths, f"{UNIT_DIR}/hostprep.service")
    assert u["Unit"] == {
        "Description": ["hostprep: reverse-proxy host hardening (external NIC eth1)"],
        "DefaultDependencies": ["no"],
        "Wants": ["network-pre.target"],
        "Before": ["network-pre.target shutdown.target"],
        "After": ["local-fs.target systemd-sysctl.service systemd-udev-trigger.service iptables.service "
                  "ip6tables.service firewalld.service netfilter-persistent.service nftables.service"],
        "Conflicts": ["shutdown.target"],
    }
    assert u["Service"] == {
        "Type": ["oneshot"], "RemainAfterExit": ["yes"],
        "Environment": env_lines(paths, "HOSTPREP_LOCK_TIMEOUT=30"),
        "ExecStartPre": [f"-{failsafe_line(paths, 4)}", f"-{failsafe_line(paths, 6)}"],
        "ExecStart": [BOOT], "TimeoutStartSec": ["180"],
    }
    assert u["Install"] == {"WantedBy": ["multi-user.target"]}
    assert list(u) == ["Unit", "Service", "Install"]


def test_nic_template_unit(paths, runner):
    persist.install(paths, "eth1", runner)
    u = unit(paths, f"{UNIT_DIR}/hostprep-nic@.service")
    assert u == {
        "Unit": {"Description": ["hostprep: hardening on %I when it appears"],
                 "BindsTo": ["sys-subsystem-net-devices-%i.device"],
                 "After": ["sys-subsystem-net-devices-%i.device hostprep.service"]},
        "Service": {"Type": ["oneshot"], "Environment": env_lines(paths, "HOSTPREP_LOCK_TIMEOUT=30"),
                    "ExecStart": [BOOT]},
        "Install": {"WantedBy": ["sys-subsystem-net-devices-%i.device"]},
    }


@pytest.mark.parametrize("service", ["iptables", "ip6tables"])
def test_iptables_services_dropins(paths, runner, service):
    persist.install(paths, "eth1", runner)
    u = unit(paths, f"{UNIT_DIR}/{service}.service.d/hostprep.conf")
    # the fail-safe of the family the service flushed first (no Python), then hostprep boot
    first = f"-{failsafe_line(paths, 4 if service == 'iptables' else 6)}"
    assert u == {"Service": {"ExecStartPost": [first, f"-{BOOT}"], "ExecReload": [first, f"-{BOOT}"],
                             "ExecStopPost": [first, f"-{BOOT}"],
                             "Environment": env_lines(paths) + ["HOSTPREP_LOCK_TIMEOUT=30"]}}
    text = (paths.root / f"{UNIT_DIR}/{service}.service.d/hostprep.conf").read_text()
    assert text.splitlines()[0] == f"# hostprep: the {service} service of iptables-services loads"


@pytest.mark.parametrize("service, first_line", [
    ("netfilter-persistent", "# hostprep: netfilter-persistent (Debian's iptables-persistent) loads"),
    ("nftables", "# hostprep: nftables.service loads /etc/nftables.conf, which begins with")])
def test_debian_firewall_service_dropins_only_where_the_host_has_the_service(paths, runner, service, first_line):
    """netfilter-persistent and nftables.service flush hostprep's rules when they (re)start
    (found in the Vagrant bed): a drop-in with both families' fail-safes, then hostprep boot;
    none where the host lacks the service, and flush --persistent removes it."""
    dropin = paths.root / f"{UNIT_DIR}/{service}.service.d/hostprep.conf"
    persist.install(paths, "eth1", runner)
    assert dropin.exists() is False
    (paths.root / "lib/systemd/system").mkdir(parents=True)
    (paths.root / f"lib/systemd/system/{service}.service").write_text("[Service]\nExecStart=/bin/true\n")
    assert persist.install(paths, "eth1", runner) == [str(dropin)]
    both = [f"-{failsafe_line(paths, 4)}", f"-{failsafe_line(paths, 6)}", f"-{BOOT}"]
    assert unit(paths, f"{UNIT_DIR}/{service}.service.d/hostprep.conf") == {
        "Service": {"ExecStartPost": both, "ExecReload": both, "ExecStopPost": both,
                    "Environment": env_lines(paths) + ["HOSTPREP_LOCK_TIMEOUT=30"]}}
    assert dropin.read_text().splitlines()[0] == first_line
    assert persist.report(paths, "eth1")["iptables_dropins"] == ["iptables", "ip6tables", service]
    assert str(dropin) in persist.remove(paths, runner)
    assert dropin.exists() is False


FAILSAFE_V4 = [
    "*filter",
    ":HOSTPREP-FAILSAFE - [0:0]",
    "-I INPUT 1 -i eth1 -j HOSTPREP-FAILSAFE",
    "-I FORWARD 1 -i eth1 -j HOSTPREP-FAILSAFE",
    '-A HOSTPREP-FAILSAFE -m conntrack --ctstate ESTABLISHED -m comment --comment "hostprep failsafe: established" -j ACCEPT',
    *[f'-A HOSTPREP-FAILSAFE -p icmp -m conntrack --ctstate RELATED -m icmp --icmp-type {t} -m comment --comment '
      f'"hostprep failsafe: icmp error" -j ACCEPT' for t in (3, 4, 11, 12)],
    '-A HOSTPREP-FAILSAFE -m comment --comment "hostprep failsafe: default deny" -j DROP',
    "COMMIT",
]
FAILSAFE_V6 = FAILSAFE_V4[:5] + [
    *[f'-A HOSTPREP-FAILSAFE -p ipv6-icmp -m conntrack --ctstate RELATED -m icmp6 --icmpv6-type {t} -m comment '
      f'--comment "hostprep failsafe: icmp error" -j ACCEPT' for t in (1, 2, 3, 4)],
    *[f'-A HOSTPREP-FAILSAFE -p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq 255 -m comment --comment '
      f'"hostprep failsafe: neighbour discovery" -j ACCEPT' for t in (133, 134, 135, 136)],
] + FAILSAFE_V4[-2:]


@pytest.mark.parametrize("family,expected", [(4, FAILSAFE_V4), (6, FAILSAFE_V6)])
def test_failsafe_rules(paths, runner, family, expected):
    """Default deny inbound on the NIC (INPUT and FORWARD) but established, ICMP errors and (IPv6) ND."""
    persist.install(paths, "eth1", runner)
    f = paths.root / f"etc/hostprep/failsafe.v{family}.rules"
    lines = f.read_text().splitlines()
    assert [ln for ln in lines if ln and not ln.startswith("#")] == expected
    assert lines[0] == f"# hostprep FAIL-SAFE for the external NIC eth1 (IPv{family}).  Written by"
    assert oct(f.stat().st_mode & 0o777) == "0o644"


def test_failsafe_follows_the_nic_and_the_recorded_variant(paths, runner):
    (paths.state_dir).mkdir(parents=True)
    paths.state_file.write_text('{"backend": "legacy"}')
    persist.install(paths, "ens3.100", runner)
    u = unit(paths, f"{UNIT_DIR}/hostprep.service")
    assert u["Service"]["ExecStartPre"] == [f"-{failsafe_line(paths, 4, 'legacy', 'ens3.100')}",
                                            f"-{failsafe_line(paths, 6, 'legacy', 'ens3.100')}"]
    assert persist.failsafe_tool("legacy", 6).endswith("ip6tables-legacy-restore")
    text = (paths.root / "etc/hostprep/failsafe.v4.rules").read_text()
    assert [ln for ln in text.splitlines() if ln.startswith("-I ")] == [
        "-I INPUT 1 -i ens3.100 -j HOSTPREP-FAILSAFE", "-I FORWARD 1 -i ens3.100 -j HOSTPREP-FAILSAFE"]


def test_failsafe_tool_does_not_follow_the_callers_path(paths, runner, monkeypatch, tmp_path):
    """systemd runs the unit with its own PATH: a wrapper early on apply's PATH must not get into the unit."""
    before = persist.failsafe_tool("nft", 6)
    wrapper = tmp_path / "bin/ip6tables-nft-restore"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    assert persist.failsafe_tool("nft", 6) == before
    assert before.startswith(tuple(d + "/" for d in persist.SERVICE_PATH.split(":")) + ("/usr/sbin/",))


def test_no_failsafe_without_a_nic(paths, runner):
    """apply -k alone: no external NIC is known, so there is nothing to close."""
    persist.install(paths, None, runner)
    assert (paths.root / "var/lib/hostprep").exists() is False
    assert "ExecStartPre" not in unit(paths, f"{UNIT_DIR}/hostprep.service")["Service"]
    assert unit(paths, f"{UNIT_DIR}/iptables.service.d/hostprep.conf")["Service"]["ExecStartPost"] == [f"-{BOOT}"]


def test_logrotate_config(paths, runner):
    persist.install(paths, "eth1", runner)
    text = (paths.root / "etc/logrotate.d/hostprep").read_text()
    log = paths.root / "var/log/hostprep"
    assert [ln for ln in text.splitlines() if ln.endswith("{")] == [f"{log}/journal.log {{",
                                                                    f"{log}/iptables_logs/*.log {{"]
    blocks = text.split("{")[1:]
    assert [[ln.strip() for ln in b.split("}")[0].strip().splitlines()] for b in blocks] == [
        ["monthly", "rotate 24", "compress", "delaycompress", "missingok", "notifempty", "create 0640 root root"],
        ["monthly", "rotate 6", "compress", "delaycompress", "missingok", "notifempty", "create 0640 root root"]]


def test_real_root_is_not_written_into_the_units(paths, runner, monkeypatch):
    monkeypatch.setenv("HOSTPREP_ROOT", "/")
    monkeypatch.delenv("HOSTPREP_BACKEND")
    monkeypatch.setenv("HOSTPREP_SELINUXFS", "/run/selinuxfs-standin")
    assert persist.environment() == [("HOSTPREP_SELINUXFS", "/run/selinuxfs-standin")]
    monkeypatch.delenv("HOSTPREP_SELINUXFS")
    assert persist.environment() == []


@pytest.mark.parametrize("value", ["/tmp/a b", "/tmp/a%i", "/tmp/a$X", "/tmp/a'b", '/tmp/a"b', "/tmp/a\\b",
                                   "/tmp/a\nb"])
def test_a_value_systemd_would_reinterpret_is_refused(paths, runner, monkeypatch, value):
    monkeypatch.setenv("HOSTPREP_ROOT", value)
    with pytest.raises(StateError) as exc:
        persist.install(paths, "eth1", runner)
    assert exc.value.field == "HOSTPREP_ROOT"
    assert list(paths.root.rglob("*")) == []


# --------------------------------------------------------------------------- symlinks and names

def test_enablement_symlinks(paths, runner):
    persist.install(paths, "eth1", runner)
    wants = paths.root / f"{UNIT_DIR}/multi-user.target.wants/hostprep.service"
    nic = paths.root / f"{UNIT_DIR}/sys-subsystem-net-devices-eth1.device.wants/hostprep-nic@eth1.service"
    assert (wants.is_symlink(), os.readlink(wants)) == (True, "/etc/systemd/system/hostprep.service")
    assert (nic.is_symlink(), os.readlink(nic)) == (True, "/etc/systemd/system/hostprep-nic@.service")


NAMES = [   # interface name -> systemd-escape output (as systemd-escape 252 prints it)
    ("eth1", "eth1"), ("eth-1", r"eth\x2d1"), ("ens3.100", "ens3.100"), ("br_0", "br_0"),
    ("eth1-", r"eth1\x2d"), ("a-b.c_d", r"a\x2db.c_d"), ("enp0s31f6", "enp0s31f6"), ("bond0.10", "bond0.10"),
]


@pytest.mark.parametrize("name,escaped", NAMES)
def test_escape(name, escaped):
    assert persist.escape(name) == escaped
    assert persist.device_unit(name) == f"sys-subsystem-net-devices-{escaped}.device"
    assert persist.nic_instance(name) == f"hostprep-nic@{escaped}.service"


@pytest.mark.parametrize("name", [n for n, _ in NAMES])
def test_escape_matches_systemd_escape(name):
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed (package systemd)")

    def sd(*args: str) -> str:
        return subprocess.run(["systemd-escape", *args], capture_output=True, text=True, check=True).stdout.strip()

    assert persist.escape(name) == sd("--", name)
    # the device unit systemd makes for the NIC, and the instance 'systemctl enable' would name
    assert persist.device_unit(name) == sd("--path", "--suffix=device", f"/sys/subsystem/net/devices/{name}")
    assert persist.nic_instance(name) == sd("--template=hostprep-nic@.service", "--", name)


def test_escaped_nic_symlink(paths, runner):
    persist.install(paths, "eth-1", runner)
    link = paths.root / UNIT_DIR / r"sys-subsystem-net-devices-eth\x2d1.device.wants" / r"hostprep-nic@eth\x2d1.service"
    assert os.readlink(link) == "/etc/systemd/system/hostprep-nic@.service"
    assert sorted(p.name for p in (paths.root / UNIT_DIR).glob("sys-subsystem-net-devices-*")) == \
        [r"sys-subsystem-net-devices-eth\x2d1.device.wants"]


# --------------------------------------------------------------------------- install, switch, remove

def test_install_is_idempotent(paths, runner):
    persist.install(paths, "eth1", runner)
    before = {p: (p.read_text() if p.is_file() and not p.is_symlink() else os.readlink(p), p.lstat().st_ino)
              for p in paths.root.rglob("*") if p.is_file() or p.is_symlink()}
    assert persist.install(paths, "eth1", runner) == []
    after = {p: (p.read_text() if p.is_file() and not p.is_symlink() else os.readlink(p), p.lstat().st_ino)
             for p in paths.root.rglob("*") if p.is_file() or p.is_symlink()}
    assert after == before                  # not even rewritten (same inodes)


def test_install_repairs_a_changed_file_and_a_wrong_symlink(paths, runner):
    persist.install(paths, "eth1", runner)
    svc = paths.root / UNIT_DIR / "hostprep.service"
    wants = paths.root / UNIT_DIR / "multi-user.target.wants/hostprep.service"
    good = svc.read_text()
    svc.write_text(good.replace("TimeoutStartSec=180", "TimeoutStartSec=1"))
    wants.unlink()
    wants.symlink_to("/dev/null")            # masked-looking link
    assert persist.install(paths, "eth1", runner) == [str(svc), str(wants)]
    assert (svc.read_text(), os.readlink(wants)) == (good, "/etc/systemd/system/hostprep.service")


def test_failsafe_lives_under_etc_and_the_old_copy_under_var_lib_goes(paths, runner):
    """SELinux lets iptables_t read etc_t, not var_lib_t (found by the Vagrant bed): the
    fail-safe is written under /etc/hostprep; a copy an earlier build left in
    /var/lib/hostprep is removed by install, and by remove."""
    old = [paths.root / f"var/lib/hostprep/failsafe.v{fam}.rules" for fam in (4, 6)]
    for f in old:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("*filter\nCOMMIT\n")
    changed = persist.install(paths, "eth1", runner)
    assert [f"removed {f}" for f in old] == [c for c in changed if c.startswith("removed ")]
    assert [f.exists() for f in old] == [False, False]
    assert all((paths.root / f"etc/hostprep/failsafe.v{fam}.rules").is_file() for fam in (4, 6))
    old[0].write_text("*filter\nCOMMIT\n")
    assert str(old[0]) in persist.remove(paths, runner)
    assert not any(f.exists() for f in old + [paths.root / "etc/hostprep/failsafe.v4.rules"])


def test_switching_the_nic_removes_the_old_nic_link(paths, runner):
    persist.install(paths, "eth1", runner)
    old = paths.root / UNIT_DIR / "sys-subsystem-net-devices-eth1.device.wants/hostprep-nic@eth1.service"
    new = paths.root / UNIT_DIR / r"sys-subsystem-net-devices-ens3.100.device.wants/hostprep-nic@ens3.100.service"
    changed = persist.install(paths, "ens3.100", runner)
    # the service's Description names the NIC, so it is rewritten too; so are the iptables
    # services' drop-ins (their fail-safe line checks the jump from INPUT on that NIC)
    assert changed == [str(paths.root / f"etc/hostprep/failsafe.v{fam}.rules") for fam in (4, 6)] + [
        str(paths.root / UNIT_DIR / "hostprep.service"), str(new),
        *[str(paths.root / UNIT_DIR / f"{svc}.service.d/hostprep.conf") for svc in ("iptables", "ip6tables")],
        f"removed {old}"]
    assert (old.is_symlink(), old.parent.exists()) == (False, False)
    assert sorted(str(p.relative_to(paths.root / UNIT_DIR))
                  for p in (paths.root / UNIT_DIR).glob("sys-subsystem-net-devices-*/*")) == \
        ["sys-subsystem-net-devices-ens3.100.device.wants/hostprep-nic@ens3.100.service"]
    assert os.readlink(new) == "/etc/systemd/system/hostprep-nic@.service"
    assert persist.report(paths, "ens3.100")["up_to_date"] is True


def test_remove_takes_exactly_the_units(paths, runner):
    persist.install(paths, "eth1", runner)
    # an admin's own files beside them stay, and so do their directories
    own_wants = paths.root / UNIT_DIR / "multi-user.target.wants/sshd.service"
    own_wants.symlink_to("/usr/lib/systemd/system/sshd.service")
    own_dropin = paths.root / UNIT_DIR / "iptables.service.d/local.conf"
    own_dropin.write_text("[Service]\n")
    gone = persist.remove(paths, runner)
    assert sorted(gone) == sorted(str(paths.root / p) for p in UNITS)
    assert sorted(str(p.relative_to(paths.root)) for p in paths.root.rglob("*")) == sorted([
        "etc", "etc/logrotate.d", "etc/logrotate.d/hostprep", "etc/systemd", "etc/systemd/system",
        "etc/hostprep",
        f"{UNIT_DIR}/multi-user.target.wants", f"{UNIT_DIR}/multi-user.target.wants/sshd.service",
        f"{UNIT_DIR}/iptables.service.d", f"{UNIT_DIR}/iptables.service.d/local.conf"])
    assert persist.remove(paths, runner) == []
    assert runner.calls == []
    assert persist.report(paths, "eth1")["installed"] is False


# --------------------------------------------------------------------------- report (status)

def test_report_not_installed(paths):
    assert persist.report(paths, "eth1") == {"installed": False, "enabled": False, "nic_unit": None,
                                             "up_to_date": False, "iptables_dropins": [], "logrotate": False,
                                             "stale": []}


def test_report_up_to_date(paths, runner):
    persist.install(paths, "eth1", runner)
    assert persist.report(paths, "eth1") == {"installed": True, "enabled": True,
                                             "nic_unit": "hostprep-nic@eth1.service", "up_to_date": True,
                                             "iptables_dropins": ["iptables", "ip6tables"], "logrotate": True,
                                             "stale": []}


def test_report_stale(paths, runner):
    persist.install(paths, "eth1", runner)
    unit_dir = paths.root / UNIT_DIR
    (unit_dir / "hostprep-nic@.service").write_text("edited\n")
    (unit_dir / "multi-user.target.wants/hostprep.service").unlink()
    rep = persist.report(paths, "eth1")
    assert (rep["up_to_date"], rep["enabled"], rep["stale"]) == (False, False, [
        str(unit_dir / "multi-user.target.wants/hostprep.service"), str(unit_dir / "hostprep-nic@.service")])
    persist.install(paths, "eth1", runner)
    assert persist.report(paths, "eth1")["stale"] == []
    # another NIC is not what apply wrote: the service (its Description), the NIC link and the
    # iptables drop-ins (their fail-safe lines name the NIC) are stale
    assert persist.report(paths, "eth2")["stale"] == [
        str(paths.root / "etc/hostprep/failsafe.v4.rules"), str(paths.root / "etc/hostprep/failsafe.v6.rules"),
        str(unit_dir / "hostprep.service"),
        str(unit_dir / "sys-subsystem-net-devices-eth2.device.wants/hostprep-nic@eth2.service"),
        str(unit_dir / "iptables.service.d/hostprep.conf"), str(unit_dir / "ip6tables.service.d/hostprep.conf")]
    # nothing applied (no NIC; -k alone): the service names eth1 and loads its fail-safe, the drop-ins
    # load it too, which is not what apply -k writes
    rep = persist.report(paths, None)
    assert (rep["installed"], rep["up_to_date"], rep["nic_unit"], rep["stale"]) == (
        True, False, None, [str(unit_dir / "hostprep.service"), str(unit_dir / "iptables.service.d/hostprep.conf"),
                            str(unit_dir / "ip6tables.service.d/hostprep.conf")])


def test_report_compares_with_the_installed_invocation(paths, runner, monkeypatch):
    """status may run with another environment than apply: the units are rendered with the command and
    environment that the installed hostprep.service names, so only a unit that disagrees with it is stale."""
    persist.install(paths, "eth1", runner)
    unit_dir = paths.root / UNIT_DIR
    monkeypatch.setenv("HOSTPREP_BACKEND", "legacy")            # status run with another environment
    monkeypatch.setenv("HOSTPREP_SELINUXFS", "/elsewhere")
    assert persist.installed_invocation(paths) == (f"{sys.executable} -m hostprep",
                                                   [("HOSTPREP_ROOT", str(paths.root)), ("HOSTPREP_BACKEND", "nft")])
    assert persist.report(paths, "eth1")["up_to_date"] is True
    # hostprep.service edited to another backend: the other units no longer agree with it, nor does
    # its own fail-safe line (nothing recorded as applied: the fail-safe takes the units' backend)
    svc = unit_dir / "hostprep.service"
    svc.write_text(svc.read_text().replace("HOSTPREP_BACKEND=nft", "HOSTPREP_BACKEND=legacy"))
    assert persist.report(paths, "eth1")["stale"] == [
        str(svc), str(unit_dir / "hostprep-nic@.service"), str(unit_dir / "iptables.service.d/hostprep.conf"),
        str(unit_dir / "ip6tables.service.d/hostprep.conf")]
    # an ExecStart that is not hostprep's boot: the service itself is stale
    svc.write_text(svc.read_text().replace(" -m hostprep boot", " -m hostprep status"))
    rep = persist.report(paths, "eth1")
    assert (rep["installed"], rep["up_to_date"], rep["stale"]) == (True, False, [str(svc)])


def test_report_stale_when_the_installed_interpreter_is_gone(paths, runner, tmp_path):
    persist.install(paths, "eth1", runner)
    gone = str(tmp_path / "old-venv/bin/python")
    for p in paths.root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.write_text(p.read_text().replace(sys.executable, gone))
    assert persist.installed_invocation(paths)[0] == f"{gone} -m hostprep"
    assert persist.report(paths, "eth1")["up_to_date"] is False


# --------------------------------------------------------------------------- the real tools

def analyze_verify(cwd: Path, *files: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *files], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def verify_dir(tmp_path) -> Path:
    """A directory for systemd-analyze verify; skips (with the reason) where it cannot run."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    d = tmp_path / "verify"
    d.mkdir()
    (d / "known-good.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    probe = analyze_verify(d, str(d / "known-good.service"))
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run here (a known-good unit fails): {probe.stderr.strip()}")
    (d / "known-good.service").unlink()
    return d


@pytest.mark.parametrize("nic", ["eth1", "eth-1"])
def test_systemd_analyze_verify_units(paths, runner, verify_dir, nic):
    persist.install(paths, nic, runner)
    for name in ("hostprep.service", "hostprep-nic@.service"):
        shutil.copy(paths.root / UNIT_DIR / name, verify_dir / name)
    # the template is verified as the instance that the NIC's .wants link starts
    instance = persist.nic_instance(nic)
    res = analyze_verify(verify_dir, str(verify_dir / "hostprep.service"), str(verify_dir / instance))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # the same check catches a broken unit (the test can fail)
    (verify_dir / "hostprep.service").write_text((paths.root / UNIT_DIR / "hostprep.service").read_text()
                                                 .replace("ExecStart=", "ExecStrat="))
    bad = analyze_verify(verify_dir, str(verify_dir / "hostprep.service"))
    assert (bad.returncode != 0, "Unknown key 'ExecStrat'" in bad.stderr) == (True, True), bad.stderr


@pytest.mark.parametrize("service", ["iptables", "ip6tables"])
def test_systemd_analyze_verify_dropins(paths, runner, verify_dir, service):
    """The drop-in on a stand-in of iptables-services' unit (RHEL 9), loaded from <unit>.d/ beside it."""
    persist.install(paths, "eth1", runner)
    (verify_dir / f"{service}.service").write_text(
        f"[Unit]\nDescription={service} stand-in\nBefore=network-pre.target\nWants=network-pre.target\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\nExecReload=/bin/true\n"
        "ExecStop=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n")
    (verify_dir / f"{service}.service.d").mkdir()
    shutil.copy(paths.root / UNIT_DIR / f"{service}.service.d/hostprep.conf",
                verify_dir / f"{service}.service.d/hostprep.conf")
    res = analyze_verify(verify_dir, str(verify_dir / f"{service}.service"))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # the drop-in is really read: a bad key in it is reported
    with open(verify_dir / f"{service}.service.d/hostprep.conf", "a") as fh:
        fh.write("ExecStrat=/bin/true\n")
    bad = analyze_verify(verify_dir, str(verify_dir / f"{service}.service"))
    assert "Unknown key 'ExecStrat' in section [Service]" in bad.stderr, bad.stderr


def test_logrotate_debug_run(paths, runner, tmp_path):
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed (package logrotate)")
    persist.install(paths, "eth1", runner)
    log = paths.root / "var/log/hostprep"
    (log / "iptables_logs").mkdir(parents=True)
    (log / "journal.log").write_text("line\n")
    (log / "iptables_logs/fin.log").write_text("line\n")
    res = subprocess.run(["logrotate", "-d", "-f", "-s", str(tmp_path / "logrotate.state"),
                          str(paths.root / "etc/logrotate.d/hostprep")], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert [ln for ln in out.splitlines() if ln.startswith("error")] == []
    assert [ln for ln in out.splitlines() if ln.startswith(("rotating pattern:", "Handling"))] == [
        "Handling 2 logs",
        f"rotating pattern: {log}/journal.log  forced from command line (24 rotations)",
        f"rotating pattern: {log}/iptables_logs/*.log  forced from command line (6 rotations)"]
    assert [ln for ln in out.splitlines() if ln.startswith("rotating log ")] == [
        f"rotating log {log}/journal.log, log->rotateCount is 24",
        f"rotating log {log}/iptables_logs/fin.log, log->rotateCount is 6"]


@pytest.mark.parametrize("bad", ["a b", "a$b", "a'b", "a%b", "a;b", "a|b", "a*b", "a(b", "a~b", "a[b", "a&b"])
def test_a_root_the_failsafe_line_cannot_carry_is_refused_and_nothing_written(tmp_path, runner, bad):
    root = tmp_path / bad
    root.mkdir()
    with pytest.raises(StateError) as err:
        persist.install(Paths(root), "eth1", runner)
    assert err.value.line().startswith(f"{root}/etc/hostprep/failsafe.v4.rules: cannot be written into the "
                                       "fail-safe's unit line")
    assert list(root.rglob("*")) == []
