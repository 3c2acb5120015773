"""Boot persistence: the systemd units and the logrotate config that ``apply`` installs.

Files (all under the HOSTPREP_ROOT prefix, rendered from systemd/ and logrotate.d/):

  etc/systemd/system/hostprep.service                 hostprep boot, before network-pre.target
  etc/systemd/system/multi-user.target.wants/...      its enablement (what systemctl enable makes)
  etc/systemd/system/hostprep-nic@.service            hostprep boot when the external NIC appears
  etc/systemd/system/sys-subsystem-net-devices-<NIC>.device.wants/hostprep-nic@<NIC>.service
  etc/systemd/system/iptables.service.d/hostprep.conf  (and ip6tables) put the chains back after
                                                       iptables-services flushed them
  etc/systemd/system/netfilter-persistent.service.d/hostprep.conf, nftables.service.d/hostprep.conf
                                                      the same for Debian's services that flush them
                                                      (written only where the host has the service)
  etc/logrotate.d/hostprep                            rotation of the journal and container logs
  etc/hostprep/failsafe.v4.rules, failsafe.v6.rules
                                                      the fail-safe of the external NIC: loaded with
                                                      ip(6)tables-restore alone (no Python) before
                                                      'hostprep boot' (ExecStartPre=) and by the
                                                      iptables-services drop-ins (each skips it when
                                                      its jump is live: failsafe_command), replaced
                                                      by the real hardening when hostprep runs

The symlinks are made here rather than by ``systemctl enable`` so that the same
code works with and without a running systemd (and under a test root); where
systemd runs, ``systemctl daemon-reload`` follows.  Nothing here saves a ruleset.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hostprep import render, validate
from hostprep.backend import VARIANTS, detect_variant
from hostprep.errors import StateError
from hostprep.netns import same_netns_as_init
from hostprep.data import data_dir
from hostprep.paths import Paths
from hostprep.runner import Runner
from hostprep.state import read_json, write_atomic

UNIT = "hostprep.service"
NIC_TEMPLATE = "hostprep-nic@.service"
WANTED_BY = "multi-user.target"
IPTABLES_SERVICES = ("iptables", "ip6tables")
# Debian's services that load a saved ruleset and, doing so, flush hostprep's: netfilter-persistent
# (iptables-persistent: iptables-restore without --noflush, both families) and nftables.service
# (/etc/nftables.conf begins with 'flush ruleset').  A drop-in for each one the host has.
OTHER_FIREWALL_SERVICES = ("netfilter-persistent", "nftables")
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
ENV_KEYS = ("HOSTPREP_ROOT", "HOSTPREP_BACKEND", "HOSTPREP_PROC_SYS", "HOSTPREP_PROC_SYS_NONNET",
            "HOSTPREP_SELINUXFS")


def escape(name: str) -> str:
    """systemd-escape of one path component (interface names: letters, digits, '-', '.', '_', ':')."""
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out)


def device_unit(nic: str) -> str:
    return f"sys-subsystem-net-devices-{escape(nic)}.device"


def nic_instance(nic: str) -> str:
    return f"hostprep-nic@{escape(nic)}.service"


def interpreter() -> str:
    """The interpreter the units name: this one, or for a system install (scripts/install.sh:
    ``<prefix>/venv-<time>`` with ``<prefix>/current`` pointing at it) the same one through
    ``current``, so that an upgrade, which switches ``current``, keeps the units right."""
    exe = sys.executable
    venv = Path(sys.prefix)
    current = venv.parent / "current"
    try:
        if venv.name.startswith("venv-") and current.is_symlink() and current.resolve() == venv.resolve():
            return str(current / "bin" / Path(exe).name)
    except OSError:
        pass
    return exe


def command() -> str:
    """How the units start hostprep: this interpreter (see interpreter()); systemd starts it in /."""
    exe = interpreter()
    if not exe or any(c.isspace() or c in "\"'\\%$;" for c in exe):
        raise StateError("python", f"{exe!r} cannot be written into a unit file (systemd splits or expands it)",
                         "install hostprep in a path without spaces, quotes, '%', '$' or ';'")
    return f"{exe} -m hostprep"


def environment() -> list[tuple[str, str]]:
    out = []
    for key in ENV_KEYS:
        value = os.environ.get(key)
        if value and not (key == "HOSTPREP_ROOT" and value == "/"):
            if any(c.isspace() or c in "\"'\\%$" for c in value):
                raise StateError(key, f"{value!r} cannot be written into a unit file",
                                 "use a path without spaces, quotes, '%' or '$'")
            out.append((key, value))
    return out


def failsafe_file(paths: Paths, family: int) -> Path:
    """Under /etc/hostprep, not /var/lib/hostprep: SELinux lets ip(6)tables-restore (iptables_t)
    read etc_t files such as /etc/sysconfig/iptables, and denies it var_lib_t (found by the
    Vagrant bed under enforcing: the fail-safe never loaded from /var/lib/hostprep)."""
    return paths.etc / f"failsafe.v{family}.rules"


def _old_failsafe_files(paths: Paths) -> list[Path]:
    """Where earlier builds kept the fail-safe (var_lib_t under SELinux): removed by install and flush."""
    return [paths.state_dir / f"failsafe.v{family}.rules" for family in (4, 6)]


# Where systemd looks for a system service's commands (its default PATH): the units do
# not depend on the PATH of whoever ran apply.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def failsafe_tool(variant: str, family: int) -> str:
    """The restore tool of ``variant`` (as IptablesBackend.tool picks it), as an absolute path for the unit."""
    base = "iptables" if family == 4 else "ip6tables"
    specific = f"{base}-{variant}-restore"
    return (shutil.which(specific, path=SERVICE_PATH) or shutil.which(f"{base}-restore", path=SERVICE_PATH)
            or f"/usr/sbin/{specific}")


_UNIT_WORD = re.compile(r"/[A-Za-z0-9._@+/-]*")


def failsafe_command(variant: str, family: int, interface: str, file: Path | str) -> str:
    """The unit command that loads the fail-safe of ``family`` unless it is live already.

    Two units load it at boot (hostprep.service's ExecStartPre= and the drop-in of the
    iptables/netfilter-persistent service, which runs first): an ``iptables-restore
    --noflush`` file inserts its jumps again each time (a restore file cannot delete a rule
    that may not be there: the whole file would fail), so the load is skipped when the jump
    from INPUT into the fail-safe is there (``-C``).  /bin/sh only, no Python.  The interface
    name is validated (validate.interface_name, again here); a path with anything but letters,
    digits and ``/._@+-`` (what /bin/sh or systemd could split or expand) is refused here
    (StateError), nothing written."""
    restore = failsafe_tool(variant, family)
    check = restore.removesuffix("-restore")
    for word in (restore, str(file)):
        # an allow-list, not a list of the characters sh or systemd treat specially
        if not _UNIT_WORD.fullmatch(word):
            raise StateError(word, "cannot be written into the fail-safe's unit line (/bin/sh and systemd "
                             "could split or expand it)", "use a HOSTPREP_ROOT made of letters, digits and "
                             "'/._@+-' only")
    validate.interface_name(interface)
    return (f"/bin/sh -c '{check} -w -C INPUT -i {interface} -j {render.FAILSAFE_CHAIN} 2>/dev/null"
            f" || exec {restore} --noflush {file}'")


def failsafe_variant(paths: Paths, invocation: tuple[str, list[tuple[str, str]]] | None = None) -> str:
    """The iptables variant the fail-safe is loaded with: the last apply's, else the units' or this
    environment's HOSTPREP_BACKEND, else what ``iptables -V`` says."""
    # Only the variant is read, from whatever applied.json holds (a record too damaged to load
    # still says which iptables its rules were loaded with).
    try:
        record = read_json(paths.state_file) or {}
    except StateError:
        record = {}
    if record.get("backend") in VARIANTS:
        return record["backend"]
    env = dict(invocation[1]) if invocation else {}
    choice = env.get("HOSTPREP_BACKEND") or os.environ.get("HOSTPREP_BACKEND")
    if choice in VARIANTS:
        return choice
    try:
        return detect_variant(Runner(), None)
    except Exception:  # noqa: BLE001 - no iptables at all: the nft variant is RHEL 9's
        return "nft"


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader([str(data_dir("systemd")),
                                                             str(data_dir("logrotate.d"))]),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass(frozen=True)
class HostFile:
    path: Path          # under the root
    text: str | None    # None: a symlink
    link: str | None = None  # the symlink's target (as seen on the host)


def installed_invocation(paths: Paths) -> tuple[str, list[tuple[str, str]]] | None:
    """(command, environment) written into the installed hostprep.service, or None."""
    unit = paths.root / "etc/systemd/system" / UNIT
    try:
        text = unit.read_text()
    except OSError:
        return None
    cmd, env = None, []
    for line in text.splitlines():
        if line.startswith("ExecStart=") and line.endswith(" boot"):
            cmd = line[len("ExecStart="):-len(" boot")]
        elif line.startswith("Environment=") and "=" in line[len("Environment="):]:
            key, value = line[len("Environment="):].split("=", 1)
            if key in ENV_KEYS:
                env.append((key, value))
    return (cmd, env) if cmd else None


def wanted_files(paths: Paths, interface: str | None,
                 invocation: tuple[str, list[tuple[str, str]]] | None = None) -> list[HostFile]:
    """The files for ``interface`` (None: -k only, no NIC unit); ``invocation``: (command,
    environment), default this process's."""
    env = _env()
    unit_dir = paths.root / "etc/systemd/system"
    cmd, environ = invocation or (command(), environment())
    failsafe: list[tuple[int, str]] = []
    files: list[HostFile] = []
    if interface:
        variant = failsafe_variant(paths, invocation)
        for fam in (4, 6):
            failsafe.append((fam, failsafe_command(variant, fam, interface, failsafe_file(paths, fam))))
            files.append(HostFile(failsafe_file(paths, fam), render.failsafe_text(interface, fam)))
    ctx = {"command": cmd, "environment": environ, "interface": interface or "none: kernel profile only",
           "state_dir": str(paths.state_dir), "log_dir": str(paths.log_dir), "failsafe": failsafe}
    files += [
        HostFile(unit_dir / UNIT, env.get_template("hostprep.service.j2").render(ctx)),
        HostFile(unit_dir / f"{WANTED_BY}.wants" / UNIT, None, f"/etc/systemd/system/{UNIT}"),
        HostFile(unit_dir / NIC_TEMPLATE, env.get_template("hostprep-nic@.service.j2").render(ctx)),
        HostFile(paths.root / "etc/logrotate.d/hostprep", env.get_template("hostprep.j2").render(ctx)),
    ]
    if interface:
        files.insert(len(failsafe) + 3, HostFile(unit_dir / f"{device_unit(interface)}.wants"
                                                 / nic_instance(interface), None,
                                                 f"/etc/systemd/system/{NIC_TEMPLATE}"))
    for svc in IPTABLES_SERVICES:
        files.append(HostFile(unit_dir / f"{svc}.service.d/hostprep.conf",
                              env.get_template("iptables-dropin.conf.j2").render(
                                  dict(ctx, service=svc, failsafe=[f for f in failsafe
                                                                   if f[0] == (4 if svc == "iptables" else 6)]))))
    for svc in firewall_services(paths):
        files.append(HostFile(unit_dir / f"{svc}.service.d/hostprep.conf",
                              env.get_template("iptables-dropin.conf.j2").render(dict(ctx, service=svc))))
    return files


def firewall_services(paths: Paths) -> list[str]:
    """The services of OTHER_FIREWALL_SERVICES that this host has (a unit file under the root)."""
    return [svc for svc in OTHER_FIREWALL_SERVICES
            if any((paths.root / d / f"{svc}.service").is_file() for d in UNIT_DIRS)]


def _ours(paths: Paths) -> list[Path]:
    """Every persistence file hostprep may have made (any NIC), for removal and for status."""
    unit_dir = paths.root / "etc/systemd/system"
    found = [failsafe_file(paths, 4), failsafe_file(paths, 6), *_old_failsafe_files(paths),
             unit_dir / UNIT, unit_dir / f"{WANTED_BY}.wants" / UNIT, unit_dir / NIC_TEMPLATE]
    found += sorted(unit_dir.glob("sys-subsystem-net-devices-*.device.wants/hostprep-nic@*.service"))
    found += [unit_dir / f"{svc}.service.d/hostprep.conf" for svc in IPTABLES_SERVICES + OTHER_FIREWALL_SERVICES]
    return found


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _reload(paths: Paths, runner: Runner) -> None:
    if str(paths.root) == "/" and systemd_running() and same_netns_as_init() and runner.which("systemctl"):
        runner.run(["systemctl", "daemon-reload"], check=False, mutates=True)


def install(paths: Paths, interface: str | None, runner: Runner,
            invocation: tuple[str, list[tuple[str, str]]] | None = None) -> list[str]:
    """Write and enable the units for ``interface``; returns what changed (empty: all in place)."""
    changed: list[str] = []
    want = wanted_files(paths, interface, invocation)
    keep = {f.path for f in want}
    try:
        for f in want:
            if f.text is not None:
                current = f.path.read_text() if f.path.is_file() else None
                if current != f.text:
                    write_atomic(f.path, f.text, 0o644)
                    changed.append(str(f.path))
            else:
                if f.path.is_symlink() and os.readlink(f.path) == f.link:
                    continue
                f.path.parent.mkdir(parents=True, exist_ok=True)
                if f.path.is_symlink() or f.path.exists():
                    f.path.unlink()
                os.symlink(f.link, f.path)
                changed.append(str(f.path))
        for old in _old_failsafe_files(paths):
            if old.is_file():
                old.unlink()
                changed.append(f"removed {old}")
        # The NIC unit of an earlier external NIC goes.
        for old in _ours(paths):
            if old not in keep and old.name.startswith("hostprep-nic@") and old.is_symlink():
                old.unlink()
                _rmdir_empty(old.parent)
                changed.append(f"removed {old}")
    except OSError as err:
        raise StateError(str(paths.root / "etc/systemd/system"), f"cannot install the boot units "
                         f"({err.strerror})", "check that /etc is writable") from None
    if changed:
        _reload(paths, runner)
    return changed


def _rmdir_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def remove(paths: Paths, runner: Runner) -> list[str]:
    gone = []
    for p in _ours(paths):
        if p.is_symlink() or p.exists():
            try:
                p.unlink()
            except OSError as err:
                raise StateError(str(p), f"cannot remove ({err.strerror})") from None
            gone.append(str(p))
            if p.parent.name.endswith((".wants", ".d")):
                _rmdir_empty(p.parent)
    if gone:
        _reload(paths, runner)
    return gone


def report(paths: Paths, interface: str | None) -> dict:
    """What status shows: installed, enabled, up to date (as apply would write it now)."""
    unit = paths.root / "etc/systemd/system" / UNIT
    out = {"installed": unit.is_file(), "enabled": False, "nic_unit": None, "up_to_date": False,
           "iptables_dropins": [], "logrotate": (paths.root / "etc/logrotate.d/hostprep").is_file(),
           "stale": []}
    if not out["installed"]:
        return out
    # Compared with what apply would write with the command and environment the
    # installed unit names (status may run with another environment than apply).
    invocation = installed_invocation(paths)
    if invocation is None:
        out["stale"] = [str(unit)]
        return out
    files = wanted_files(paths, interface, invocation)
    exe = invocation[0].split()[0]
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        out["stale"] = [f"{unit}: its interpreter {exe} does not exist (the boot would fail)"]
        return out
    out["enabled"] = (paths.root / "etc/systemd/system" / f"{WANTED_BY}.wants" / UNIT).is_symlink()
    differs = []
    for f in files:
        if f.text is not None:
            if not f.path.is_file() or f.path.read_text() != f.text:
                differs.append(str(f.path))
        elif not (f.path.is_symlink() and os.readlink(f.path) == f.link):
            differs.append(str(f.path))
    if interface:
        out["nic_unit"] = nic_instance(interface)
    out["iptables_dropins"] = [svc for svc in IPTABLES_SERVICES + OTHER_FIREWALL_SERVICES
                               if (paths.root / f"etc/systemd/system/{svc}.service.d/hostprep.conf").is_file()]
    out["stale"] = differs
    out["up_to_date"] = not differs
    return out
