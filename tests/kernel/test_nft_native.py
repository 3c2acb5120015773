"""The native nftables backend on the sandbox's kernel (issue 13): one ``nft -f`` per change,
a change the kernel refuses leaves everything as it was, and other tables stay as they are.

A stand-in ``nft`` first in PATH logs every call and hands it to the real binary; in
"refuse" mode it appends, on the real load only (not on ``nft -c``), rules that make a
jump loop, which the kernel refuses at commit ("Too many links"): the whole
transaction is dropped by the kernel, hostprep undoes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from hostprep.sandbox import HOST_EXT4
from tests.helpers import QUIET, env_file, tcp

from test_containers import finesse_env

STATE = "var/lib/hostprep"

WRAPPER = """#!/bin/sh
echo "$*" >> {log}
if [ "{mode}" = refuse ] && [ "$1" = "-f" ] && [ "$2" = "-" ]; then
    {{ cat; printf 'add chain inet hostprep LOOPA\\nadd chain inet hostprep LOOPB\\n'
       printf 'add rule inet hostprep LOOPA jump LOOPB\\nadd rule inet hostprep LOOPB jump LOOPA\\n'
       printf 'add rule inet hostprep HOSTPREP-DENY-v4 jump LOOPA\\n'; }} | {real} "$@"
    exit $?
fi
exec {real} "$@"
"""

OTHER_TABLE = """table inet othertable {
	chain input {
		type filter hook input priority -10; policy accept;
		tcp dport 8445 counter accept comment "another firewall opens 8445"
	}
}
"""


NATIVE = True      # runs on the native nft backend too (conftest.variant)


@pytest.fixture
def variant() -> str:
    return "native"


def nft_wrapper(tmp_path: Path, mode: str = "log") -> tuple[dict, Path]:
    real = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert real is not None
    bindir, log = tmp_path / "bin", tmp_path / "nft.log"
    bindir.mkdir(exist_ok=True)
    (bindir / "nft").write_text(WRAPPER.format(real=real, log=log, mode=mode))
    (bindir / "nft").chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, log


def loads(log: Path) -> list[str]:
    """The nft calls that change the kernel (``-f -``) since the log was last cleared."""
    return [ln for ln in log.read_text().splitlines() if ln == "-f -"] if log.exists() else []


def ruleset(host) -> str:
    """Every table of the sandbox host (nft and iptables-nft's), without counters."""
    return re.sub(r"counter packets \d+ bytes \d+", "counter", host.nft_listing())


def state_files(host) -> dict[str, str]:
    return {str(p.relative_to(host.root)): p.read_text() for p in sorted(host.root.rglob("*"))
            if p.is_file() and not str(p.relative_to(host.root)).startswith("var/log/")
            and p.name != "lock"}


def test_one_nft_f_per_change(host, tmp_path):
    env, log = nft_wrapper(tmp_path)
    host.hostprep("apply", "-i", "eth1", "-y", env=env)
    assert loads(log) == ["-f -"]
    assert "-c -f -" in log.read_text().splitlines()             # checked first
    log.unlink()
    again = host.hostprep("apply", "-i", "eth1", "-y", env=env)
    assert "nothing changed" in again.stdout and loads(log) == []
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="|".join(
        f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000)))
    log.unlink(missing_ok=True)
    args = ["container", "up", "fin", "--env", str(finesse_env(tmp_path)), "--core", str(core)]
    up = host.hostprep(*args, env=env, check=False)
    assert up.returncode == 0, up.stderr
    assert loads(log) == ["-f -"]                                 # rules, both families, a 1,000-entry set
    log.unlink()
    host.hostprep("flush", env=env)
    assert loads(log) == ["-f -"]
    assert "table inet hostprep" not in host.nft_listing()


def test_a_rule_the_kernel_refuses_leaves_everything_as_before(host, tmp_path):
    host.apply()
    before, files = ruleset(host), state_files(host)
    env, log = nft_wrapper(tmp_path, "refuse")
    res = host.hostprep("apply", "-i", "eth1", "-y", "-a", env=env, check=False)
    lines = res.stderr.strip().splitlines()
    assert (res.returncode != 0, len(lines)) == (True, 1), res.stderr
    assert "Too many links" in lines[0] and "the kernel refused the whole transaction, the previous rules are " \
        "in place" in lines[0], lines[0]
    assert loads(log) == ["-f -"]                  # the refused load; nothing to undo, nothing loaded after
    assert ruleset(host) == before                 # both families, the sets, the ingress table
    assert state_files(host) == files
    assert not (host.root / STATE / "inflight.json").exists()
    code = host.hostprep("status", "--json", check=False)
    assert (code.returncode, json.loads(code.stdout)["problems"]) == (0, [])


def test_another_table_accepting_does_not_open_hostprep_and_stays_identical(host):
    host.run(host.box.host, ["nft", "-f", "-"], input=OTHER_TABLE)
    other = host.run(host.box.host, ["nft", "list", "table", "inet", "othertable"]).stdout
    host.apply()
    r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445, QUIET)])
    assert r["answered"] is False                  # hostprep's deny holds what the other table accepts
    assert host.counter(4, "HOSTPREP-DENY", "hostprep deny: default deny") == 1
    after_apply = host.run(host.box.host, ["nft", "list", "table", "inet", "othertable"]).stdout
    assert re.sub(r"packets \d+ bytes \d+", "", after_apply) == re.sub(r"packets \d+ bytes \d+", "", other)
    assert "counter packets 1 " in after_apply     # it judged the packet too (and accepted it)
    host.hostprep("flush")
    after_flush = host.run(host.box.host, ["nft", "list", "table", "inet", "othertable"]).stdout
    assert after_flush == after_apply
    r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445, QUIET)])
    assert r["reply"] == "RA"                      # without hostprep the other table's accept lets it in


@pytest.mark.parametrize("variant", ["native", "nft"])
def test_nftables_restart_then_dropin_puts_hostprep_back(host, variant):
    """``systemctl restart nftables`` on RHEL 9: ExecStop=/sbin/nft flush ruleset removes every table
    (the native ones and iptables-nft's alike); the drop-in's ExecStopPost/ExecStartPost then load
    the fail-safe and run 'hostprep boot': hostprep is back as it was, on either backend."""
    from test_persistence import UNIT_DIR, kernel_state, run_all, unit_commands
    unit = host.root / "usr/lib/systemd/system/nftables.service"      # RHEL's unit: the host has the service
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text("[Service]\nExecStart=/sbin/nft -f /etc/sysconfig/nftables.conf\n"
                    "ExecStop=/sbin/nft flush ruleset\n")
    host.apply()
    before = kernel_state(host, host.box.host)
    dropin = host.root / UNIT_DIR / "nftables.service.d/hostprep.conf"
    host.run(host.box.host, ["nft", "flush", "ruleset"])               # ExecStop
    gone = kernel_state(host, host.box.host)
    assert (gone["v4"], gone["nft"]) == ([], None)
    for key in ("ExecStopPost", "ExecStartPost"):
        for res in run_all(host.box.host, unit_commands(dropin, key)):
            assert res.returncode == 0, res.stdout + res.stderr
    assert kernel_state(host, host.box.host) == before
    code = host.hostprep("status", "--json", check=False)
    assert (code.returncode, json.loads(code.stdout)["problems"]) == (0, [])
