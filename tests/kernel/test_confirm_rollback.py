"""Commit-confirmed changes (``--confirm SECONDS``), ``hostprep confirm`` and ``hostprep rollback``, for real.

Every test runs in the sandbox host of ``conftest.host`` (both firewall variants)
with its own HOSTPREP_ROOT.  The sandbox host is a network namespace whose PID 1
is not systemd, so the armed rollback is the detached watcher process
(``hostprep rollback --due ID --wait``), started by hostprep inside the namespace.

"The state" compared before and after is everything a change may touch:

* ``iptables-save -t filter`` of both families (no counters, no comment lines;
  the policy counters iptables-legacy-save prints anyway set to 0),
* ``ipset save`` (only hostprep's sets live in the sandbox host; a set that is
  destroyed and created again gets a new random ``initval``, so an untouched set
  is proven untouched byte for byte),
* ``nft list table netdev hostprep`` (counters set to 0; None when absent),
* the state files, byte for byte (settings.json, applied.json, kernel.json, the
  sysctl drop-in, containers/*.json).

Tests that wait out a deadline use ``--confirm 3`` and poll the journal for the
watcher's rollback line (up to 10 s); tests that end the pending change
themselves (status, refusals) use a long window so the watcher cannot fire while
they look.  Every test ends with no watcher left: it is confirmed, rolled back,
or waited out (the ``t`` fixture kills a leftover one by PID after a failure).

Real packets: the ``-e`` change turns the fragment drop (nft netdev ingress) off.
A fragmented echo request from the ``-p`` host is dropped at ingress by the base
hardening and answered under ``-e``; after the rollback it is dropped again (and
counted by the recreated nft rule).  The container test connects to the ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from bgproc import watcher_alive
from test_kernel_sysctl import key_path, read_machine

from hostprep import sysctl
from hostprep.sandbox import HOST_EXT4, INET4, INET_EXTRA4
from tests.helpers import ANSWER, QUIET, env_file

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[2])
CONFIRM = 3          # the window of the tests that wait the deadline out
LONG = 60            # the window of the tests that end the pending change themselves
POLL = 10.0          # how long after the deadline the rollback may take at most
SRC_A, SRC_B = INET_EXTRA4          # 203.0.113.7, 203.0.113.8: internet clients in the inet namespace
FRAG_RULE = "hostprep ddos: ipv4 fragment"
BASE = ("apply", "-i", "eth1", "-y", "--ignore-selinux", "-p", INET4)
CHANGE = ("apply", "-i", "eth1", "-y", "--ignore-selinux", "-e", "-p", INET4)
STATE_FILES = ("etc/hostprep/settings.json", "var/lib/hostprep/applied.json", "var/lib/hostprep/kernel.json",
               f"etc/sysctl.d/{sysctl.DROPIN_NAME}")
CONTAINERS_DIR = "var/lib/hostprep/containers"
PENDING = "var/lib/hostprep/pending.json"
INFLIGHT = "var/lib/hostprep/inflight.json"
JOURNAL = "var/log/hostprep/journal.log"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --------------------------------------------------------------------------- helpers

NATIVE = True      # runs on the native nft backend too (conftest.variant)
LEGACY = False     # conftest.variant: iptables-nft stands for both iptables variants here
LEGACY_WHY = ("the iptables variant changes only the tool hostprep runs in this module; its rules, "
              "reading and boot files are proven on iptables-legacy by the hardening, containers, "
              "persistence, boot, switch, synproxy and selftest modules")


def command_of(args) -> str:
    """The command line hostprep records (``hostprep`` + its arguments)."""
    return "hostprep " + " ".join(args)


def zero_policy_counters(text: str) -> str:
    """iptables-legacy-save prints the built-in chains' policy counters even without -c."""
    return re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", text, flags=re.M)


def ingress(nft: str | None) -> bool:
    """Whether hostprep's fragment table (netdev) is in a state's nft part (either backend)."""
    return nft is not None and "table netdev hostprep" in nft


def has_ddos(host, state: dict) -> bool:
    if host.native:
        return "chain HOSTPREP-DDOS-v4 {" in (state["nft"] or "")
    return ":HOSTPREP-DDOS - [0:0]" in state["filter4"].splitlines()


def nft_table(host) -> str | None:
    if host.native:
        return host.nft_state()
    res = host.run(host.box.host, ["nft", "list", "table", "netdev", "hostprep"], check=False)
    if res.returncode != 0:
        return None
    return re.sub(r"counter packets \d+ bytes \d+", "counter packets 0 bytes 0", res.stdout)


def ipset_save(host) -> str:
    return host.run(host.box.host, ["ipset", "save"]).stdout


def state_files(host) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for rel in STATE_FILES:
        p = host.root / rel
        out[rel] = p.read_bytes() if p.is_file() else None
    cdir = host.root / CONTAINERS_DIR
    for p in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
        out[str(p.relative_to(host.root))] = p.read_bytes()
    return out


def snapshot(host) -> dict:
    """Everything a change may touch (see the module docstring)."""
    return {"filter4": zero_policy_counters(host.ruleset_text(4)),
            "filter6": zero_policy_counters(host.ruleset_text(6)),
            "ipset": ipset_save(host), "nft": nft_table(host), "files": state_files(host)}


def pending(host) -> dict | None:
    p = host.root / PENDING
    return json.loads(p.read_text()) if p.is_file() else None


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def journal(host) -> list[list[str]]:
    """The journal as [time, user, command, what changed, result] per line."""
    p = host.root / JOURNAL
    rows = [ln.split("\t") for ln in p.read_text().splitlines()] if p.is_file() else []
    return [r for r in rows if len(r) == 5]          # (a line being written is read at the next poll)


def deadline_rollbacks(host, cid: str) -> list[list[str]]:
    """Journal lines of the watcher's rollback of change ``cid``."""
    return [f for f in journal(host) if f[2] == f"hostprep rollback (deadline of change {cid})"]


def armed_line(p: dict) -> str:
    return (f"confirm within {p['seconds']} s: run 'hostprep confirm' before {p['deadline_text']}, or the state "
            f"before this change is restored (watcher process {p['watcher_pid']} (no systemd in this namespace)); "
            "'hostprep rollback' restores it now")


def refusal(p: dict) -> str:
    return (f"error: confirmation: change {p['id']} ({p['command']}) waits for 'hostprep confirm' until "
            f"{p['deadline_text']} (run 'hostprep confirm' to keep it or 'hostprep rollback' to undo it first)")


def frag_probe(host, timeout: float) -> tuple[dict, int]:
    """A fragmented echo request from the -p host to the external NIC; (result, nft fragment drops)."""
    before = host.nft_counter(FRAG_RULE)
    res = host.probe1(host.box.inet, kind="frag", dst=HOST_EXT4, src=INET4, timeout=timeout)
    return res, host.nft_counter(FRAG_RULE) - before


def container_lines(text: str, name: str) -> list[str]:
    """A container's lines in iptables-save: its dispatch rule(s), then its chain."""
    chain = f"HOSTPREP-C-{name}"
    lines = text.splitlines()
    return ([ln for ln in lines if ln.startswith("-A HOSTPREP-CONTAINERS ") and ln.endswith(f"-j {chain}")]
            + [ln for ln in lines if ln.startswith(f"-A {chain} ")])


def ipset_blocks(text: str) -> dict[str, list[str]]:
    """``ipset save`` as set name -> its lines, in the order printed."""
    out: dict[str, list[str]] = {}
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) >= 2:
            out.setdefault(parts[1], []).append(ln)
    return out


class T:
    """The sandbox host and the watchers this test made hostprep start."""

    def __init__(self, host) -> None:
        self.host = host
        self.watchers: set[int] = set()

    def hp(self, *args: str, check: bool = True, env: dict | None = None):
        return self.host.hostprep(*args, check=check, env=env)

    def armed(self) -> dict:
        """The pending confirmation just armed (its watcher remembered for the teardown)."""
        p = pending(self.host)
        assert p is not None, "no pending.json after a --confirm change"
        if p.get("watcher_pid"):
            self.watchers.add(p["watcher_pid"])
        return p

    def wait_rolled_back(self, p: dict) -> list[str]:
        """Poll until the watcher's rollback of ``p`` is journalled and the watcher exited."""
        assert wait_for(lambda: deadline_rollbacks(self.host, p["id"]), p["deadline"] - time.time() + POLL), \
            f"no rollback of change {p['id']} in the journal {POLL} s after its deadline"
        assert time.time() >= p["deadline"]          # not before the deadline
        assert wait_for(lambda: not watcher_alive(p["watcher_pid"]), POLL)
        lines = deadline_rollbacks(self.host, p["id"])
        assert len(lines) == 1
        return lines[0]


@pytest.fixture
def t(host):
    tt = T(host)
    yield tt
    # No watcher of this test may outlive it (after a failure: killed by its PID).
    try:
        p = pending(host)
        if p and p.get("watcher_pid"):
            tt.watchers.add(p["watcher_pid"])
    except (OSError, ValueError):
        pass
    for pid in tt.watchers:
        if watcher_alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not watcher_alive(pid), 5)


def assert_rolled_back_line(fields: list[str], p: dict) -> None:
    assert fields[3].startswith(f"rolled back change {p['id']} ({p['command']}), deadline passed without "
                                "'hostprep confirm': "), fields
    assert fields[4] == "ok"


# --------------------------------------------------------------------------- 1. no confirm: rolled back

def test_unconfirmed_change_is_rolled_back_at_the_deadline(t):
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    status_before = t.hp("status", "--json", check=False)
    assert (status_before.returncode, json.loads(status_before.stdout)["problems"]) == (0, [])
    res, drops = frag_probe(host, QUIET)
    assert (res["answered"], drops) == (False, res["fragments"])       # dropped at ingress before

    t0 = time.time()
    args = (*CHANGE, "--confirm", str(CONFIRM))
    applied = t.hp(*args)
    p = t.armed()
    during = snapshot(host)
    assert time.time() < p["deadline"], "the pending state was looked at after the deadline"
    assert (p["command"], p["seconds"], p["mechanism"]) == (command_of(args), CONFIRM, "process")
    assert t0 + CONFIRM <= p["deadline"] <= time.time() + CONFIRM
    assert armed_line(p) in applied.stderr.splitlines()
    assert watcher_alive(p["watcher_pid"])
    # the change is live while it waits: the ddos group and the fragment table are gone
    assert ingress(before["nft"]) and not ingress(during["nft"])
    assert (has_ddos(host, before), has_ddos(host, during)) == (True, False)
    assert during["files"]["etc/hostprep/settings.json"] != before["files"]["etc/hostprep/settings.json"]

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    after = snapshot(host)
    for part in ("filter4", "filter6", "ipset", "nft", "files"):
        assert after[part] == before[part], part
    assert pending(host) is None
    assert not (host.root / INFLIGHT).exists()
    status_after = t.hp("status", "--json", check=False)
    report = json.loads(status_after.stdout)
    assert (status_after.returncode, report["problems"], report["transaction"]["pending"]) == (0, [], None)
    # the packet is back to its before-behaviour: dropped at ingress, counted by the recreated rule
    res, drops = frag_probe(host, QUIET)
    assert (res["answered"], res["reply"], drops) == (False, None, res["fragments"])


# --------------------------------------------------------------------------- 2. confirmed: it stays

def test_confirmed_change_stays_after_the_deadline(t):
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    args = (*CHANGE, "--confirm", str(CONFIRM))
    t.hp(*args)
    p = t.armed()
    during = snapshot(host)
    assert not ingress(during["nft"]) and ingress(before["nft"])

    confirmed = t.hp("confirm")
    assert time.time() < p["deadline"], "the confirm came too late for this test to mean anything"
    assert confirmed.stdout.strip() == f"confirmed: change {p['id']} ({command_of(args)}) stays"
    assert wait_for(lambda: not watcher_alive(p["watcher_pid"]), 5)     # the watcher is stopped at once
    assert pending(host) is None
    again = t.hp("confirm", check=False)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == ["error: confirm: no change waits for confirmation "
                                                 "(see 'hostprep status')"]

    time.sleep(max(0.0, p["deadline"] + 1.5 - time.time()))            # the deadline is over
    assert snapshot(host) == during
    rows = [f[2:] for f in journal(host) if p["id"] in f[3] and f[2] != command_of(args)]
    assert rows == [["hostprep confirm", f"change {p['id']} ({command_of(args)}) confirmed", "ok"]]
    assert deadline_rollbacks(host, p["id"]) == []

    rc_text = t.hp("status", check=False)
    assert rc_text.returncode == 0, rc_text.stderr
    assert "PENDING CONFIRMATION" not in rc_text.stdout
    assert (f"rollback: change {p['id']} ('hostprep rollback' undoes it)"      # 80 columns: issue 15, item 3
            in rc_text.stdout.splitlines())
    report = json.loads(t.hp("status", "--json").stdout)
    assert report["transaction"]["pending"] is None
    assert report["problems"] == []

    # the kept change on real packets: the fragmented echo from the -p host is reassembled and answered
    res, drops = frag_probe(host, ANSWER)
    assert (res["answered"], res["reply"], drops) == (True, "icmp 0/0", 0)


# --------------------------------------------------------------------------- 3. status while pending

def test_status_shows_the_pending_confirmation(t):
    t.hp(*BASE)
    args = (*CHANGE, "--confirm", str(LONG))
    t.hp(*args)
    p = t.armed()
    cmd = command_of(args)

    text = t.hp("status", check=False)
    assert text.returncode == 1
    lines = [ln for ln in text.stdout.splitlines() if ln.startswith("PENDING CONFIRMATION")]
    assert len(lines) == 1, text.stdout
    m = re.fullmatch(rf"PENDING CONFIRMATION: change {re.escape(p['id'])} \({re.escape(cmd)}\) is rolled back at "
                     rf"{re.escape(p['deadline_text'])} \((\d+) s left\) unless 'hostprep confirm' runs; "
                     r"timer: process", lines[0])
    assert m is not None, lines[0]
    assert LONG - 15 <= int(m[1]) <= LONG
    waits = (f"change {p['id']} ({cmd}) waits for 'hostprep confirm' until {p['deadline_text']} "
             f"({m[1]} s left); then it is rolled back")
    assert f"difference: {waits}" in text.stderr.splitlines()

    js = t.hp("status", "--json", check=False)
    assert js.returncode == 1
    report = json.loads(js.stdout)
    pend = dict(report["transaction"]["pending"])
    left = pend.pop("seconds_left")
    assert LONG - 15 <= left <= LONG
    assert pend == {"id": p["id"], "command": cmd, "deadline": p["deadline_text"], "mechanism": "process",
                    "timer_alive": True, "watcher_pid": p["watcher_pid"], "unit": None}
    assert [x for x in report["problems"] if "hostprep confirm" in x] == [
        f"change {p['id']} ({cmd}) waits for 'hostprep confirm' until {p['deadline_text']} ({left} s left); "
        "then it is rolled back"]
    assert report["transaction"]["interrupted"] is None

    t.hp("confirm")
    assert wait_for(lambda: not watcher_alive(p["watcher_pid"]), 5)
    after = t.hp("status", check=False)
    assert after.returncode == 0, after.stderr
    assert "PENDING CONFIRMATION" not in after.stdout
    assert json.loads(t.hp("status", "--json").stdout)["transaction"]["pending"] is None


# --------------------------------------------------------------------------- 4. other changes refused

def test_changes_refused_while_a_confirmation_is_pending(t, tmp_path):
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    env = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse")
    args = (*CHANGE, "--confirm", str(LONG))
    t.hp(*args)
    p = t.armed()
    during = snapshot(host)
    journal_during = journal(host)
    rollback_dir = sorted(x.name for x in (host.root / "var/lib/hostprep/rollback").iterdir())

    for attempt in (BASE, ("container", "up", "fin", "--env", str(env)), ("flush",)):
        res = t.hp(*attempt, check=False)
        assert res.returncode != 0, attempt
        assert res.stderr.strip().splitlines() == [refusal(p)], attempt
        assert "Traceback" not in res.stdout + res.stderr
        assert snapshot(host) == during, attempt
        assert pending(host) == p
        assert watcher_alive(p["watcher_pid"])
        assert not (host.root / INFLIGHT).exists()
        assert sorted(x.name for x in (host.root / "var/lib/hostprep/rollback").iterdir()) == rollback_dir
    assert not (host.root / "var/log/hostprep/iptables_logs/fin.log").exists()
    assert journal(host) == journal_during

    # end it: 'hostprep rollback' while pending restores the state before the pending change
    res = t.hp("rollback")
    assert res.stdout.splitlines()[0].startswith(
        f"rolled back change {p['id']} ({command_of(args)}), on demand: ")
    assert wait_for(lambda: not watcher_alive(p["watcher_pid"]), 5)
    assert pending(host) is None
    assert snapshot(host) == before
    assert deadline_rollbacks(host, p["id"]) == []


# --------------------------------------------------------------------------- 5. the SSH session dies

# The login shell of an SSH session: a session leader whose controlling terminal is
# the slave of a pseudo-terminal.  It runs hostprep, prints its exit code, then idles.
# When hostprep has returned (argv[1] "-") or has reached the fault point whose
# marker file is argv[1], the "connection dies": the master side is closed (the
# kernel hangs up the terminal) and SIGHUP goes to the session's process group.
# The login shell starts with the default dispositions sshd gives it, whatever this
# test inherited: an ignored SIGHUP (a CI started under nohup) survives exec and
# would keep the session alive (the test then waited out its 90 s and failed).
SSH_SESSION = r"""
import json, os, pty, re, select, signal, sys, time
marker = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.execv("/bin/sh", ["sh", "-c", '"$0" -m hostprep "$@"; echo "HOSTPREP-EXIT $?"; exec sleep 120',
                         sys.executable, *sys.argv[2:]])
def reached():
    return os.path.exists(marker) if marker != "-" else re.search(rb"HOSTPREP-EXIT \d+", out)
out = b""
end = time.monotonic() + 60
while not reached() and time.monotonic() < end:
    ready, _, _ = select.select([fd], [], [], 0.5)
    if ready:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
time.sleep(0.2)
sid, pgrp = os.getsid(pid), os.getpgid(pid)
os.close(fd)
try:
    os.killpg(pgrp, signal.SIGHUP)
except ProcessLookupError:
    pass
_, status = os.waitpid(pid, 0)
print(json.dumps({"output": out.decode(errors="replace"), "leader": pid, "sid": sid, "pgrp": pgrp,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}))
"""


def test_rollback_survives_the_ssh_session_dying(t):
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    args = (*CHANGE, "--confirm", str(CONFIRM))
    env = {"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend, "PYTHONPATH": REPO,
           "HOSTPREP_SELINUXFS": str(host.selinuxfs)}
    res = host.run(host.box.host, [PY, "-c", SSH_SESSION, "-", *args], env=env, timeout=90)
    session = json.loads(res.stdout)
    p = t.armed()
    output = ANSI.sub("", session["output"]).replace("\r\n", "\n")

    assert "HOSTPREP-EXIT 0" in output.splitlines(), output
    assert re.search(r"^applied: .* on eth1 ", output, re.M), output
    assert "confirm within 3 s: run 'hostprep confirm' before" in output
    assert session["sid"] == session["leader"] == session["pgrp"]       # it was a session leader
    assert session["signal"] == signal.SIGHUP                            # and the hangup reached it
    # the session is gone; its watcher is not: it lives in a session of its own
    assert watcher_alive(p["watcher_pid"])
    assert os.getsid(p["watcher_pid"]) == p["watcher_pid"] != session["sid"]
    assert time.time() < p["deadline"]
    assert snapshot(host) != before

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    assert snapshot(host) == before
    assert pending(host) is None


def hostprep_running(pid: int) -> bool:
    try:
        return b"hostprep" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_rollback_when_the_ssh_session_dies_during_the_change(t, tmp_path):
    """The change cut the admin's connection while it was loading: the hangup waits until the change is
    whole (recorded, never one family without the other), then takes the process; the armed rollback
    restores the state before it at the deadline."""
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    faults = tmp_path / "faults"
    faults.mkdir()
    marker = faults / "before-record.reached"
    args = (*CHANGE, "--confirm", str(CONFIRM))
    env = {"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend, "PYTHONPATH": REPO,
           "HOSTPREP_SELINUXFS": str(host.selinuxfs), "HOSTPREP_FAULT": "before-record:pause",
           "HOSTPREP_FAULT_DIR": str(faults)}
    res = host.run(host.box.host, [PY, "-c", SSH_SESSION, str(marker), *args], env=env, timeout=90)
    session = json.loads(res.stdout)
    p = t.armed()
    apply_pid = int(marker.read_text())
    output = ANSI.sub("", session["output"])

    assert session["signal"] == signal.SIGHUP                # the session is gone ...
    assert "HOSTPREP-EXIT" not in output
    assert hostprep_running(apply_pid)                       # ... the change in the middle of it is not
    assert (host.root / INFLIGHT).is_file()
    marker.unlink()                                          # let it go on
    assert wait_for(lambda: not hostprep_running(apply_pid), 10)

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    # It finished and recorded the change whole before the hang-up took it (no recovery was needed);
    # the watcher, which waited for the lock meanwhile, then rolled it back.
    commands = [f[2] for f in journal(host)]
    assert commands[-2:] == [command_of(args), f"hostprep rollback (deadline of change {p['id']})"]
    assert not any(c.startswith("recover") for c in commands)
    assert snapshot(host) == before
    assert pending(host) is None
    status = t.hp("status", "--json", check=False)
    report = json.loads(status.stdout)
    assert (status.returncode, report["problems"], report["transaction"]["interrupted"]) == (0, [], None)


# --------------------------------------------------------------------------- 6. rollback on demand

def test_rollback_on_demand_then_nothing_left(t):
    host = t.host
    t.hp(*BASE)
    before = snapshot(host)
    t.hp(*CHANGE)
    changed = snapshot(host)
    assert changed != before
    cid = json.loads(t.hp("status", "--json").stdout)["transaction"]["rollback_available"]
    assert cid is not None
    assert pending(host) is None

    res = t.hp("rollback")
    first = res.stdout.splitlines()[0]
    m = re.fullmatch(rf"rolled back change {re.escape(cid)} \({re.escape(command_of(CHANGE))}\), on demand: "
                     r"(\d+) items restored", first)
    assert m is not None, res.stdout
    assert int(m[1]) >= 3
    assert snapshot(host) == before
    entry = [f[2:] for f in journal(host) if f[2] == "hostprep rollback"]
    assert len(entry) == 1
    assert entry[0][1].startswith(f"rolled back change {cid} ({command_of(CHANGE)}), on demand: ")
    assert entry[0][2] == "ok"

    again = t.hp("rollback", check=False)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [
        "error: rollback: nothing to roll back: no change is recorded since the last rollback "
        "(see 'hostprep status')"]
    assert again.stdout == ""
    assert snapshot(host) == before
    assert len([f for f in journal(host) if f[2] == "hostprep rollback"]) == 1

    # --confirm on a change that changes nothing arms nothing (no watcher is left behind)
    same = t.hp(*BASE, "--confirm", str(LONG))
    assert "nothing changed: the hardening on eth1 is already live" in same.stdout
    assert "confirm within" not in same.stderr
    assert pending(host) is None
    assert snapshot(host) == before


def nft_chain_block(nft: str, chain: str) -> list[str]:
    """The rules of ``chain`` (and its sub-chains) in a native state's nft text."""
    out, inside = [], False
    for line in nft.splitlines():
        m = re.match(r"^\tchain (\S+) \{", line)
        if m:
            inside = m.group(1) == chain or m.group(1).startswith(chain + ".")
        elif line == "\t}":
            inside = False
        elif inside and line.strip():
            out.append(line.strip())
    return out


def c_lines(host, state: dict, name: str, fam: int = 4) -> list[str]:
    """A container's rules in a state: iptables-save lines, or the native table's chain."""
    if host.native:
        return nft_chain_block(state["nft"] or "", f"HOSTPREP-C-{name}-v{fam}")
    return container_lines(state[f"filter{fam}"], name)


def c_sets(host, state: dict, each=None) -> dict:
    """hostprep's exempt/load-balancer sets in a state: ipset blocks (``each``: members), or the native
    table's list sets, NAME.addr and NAME.net (name -> its members line, conftest.Host.nft_state)."""
    if host.native:
        return {ln.split(":")[0][len("set "):]: ln for ln in (state["nft"] or "").splitlines()
                if ln.startswith("set hostprep-")}
    return (each or ipset_blocks)(state["ipset"])


# --------------------------------------------------------------------------- 7. container up, unconfirmed

def test_unconfirmed_container_up_is_rolled_back_other_container_untouched(t, tmp_path):
    host = t.host
    t.hp(*BASE)
    fin_env = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse", IPTABLES_CONNECTION_LIMIT_ABOVE=1000)
    core_a = env_file(tmp_path, "core-a.env", NGX_RATELIMIT_DISABLE_IPS=SRC_A)
    ids_env = env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids", IPTABLES_CONNECTION_LIMIT_ABOVE=1000)
    core_b = env_file(tmp_path, "core-b.env", NGX_RATELIMIT_DISABLE_IPS="192.0.2.99")
    t.hp("container", "up", "fin", "--env", str(fin_env), "--core", str(core_a))
    before = snapshot(host)
    fin4, fin6 = c_lines(host, before, "fin"), c_lines(host, before, "fin", 6)
    fin_sets = c_sets(host, before)
    assert len(fin4) >= 3 and fin_sets != {}
    probes = [{"kind": "connect", "dst": HOST_EXT4, "port": 8553, "src": SRC_B, "timeout": QUIET},
              {"kind": "connect", "dst": HOST_EXT4, "port": 8445, "src": SRC_B, "timeout": ANSWER}]
    closed_open = [{"answered": False, "reply": None}, {"answered": True, "reply": "refused"}]
    assert host.probe(host.box.inet, probes) == closed_open

    args = ("container", "up", "ids", "--env", str(ids_env), "--core", str(core_b), "--confirm", str(CONFIRM))
    up = t.hp(*args)
    p = t.armed()
    live = host.probe(host.box.inet, probes[:1])
    probed_in_time = time.time() < p["deadline"]
    during = snapshot(host)
    assert armed_line(p) in up.stderr.splitlines()
    assert probed_in_time, "the probe of the pending state ended after the deadline"
    assert live == [{"answered": True, "reply": "refused"}]            # ids' port 8553 is open while pending
    assert c_lines(host, during, "ids") != []
    new_sets = sorted(set(c_sets(host, during)) - set(fin_sets))
    assert len(new_sets) >= 1
    assert f"{CONTAINERS_DIR}/ids.json" in during["files"]
    assert c_lines(host, during, "fin") == fin4

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    after = snapshot(host)
    for part in ("filter4", "filter6", "ipset", "nft", "files"):
        assert after[part] == before[part], part
    assert c_lines(host, after, "ids") == c_lines(host, after, "ids", 6) == []
    assert "HOSTPREP-C-ids" not in after["filter4"] + after["filter6"] + (after["nft"] or "")
    assert set(c_sets(host, after)) & set(new_sets) == set()
    assert not (host.root / CONTAINERS_DIR / "ids.json").exists()
    # the container that was up before: its exact rules and sets (same initval: never recreated)
    assert (c_lines(host, after, "fin"), c_lines(host, after, "fin", 6)) == (fin4, fin6)
    assert c_sets(host, after) == fin_sets
    assert host.probe(host.box.inet, probes) == closed_open


def members(ipset_text: str) -> dict[str, list[str]]:
    """``ipset save`` per set, lines sorted, without the random hash seed (a swapped-in set has a new one)."""
    return {name: sorted(re.sub(r" initval 0x[0-9a-f]+", "", ln) for ln in lines)
            for name, lines in ipset_blocks(ipset_text).items()}


def test_unconfirmed_container_replace_brings_the_old_rules_and_sets_back(t, tmp_path):
    host = t.host
    t.hp(*BASE)
    old_env = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse", IPTABLES_CONNECTION_LIMIT_ABOVE=1000,
                       IPTABLES_HASH_LIMIT_UPTO=6, IPTABLES_HASH_LIMIT_BURST=8)
    old_core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS=SRC_A)
    t.hp("container", "up", "fin", "--env", str(old_env), "--core", str(old_core))
    before = snapshot(host)
    new_env = env_file(tmp_path, "finesse2.env", TEMPLATE_TYPE="finesse", IPTABLES_CONNECTION_LIMIT_ABOVE=1000,
                       IPTABLES_HASH_LIMIT_UPTO=3, IPTABLES_HASH_LIMIT_BURST=4)
    new_core = env_file(tmp_path, "core2.env", NGX_RATELIMIT_DISABLE_IPS=f"{SRC_B}|192.0.2.77")
    t.hp("container", "up", "fin", "--env", str(new_env), "--core", str(new_core), "--confirm", str(CONFIRM),
         "-y")                                              # exempt entries added: widens access
    p = t.armed()
    during = snapshot(host)
    assert time.time() < p["deadline"], "the pending state was looked at after the deadline"
    assert c_lines(host, during, "fin") != c_lines(host, before, "fin")
    assert c_sets(host, during, members) != c_sets(host, before, members)
    assert during["files"][f"{CONTAINERS_DIR}/fin.json"] != before["files"][f"{CONTAINERS_DIR}/fin.json"]

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    after = snapshot(host)
    for part in ("filter4", "filter6", "nft", "files"):
        assert after[part] == before[part], part
    assert c_sets(host, after, members) == c_sets(host, before, members)
    # the old exempt set is live again: SRC_A passes as exempt, SRC_B within the rate
    exempt = '"hostprep containers: fin exempt"'
    within = '"hostprep containers: fin within rate"'
    c0 = (host.counter(4, "HOSTPREP-C-fin", exempt), host.counter(4, "HOSTPREP-C-fin", within))
    res = host.probe(host.box.inet, [{"kind": "connect", "dst": HOST_EXT4, "port": 8445, "src": src,
                                      "timeout": ANSWER} for src in (SRC_A, SRC_B)])
    assert res == [{"answered": True, "reply": "refused"}] * 2
    c1 = (host.counter(4, "HOSTPREP-C-fin", exempt), host.counter(4, "HOSTPREP-C-fin", within))
    assert (c1[0] - c0[0], c1[1] - c0[1]) == (1, 1)


# --------------------------------------------------------------------------- boot units

def boot_units(host) -> dict[str, str]:
    """What apply installs for the next boot: the unit files, their enabling symlinks, logrotate."""
    out: dict[str, str] = {}
    for top in ("etc/systemd", "etc/logrotate.d"):
        base = host.root / top
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            if p.is_symlink():
                out[str(p.relative_to(host.root))] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(host.root))] = p.read_text()
    return out


def test_unconfirmed_nic_switch_rolls_back_the_boot_units_too(t):
    """Moving the hardening to another NIC is the change one fears most; its rollback must be whole."""
    host = t.host
    t.hp(*BASE)
    before, units_before = snapshot(host), boot_units(host)
    assert "etc/systemd/system/sys-subsystem-net-devices-eth1.device.wants/hostprep-nic@eth1.service" in units_before
    args = ("apply", "-i", "eth0", "-y", "--switch-nic", "--ignore-selinux", "--confirm", str(CONFIRM))
    t.hp(*args)
    p = t.armed()
    assert boot_units(host) != units_before            # apply installed the units of eth0

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    assert snapshot(host) == before                    # the firewall and the state files are back ...
    status = t.hp("status", "--json", check=False)
    assert (status.returncode, json.loads(status.stdout)["problems"]) == (0, [])
    assert boot_units(host) == units_before            # ... and so must the next boot be


# --------------------------------------------------------------------------- 8. apply -k, unconfirmed

PROFILE = {s.key: s.value for s in sysctl.profile()}
NET = [k for k in PROFILE if k.startswith("net.")]
OTHER = [k for k in PROFILE if not k.startswith("net.")]

# Every readable file of /proc/sys/net as the namespace it runs in sees it.
NET_TREE = r"""
import json, os
out = {}
for d, _, files in os.walk("/proc/sys/net"):
    for f in files:
        p = os.path.join(d, f)
        try:
            with open(p) as fh:
                out[p] = fh.read()
        except OSError:
            pass
print(json.dumps(out))
"""
VOLATILE = {"/proc/sys/net/netfilter/nf_conntrack_count"}


def net_tree(host) -> dict[str, str]:
    res = host.run(host.box.host, [PY, "-c", NET_TREE])
    return {k: v for k, v in json.loads(res.stdout).items() if k not in VOLATILE}


def standin_texts(d: Path) -> dict[str, str]:
    return {str(p): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_unconfirmed_kernel_profile_is_rolled_back(t, tmp_path):
    host = t.host
    machine_before = read_machine(PROFILE)
    standin = tmp_path / "proc-sys-standin"
    for key, text in read_machine(OTHER).items():
        if text is not None:
            p = key_path(standin, key)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    env = {"HOSTPREP_PROC_SYS_NONNET": str(standin), "SSH_CONNECTION": ""}
    # hostprep resolves the non-net keys into the stand-in, or this test stops here
    where = host.run(host.box.host, [PY, "-c", "from hostprep.sysctl import Kernel; "
                                     "print(Kernel().path('vm.swappiness'))"], env={**env, "PYTHONPATH": REPO})
    assert where.stdout.strip() == str(standin / "vm/swappiness")

    net_before, other_before, files_before = net_tree(host), standin_texts(standin), state_files(host)
    assert files_before[STATE_FILES[3]] is None
    args = ("apply", "-k", "--confirm", str(CONFIRM))
    t.hp(*args, env=env)
    p = t.armed()
    net_during = net_tree(host)
    other_during = standin_texts(standin)
    assert net_during["/proc/sys/net/ipv4/ip_forward"] == "1\n" != net_before["/proc/sys/net/ipv4/ip_forward"]
    assert net_during["/proc/sys/net/ipv4/conf/all/rp_filter"] == "1\n"
    assert other_during != other_before
    assert other_during[str(standin / "kernel/randomize_va_space")] == "2\n"
    assert (host.root / STATE_FILES[3]).is_file()

    line = t.wait_rolled_back(p)

    assert_rolled_back_line(line, p)
    assert net_tree(host) == net_before
    assert standin_texts(standin) == other_before
    assert state_files(host) == files_before          # the drop-in and kernel.json are gone again
    assert pending(host) is None
    assert read_machine(PROFILE) == machine_before
