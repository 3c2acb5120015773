"""The confirm timer of a change (``--confirm SECONDS``) and the record of a change waiting for it.

``arm`` writes ``pending.json`` and starts what rolls the change back at its deadline
unless ``hostprep confirm`` runs first: a transient systemd timer, or a detached
watcher process (through the runner) where systemd is not PID 1 of this network
namespace.  ``disarm`` stops it; ``pending`` reads the record; ``refuse_if_pending``
keeps the next change out while one waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
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
        raise RefusedError("confirmation", f"change {p['id']} ({p['command']}) waits for 'hostprep "
                           f"confirm' until {p['deadline_text']}",
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


def arm(store: Store, runner: Runner, cid: str, seconds: int, command: str) -> dict:
    mech = timer_mechanism(store)
    deadline = time.time() + seconds
    pending = {"id": cid, "command": command, "armed": now(), "boot_id": boot_id(), "seconds": seconds,
               "deadline": deadline,
               "deadline_text": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(deadline)),
               "mechanism": mech, "watcher_pid": None, "unit": None}
    write_atomic(pending_file(store), json.dumps(pending, indent=2) + "\n")
    if mech == "systemd":
        unit = unit_name(cid)
        env = [f"--setenv={k}={v}" for k, v in _env_for_child().items()]
        runner.run(["systemd-run", f"--unit={unit}", "--description=hostprep: roll back unconfirmed change "
                    + cid, f"--on-active={seconds}s", "--timer-property=AccuracySec=1s", "--collect",
                    *env, *_hostprep_argv(), "rollback", "--due", cid], mutates=True)
        pending["unit"] = unit + ".timer"
    else:
        pending["watcher_pid"] = runner.spawn([*_hostprep_argv(), "rollback", "--due", cid, "--wait"],
                                              env=dict(_env_for_child()))
    write_atomic(pending_file(store), json.dumps(pending, indent=2) + "\n")
    return pending


def pending(store: Store) -> dict | None:
    p = read_json(pending_file(store))
    if p is None:
        return None
    ok = (isinstance(p.get("id"), str) and isinstance(p.get("command"), str)
          and isinstance(p.get("deadline"), (int, float)) and isinstance(p.get("deadline_text"), str))
    if not ok:
        raise StateError(str(pending_file(store)), "malformed record of a change waiting for confirmation",
                         "run 'hostprep rollback' if its snapshot exists, else remove the file")
    return p


def _watcher_alive(pid: int | None, cid: str) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"--due" in argv and cid.encode() in argv


def timer_alive(runner: Runner, p: dict) -> bool | None:
    """Is the armed rollback still going to fire?  None: cannot tell."""
    if p.get("mechanism") == "systemd":
        if runner.which("systemctl") is None:
            return None
        res = runner.run(["systemctl", "is-active", p.get("unit") or ""], check=False)
        return res.stdout.strip() == "active"
    return _watcher_alive(p.get("watcher_pid"), p["id"])


def disarm(store: Store, runner: Runner, p: dict) -> None:
    discard(pending_file(store))
    if p.get("mechanism") == "systemd" and p.get("unit") and runner.which("systemctl"):
        runner.run(["systemctl", "stop", p["unit"]], check=False, mutates=True)
    pid = p.get("watcher_pid")
    if pid and pid != os.getpid() and _watcher_alive(pid, p["id"]):
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
        if p is None or p.get("id") != cid:
            return False
        left = p["deadline"] - time.time()
        if left <= 0:
            return True
        time.sleep(min(left, 0.5))
