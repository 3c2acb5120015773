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
import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostprep import faults
from hostprep.errors import HostprepError, InputError, RefusedError, StateError
from hostprep.runner import Runner
from hostprep.snapshot import (Snapshot, last_file, load_snapshot, new_id, restore, rollback_dir, save_snapshot,
                               snapshot_file, take)
from hostprep.state import Store, discard, now, read_json, read_text, write_atomic
from hostprep.timers import Pending, arm, disarm, pending, refuse_if_pending


def inflight_file(store: Store) -> Path:
    return store.paths.state_dir / "inflight.json"


@dataclass(frozen=True)
class Inflight:
    """inflight.json: the marker of a change (or a rollback) in progress; left behind by a crash.

    Read leniently on purpose: whatever a dying process left is recovered; an id that
    names no usable snapshot restores nothing and the marker is removed.
    """

    id: str
    pid: int | None = None
    command: str | None = None
    time: str | None = None
    kind: str = "change"            # or "rollback"

    @classmethod
    def from_dict(cls, d: dict) -> "Inflight":
        def text(key: str) -> str | None:
            return d[key] if isinstance(d.get(key), str) else None
        return cls(text("id") or "?", d["pid"] if isinstance(d.get("pid"), int) else None, text("command"),
                   text("time"), "rollback" if d.get("kind") == "rollback" else "change")

    def to_dict(self) -> dict:
        return {"id": self.id, **({"kind": self.kind} if self.kind != "change" else {}), "pid": self.pid,
                "command": self.command, "time": self.time}


def read_inflight(store: Store) -> Inflight | None:
    d = read_json(inflight_file(store))
    return None if d is None else Inflight.from_dict(d)


def _mark(store: Store, marker: Inflight) -> None:
    write_atomic(inflight_file(store), json.dumps(marker.to_dict()) + "\n")


@dataclass
class Change:
    """One open change, handed to the code that runs inside it."""

    id: str
    snapshot: Snapshot
    pending: Pending | None = None
    changed: bool = True
    recovered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Confirmed:
    """What 'hostprep confirm' kept."""

    id: str
    command: str
    late: bool          # after its deadline (the rollback had not run yet)


@dataclass(frozen=True)
class RolledBack:
    """What 'hostprep rollback' (or the timer) did."""

    id: str | None                  # None: nothing but the recovery of an interrupted change
    skipped: bool                   # the timer's change no longer waited for confirmation
    recovered: list[str]
    notes: list[str]
    command: str | None = None
    why: str | None = None


def owner_alive(store: Store) -> bool:
    """Is some process holding the lock right now?  Never blocks."""
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
    marker = read_inflight(store)
    if marker is None:
        return []
    cid = marker.id
    try:
        snap = load_snapshot(store, cid)
    except StateError as err:
        discard(inflight_file(store))
        if not snapshot_file(store, cid).exists():
            store.journal(f"recover (by {by})", f"interrupted change {cid} ({marker.command}) had no "
                          "snapshot", "marker removed; run 'hostprep apply' to converge")
            return [f"interrupted change {cid}: no snapshot; marker removed"]
        store.journal(f"recover (by {by})", f"interrupted change {cid} ({marker.command}): "
                      f"snapshot not usable ({err.problem})", "nothing restored, marker removed; "
                      "run 'hostprep apply' to converge")
        return [f"interrupted change {cid}: snapshot not usable ({err.problem}); nothing restored, marker removed"]
    notes = restore(backend, store, snap)
    try:
        p = pending(store)
    except StateError:
        p = None
    if p and p.id == cid:
        disarm(store, Runner(), p)
        _note_rolled_back(store, cid, marker.command, "it was interrupted before it was confirmed")
    last = read_text(last_file(store))
    if last and last.strip() == cid:
        discard(last_file(store))
    discard(inflight_file(store))
    discard(snapshot_file(store, cid))
    if marker.kind == "rollback":
        what = f"was being rolled back (PID {marker.pid}) when that was interrupted; the rollback is finished"
        _note_rolled_back(store, cid, marker.command, "its interrupted rollback was finished")
        logged = f"change {cid} ({marker.command}) {what}"
    else:
        what = f"was interrupted (PID {marker.pid}); the state before it is restored"
        logged = (f"change {cid} ({marker.command}, PID {marker.pid}) was interrupted; "
                  "the state before it is restored")
    store.journal(f"recover (by {by})", f"{logged}: {'; '.join(notes) or 'nothing had changed'}", "ok")
    return [f"change {cid} ({marker.command}) {what}"
            + (f" ({len(notes)} items)" if notes else " (nothing had changed)")]


def _note_rolled_back(store: Store, cid: str, command: str | None, why: str) -> None:
    """What 'hostprep confirm' tells when it comes too late."""
    with contextlib.suppress(StateError):
        write_atomic(rollback_dir(store) / "rolled-back.json",
                     json.dumps({"id": cid, "command": command, "why": why, "time": now()}) + "\n")


@contextlib.contextmanager
def _signals_deferred():
    """SIGHUP (the SSH session gone), SIGINT and SIGTERM wait until the change is whole.

    Delivered again, with their default effect, once the change has been
    recorded or undone: a hang-up never leaves one family loaded and the other not.
    """
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
    """One change of the host, as described in this module's docstring.

    Never nested: the code that runs inside a change is handed it (or needs none);
    opening a second one on the same store while one is open is a programming
    error, refused before the lock or any snapshot.
    """
    if store.open_change is not None:
        raise RuntimeError(f"a change ({store.open_change}) is open already; run inside it instead")
    runner = runner or Runner()
    with store.lock(), _signals_deferred():
        store.open_change = command
        try:
            faults.hit("locked")
            recovered = recover(backend, store, command)
            refuse_if_pending(store)
            discard(rollback_dir(store) / "rolled-back.json")   # a late 'confirm' must not name an older one
            cid = new_id()
            snap = take(backend, store, firewall=firewall, kernel=kernel, command=command)
            save_snapshot(store, cid, snap)
            _mark(store, Inflight(cid, os.getpid(), command, now()))
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
            store.open_change = None


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
    if p and p.id == ch.id:
        disarm(store, Runner(), p)
    with contextlib.suppress(OSError):
        discard(inflight_file(store))
        discard(snapshot_file(store, ch.id))
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
        discard(snapshot_file(store, ch.id))
    else:
        write_atomic(last_file(store), ch.id + "\n")
        for old in rollback_dir(store).glob("*.json"):
            if old.stem != ch.id:
                discard(old)
    discard(inflight_file(store))


def confirm(store: Store, runner: Runner, backend=None) -> Confirmed:
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
        late = time.time() >= p.deadline
        disarm(store, runner, p)
        store.journal("hostprep confirm", f"change {p.id} ({p.command}) confirmed"
                      + (" after its deadline (the rollback had not run yet)" if late else ""), "ok")
        return Confirmed(p.id, p.command, late)


def rollback(backend, store: Store, runner: Runner, command: str, due: str | None = None,
             reason: str | None = None) -> RolledBack:
    """Restore the state before the pending change, else before the last one.

    ``due``: called by the timer or the watcher for change ``due``; does nothing
    when that change is no longer pending (confirmed, or rolled back already).
    """
    with store.lock():
        recovered = recover(backend, store, command)
        p = pending(store)
        if due is not None:
            if p is None or p.id != due:
                return RolledBack(due, True, recovered, [])
        if recovered and due is None:
            return RolledBack(None, False, recovered, [])
        last = read_text(last_file(store))
        cid = p.id if p else (last.strip() if last else None)
        if cid is None:
            raise InputError("rollback", "nothing to roll back: no change is recorded since the last "
                             "rollback", "see 'hostprep status'")
        snap = load_snapshot(store, cid)
        why = reason or ("deadline passed without 'hostprep confirm'" if due else "on demand")
        return _rollback_deferred(backend, store, runner, command, cid, snap, why, p, recovered)


def _rollback_deferred(backend, store: Store, runner: Runner, command: str, cid: str, snap: Snapshot, why: str,
                       p: Pending | None, recovered: list[str]) -> RolledBack:
    """The restore of a rollback: hang-ups wait for it; a kill leaves a marker the next command finishes."""
    with _signals_deferred():
        _mark(store, Inflight(cid, os.getpid(), snap.command, now(), "rollback"))
        try:
            notes = restore(backend, store, snap)
        except HostprepError as err:
            store.journal(command, f"rollback of change {cid} ({snap.command}), {why}", f"FAILED: {err}; "
                          "the next hostprep command retries it")
            raise
        if p:
            disarm(store, runner, p)
        discard(last_file(store))
        discard(inflight_file(store))
        discard(snapshot_file(store, cid))
        _note_rolled_back(store, cid, snap.command, why)
        store.journal(command, f"rolled back change {cid} ({snap.command}), {why}: "
                      + ("; ".join(notes) or "nothing differed"), "ok")
        return RolledBack(cid, False, recovered, notes, snap.command, why)
