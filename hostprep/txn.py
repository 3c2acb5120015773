"""Every change as a transaction: snapshot, in-flight marker, confirm/rollback, recovery.

A change (apply, apply -k, container up/down, flush) runs inside ``change()``:

  1. under the lock, an interrupted earlier change (its process died: kill -9,
     power loss) is recovered first: the state before it is restored;
  2. a change still waiting for ``hostprep confirm`` refuses new ones;
  3. the snapshot of hostprep's part of the host (chains and jumps of both
     families, ipsets, the nft table; with -k the profile's sysctls and the
     drop-in; the state files) is written to ``rollback/<id>.json`` and the
     marker ``inflight.json`` names it;
  4. with ``--confirm SECONDS`` the rollback is armed *before* anything changes
     (``pending.json`` plus a transient systemd timer, or a detached watcher
     process where systemd is not PID 1 of this network namespace);
  5. the change runs; if it raises (a load failed, the read-back differed, the
     record could not be written: full disk, read-only state directory), the
     snapshot is restored, so the kernel agrees with the recorded state again;
  6. on success ``rollback/last`` names the snapshot (``hostprep rollback``
     restores it on demand) and the marker is removed.

A kill -9 at any point leaves ``inflight.json``: ``status`` reports the
interrupted change and whether the kernel still holds the state before it, and
the next command that takes the lock (or the boot unit) restores that state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostprep import faults
from hostprep import plan as planmod
from hostprep.errors import CommandFailed, HostprepError, InputError, RefusedError, StateError
from hostprep.model import BanSet, Chain, IpSet, NftIngress, Rule, Ruleset, is_ban_set
from hostprep.netns import same_netns_as_init
from hostprep.runner import PACKAGE_PARENT, Runner, python_module
from hostprep.state import Store, now, read_json, write_atomic

SNAPSHOT_VERSION = 1
MIN_CONFIRM, MAX_CONFIRM = 1, 86400


# -- where things live ---------------------------------------------------------

def rollback_dir(store: Store) -> Path:
    return store.paths.state_dir / "rollback"


def inflight_file(store: Store) -> Path:
    return store.paths.state_dir / "inflight.json"


def pending_file(store: Store) -> Path:
    return store.paths.state_dir / "pending.json"


def last_file(store: Store) -> Path:
    return rollback_dir(store) / "last"


def snapshot_file(store: Store, cid: str) -> Path:
    return rollback_dir(store) / f"{cid}.json"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def new_id() -> str:
    """Sortable by time, unique even for two changes of one process within a second."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{os.urandom(3).hex()}"


def confirm_seconds(value: int | None) -> int | None:
    if value is None:
        return None
    if not MIN_CONFIRM <= value <= MAX_CONFIRM:
        raise InputError("--confirm", f"{value} is not a number of seconds between {MIN_CONFIRM} and "
                         f"{MAX_CONFIRM}", "e.g. --confirm 120")
    return value


# -- the state files a change may rewrite --------------------------------------

def state_files(store: Store) -> list[Path]:
    from hostprep import sysctl
    p = store.paths
    files = [p.settings_file, p.state_file, p.state_dir / "kernel.json", p.root / "etc/sysctl.d" / sysctl.DROPIN_NAME]
    cdir = store.containers_dir
    if cdir.is_dir():
        files += sorted(f for f in cdir.glob("*.json") if _container_record_name(f.name))
    return files


def _container_record_name(filename: str) -> bool:
    from hostprep.model import container_name
    if not filename.endswith(".json"):
        return False
    try:
        container_name(filename[:-len(".json")])
    except InputError:
        return False
    return True


def owned_file(store: Store, rel: object) -> Path | None:
    """The state file ``rel`` (relative to the root) names, if it is one hostprep owns; else None.

    A snapshot restores only these: the settings, the record, the kernel record,
    the sysctl drop-in and the container records (by a valid container name),
    never an absolute path, a '..' or anything else a tampered snapshot names.
    """
    from hostprep import sysctl
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\0" in rel:
        return None
    p = store.paths
    fixed = {str(f.relative_to(p.root)): f for f in (p.settings_file, p.state_file, p.state_dir / "kernel.json",
                                                     p.root / "etc/sysctl.d" / sysctl.DROPIN_NAME)}
    if rel in fixed:
        return fixed[rel]
    cdir = str(store.containers_dir.relative_to(p.root)) + "/"
    if rel.startswith(cdir) and "/" not in rel[len(cdir):] and _container_record_name(rel[len(cdir):]):
        return p.root / rel
    return None


def check_snapshot(store: Store, snap: dict) -> str | None:
    """What makes ``snap`` unsafe to restore (a file or a sysctl hostprep does not own), or None."""
    from hostprep import sysctl
    files = snap.get("files")
    if not isinstance(files, dict):
        return "no list of state files"
    for rel, text in files.items():
        if owned_file(store, rel) is None:
            return f"it names a file hostprep does not own ({rel!r})"
        if text is not None and not isinstance(text, str):
            return f"the content of {rel} is not text"
    if "sysctl" in snap:
        keys = snap["sysctl"]
        if not isinstance(keys, dict):
            return "its kernel part is not a table of keys"
        profile = {s.key for s in sysctl.profile()}
        for key, value in keys.items():
            if key not in profile:
                return f"it names a kernel key outside hostprep's profile ({key!r})"
            if value is not None and (not isinstance(value, str) or "\n" in value):
                return f"the value of {key} is not one line of text"
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateError(str(path), f"cannot read ({err.strerror})", "run as root") from None


# -- snapshot ------------------------------------------------------------------

def set_family(name: str, members) -> int:
    if any(":" in m for m in members):
        return 6
    base = name[:-len(planmod.TEMP_SUFFIX)] if name.endswith(planmod.TEMP_SUFFIX) else name
    return 6 if base.endswith("6") else 4


def take(backend, store: Store, *, firewall: bool, kernel: bool, command: str = "") -> dict:
    """hostprep's part of the host as it is now (the parts this change may touch)."""
    from hostprep import apply as applymod
    snap: dict = {"version": SNAPSHOT_VERSION, "time": now(), "command": command, "pid": os.getpid(),
                  "backend": backend.variant if backend is not None else None}
    if firewall:
        live = applymod.observe(backend)
        record = store.applied() or {}
        fw = {}
        for fam, obs in live.observed.items():
            rs = planmod.ruleset_from_observed(obs)
            fw[str(fam)] = {"chains": [[c.name, [r.spec for r in c.rules]] for c in rs.chains],
                            "jumps": [[j.chain, j.spec] for j in rs.jumps]}
        snap["firewall"] = fw
        # a ban set's members are fail2ban's (never restored): its name and family are enough
        snap["sets"] = {name: {"family": set_family(name, members),
                               "members": [] if is_ban_set(name) else sorted(members)}
                        for name, members in live.sets.items() if not name.endswith(planmod.TEMP_SUFFIX)}
        if live.nft is None:
            snap["nft"] = None
        else:
            rec = record.get("nft") or {}
            script = rec.get("script") if rec.get("live") == live.nft.text and rec.get("script") else \
                "table netdev hostprep\ndelete table netdev hostprep\n" + live.nft.text
            snap["nft"] = {"device": live.nft.device, "text": live.nft.text, "script": script}
    if kernel:
        from hostprep import sysctl
        k = sysctl.Kernel()
        snap["sysctl"] = {s.key: k.read(s.key) for s in sysctl.profile() if not k.machine_wide(s.key)}
    root = store.paths.root
    snap["files"] = {str(p.relative_to(root)): _read_text(p) for p in state_files(store)}
    return snap


@dataclass(frozen=True)
class Target:
    """The state a snapshot describes, in the shape make_plan/execute/verify take."""

    v4: Ruleset
    v6: Ruleset
    nft: NftIngress | None
    sets: tuple = ()

    def ruleset(self, family: int) -> Ruleset:
        return self.v4 if family == 4 else self.v6


def target_of(snap: dict) -> Target:
    import ipaddress
    rulesets = {}
    for fam in (4, 6):
        part = snap["firewall"].get(str(fam)) or {"chains": [], "jumps": []}
        chains = tuple(Chain(name, tuple(Rule(name, s) for s in specs)) for name, specs in part["chains"])
        jumps = tuple(Rule(c, s) for c, s in part["jumps"])
        rulesets[fam] = Ruleset(fam, chains, jumps)
    # A ban set is put back (created when missing) but never refilled: its members are
    # fail2ban's bans, which expire or are lifted by fail2ban, not by a rollback.
    sets = tuple(BanSet(name, int(s["family"])) if is_ban_set(name) else
                 IpSet(name, int(s["family"]), tuple(ipaddress.ip_network(m) for m in s["members"]))
                 for name, s in sorted(snap.get("sets", {}).items()))
    nft = snap.get("nft")
    return Target(rulesets[4], rulesets[6], NftIngress(nft["device"], nft["script"]) if nft else None, sets)


def save_snapshot(store: Store, cid: str, snap: dict) -> None:
    write_atomic(snapshot_file(store, cid), json.dumps(snap) + "\n")


# new_id() makes "20261205T182200-<pid>-<hex>"; anything with a '/' or '..' names another file
CHANGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,80}")


def load_snapshot(store: Store, cid: str) -> dict:
    if not isinstance(cid, str) or not CHANGE_ID.fullmatch(cid):
        raise StateError("snapshot", f"{cid!r} is not a change id hostprep makes",
                         "nothing was restored; run 'hostprep apply' to converge")
    snap = read_json(snapshot_file(store, cid))
    if snap is None:
        raise StateError(str(snapshot_file(store, cid)), "the snapshot of this change is missing",
                         "nothing can be rolled back; run 'hostprep apply' to converge")
    bad = snap.get("version") != SNAPSHOT_VERSION or not isinstance(snap.get("files"), dict)
    unsafe = None if bad else check_snapshot(store, snap)
    if unsafe:
        raise StateError(str(snapshot_file(store, cid)), f"refused: {unsafe}",
                         "nothing was restored; remove the file and run 'hostprep apply' to converge")
    if not bad and "firewall" in snap:
        try:
            target_of(snap)
        except Exception:  # noqa: BLE001 - any malformed part: the snapshot is unusable
            bad = True
    if bad:
        raise StateError(str(snapshot_file(store, cid)), "not a snapshot this hostprep can read",
                         "remove it; run 'hostprep apply' to converge")
    return snap


# -- restore -------------------------------------------------------------------

def _backend_for(snap: dict, backend):
    if backend is not None and (snap.get("backend") in (None, backend.variant)):
        return backend
    from hostprep.backend import Backend
    runner = backend.runner if backend is not None else Runner()
    return Backend(runner, snap["backend"])


def firewall_differs(backend, snap: dict) -> list[str]:
    """What of the live firewall differs from the snapshot (empty: it holds the snapshot)."""
    from hostprep import apply as applymod
    if "firewall" not in snap:
        return []
    target = target_of(snap)
    rec = {"nft": {"script": target.nft.script, "live": snap["nft"]["text"]}} if target.nft else None
    plan = applymod.make_plan(backend, target, rec)
    return plan.notes()


def restore(backend, store: Store, snap: dict, sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """Bring hostprep's part of the host back to ``snap``; returns what was changed."""
    from hostprep import apply as applymod
    unsafe = check_snapshot(store, snap)
    if unsafe:
        raise StateError("snapshot", f"refused: {unsafe}", "nothing was restored; run 'hostprep apply' to converge")
    notes: list[str] = []
    if "firewall" in snap:
        be = _backend_for(snap, backend)
        target = target_of(snap)
        rec = {"nft": {"script": target.nft.script, "live": snap["nft"]["text"]}} if target.nft else None
        if target.nft is not None and not (sys_net / target.nft.device).exists():
            # Kernels before 6.x refuse an ingress hook on a missing device; the
            # iptables part (matching the NIC by name) is restored all the same and
            # hostprep-nic@ adds the table when the NIC appears.
            import dataclasses
            target = dataclasses.replace(target, nft=None)
            live_nft = be.nft_observe()
            if live_nft is not None:
                target = dataclasses.replace(target, nft=NftIngress(live_nft.device, ""))
                rec = {"nft": {"script": "", "live": live_nft.text}}
            notes.append(f"nft table: {snap['nft']['device']} is not present, left to hostprep-nic@")
        plan = applymod.make_plan(be, target, rec)
        if not plan.empty:
            ex = applymod.execute(be, plan)
            _, problems = applymod.verify(be, target)
            if problems:
                failed = applymod.undo(be, plan, ex)
                raise CommandFailed("rollback", "the kernel does not hold the snapshot after loading it: "
                                    + "; ".join(problems) + ("; undo failed: " + "; ".join(failed) if failed else ""),
                                    "run 'hostprep status' and report this")
            applymod.finish(be, plan, ex)
            notes += plan.notes()
    if "sysctl" in snap:
        from hostprep import sysctl
        k = sysctl.Kernel()
        errors = []
        for key, value in snap["sysctl"].items():
            if k.machine_wide(key):
                continue        # never from inside a namespace, whatever the snapshot says
            if value is not None and k.read(key) != value:
                problem = k.write(key, value)
                if problem:
                    errors.append(f"{key} = {value}: {problem}")
                else:
                    notes.append(f"{key} = {value}")
        if errors:
            raise CommandFailed("rollback", "the kernel refused: " + "; ".join(errors), "run 'hostprep status'")
    root = store.paths.root
    wanted = {owned_file(store, rel): text for rel, text in snap["files"].items()}
    for path in state_files(store):
        if path not in wanted:
            wanted[path] = None       # a container record the change added
    for path, text in wanted.items():
        if _read_text(path) == text:
            continue
        if text is None:
            try:
                path.unlink()
            except OSError as err:
                raise StateError(str(path), f"cannot remove ({err.strerror})") from None
        else:
            write_atomic(path, text, 0o644 if path.suffix == ".conf" or path.name == "settings.json" else 0o600)
        notes.append(f"{path.relative_to(root)} restored")
    notes += _units_follow(store)
    return notes


def _units_follow(store: Store) -> list[str]:
    """Installed boot units follow the restored record (its external NIC), never this process's env."""
    from hostprep import persist
    invocation = persist.installed_invocation(store.paths)
    record = read_json(store.paths.state_file)
    iface = ((record or {}).get("settings") or {}).get("interface")
    if invocation is None or not iface:
        return []
    changed = persist.install(store.paths, iface, Runner(), invocation)
    return [f"boot units for {iface}: {len(changed)} files"] if changed else []


def refuse_if_pending(store: Store) -> None:
    """Before any prompt or guard: a change waiting for confirmation blocks the next one."""
    p = pending(store)
    if p:
        raise RefusedError("confirmation", f"change {p['id']} ({p['command']}) waits for 'hostprep "
                           f"confirm' until {p['deadline_text']}",
                           "run 'hostprep confirm' to keep it or 'hostprep rollback' to undo it first")


# -- confirmation timers -------------------------------------------------------



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
        env = dict(_env_for_child())
        proc = subprocess.Popen([*_hostprep_argv(), "rollback", "--due", cid, "--wait"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True, cwd="/")
        pending["watcher_pid"] = proc.pid
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
    _unlink(pending_file(store))
    if p.get("mechanism") == "systemd" and p.get("unit") and runner.which("systemctl"):
        runner.run(["systemctl", "stop", p["unit"]], check=False, mutates=True)
    pid = p.get("watcher_pid")
    if pid and pid != os.getpid() and _watcher_alive(pid, p["id"]):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


# -- the change itself -----------------------------------------------------------

@dataclass
class Change:
    id: str
    snapshot: dict
    pending: dict | None = None
    changed: bool = True
    recovered: list[str] = field(default_factory=list)


def owner_alive(store: Store) -> bool:
    """Is some process holding the lock right now?  Never blocks."""
    import fcntl
    path = store.paths.state_dir / "lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def recover(backend, store: Store, by: str = "hostprep") -> list[str]:
    """Under the lock: undo a change whose process died.  Returns journal-worthy notes."""
    marker = read_json(inflight_file(store))
    if marker is None:
        return []
    cid = marker.get("id", "?")
    try:
        snap = load_snapshot(store, cid)
    except StateError as err:
        _unlink(inflight_file(store))
        if not snapshot_file(store, cid).exists():
            store.journal(f"recover (by {by})", f"interrupted change {cid} ({marker.get('command')}) had no "
                          "snapshot", "marker removed; run 'hostprep apply' to converge")
            return [f"interrupted change {cid}: no snapshot; marker removed"]
        store.journal(f"recover (by {by})", f"interrupted change {cid} ({marker.get('command')}): "
                      f"snapshot not usable ({err.problem})", "nothing restored, marker removed; "
                      "run 'hostprep apply' to converge")
        return [f"interrupted change {cid}: snapshot not usable ({err.problem}); nothing restored, marker removed"]
    notes = restore(backend, store, snap)
    try:
        p = pending(store)
    except StateError:
        p = None
    if p and p.get("id") == cid:
        disarm(store, Runner(), p)
        _note_rolled_back(store, cid, marker.get("command"), "it was interrupted before it was confirmed")
    last = _read_text(last_file(store))
    if last and last.strip() == cid:
        _unlink(last_file(store))
    _unlink(inflight_file(store))
    _unlink(snapshot_file(store, cid))
    if marker.get("kind") == "rollback":
        what = f"was being rolled back (PID {marker.get('pid')}) when that was interrupted; the rollback is finished"
        _note_rolled_back(store, cid, marker.get("command"), "its interrupted rollback was finished")
        logged = f"change {cid} ({marker.get('command')}) {what}"
    else:
        what = f"was interrupted (PID {marker.get('pid')}); the state before it is restored"
        logged = (f"change {cid} ({marker.get('command')}, PID {marker.get('pid')}) was interrupted; "
                  "the state before it is restored")
    store.journal(f"recover (by {by})", f"{logged}: {'; '.join(notes) or 'nothing had changed'}", "ok")
    return [f"change {cid} ({marker.get('command')}) {what}"
            + (f" ({len(notes)} items)" if notes else " (nothing had changed)")]


def _note_rolled_back(store: Store, cid: str, command: str | None, why: str) -> None:
    """What 'hostprep confirm' tells when it comes too late."""
    with contextlib.suppress(StateError):
        write_atomic(rollback_dir(store) / "rolled-back.json",
                     json.dumps({"id": cid, "command": command, "why": why, "time": now()}) + "\n")


_depth: dict[int, int] = {}


@contextlib.contextmanager
def _signals_deferred():
    """SIGHUP (the SSH session gone), SIGINT and SIGTERM wait until the change is whole.

    Delivered again, with their default effect, once the change has been
    recorded or undone: a hang-up never leaves one family loaded and the other not.
    """
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(got):
            os.kill(os.getpid(), sig)


@contextlib.contextmanager
def change(backend, store: Store, command: str, *, firewall: bool = True, kernel: bool = False,
           confirm: int | None = None, runner: Runner | None = None):
    """One change of the host, as described in this module's docstring.  Re-entrant (nested: no-op)."""
    key = id(store)
    if _depth.get(key):
        _depth[key] += 1
        try:
            yield None
        finally:
            _depth[key] -= 1
        return
    runner = runner or Runner()
    with store.lock(), _signals_deferred():
        _depth[key] = 1
        try:
            faults.hit("locked")
            recovered = recover(backend, store, command)
            refuse_if_pending(store)
            _unlink(rollback_dir(store) / "rolled-back.json")   # a late 'confirm' must not name an older one
            cid = new_id()
            snap = take(backend, store, firewall=firewall, kernel=kernel, command=command)
            save_snapshot(store, cid, snap)
            write_atomic(inflight_file(store), json.dumps({"id": cid, "pid": os.getpid(), "command": command,
                                                           "time": now()}) + "\n")
            ch = Change(cid, snap, recovered=recovered)
            try:
                if confirm is not None:
                    ch.pending = arm(store, runner, cid, confirm, command)
                yield ch
                faults.hit("after-record")
            except BaseException as exc:
                _fail(backend, store, ch, exc, command)
                raise
            _close(store, runner, ch, command)
        finally:
            _depth.pop(key, None)


def _fail(backend, store: Store, ch: Change, exc: BaseException, command: str) -> None:
    """The change raised: bring the host back to the snapshot (the recorded state)."""
    try:
        notes = restore(backend, store, ch.snapshot)
    except HostprepError as err:
        store.journal(command, f"change {ch.id} failed ({exc}); restoring the state before it failed too",
                      f"{err}; 'hostprep status' shows it, the next hostprep command retries")
        if isinstance(exc, HostprepError):
            exc.problem += f"; restoring the state before it failed too ({err.problem})"
            exc.fix = "the next hostprep command retries the restore; 'hostprep status' shows what is live"
            exc.args = (exc.line(),)
        return
    try:
        p = ch.pending or pending(store)
    except StateError:
        p = None
    if p and p.get("id") == ch.id:
        disarm(store, Runner(), p)
    with contextlib.suppress(OSError):
        _unlink(inflight_file(store))
        _unlink(snapshot_file(store, ch.id))
    if notes or not getattr(exc, "journalled", False):
        # (a failed load or read-back is journalled by converge itself)
        store.journal(command, f"change {ch.id} failed ({exc})", "the state before it is restored: "
                      + "; ".join(notes) if notes else "nothing had changed")
    if notes:
        if isinstance(exc, HostprepError):
            exc.problem += "; the host was brought back to the recorded state before this change"
            exc.args = (exc.line(),)


def _close(store: Store, runner: Runner, ch: Change, command: str) -> None:
    if not ch.changed:
        if ch.pending:
            disarm(store, runner, ch.pending)
            ch.pending = None
        _unlink(snapshot_file(store, ch.id))
    else:
        write_atomic(last_file(store), ch.id + "\n")
        for old in rollback_dir(store).glob("*.json"):
            if old.stem != ch.id:
                _unlink(old)
    _unlink(inflight_file(store))


# -- confirm / rollback ------------------------------------------------------------

def confirm(store: Store, runner: Runner, backend=None) -> dict:
    with store.lock():
        # An interrupted change (or rollback) is undone first: confirming it would
        # keep a state nobody recorded.
        recovered = recover(backend, store, "hostprep confirm")
        p = pending(store)
        if p is None:
            gone = read_json(rollback_dir(store) / "rolled-back.json") if not recovered else None
            if recovered:
                raise RefusedError("confirm", recovered[0] + "; nothing is left to confirm",
                                   "apply the change again if you want it")
            if gone:
                raise InputError("confirm", f"no change waits for confirmation: change {gone.get('id')} "
                                 f"({gone.get('command')}) was rolled back at {gone.get('time')} "
                                 f"({gone.get('why')})", "apply it again if you want it")
            raise InputError("confirm", "no change waits for confirmation", "see 'hostprep status'")
        late = time.time() >= p["deadline"]
        disarm(store, runner, p)
        store.journal("hostprep confirm", f"change {p['id']} ({p['command']}) confirmed"
                      + (" after its deadline (the rollback had not run yet)" if late else ""), "ok")
        return dict(p, late=late)


def rollback(backend, store: Store, runner: Runner, command: str, due: str | None = None,
             reason: str | None = None) -> dict:
    """Restore the state before the pending change, else before the last one.

    ``due``: called by the timer or the watcher for change ``due``; does nothing
    when that change is no longer pending (confirmed, or rolled back already).
    """
    with store.lock():
        recovered = recover(backend, store, command)
        p = pending(store)
        if due is not None:
            if p is None or p.get("id") != due:
                return {"id": due, "skipped": True, "recovered": recovered, "notes": []}
        if recovered and due is None:
            return {"id": None, "skipped": False, "recovered": recovered, "notes": []}
        last = _read_text(last_file(store))
        cid = p["id"] if p else (last.strip() if last else None)
        if cid is None:
            raise InputError("rollback", "nothing to roll back: no change is recorded since the last "
                             "rollback", "see 'hostprep status'")
        snap = load_snapshot(store, cid)
        why = reason or ("deadline passed without 'hostprep confirm'" if due else "on demand")
        return _rollback_deferred(backend, store, runner, command, cid, snap, why, p, recovered)


def _rollback_deferred(backend, store: Store, runner: Runner, command: str, cid: str, snap: dict, why: str,
                       p: dict | None, recovered: list[str]) -> dict:
    """The restore of a rollback: hang-ups wait for it; a kill leaves a marker the next command finishes."""
    with _signals_deferred():
        write_atomic(inflight_file(store), json.dumps({"id": cid, "kind": "rollback", "pid": os.getpid(),
                                                       "command": snap.get("command"), "time": now()}) + "\n")
        try:
            notes = restore(backend, store, snap)
        except HostprepError as err:
            store.journal(command, f"rollback of change {cid} ({snap.get('command')}), {why}", f"FAILED: {err}; "
                          "the next hostprep command retries it")
            raise
        if p:
            disarm(store, runner, p)
        _unlink(last_file(store))
        _unlink(inflight_file(store))
        _unlink(snapshot_file(store, cid))
        _note_rolled_back(store, cid, snap.get("command"), why)
        store.journal(command, f"rolled back change {cid} ({snap.get('command')}), {why}: "
                      + ("; ".join(notes) or "nothing differed"), "ok")
        return {"id": cid, "skipped": False, "recovered": recovered, "notes": notes,
                "command": snap.get("command"), "why": why}


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


# -- what status says -----------------------------------------------------------------

def status_section(backend, store: Store, runner: Runner) -> tuple[dict, list[str]]:
    out: dict = {"pending": None, "interrupted": None, "rollback_available": None, "rolled_back": None}
    problems: list[str] = []
    # The last change was rolled back (its confirm timer fired, or 'hostprep rollback'): kept
    # until the next change, so a new session after a lost one learns what happened.
    gone = read_json(rollback_dir(store) / "rolled-back.json")
    if gone:
        out["rolled_back"] = {k: gone.get(k) for k in ("id", "command", "why", "time")}
    p = pending(store)
    if p:
        left = p["deadline"] - time.time()
        alive = timer_alive(runner, p)
        out["pending"] = {"id": p["id"], "command": p["command"], "deadline": p["deadline_text"],
                          "seconds_left": max(0, int(left)), "mechanism": p["mechanism"],
                          "timer_alive": alive, "watcher_pid": p.get("watcher_pid"), "unit": p.get("unit")}
        problems.append(f"change {p['id']} ({p['command']}) waits for 'hostprep confirm' until "
                        f"{p['deadline_text']} ({max(0, int(left))} s left); then it is rolled back")
        if alive is False:
            problems.append(f"the rollback timer of change {p['id']} is not running ({p['mechanism']}): "
                            "run 'hostprep confirm' or 'hostprep rollback'")
    marker = read_json(inflight_file(store))
    if marker:
        running = owner_alive(store)
        entry = {"id": marker.get("id"), "kind": marker.get("kind", "change"), "command": marker.get("command"),
                 "pid": marker.get("pid"), "running": running, "kernel": None}
        if not running:
            try:
                snap = load_snapshot(store, marker["id"])
                differs = firewall_differs(_backend_for(snap, backend), snap)
                entry["kernel"] = "old" if not differs else "changed"
                entry["differences"] = differs
            except HostprepError as err:
                entry["kernel"] = f"unknown ({err.problem})"
            if entry["kind"] == "rollback":
                problems.append(f"the rollback of change {marker.get('id')} ({marker.get('command')}) by PID "
                                f"{marker.get('pid')} was interrupted; the firewall "
                                + ("holds the state before that change again" if entry["kernel"] == "old" else
                                   "is partly rolled back" if entry["kernel"] == "changed" else entry["kernel"])
                                + "; the next hostprep command finishes the rollback")
            else:
                problems.append(f"change {marker.get('id')} ({marker.get('command')}, PID {marker.get('pid')}) was "
                                "interrupted; the firewall "
                                + ("still holds the state before it" if entry["kernel"] == "old" else
                                   "holds part or all of it" if entry["kernel"] == "changed" else entry["kernel"])
                                + "; the next hostprep change (or 'hostprep rollback') restores the state before it")
        out["interrupted"] = entry
    last = _read_text(last_file(store))
    if last and snapshot_file(store, last.strip()).is_file() and not marker:
        out["rollback_available"] = last.strip()
    return out, problems
