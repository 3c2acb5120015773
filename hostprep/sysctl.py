"""Kernel settings (apply -k): render the profile, install the drop-in, load, verify, report drift.

Pure parts: ``render`` (the profile template in sysctl.d/), ``parse_conf``,
``effective_sources`` (which file of the sysctl.d search path sets a key last).
Host parts: ``Kernel`` reads and writes /proc/sys (paths injectable: the tests
point kernel.*, vm.*, fs.* keys at a temporary stand-in, and net.* keys at a
network namespace's own /proc/sys).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hostprep.errors import CommandFailed, RefusedError, StateError
from hostprep.netns import same_netns_as_init
from hostprep.data import data_dir
from hostprep.paths import Paths
from hostprep.state import read_json, write_atomic

DROPIN_NAME = "90-hostprep.conf"
# systemd-sysctl / `sysctl --system` search path, in precedence order for files
# of the same name (the first directory wins); files are applied sorted by name,
# and /etc/sysctl.conf last (procps).
SEARCH_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d")

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_dir("sysctl.d"))), trim_blocks=True,
                          lstrip_blocks=True, undefined=jinja2.StrictUndefined, autoescape=False,
                          keep_trailing_newline=True)


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    ignore_failure: bool = False   # "-key = value": skip where the kernel lacks it


def render(missing: frozenset[str] = frozenset(), machine: frozenset[str] = frozenset()) -> str:
    """The drop-in; ``missing`` keys written as "-key", ``machine`` keys commented out."""
    return _ENV.get_template(f"{DROPIN_NAME}.j2").render(missing=missing, machine=machine)


def normalise(value: str) -> str:
    """sysctl values compare with runs of white space folded (tcp_rmem "4096 87380 6291456")."""
    return " ".join(value.split())


def parse_conf(text: str) -> list[Setting]:
    out: list[Setting] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        ignore = line.startswith("-")
        if ignore:
            line = line[1:].strip()
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if "/" in key and ("." not in key or key.index("/") < key.index(".")):
            # sysctl.d(5): with '/' as the first separator, '.' and '/' swap
            # (net/ipv4/conf/eth0.100/rp_filter is net.ipv4.conf.eth0/100.rp_filter).
            key = key.translate(str.maketrans("./", "/."))
        out.append(Setting(key, normalise(value), ignore))
    return out


def profile() -> list[Setting]:
    return parse_conf(render())


def search_files(root: Path) -> list[Path]:
    """The files `sysctl --system` reads, in the order it applies them."""
    chosen: dict[str, Path] = {}
    for d in SEARCH_DIRS:
        base = root / d
        if base.is_dir():
            for f in sorted(base.glob("*.conf")):
                chosen.setdefault(f.name, f)
    files = [chosen[name] for name in sorted(chosen)]
    legacy = root / "etc/sysctl.conf"
    if legacy.is_file():
        files.append(legacy)
    return files


def effective_sources(root: Path) -> dict[str, tuple[Path, str]]:
    """key -> (the file that sets it last, its value)."""
    out: dict[str, tuple[Path, str]] = {}
    for f in search_files(root):
        try:
            text = f.read_text()
        except OSError:
            continue
        for s in parse_conf(text):
            out[s.key] = (f, s.value)
    return out


PROC_SYS = Path("/proc/sys")
MACHINE_WIDE = "machine-wide"
MACHINE_WIDE_DETAIL = "belongs to the whole machine: not set from a network namespace"


class Kernel:
    """/proc/sys, with the net.* and the other keys possibly under different roots.

    In a network namespace other than the machine's (the sandbox, selftest, a
    test), only the net.* keys that namespace shows are its own; kernel.*,
    vm.*, fs.*, dev.* and the net.core.* keys it does not show belong to the
    whole machine.  Such keys are ``machine_wide`` and never written from there
    (a stand-in root for them, as the tests use, is written instead).
    """

    def __init__(self, net_root: Path | None = None, other_root: Path | None = None, *,
                 in_namespace: bool | None = None) -> None:
        self.net_root = net_root or Path(os.environ.get("HOSTPREP_PROC_SYS") or PROC_SYS)
        self.other_root = other_root or Path(os.environ.get("HOSTPREP_PROC_SYS_NONNET") or self.net_root)
        self.in_namespace = (not same_netns_as_init()) if in_namespace is None else in_namespace

    def machine_wide(self, key: str) -> bool:
        """A key of the whole machine that this process must not write from inside another namespace."""
        if not self.in_namespace:
            return False
        if not key.startswith("net."):
            return self.other_root == PROC_SYS
        # net.* keys that are not per namespace (net.core.netdev_max_backlog...) are not shown inside
        # one, or shown read-only (net.netfilter.nf_conntrack_max and _buckets: mode 0444 there)
        return self.net_root == PROC_SYS and (not self.has(key) or not self.path(key).stat().st_mode & 0o200)

    def skipped(self, settings: list[Setting]) -> tuple[frozenset[str], frozenset[str]]:
        """(keys this kernel lacks, machine-wide keys left alone) among ``settings``."""
        machine = frozenset(s.key for s in settings if self.machine_wide(s.key))
        missing = frozenset(s.key for s in settings if s.key not in machine and not self.has(s.key))
        return missing, machine

    def path(self, key: str) -> Path:
        root = self.net_root if key.startswith("net.") else self.other_root
        # A '/' inside a dotted key is a '.' of an interface name (eth0/100 = eth0.100).
        return root.joinpath(*(part.replace("/", ".") for part in key.split(".")))

    def read(self, key: str) -> str | None:
        try:
            return normalise(self.path(key).read_text())
        except OSError:
            return None

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, value: str) -> str | None:
        """Write one key; returns an error text, or None on success."""
        try:
            with open(self.path(key), "w") as fh:
                fh.write(value + "\n")
        except OSError as err:
            return err.strerror or str(err)
        return None


@dataclass
class KeyReport:
    key: str
    desired: str
    live: str | None
    source: str | None       # the file that sets it last in the search path
    state: str               # "ok", "drift", "missing", "overridden", "machine-wide"
    detail: str = ""

    def as_dict(self) -> dict:
        return {"key": self.key, "desired": self.desired, "live": self.live, "source": self.source,
                "state": self.state, "detail": self.detail}


def check(kernel: Kernel, paths: Paths) -> list[KeyReport]:
    """Each profile key: desired, live, source file and state (status and apply's read-back)."""
    ours = paths.root / "etc/sysctl.d" / DROPIN_NAME
    sources = effective_sources(paths.root)
    out: list[KeyReport] = []
    for s in profile():
        live = kernel.read(s.key)
        src = sources.get(s.key)
        source = str(src[0]) if src else None
        if kernel.machine_wide(s.key):
            out.append(KeyReport(s.key, s.value, live, source, MACHINE_WIDE, MACHINE_WIDE_DETAIL))
            continue
        if live is None:
            out.append(KeyReport(s.key, s.value, None, source, "missing", "the running kernel has no such key"))
            continue
        if src and src[0] != ours and src[1] != s.value:
            out.append(KeyReport(s.key, s.value, live, source, "overridden",
                                 f"{src[0]} sets {src[1]} after {DROPIN_NAME}"))
            continue
        if live != s.value:
            out.append(KeyReport(s.key, s.value, live, source, "drift", f"live value {live}"))
            continue
        out.append(KeyReport(s.key, s.value, live, source, "ok"))
    return out


class KernelState:
    """Previous live values (recorded before the first change) and whether -k is applied."""

    def __init__(self, paths: Paths) -> None:
        self.file = paths.state_dir / "kernel.json"
        self.dropin = paths.root / "etc/sysctl.d" / DROPIN_NAME

    def load(self) -> dict | None:
        return read_json(self.file)

    def save(self, data: dict) -> None:
        write_atomic(self.file, json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class KernelApplied:
    """What ``apply_kernel`` did: every key read back, and notes for the admin."""

    report: list[KeyReport]
    notes: list[str]


def apply_kernel(kernel: Kernel, paths: Paths) -> KernelApplied:
    """Install the drop-in, load every key, read every key back.

    Returns the read-back report and notes (``KernelApplied``).  Keys the kernel lacks are reported and
    skipped; a key the kernel refuses is an error after the others are loaded.
    """
    settings = profile()
    missing, machine = kernel.skipped(settings)
    state = KernelState(paths)
    record = state.load() or {}
    # Before the first change of each key, remember its value; a key that only
    # appeared later (a module loaded since) is recorded when it first shows up,
    # and values recorded earlier are never overwritten.
    previous = dict(record.get("previous") or {})
    for s in settings:
        if s.key not in missing and s.key not in machine and s.key not in previous:
            previous[s.key] = kernel.read(s.key)
    state.save({"previous": previous, "applied": bool(record.get("applied"))})
    write_atomic(state.dropin, render(missing, machine), 0o644)
    errors: list[str] = []
    for s in settings:
        if s.key in missing or s.key in machine:
            continue
        if kernel.read(s.key) == s.value:
            continue
        problem = kernel.write(s.key, s.value)
        if problem:
            errors.append(f"{s.key} = {s.value}: {problem}")
    report = check(kernel, paths)
    state.save({"previous": previous, "applied": True})
    notes = [f"{k} is not in this kernel: skipped (written as '-{k}')" for k in sorted(missing)]
    if machine:
        notes.append(f"{len(machine)} machine-wide keys left alone (this is not the machine's own network "
                     f"namespace; they are commented out in the drop-in): {', '.join(sorted(machine))}")
    if errors:
        raise CommandFailed("apply -k", "the kernel refused: " + "; ".join(errors),
                            f"the other keys are loaded; fix or report these ({state.dropin})")
    return KernelApplied(report, notes)


def flush_kernel(kernel: Kernel, paths: Paths) -> list[str]:
    """Restore the values recorded before the first -k and remove the drop-in."""
    state = KernelState(paths)
    record = state.load()
    if not record:
        raise RefusedError("flush --kernel", "no kernel settings were applied by hostprep",
                           "nothing to restore")
    errors: list[str] = []
    restored: list[str] = []
    ours = {s.key for s in profile()}
    for key, value in (record.get("previous") or {}).items():
        # only the profile's keys, and never a machine-wide one from inside a namespace
        if key not in ours or not isinstance(value, str) or kernel.machine_wide(key):
            continue
        if kernel.read(key) == value:
            continue
        problem = kernel.write(key, value)
        if problem:
            errors.append(f"{key} = {value}: {problem}")
        else:
            restored.append(f"{key} = {value}")
    try:
        state.dropin.unlink()
    except FileNotFoundError:
        pass
    if errors:
        raise CommandFailed("flush --kernel", "could not restore: " + "; ".join(errors),
                            f"the record stays in {state.file}")
    try:
        state.file.unlink()
    except OSError as err:
        raise StateError(str(state.file), f"cannot remove ({err.strerror})") from None
    return restored
