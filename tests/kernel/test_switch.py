"""Switching a hardened host between backends, in one change (issue 13 item 3).

From each backend of the sandbox host (``host.backend``: iptables-nft, iptables-legacy, or
the native nft backend) to the other kind (native nft from iptables, iptables-nft from
native) and back:

  1. ``apply --backend OTHER``: the other backend's rules are loaded and read back, then the
     old backend's part goes: afterwards exactly one backend holds hostprep, the journal says
     "backend A -> B", real packets meet the same policy, ``status`` names the backend and why;
  2. ``rollback`` (and the ``--confirm`` deadline) puts the old backend back exactly as it was
     (rules, sets, tables, records) and removes the new one's part;
  3. kill -9 at each point of a switch (before the load, between "new in" and "old out",
     before the record): recovery leaves the host on exactly one complete backend, the old one;
  4. a switch whose load fails, or whose removal of the old part fails, leaves the old backend
     exactly as it was and nothing of the new one.

"Holding hostprep" is read from the kernel directly: hostprep's chains in the filter table of
each iptables variant, hostprep's ipsets, the ``inet hostprep`` table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostprep.backend import PROBE_SCRIPT
from hostprep.model import PREFIX, SET_PREFIX
from hostprep.sandbox import HOST_EXT4, HOST_EXT6
from tests.helpers import ANSWER, env_file, tcp

NATIVE = True      # runs from the native nft backend too (conftest.variant)

REPO = str(Path(__file__).resolve().parents[2])
STATE = "var/lib/hostprep"
NAMES = {"iptables-nft": "iptables-nft", "iptables-legacy": "iptables-legacy", "nft": "nft"}
REMEMBERED = {"HOSTPREP_BACKEND": ""}      # no backend asked: the one applied.json remembers


def other(host) -> str:
    """The backend a switch goes to: native nft from iptables, iptables-nft from native."""
    return "iptables-nft" if host.native else "nft"


def holders(host) -> set[str]:
    """Which backends hold a part of hostprep now (read from the kernel, not through hostprep)."""
    out = set()
    for variant in ("nft", "legacy"):
        if variant == "legacy":
            names = host.run(host.box.host, ["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"],
                             check=False).stdout.split()
            if "filter" not in names:
                continue        # iptables-legacy-save would create the table
        for base in ("iptables", "ip6tables"):
            text = host.run(host.box.host, [f"{base}-{variant}-save", "-t", "filter"], check=False).stdout
            if re.search(rf"^(:{PREFIX}|-A \S+ .*-j {PREFIX})", text, re.M):
                out.add(f"iptables-{variant}")
    sets = host.run(host.box.host, ["ipset", "list", "-n"], check=False).stdout.split()
    if any(s.startswith(SET_PREFIX) for s in sets):
        out.add("ipset")
    if host.run(host.box.host, ["nft", "list", "table", "inet", "hostprep"], check=False).returncode == 0:
        out.add("nft")
    return out


def owned(backend: str) -> set[str]:
    """What ``holders`` finds when ``backend`` alone holds hostprep (with a container up)."""
    return {"nft"} if backend == "nft" else {backend, "ipset"}


def full_state(host) -> dict:
    """Everything of the kernel a switch may touch, without counters: both families of the
    filter table of each iptables variant in use, the ipsets, hostprep's nft tables."""
    out = {}
    for variant in ("nft", "legacy"):
        names = host.run(host.box.host, ["cat", "/proc/net/ip_tables_names"], check=False).stdout.split()
        if variant == "legacy" and "filter" not in names:
            continue
        for base in ("iptables", "ip6tables"):
            text = host.run(host.box.host, [f"{base}-{variant}-save", "-t", "filter"], check=False).stdout
            out[f"{base}-{variant}"] = re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", "\n".join(
                ln for ln in text.splitlines() if not ln.startswith("#")), flags=re.M)
    out["ipset"] = re.sub(r" initval 0x[0-9a-f]+", "", host.run(host.box.host, ["ipset", "save"]).stdout)
    out["nft"] = host.nft_state()
    return out


def files(host) -> dict[str, str]:
    """The state files a rollback restores (settings, record, container records)."""
    return {str(p.relative_to(host.root)): p.read_text() for p in sorted(host.root.rglob("*.json"))
            if "/rollback/" not in str(p) and p.name not in ("inflight.json", "pending.json", "attack-baseline.json")}


def journal(host) -> list[list[str]]:
    path = host.root / "var/log/hostprep/journal.log"
    return [ln.split("\t") for ln in path.read_text().splitlines()] if path.exists() else []


def status(host, **env) -> tuple[int, dict]:
    res = host.hostprep("status", "--json", check=False, env={**REMEMBERED, **env})
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def packets(host) -> list[bool]:
    """Port 8445 (container fin, IPv4) over IPv4 and IPv6, port 9999 (a foreign rule accepts it,
    hostprep's deny drops it) over both: answered or not."""
    res = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445, ANSWER), tcp(HOST_EXT6, 8445, ANSWER),
                                     tcp(HOST_EXT4, 9999), tcp(HOST_EXT6, 9999)])
    return [r["answered"] for r in res]


OPEN_CLOSED = [True, False, False, False]     # fin's IPv4 port open, the rest closed


@pytest.fixture
def hardened(host, tmp_path):
    """The sandbox host hardened by its own backend, with container fin up (a set on iptables)."""
    host.apply()
    env = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse")
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="203.0.113.7")
    host.hostprep("container", "up", "fin", "--env", str(env), "--core", str(core))
    assert holders(host) == owned(host.backend)
    assert packets(host) == OPEN_CLOSED
    return host


def test_the_probe_is_accepted_and_changes_nothing(host):
    """The automatic choice's probe: `nft -c` accepts it on this kernel, and nothing is loaded."""
    before = host.nft_listing()
    res = host.run(host.box.host, ["nft", "-c", "-f", "-"], input=PROBE_SCRIPT, check=False)
    assert (res.returncode, res.stderr) == (0, "")
    assert host.nft_listing() == before


def test_switch_said_journalled_and_the_new_backend_takes_changes(hardened):
    host = hardened
    old, new = host.backend, other(host)
    before = full_state(host)
    lines = len(journal(host))

    dry = host.hostprep("apply", "-i", "eth1", "--dry-run", "--backend", new)
    said = (f"BACKEND SWITCH: the hardening moves from {NAMES[old]} to {NAMES[new]} in one change: {NAMES[new]}'s "
            f"rules are loaded and read back first, then {NAMES[old]}'s are removed; 'hostprep rollback' (or "
            f"--confirm) brings {NAMES[old]} back")
    assert said in " ".join(dry.stderr.split()) and full_state(host) == before
    res = host.apply("--backend", new)
    assert said in " ".join(res.stderr.split())
    assert f"backend {NAMES[old]} -> {NAMES[new]}: " in res.stdout
    assert holders(host) == owned(new)
    assert packets(host) == OPEN_CLOSED
    entry = journal(host)[lines:]
    assert [e[-1] for e in entry] == ["ok"]
    assert f"backend {NAMES[old]} -> {NAMES[new]}: {NAMES[new]} loaded and read back, then removed " in entry[0][3]
    code, report = status(host)
    assert (report["problems"], code, report["backend"], report["backend_choice"]["why"]) == (
        [], 0, new, "remembered")
    text = host.hostprep("status", check=False, env=REMEMBERED)
    assert f"backend: {new}, remembered (the last apply used it)" in text.stdout.splitlines()
    # container down and up again on the new backend (its record carried over)
    host.hostprep("container", "down", "fin", env=REMEMBERED)
    assert packets(host) == [False, False, False, False]
    assert holders(host) == ({"nft"} if new == "nft" else {new})

    # the rollback of that container down stays on the new backend
    host.hostprep("rollback", env=REMEMBERED)
    assert holders(host) == owned(new)
    assert packets(host) == OPEN_CLOSED


def test_rollback_of_the_switch_restores_the_old_backend(hardened):
    host = hardened
    old, new = host.backend, other(host)
    before, before_files = full_state(host), files(host)
    host.apply("--backend", new)
    assert full_state(host) != before
    lines = len(journal(host))

    rb = host.hostprep("rollback", env=REMEMBERED)
    assert rb.stdout.startswith("rolled back change "), rb.stdout
    assert full_state(host) == before
    assert files(host) == before_files
    assert holders(host) == owned(old)
    assert packets(host) == OPEN_CLOSED
    entry = journal(host)[lines:]
    assert len(entry) == 1 and entry[0][-1] == "ok"
    assert f"backend {NAMES[new]} -> {NAMES[old]}: {NAMES[old]} loaded and read back, then removed " in entry[0][3]
    code, report = status(host)
    assert (code, report["backend"], report["backend_choice"]["why"], report["problems"]) == (
        0, old, "remembered", [])


def test_unconfirmed_switch_is_rolled_back_at_the_deadline(hardened):
    host = hardened
    old, new = host.backend, other(host)
    before, before_files = full_state(host), files(host)
    host.apply("--backend", new, "--confirm", "3")
    p = json.loads((host.root / STATE / "pending.json").read_text())
    try:
        assert holders(host) == owned(new)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (host.root / STATE / "pending.json").exists():
            time.sleep(0.2)
        # the watcher journals after the restore; wait for it to exit
        while time.monotonic() < deadline and _alive(p.get("watcher_pid")):
            time.sleep(0.2)
    finally:
        if _alive(p.get("watcher_pid")):
            os.kill(p["watcher_pid"], signal.SIGTERM)
    assert not (host.root / STATE / "pending.json").exists()
    assert full_state(host) == before
    assert files(host) == before_files
    assert holders(host) == owned(old)
    assert packets(host) == OPEN_CLOSED
    assert any(e[3].startswith(f"rolled back change {p['id']}") and f"backend {NAMES[new]} -> {NAMES[old]}" in e[3]
               for e in journal(host))


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _start(host, fault: str, *args: str, fault_dir: Path) -> subprocess.Popen:
    env = {"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend, "PYTHONPATH": REPO,
           "HOSTPREP_SELINUXFS": str(host.selinuxfs), "HOSTPREP_FAULT": fault, "HOSTPREP_FAULT_DIR": str(fault_dir)}
    argv = ["ip", "netns", "exec", host.box.host, "env", *[f"{k}={v}" for k, v in env.items()],
            sys.executable, "-m", "hostprep", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["before-load", "before-release", "before-record"])
def test_kill_9_during_a_switch_then_recovery(hardened, tmp_path, point):
    """kill -9 while the switch waits at ``point``: at most both complete backends hold hostprep
    (never one half, never neither); ``status`` says so; the next command recovers the old backend."""
    host = hardened
    old, new = host.backend, other(host)
    before, before_files = full_state(host), files(host)
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    proc = _start(host, f"{point}:pause", "apply", "-i", "eth1", "-y", "--backend", new, fault_dir=fault_dir)
    marker = fault_dir / f"{point}.reached"
    try:
        deadline = time.monotonic() + 90
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{point} not reached"
            time.sleep(0.05)
        live = holders(host)
        expected = {"before-load": owned(old), "before-release": owned(old) | owned(new),
                    "before-record": owned(new)}[point]
        if point == "before-load" and new != "nft":
            expected = owned(old) | {"ipset"}   # (the iptables backend's test() creates the new sets)
        if point == "before-release" and new == "nft":
            # (the native backend's load removes the iptables chains right after its transaction;
            # the point is between its nft -f and that removal)
            expected = {"nft", old, "ipset"}
        assert live == expected
        assert packets(host) == OPEN_CLOSED         # whichever holds it: the same policy
        os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        marker.unlink(missing_ok=True)

    code, report = status(host)
    assert code == 1 and report["transaction"]["interrupted"] is not None
    # the next command that takes the lock (here the boot unit's) recovers: the old backend, as it was
    res = host.hostprep("boot", env=REMEMBERED)
    assert res.returncode == 0, res.stderr
    assert holders(host) == owned(old)
    assert full_state(host) == before
    assert files(host) == before_files
    assert packets(host) == OPEN_CLOSED
    code, report = status(host)
    assert (code, report["backend"], report["problems"]) == (0, old, [])


def _wrapper(tmp_path: Path, name: str, needle: str, unless: str = "") -> Path:
    """A ``name`` first in PATH that fails when its stdin has a line containing ``needle`` (and
    none containing ``unless``); anything else goes to the real one."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    real = subprocess.run(["which", name], capture_output=True, text=True, check=True).stdout.strip()
    script = bindir / name
    guard = f" && ! grep -qF -- '{unless}' \"$tmp\"" if unless else ""
    script.write_text(f"""#!/bin/sh
tmp=$(mktemp)
cat > "$tmp"
if grep -qF -- '{needle}' "$tmp"{guard}; then
    echo "Error: injected failure of {name}" >&2; rm -f "$tmp"; exit 1
fi
{real} "$@" < "$tmp"; rc=$?; rm -f "$tmp"; exit $rc
""")
    script.chmod(0o755)
    return bindir


@pytest.mark.parametrize("where", ["load", "release"])
def test_failed_switch_leaves_the_old_backend_exactly(hardened, tmp_path, where):
    """The new backend's load fails (the kernel's tool refuses), or the removal of the old part
    fails: the old backend holds hostprep exactly as before, nothing of the new one stays."""
    host = hardened
    old, new = host.backend, other(host)
    before, before_files = full_state(host), files(host)
    if new == "nft":
        # nft -c/-f of hostprep's script (load), or the IPv6 restore that removes the chains
        bindir = _wrapper(tmp_path, "nft", "table inet hostprep {") if where == "load" else \
            _wrapper(tmp_path, f"ip6tables-{old.split('-')[1]}-restore", "-X HOSTPREP")
    else:
        # the IPv6 restore (--test and load) of the new chains, or the nft -f deleting the inet table
        bindir = _wrapper(tmp_path, "ip6tables-nft-restore", ":HOSTPREP") if where == "load" else \
            _wrapper(tmp_path, "nft", "delete table inet hostprep", unless="{")
    res = host.hostprep("apply", "-i", "eth1", "-y", "--backend", new, check=False,
                        env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    # the switch said before it starts, then one error line
    assert len(err) == 2 and err[0].startswith("BACKEND SWITCH: ") and err[1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert full_state(host) == before
    assert files(host) == before_files
    assert holders(host) == owned(old)
    assert packets(host) == OPEN_CLOSED
    assert not (host.root / STATE / "inflight.json").exists()
    code, report = status(host)
    assert (code, report["backend"], report["problems"]) == (0, old, [])
