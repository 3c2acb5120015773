"""The snapshot of a change: hostprep's part of the host before it, saved, checked, restored.

A snapshot (``rollback/<id>.json``) holds the chains and jumps of both families,
the ipsets and the nft table (``firewall``; on the native backend its script is one
NftBackend loads as it is: the recorded render, or previous_script when the live tables
drifted), with -k the profile's sysctls, and the state files hostprep owns.  ``take``
makes one, ``load_snapshot`` reads one back refusing anything hostprep does not own (a
tampered file restores nothing) or cannot load (a native snapshot's foreign nft script),
``restore`` brings the host back to it through the engine (plan, load, read back, undo)
and makes the installed boot units follow the restored record.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostprep import engine, persist, records, sysctl
from hostprep import plan as planmod
from hostprep.backend import NATIVE, NftBackend, for_variant
from hostprep.errors import CommandFailed, InputError, StateError
from hostprep.model import BanSet, Chain, IpSet, NftIngress, Rule, Ruleset, container_name, is_ban_set
from hostprep.plan import NftRecord
from hostprep.runner import Runner
from hostprep.state import Store, now, read_json, read_text, write_atomic


SNAPSHOT_VERSION = 1


def rollback_dir(store: Store) -> Path:
    return store.paths.state_dir / "rollback"


def last_file(store: Store) -> Path:
    return rollback_dir(store) / "last"


def snapshot_file(store: Store, cid: str) -> Path:
    return rollback_dir(store) / f"{cid}.json"


def new_id() -> str:
    """Sortable by time, unique even for two changes of one process within a second."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{os.urandom(3).hex()}"


def state_files(store: Store) -> list[Path]:
    p = store.paths
    files = [p.settings_file, p.state_file, p.state_dir / "kernel.json", p.root / "etc/sysctl.d" / sysctl.DROPIN_NAME]
    cdir = store.containers_dir
    if cdir.is_dir():
        files += sorted(f for f in cdir.glob("*.json") if _container_record_name(f.name))
    return files


def _container_record_name(filename: str) -> bool:
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


def set_family(name: str, members) -> int:
    if any(":" in m for m in members):
        return 6
    base = name[:-len(planmod.TEMP_SUFFIX)] if name.endswith(planmod.TEMP_SUFFIX) else name
    return 6 if base.endswith("6") else 4


@dataclass(frozen=True)
class SnapshotNft:
    """The nft ingress table in a snapshot: where it was hooked, its listing, the script that loads it."""

    device: str
    text: str
    script: str


@dataclass(frozen=True)
class Snapshot:
    """rollback/<id>.json: hostprep's part of the host before a change (only the parts it may touch).

    ``firewall``: family -> {"chains": [[name, [spec, ...]], ...], "jumps": [[chain, spec], ...]} (None:
    the change left the firewall alone); ``sets``: name -> {"family", "members"}; ``sysctl``: key ->
    value (None: no -k); ``files``: path under the root -> text (None: absent).
    """

    version: int
    time: str
    command: str | None
    pid: int | None
    backend: str | None
    files: dict
    firewall: dict | None = None
    sets: dict = field(default_factory=dict)
    nft: SnapshotNft | None = None
    sysctl: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        """Structure only (KeyError, TypeError, ValueError when malformed); what it may touch is
        check_snapshot's to judge, before it is read."""
        nft = d.get("nft")
        snap = cls(int(d["version"]), str(d.get("time", "")), d.get("command"), d.get("pid"), d.get("backend"),
                   dict(d["files"]), d["firewall"] if "firewall" in d else None, dict(d.get("sets") or {}),
                   SnapshotNft(str(nft["device"]), str(nft["text"]), str(nft["script"])) if nft else None,
                   d["sysctl"] if "sysctl" in d else None)
        if snap.firewall is not None:
            snapshot_target(snap)       # every rule, set and table readable
        return snap

    def to_dict(self) -> dict:
        out: dict = {"version": self.version, "time": self.time, "command": self.command, "pid": self.pid,
                     "backend": self.backend}
        if self.firewall is not None:
            out["firewall"] = self.firewall
            out["sets"] = self.sets
            out["nft"] = dataclasses.asdict(self.nft) if self.nft else None
        if self.sysctl is not None:
            out["sysctl"] = self.sysctl
        out["files"] = self.files
        return out


def holder_of(backend):
    """The backend that holds hostprep's part now: ``backend``, or (before a switch of backends)
    the other one that holds it; ``backend`` when none holds anything."""
    if backend is None or backend.part():
        return backend
    return next((other for other in backend.others() if other.part()), backend)


def take(backend, store: Store, *, firewall: bool, kernel: bool, command: str = "") -> Snapshot:
    """hostprep's part of the host as it is now (the parts this change may touch), read through
    the backend that holds it (holder_of): a switch's snapshot names the old backend, so that
    rolling it back (or recovering it) puts the old backend back."""
    if firewall:
        backend = holder_of(backend)
    snap: dict = {"version": SNAPSHOT_VERSION, "time": now(), "command": command, "pid": os.getpid(),
                  "backend": backend.variant if backend is not None else None}
    if firewall:
        live = backend.observe()
        record = records.load_applied(store, tolerant=True)
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
            rec = record.nft if record is not None else None
            if rec is not None and rec.live == live.nft.text and rec.script:
                script = rec.script
            elif backend.variant == NATIVE:
                # the live tables drifted from the record: what puts them back as they are now
                # (inet, bans, ingress), a script NftBackend loads as it is
                script = backend.previous_script(live) or ""
            else:
                script = "table netdev hostprep\ndelete table netdev hostprep\n" + live.nft.text
            snap["nft"] = {"device": live.nft.device, "text": live.nft.text, "script": script}
    if kernel:
        k = sysctl.Kernel()
        snap["sysctl"] = {s.key: k.read(s.key) for s in sysctl.profile() if not k.machine_wide(s.key)}
    root = store.paths.root
    snap["files"] = {str(p.relative_to(root)): read_text(p) for p in state_files(store)}
    return Snapshot.from_dict(snap)


@dataclass(frozen=True)
class Target:
    """The state a snapshot describes, in the shape make_plan/execute/verify take."""

    v4: Ruleset
    v6: Ruleset
    nft: NftIngress | None
    sets: tuple = ()

    def ruleset(self, family: int) -> Ruleset:
        return self.v4 if family == 4 else self.v6


def snapshot_target(snap: Snapshot) -> Target:
    """The firewall state ``snap`` describes."""
    rulesets = {}
    for fam in (4, 6):
        part = snap.firewall.get(str(fam)) or {"chains": [], "jumps": []}
        chains = tuple(Chain(name, tuple(Rule(name, s) for s in specs)) for name, specs in part["chains"])
        jumps = tuple(Rule(c, s) for c, s in part["jumps"])
        rulesets[fam] = Ruleset(fam, chains, jumps)
    # A ban set is put back (created when missing) but never refilled: its members are
    # fail2ban's bans, which expire or are lifted by fail2ban, not by a rollback.
    sets = tuple(BanSet(name, int(s["family"])) if is_ban_set(name) else
                 IpSet(name, int(s["family"]), tuple(ipaddress.ip_network(m) for m in s["members"]))
                 for name, s in sorted(snap.sets.items()))
    nft = snap.nft
    return Target(rulesets[4], rulesets[6], NftIngress(nft.device, nft.script) if nft else None, sets)


def save_snapshot(store: Store, cid: str, snap: Snapshot) -> None:
    write_atomic(snapshot_file(store, cid), json.dumps(snap.to_dict()) + "\n")


# new_id() makes "20261205T182200-<pid>-<hex>"; anything with a '/' or '..' names another file
CHANGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,80}")


def load_snapshot(store: Store, cid: str) -> Snapshot:
    """The snapshot of change ``cid``, read once: refused when it names anything hostprep does not
    own, unusable when malformed (one line each; nothing is restored)."""
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
    typed = None
    if not bad:
        try:
            typed = Snapshot.from_dict(snap)
        except Exception:  # noqa: BLE001 - any malformed part: the snapshot is unusable
            bad = True
    if bad or typed is None:
        raise StateError(str(snapshot_file(store, cid)), "not a snapshot this hostprep can read",
                         "remove it; run 'hostprep apply' to converge")
    if typed.backend == NATIVE and typed.nft is not None and not NftBackend.loads_script(typed.nft.script):
        # an iptables-shaped nft script (older hostprep) or a hand edit: the native backend cannot load it
        raise StateError(str(snapshot_file(store, cid)), "its nft script is not one the native backend wrote",
                         "nothing was restored; remove it and run 'hostprep apply' to converge")
    return typed


def backend_for(snap: Snapshot, backend):
    """The backend the snapshot was taken with (its variant), reusing ``backend`` when it is that one."""
    if backend is not None and (snap.backend in (None, backend.variant)):
        return backend
    runner = backend.runner if backend is not None else Runner()
    return for_variant(runner, snap.backend)


def firewall_differs(backend, snap: Snapshot) -> list[str]:
    """What of the live firewall differs from the snapshot (empty: it holds the snapshot)."""
    if snap.firewall is None:
        return []
    target = snapshot_target(snap)
    rec = NftRecord(target.nft.script, snap.nft.text) if target.nft else None
    plan = engine.make_plan(backend, target, rec)
    return plan.notes()


def restore(backend, store: Store, snap: Snapshot, sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """Bring hostprep's part of the host back to ``snap``; returns what was changed."""
    unsafe = check_snapshot(store, snap.to_dict())
    if unsafe:
        raise StateError("snapshot", f"refused: {unsafe}", "nothing was restored; run 'hostprep apply' to converge")
    notes: list[str] = []
    if snap.firewall is not None:
        be = backend_for(snap, backend)
        target = snapshot_target(snap)
        rec = NftRecord(target.nft.script, snap.nft.text) if target.nft else None
        # (the native backend's script() leaves out the ingress table itself while the NIC is absent)
        if target.nft is not None and be.variant != NATIVE and not (sys_net / target.nft.device).exists():
            # Kernels before 6.x refuse an ingress hook on a missing device; the
            # iptables part (matching the NIC by name) is restored all the same and
            # hostprep-nic@ adds the table when the NIC appears.
            target = dataclasses.replace(target, nft=None)
            live_nft = be.observe().nft
            if live_nft is not None:
                target = dataclasses.replace(target, nft=NftIngress(live_nft.device, ""))
                rec = NftRecord("", live_nft.text)
            notes.append(f"nft table: {snap.nft.device} is not present, left to hostprep-nic@")
        elif target.nft is not None and not (sys_net / target.nft.device).exists():
            notes.append(f"nft table: {snap.nft.device} is not present, left to hostprep-nic@")
        holders = engine.holding_others(be)      # the backend switched to, if the change was a switch
        plan = engine.make_plan(be, target, rec)
        if not plan.empty:
            done = engine.load_verified(be, plan, target)
            if done.problems:
                failed = done.undo_failed
                raise CommandFailed("rollback", "the kernel does not hold the snapshot after loading it: "
                                    + "; ".join(done.problems)
                                    + ("; undo failed: " + "; ".join(failed) if failed else ""),
                                    "run 'hostprep status' and report this")
            notes += plan.notes()
        if holders:
            # the snapshot's backend holds hostprep again (read back above); then the other goes
            notes.append(engine.release(be, holders, store, "restore"))
    if snap.sysctl is not None:
        k = sysctl.Kernel()
        errors = []
        for key, value in snap.sysctl.items():
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
    wanted = {owned_file(store, rel): text for rel, text in snap.files.items()}
    for path in state_files(store):
        if path not in wanted:
            wanted[path] = None       # a container record the change added
    for path, text in wanted.items():
        if read_text(path) == text:
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
    invocation = persist.installed_invocation(store.paths)
    record = records.load_applied(store, tolerant=True)
    iface = record.interface if record is not None else None
    if invocation is None or not iface:
        return []
    changed = persist.install(store.paths, iface, Runner(), invocation)
    return [f"boot units for {iface}: {len(changed)} files"] if changed else []
