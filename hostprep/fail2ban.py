"""fail2ban for the proxy's brute-force blocks, and logrotate for the proxy's logs (issue 14).

The proxy's Lua blocks a client after ``NGX_CLIENT_LOCK_THRESHOLD`` failed logins and
logs ``<ip> will be blocked for N minutes`` to ``${HOST_WORKING_DIR}/logs/blocking.log``;
fail2ban then bans that address in the firewall on the container's ports.

Decisions (README "fail2ban and the proxy's logs" says the same):

- **``container up NAME --fail2ban``**, not a ``hostprep fail2ban`` subcommand: the jail
  is made of what ``container up`` resolves anyway (ports, binding IP, load balancers,
  the env files), so it is rewritten by every up and cannot go stale when a port
  changes; it is opt-in (remembered in the container's record, ``--no-fail2ban`` drops
  it) because a host without fail2ban must still be able to bring containers up.
  ``container down`` removes the jail and the logrotate file; ``flush`` removes every
  hostprep jail, the filter, the action, the logrotate files and the ban sets.
- **The ban set** is an ipset per container (``hostprep-<key>-bn4`` or ``-bn6``, the
  family of ``PROXY_BINDING_IP``: the container's ports are open on that address only),
  ``hash:ip`` with ``timeout`` support: each ban carries the jail's bantime, so it ends
  even when fail2ban is stopped.  hostprep creates it when missing and never flushes,
  refills or swaps it (model.BanSet, plan.plan_sets), so ``apply``, a re-``container up``
  and ``boot`` reload the rules around it and the bans stay.  The rules that match it
  (rules/ban.rules.j2, chain HOSTPREP-BAN) are the first rule of HOSTPREP-IN, before
  the fast path and the container limits, on INPUT and FORWARD of the external NIC:
  a banned client also loses its keep-alive connections.  Not in the nft ``netdev``
  ingress table: that table is deleted and re-created by each apply (its sets would be
  emptied) and ``-e`` leaves it out; an ipset works with both iptables variants.  At boot,
  hostprep's unit creates the set before it loads the rules; the action's ``actionstart``
  creates it with the same parameters when fail2ban runs first, so fail2ban can restore
  its bans in either order.
- **On the native nft backend** the ban sets are nft sets ``flags timeout`` (same names,
  ``size`` 65536 as ipset's maxelem) in a table of their own, ``inet hostprep_ban``
  (rules/ban.nft.j2, render.ban_nft_text): every native change deletes and re-creates
  ``inet hostprep``, which would empty a set living there, so the bans live where no change
  deletes them.  hostprep declares the table and sets (``add``: created when missing, never
  flushed), and flushes and refills only the table's chains (base chains on input and
  forward at priority filter - 10, before hostprep's own, that only drop: a banned source
  on the container's ports, never its load balancers).  The alternative, re-adding the
  live members to a re-created set in each change, loses a ban fail2ban adds between the
  read and the load and the remaining time of every ban, and a rollback would have to
  carry the members too.  ``container down`` deletes the container's set, ``flush`` (and
  the last container with fail2ban going) the table, as the ipsets go on iptables.
  fail2ban's action is the nft version there (fail2ban.d/action-nft.conf: ``nft add
  element ... { ADDR timeout Ns }``, ``nft delete element``); which version
  ``action.d/hostprep-ban.conf`` holds follows the backend (``container up`` writes it,
  ``apply`` rewrites it when the backend changed: ``follow_backend``).  ``nft flush
  ruleset`` (a restart of nftables.service) removes the table with its bans: hostprep's
  drop-in puts the table back empty, and the earlier bans are gone from the kernel.
- **Works with whatever fail2ban the host has**: only ``jail.d/hostprep-<name>.local``,
  ``filter.d/hostprep-proxy.conf`` and ``action.d/hostprep-ban.conf`` are written (other
  jails stay byte-identical); the action needs only ``ipset`` (``nft`` on the native backend), never
  ``fail2ban-firewalld``.  Without fail2ban, ``--fail2ban`` is refused naming the
  package (EPEL's ``fail2ban-server`` on RHEL, ``fail2ban`` on Debian).  When the
  server runs, ``fail2ban-client reload`` makes it read the change.
- **The proxy user's tree**: the proxy user is the owner of the component env file (the
  installer's layout: the files are the proxy user's); its tree is that user's home.
  ``HOST_WORKING_DIR`` (installer.env, core.env or the component env, first found) or,
  without it, the installer's default ``~/reverse_proxy/<container>`` must be an
  absolute path of ``A-Z a-z 0-9 . _ @ + - /`` (what a fail2ban logpath and a logrotate
  file carry without quoting or globbing) that resolves inside that home; env files
  owned by root, a home of ``/``, ``..`` or a symlink leading out are refused.
  logrotate works there as the proxy user (``su``).  Under a ``HOSTPREP_ROOT`` other
  than ``/`` the user is looked up in ``ROOT/etc/passwd`` and ``ROOT/etc/group`` (tests).
- **Behind load balancers** the firewall sees the balancer's address, not the client's:
  balancers are in the jail's ``ignoreip`` and skipped by the ban rule, so a ban never
  takes the site down; such a site's bans stay at the proxy (HTTP 418).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hostprep.backend import NATIVE
from hostprep.envfiles import read_env
from hostprep.errors import InputError, RefusedError
from hostprep.model import BanSet, Container, is_ban_set
from hostprep.data import data_dir
from hostprep.runner import Runner
from hostprep.state import write_atomic

FILTER = "hostprep-proxy"
ACTION = "hostprep-ban"
JAIL_PREFIX = "hostprep-"
LOGS = ("access.log", "error.log", "blocking.log", "openresty_launcher.log")
FINDTIME = 180                   # the installer guide's jail
BLOCK_DURATION_DEFAULT = 1800    # NGX_CLIENT_BLOCK_DURATION, reference §3.8
BANTIME_MAX = 2147483            # ipset's largest timeout (seconds)
PACKAGES = "EPEL's fail2ban-server on RHEL 9 (dnf install fail2ban-server; fail2ban-firewalld is not needed), " \
           "fail2ban on Debian"
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._@+/-]*")
_INT = re.compile(r"[0-9]{1,10}")

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_dir("fail2ban.d"))), trim_blocks=True,
                          lstrip_blocks=True, undefined=jinja2.StrictUndefined, autoescape=False,
                          keep_trailing_newline=True)


@dataclass(frozen=True)
class Files:
    """Where hostprep's fail2ban and logrotate files go (under the HOSTPREP_ROOT prefix)."""

    root: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc/fail2ban"

    def jail(self, name: str) -> Path:
        return self.conf_dir / "jail.d" / f"{JAIL_PREFIX}{name}.local"

    @property
    def filter(self) -> Path:
        return self.conf_dir / "filter.d" / f"{FILTER}.conf"

    @property
    def action(self) -> Path:
        return self.conf_dir / "action.d" / f"{ACTION}.conf"

    def logrotate(self, name: str) -> Path:
        return self.root / "etc/logrotate.d" / f"hostprep-proxy-{name}"

    def jails(self) -> list[Path]:
        d = self.conf_dir / "jail.d"
        return sorted(d.glob(f"{JAIL_PREFIX}*.local")) if d.is_dir() else []

    def logrotates(self) -> list[Path]:
        d = self.root / "etc/logrotate.d"
        return sorted(d.glob("hostprep-proxy-*")) if d.is_dir() else []


@dataclass(frozen=True)
class ProxyUser:
    name: str
    uid: int
    group: str
    home: Path


@dataclass(frozen=True)
class JailSpec:
    """Everything one container's jail and logrotate file say; validated."""

    name: str
    ports: tuple[int, ...]
    dest: str
    working_dir: Path
    user: ProxyUser
    bantime: int
    findtime: int
    ban: BanSet
    ignore: tuple[str, ...]

    @property
    def jail(self) -> str:
        return JAIL_PREFIX + self.name

    @property
    def logpath(self) -> str:
        return str(self.working_dir / "logs/blocking.log")

    @property
    def set4(self) -> str:
        return self.ban.name if self.ban.family == 4 else ""

    @property
    def set6(self) -> str:
        return self.ban.name if self.ban.family == 6 else ""

    @property
    def logfiles(self) -> list[str]:
        return [str(self.working_dir / "logs" / f) for f in LOGS]


# -- the host's fail2ban ------------------------------------------------------

def installed(runner: Runner, files: Files) -> bool:
    return runner.which("fail2ban-client") is not None and (files.conf_dir / "jail.conf").is_file()


def require_installed(runner: Runner, files: Files) -> None:
    if not installed(runner, files):
        missing = "fail2ban-client" if runner.which("fail2ban-client") is None else f"{files.conf_dir}/jail.conf"
        raise RefusedError("--fail2ban", f"fail2ban is not installed ({missing} not found)",
                           f"install {PACKAGES}, or leave out --fail2ban")


def client(files: Files, *args: str) -> list[str]:
    return ["fail2ban-client", "-c", str(files.conf_dir), *args]


def running(runner: Runner, files: Files) -> bool:
    if runner.which("fail2ban-client") is None:
        return False
    return runner.run(client(files, "ping"), check=False).returncode == 0


def reload(runner: Runner, files: Files) -> str:
    """``fail2ban-client reload`` when the server runs; returns what happened, one line."""
    if not running(runner, files):
        return "fail2ban is not running: it reads the jail when it starts"
    res = runner.run(client(files, "reload"), check=False, mutates=True)
    if res.returncode != 0:
        last = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()][-1:] or ["no message"]
        return f"fail2ban-client reload FAILED ({last[0]}): see fail2ban's log"
    return "fail2ban reloaded"


def config_test(runner: Runner, files: Files) -> None:
    """``fail2ban-client -t``: the whole configuration (ours and the admin's) parses."""
    res = runner.run(client(files, "-t"), check=False)
    if res.returncode != 0:
        last = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()][-3:]
        raise RefusedError("fail2ban", "the configuration test (fail2ban-client -t) fails: " + " | ".join(last),
                           "fix the fail2ban configuration, or leave out --fail2ban")


# -- resolving one container's jail ---------------------------------------------

def _passwd(root: Path) -> list[list[str]]:
    try:
        text = (root / "etc/passwd").read_text()
    except OSError:
        return []
    return [ln.split(":") for ln in text.splitlines() if ln.count(":") >= 6]


def proxy_user(uid: int, root: Path) -> ProxyUser | None:
    """The user ``uid`` (name, primary group name, home), or None when unknown."""
    if root == Path("/"):
        import grp
        import pwd
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return None
        try:
            group = grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            group = str(pw.pw_gid)
        return ProxyUser(pw.pw_name, uid, group, Path(pw.pw_dir))
    for f in _passwd(root):
        if f[2] == str(uid):
            group = f[3]
            try:
                for ln in (root / "etc/group").read_text().splitlines():
                    g = ln.split(":")
                    if len(g) >= 3 and g[2] == f[3]:
                        group = g[0]
                        break
            except OSError:
                pass
            return ProxyUser(f[0], uid, group, Path(f[5]))
    return None


def _owner(path: Path) -> int:
    return os.stat(path).st_uid


def _first(envs, key: str):
    for e in envs:
        if e is not None and e.get(key) is not None:
            return e, e.get(key)
    return None, None


def resolve(c: Container, env_path: Path, core_path: Path | None, installer_path: Path | None,
            root: Path) -> JailSpec:
    """The jail of ``c`` from its env files; ``InputError`` names the field and the fix."""
    if not c.hardening:
        raise InputError("--fail2ban", f"NGX_IPTABLES_HARDENING=0: {c.name} has no open port to ban on",
                         "leave out --fail2ban, or turn the hardening on")
    env = read_env(env_path, "--env")
    core = read_env(core_path, "--core") if core_path else None
    inst = read_env(installer_path, "--installer") if installer_path else None
    owner = _owner(env_path)
    user = proxy_user(owner, root)
    if owner == 0 or user is None:
        raise InputError(f"--env {env_path}", "is owned by " + ("root" if owner == 0 else f"uid {owner}, "
                         "who is not in the passwd database") + ": hostprep cannot tell the proxy user whose "
                         "tree holds HOST_WORKING_DIR", "chown the env files to the proxy user (the installer's layout)")
    home = user.home
    if not home.is_absolute() or home == Path("/") or len(home.parts) < 2:
        raise InputError(f"home of {user.name}", f"{home} is not a proxy user's tree",
                         "give the proxy user a home directory of its own")
    src, value = _first((inst, core, env), "HOST_WORKING_DIR")
    field = f"HOST_WORKING_DIR in {src.path}" if src else f"HOST_WORKING_DIR (default ~{user.name}/reverse_proxy/{c.name})"
    text = value if value is not None else str(home / "reverse_proxy" / c.name)
    if not text.startswith("/"):
        raise InputError(field, f"{text!r} is not an absolute path",
                         f"give the full path, e.g. {home}/reverse_proxy/{c.name}")
    if not _SAFE_PATH.fullmatch(text) or "//" in text or any(p in (".", "..") for p in text.split("/")):
        raise InputError(field, f"{text!r} has a character a fail2ban or logrotate file cannot carry "
                         "(only A-Z a-z 0-9 . _ @ + - and single '/' between names; no '.' or '..' part)",
                         "move the working directory to such a path")
    wd = Path(text.rstrip("/") or "/")
    real, real_home = Path(os.path.realpath(wd)), Path(os.path.realpath(home))
    if real != real_home and real_home not in real.parents:
        raise InputError(field, f"{wd} is outside {user.name}'s tree {home}"
                         + (f" (it resolves to {real})" if real != wd else ""),
                         f"keep the proxy's working directory under {home} (the installer's default "
                         f"{home}/reverse_proxy/{c.name})")
    if real != wd:
        raise InputError(field, f"{wd} resolves to {real} through a symbolic link", f"give {real}")
    blocking = wd / "logs/blocking.log"
    if not blocking.is_file():
        raise InputError(field, f"{blocking} does not exist (fail2ban refuses a jail without its log)",
                         "start the container once (the proxy creates its logs), or create the file as "
                         f"{user.name}")
    src, value = _first((env, core), "NGX_CLIENT_BLOCK_DURATION")
    bantime = BLOCK_DURATION_DEFAULT
    if value is not None:
        if not _INT.fullmatch(value) or not 1 <= int(value) <= BANTIME_MAX:
            raise InputError(f"NGX_CLIENT_BLOCK_DURATION in {src.path}", f"is not in expected format. Input "
                             f"Provided= {value!r}", f"Expected Format <Integer> seconds from 1 to {BANTIME_MAX}. Eg. 1800")
        bantime = int(value)
    ban = c.ban_set() or BanSet(c.set_name("bn"), c.family)
    ignore = ("127.0.0.1/8", "::1") + tuple(str(n) for n in c.load_balancers)
    return JailSpec(c.name, c.ports, str(c.dest), wd, user, bantime, FINDTIME, ban, ignore)


# -- rendering and writing ------------------------------------------------------

def jail_text(s: JailSpec) -> str:
    return _ENV.get_template("jail.local.j2").render(s=s)


def logrotate_text(s: JailSpec) -> str:
    return _ENV.get_template("logrotate.j2").render(s=s)


def filter_text() -> str:
    return (data_dir("fail2ban.d") / "filter.conf").read_text()


# The ban action's two versions (action.d/hostprep-ban.conf): ipset where hostprep runs on
# iptables, nft sets in table inet hostprep_ban on the native nft backend.
ACTION_FILES = {"ipset": "action.conf", "nft": "action-nft.conf"}


def ban_kind(variant: str | None) -> str:
    """The ban action a backend (its variant) needs: "nft" on the native backend, else "ipset"."""
    return "nft" if variant == NATIVE else "ipset"


def action_text(kind: str = "ipset") -> str:
    return (data_dir("fail2ban.d") / ACTION_FILES[kind]).read_text()


def wanted_files(s: JailSpec, files: Files, kind: str = "ipset") -> dict[Path, str]:
    return {files.filter: filter_text(), files.action: action_text(kind), files.jail(s.name): jail_text(s),
            files.logrotate(s.name): logrotate_text(s)}


def _write(path: Path, text: str) -> bool:
    """Write when different (0644 as fail2ban's and logrotate's own files); True when written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_atomic(path, text, mode=0o644)
    return True


def write(s: JailSpec, files: Files, kind: str = "ipset") -> list[str]:
    """Write the container's files (the ban action of ``kind``); returns the paths changed."""
    return [str(p) for p, text in wanted_files(s, files, kind).items() if _write(p, text)]


def install(s: JailSpec, files: Files, runner: Runner, kind: str = "ipset") -> list[str]:
    """Write the container's files, then ``fail2ban-client -t``; on a failed test the files
    are put back as they were and ``RefusedError`` says why.  Returns the paths changed."""
    wanted = wanted_files(s, files, kind)
    before: dict[Path, str | None] = {}
    for p in wanted:
        try:
            before[p] = p.read_text()
        except OSError:
            before[p] = None
    changed = write(s, files, kind)
    if changed:
        try:
            config_test(runner, files)
        except RefusedError:
            for p, text in before.items():
                if text is None:
                    _unlink([p])
                else:
                    _write(p, text)
            raise
    return changed


def follow_backend(files: Files, kind: str) -> bool:
    """The ban action of ``kind`` in place of the other one where hostprep has a jail (the
    backend changed: ``apply --backend``); True when rewritten (fail2ban must reload)."""
    if not files.jails() or not files.action.is_file():
        return False
    return _write(files.action, action_text(kind))


def _unlink(paths) -> list[str]:
    gone = []
    for p in paths:
        try:
            os.unlink(p)
            gone.append(str(p))
        except FileNotFoundError:
            pass
    return gone


def remove(name: str, files: Files) -> list[str]:
    """``container down``: NAME's jail and logrotate file (the shared filter and action stay)."""
    return _unlink([files.jail(name), files.logrotate(name)])


def remove_all(files: Files) -> list[str]:
    """``flush``: every hostprep jail, the filter, the action and the logrotate files."""
    return _unlink(files.jails() + [files.filter, files.action] + files.logrotates())


# -- status ---------------------------------------------------------------------

def _banned(runner: Runner, files: Files, jail: str) -> list[str] | None:
    """The jail's banned addresses, oldest first, as fail2ban lists them; None when not loaded."""
    res = runner.run(client(files, "get", jail, "banip", "--with-time"), check=False)
    if res.returncode != 0:
        return None
    # one ban a line: "203.0.113.7 \t2026-12-05 21:00:00 + 1800 = 2026-12-05 21:30:00"
    rows = [ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()]
    return rows


def action_kind(files: Files) -> str | None:
    """Which version of the ban action ``action.d/hostprep-ban.conf`` holds ("ipset", "nft"), None
    when absent or edited."""
    try:
        text = files.action.read_text()
    except OSError:
        return None
    return next((k for k in ACTION_FILES if text == action_text(k)), None)


def collect(runner: Runner, files: Files, containers, live_sets: dict[str, frozenset[str]],
            kind: str | None = None) -> dict:
    """The fail2ban part of ``status --json``: installed, running, jails, bans per container.

    ``bans`` counts the members of the container's ban set (what the firewall drops);
    ``newest`` is the address fail2ban banned last (None when fail2ban is not running);
    ``action``: the version of the ban action on disk, ``action_wanted`` the one of the
    backend (``kind``, ban_kind): after a rolled-back backend switch they may differ.
    """
    mine = [c for c in containers if getattr(c, "fail2ban", False)]
    jails = files.jails()
    present = installed(runner, files)
    # the server is asked only when hostprep has a jail: status stays quick elsewhere
    up = present and bool(mine or jails) and running(runner, files)
    report: dict = {"installed": present, "running": up if (mine or jails) else None,
                    "jails": [p.name[:-len(".local")] for p in jails], "containers": [],
                    "action": action_kind(files) if jails else None, "action_wanted": kind if jails else None}
    for c in mine:
        ban = c.ban_set()
        name = ban.name if ban else c.set_name("bn")
        members = live_sets.get(name)
        listed = _banned(runner, files, JAIL_PREFIX + c.name) if up else None
        report["containers"].append({
            "name": c.name, "jail": files.jail(c.name).is_file(), "jail_loaded": listed is not None,
            "set": name, "set_present": members is not None, "bans": len(members) if members is not None else 0,
            "newest": listed[-1] if listed else None})
    report["stray_sets"] = sorted(n for n in live_sets if is_ban_set(n)
                                  and n not in {c.set_name("bn") for c in mine})
    return report


def problems(report: dict) -> list[str]:
    out = []
    have, want = report.get("action"), report.get("action_wanted")
    if report["jails"] and want is not None and have != want:
        # the ban would go where no rule of this backend looks: nothing banned is dropped
        out.append(f"fail2ban: action.d/{ACTION}.conf is " + (f"the {have} version" if have else "missing or edited")
                   + f", this host's backend needs the {want} one: its bans are not enforced (run 'hostprep apply')")
    for row in report["containers"]:
        if not row["jail"]:
            out.append(f"fail2ban: the jail of {row['name']} is missing (run 'hostprep container up {row['name']}')")
        if report["running"] and row["jail"] and not row["jail_loaded"]:
            out.append(f"fail2ban: the jail {JAIL_PREFIX}{row['name']} is not loaded (fail2ban-client reload)")
    return out


def warnings(report: dict) -> list[str]:
    """fail2ban stopped or gone while containers want it: nothing new is banned (the bans stay until
    their timeout)."""
    if not report["containers"] or report["running"]:
        return []
    return ["fail2ban is " + ("not running" if report["installed"] else "not installed") + ": the addresses the "
            "proxy blocks are not banned in the firewall (start it: systemctl start fail2ban)"]
