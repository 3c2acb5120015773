"""The confirm timer of a change (``--confirm SECONDS``) and the record of a change waiting for it.

``arm`` writes ``pending.json`` and starts what rolls the change back at its deadline
unless ``hostprep confirm`` runs first: a transient systemd timer, or a detached
watcher process (through the runner) where systemd is not PID 1 of this network
namespace.  ``disarm`` stops it; ``pending`` reads the record; ``refuse_if_pending``
keeps the next change out while one waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hostprep.errors import InputError, RefusedError, StateError
from hostprep.netns import same_netns_as_init
from hostprep.runner import PACKAGE_PARENT, Runner, python_module
from hostprep.state import Store, discard, now, read_json, write_atomic


MIN_CONFIRM, MAX_CONFIRM = 1, 86400


def pending_file(store: Store) -> Path:
    return store.paths.state_dir / "pending.json"


def confirm_seconds(value: int | None) -> int | None:
    if value is None:
        return None
    if not MIN_CONFIRM <= value <= MAX_CONFIRM:
        raise InputError("--confirm", f"{value} is not a number of seconds between {MIN_CONFIRM} and "
                         f"{MAX_CONFIRM}", "e.g. --confirm 120")
    return value


def refuse_if_pending(store: Store) -> None:
    """Before any prompt or guard: a change waiting for confirmation blocks the next one."""
    p = pending(store)
    if p:
        raise RefusedError("confirmation", f"change {p.id} ({p.command}) waits for 'hostprep "
                           f"confirm' until {p.deadline_text}",
                           "run 'hostprep confirm' to keep it or 'hostprep rollback' to undo it first")


def timer_mechanism(store: Store) -> str:
    """"systemd" (a transient timer, survives everything but a reboot) or "process".

    systemd-run starts the rollback in PID 1's network namespace, so inside any
    other namespace (the sandbox, the tests) a detached watcher process is used:
    its own session, no terminal, SIGHUP ignored, so the SSH session dying does
    not take it along.  HOSTPREP_CONFIRM_TIMER=systemd|process overrides.
    """
    choice = os.environ.get("HOSTPREP_CONFIRM_TIMER", "")
    if choice in ("systemd", "process"):
        return choice
    if choice:
        raise InputError("HOSTPREP_CONFIRM_TIMER", f"{choice!r} is not a timer", "use systemd or process")
    if Path("/run/systemd/system").is_dir() and same_netns_as_init() and Runner.which("systemd-run") \
            and str(store.paths.root) == "/":
        return "systemd"
    return "process"


def _hostprep_argv() -> list[str]:
    # -P and cwd "/": the rollback never imports from the directory the admin ran apply in
    return python_module("hostprep")


def _env_for_child() -> dict[str, str]:
    keep = ("HOSTPREP_ROOT", "HOSTPREP_BACKEND", "HOSTPREP_PROC_SYS", "HOSTPREP_PROC_SYS_NONNET",
            "HOSTPREP_SELINUXFS", "HOSTPREP_LOCK_TIMEOUT", "PYTHONPATH", "PATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PYTHONPATH", PACKAGE_PARENT)
    return env


def unit_name(cid: str) -> str:
    return f"hostprep-rollback-{cid}"


def boot_id() -> str:
    """This boot's id: a pending change armed in another boot outlived its timer (a reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Pending:
    """pending.json: a change waiting for 'hostprep confirm', and what rolls it back at its deadline."""

    id: str
    command: str
    deadline: float
    deadline_text: str
    armed: str = ""
    boot_id: str = ""               # the boot it was armed in (a reboot outlives its timer)
    seconds: int = 0
    mechanism: str = "process"      # "systemd" (unit) or "process" (watcher_pid)
    watcher_pid: int | None = None
    unit: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Pending":
        ok = (isinstance(d.get("id"), str) and isinstance(d.get("command"), str)
              and isinstance(d.get("deadline"), (int, float)) and isinstance(d.get("deadline_text"), str)
              and d.get("mechanism", "process") in ("systemd", "process")
              and isinstance(d.get("watcher_pid"), (int, type(None))) and isinstance(d.get("unit"), (str, type(None)))
              and isinstance(d.get("seconds", 0), int) and isinstance(d.get("boot_id", ""), str))
        if not ok:
            raise StateError(where, "malformed record of a change waiting for confirmation",
                             "run 'hostprep rollback' if its snapshot exists, else remove the file")
        return cls(d["id"], d["command"], float(d["deadline"]), d["deadline_text"], str(d.get("armed", "")),
                   d.get("boot_id", ""), d.get("seconds", 0), d.get("mechanism", "process"), d.get("watcher_pid"),
                   d.get("unit"))

    def to_dict(self) -> dict:
        return {"id": self.id, "command": self.command, "armed": self.armed, "boot_id": self.boot_id,
                "seconds": self.seconds, "deadline": self.deadline, "deadline_text": self.deadline_text,
                "mechanism": self.mechanism, "watcher_pid": self.watcher_pid, "unit": self.unit}


def _save(store: Store, p: Pending) -> None:
    write_atomic(pending_file(store), json.dumps(p.to_dict(), indent=2) + "\n")


def arm(store: Store, runner: Runner, cid: str, seconds: int, command: str) -> Pending:
    """Write pending.json, then start the timer (or the watcher) that rolls ``cid`` back at its deadline."""
    mech = timer_mechanism(store)
    deadline = time.time() + seconds
    p = Pending(cid, command, deadline, time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(deadline)),
                now(), boot_id(), seconds, mech)
    _save(store, p)
    if mech == "systemd":
        unit = unit_name(cid)
        env = [f"--setenv={k}={v}" for k, v in _env_for_child().items()]
        runner.run(["systemd-run", f"--unit={unit}", "--description=hostprep: roll back unconfirmed change "
                    + cid, f"--on-active={seconds}s", "--timer-property=AccuracySec=1s", "--collect",
                    *env, *_hostprep_argv(), "rollback", "--due", cid], mutates=True)
        p = dataclasses.replace(p, unit=unit + ".timer")
    else:
        p = dataclasses.replace(p, watcher_pid=runner.spawn([*_hostprep_argv(), "rollback", "--due", cid, "--wait"],
                                                            env=dict(_env_for_child())))
    _save(store, p)
    return p


def pending(store: Store) -> Pending | None:
    """The change waiting for confirmation, if any (a malformed record is one clear error)."""
    d = read_json(pending_file(store))
    return None if d is None else Pending.from_dict(d, str(pending_file(store)))


def _watcher_alive(pid: int | None, cid: str) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"--due" in argv and cid.encode() in argv


def timer_alive(runner: Runner, p: Pending) -> bool | None:
    """Is the armed rollback still going to fire?  None: cannot tell."""
    if p.mechanism == "systemd":
        if runner.which("systemctl") is None:
            return None
        res = runner.run(["systemctl", "is-active", p.unit or ""], check=False)
        return res.stdout.strip() == "active"
    return _watcher_alive(p.watcher_pid, p.id)


def disarm(store: Store, runner: Runner, p: Pending) -> None:
    """pending.json removed, the timer stopped or the watcher ended."""
    discard(pending_file(store))
    if p.mechanism == "systemd" and p.unit and runner.which("systemctl"):
        runner.run(["systemctl", "stop", p.unit], check=False, mutates=True)
    pid = p.watcher_pid
    if pid and pid != os.getpid() and _watcher_alive(pid, p.id):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def ignore_hangup() -> None:
    """The watcher runs in a session of its own; should a hang-up reach it anyway, it stays."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def wait_until_due(store: Store, cid: str) -> bool:
    """The watcher: sleep until the deadline of ``cid``; False when it was confirmed meanwhile.

    (The watcher process ignores SIGHUP: see ignore_hangup(), called by the CLI.)
    """
    while True:
        try:
            p = pending(store)
        except StateError:
            p = None
        if p is None or p.id != cid:
            return False
        left = p.deadline - time.time()
        if left <= 0:
            return True
        time.sleep(min(left, 0.5))
