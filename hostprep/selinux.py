"""SELinux: read the host's mode, check it before ``apply``, install the policy module.

State is read from two files, never through the PyPI ``selinux`` shim (see
DESIGN.md): ``<selinuxfs>/enforce`` (``1`` enforcing, ``0`` permissive; absent
when SELinux is disabled, because selinuxfs is then not mounted) and
``/etc/selinux/config`` (``SELINUX=`` and ``SELINUXTYPE=``).  Both paths are
injectable: ``default_paths`` takes the config under the ``HOSTPREP_ROOT``
prefix and selinuxfs from ``HOSTPREP_SELINUXFS`` (default ``/sys/fs/selinux``).

Changes go through the runner only (``semodule``, ``semanage``, ``restorecon``,
``make`` with the reference policy's development Makefile), so ``--dry-run``
records them and tests swap in a fake.

The policy module (selinux/hostprep_proxy.te) gives the proxy container
(``container_t``) three types in its working directory (HOST_WORKING_DIR,
default ``~/reverse_proxy/<container>``): logs/ and cache/ writable, conf/,
ssl/, html/ and lua/ read only.  HOST_WORKING_DIR differs per host, so the paths
are local ``semanage fcontext`` customisations added by ``install``, not lines
of the module's .fc file.

Why one module of about 500 lines: it holds three small parts (reading the mode,
the ``apply`` gate, install/remove/status of the module) that all work from
``SelinuxState``; install and remove call the gate's ``_require_selinux`` and the
tool checks, so a split would give three modules importing one another's helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hostprep.envfiles import read_env
from hostprep.errors import CommandFailed, HostprepError, InputError, MissingBinary, RefusedError, StateError
from hostprep.data import PACKAGE_DIR
from hostprep.runner import Runner

MODES = ("enforcing", "permissive", "disabled")
CONFIG_SHOWN = "/etc/selinux/config"   # how messages name the config file (what the admin edits)
SELINUXFS_DEFAULT = "/sys/fs/selinux"
IGNORE_KEY = "NGX_IGNORE_SELINUX"

MODULE_NAME = "hostprep_proxy"
DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")

# The types of selinux/hostprep_proxy.te, and the HOST_WORKING_DIR subdirectory
# each one labels (reference §5: cache, ssl, logs, conf, html, lua).
LOG_T = "hostprep_proxy_log_t"      # the container reads, writes, creates, appends, unlinks
CACHE_T = "hostprep_proxy_cache_t"  # the same plus directories and rename (proxy cache)
RO_T = "hostprep_proxy_ro_t"        # the container only reads
TYPES = (LOG_T, CACHE_T, RO_T)
CONTEXTS: tuple[tuple[str, str], ...] = (
    ("logs", LOG_T),
    ("cache", CACHE_T),
    ("conf", RO_T),
    ("ssl", RO_T),
    ("html", RO_T),
    ("lua", RO_T),
)


def _module_dir() -> Path:
    """Locate the policy sources: ``hostprep/selinux_module`` in an installed
    wheel, ``selinux/`` beside the package in a source checkout (like
    ``data.data_dir``; the wheel name differs because ``hostprep.selinux`` is
    this module)."""
    installed = PACKAGE_DIR / "selinux_module"
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / "selinux"


MODULE_DIR = _module_dir()


class SelinuxToolMissing(MissingBinary):
    """A program or file that the SELinux commands need is missing (MissingBinary names its package)."""


# -- state ---------------------------------------------------------------------

@dataclass(frozen=True)
class SelinuxState:
    """SELinux on this host, as read from selinuxfs and the config file.

    ``present``: selinuxfs is mounted (its ``enforce`` file exists).
    ``runtime``: the mode now: enforcing, permissive, or disabled (not present).
    ``configured``: ``SELINUX=`` of the config file, the mode of the next boot;
    None when the file is absent or has no valid ``SELINUX=`` line.
    ``policy``: ``SELINUXTYPE=`` (``targeted`` on RHEL), None when not set.
    ``reboot_required``: only a reboot reaches the configured mode, i.e. one of
    runtime/configured is ``disabled`` and the other is not.  Enforcing vs
    permissive is *not* a reboot: ``setenforce`` switches between them at once
    (``differs`` tells that the next boot will change the mode).
    """

    present: bool
    runtime: str
    configured: str | None
    policy: str | None
    reboot_required: bool
    config_present: bool = True      # the config file exists (False: SELinux is not installed)

    def __post_init__(self) -> None:
        if self.runtime not in MODES:
            raise ValueError(f"runtime mode {self.runtime!r} not in {MODES}")
        if self.configured is not None and self.configured not in MODES:
            raise ValueError(f"configured mode {self.configured!r} not in {MODES}")
        if not self.present and self.runtime != "disabled":
            raise ValueError("without selinuxfs the runtime mode is disabled")

    @property
    def installed(self) -> bool:
        """selinuxfs mounted or a config file: SELinux is part of this system."""
        return self.present or self.config_present

    @property
    def enabled(self) -> bool:
        return self.runtime != "disabled"

    @property
    def differs(self) -> bool:
        """The configured mode (next boot) is not the runtime mode."""
        return self.configured is not None and self.configured != self.runtime

    def as_dict(self) -> dict:
        return {
            "present": self.present,
            "config_present": self.config_present,
            "runtime": self.runtime,
            "configured": self.configured,
            "policy": self.policy,
            "reboot_required": self.reboot_required,
            "differs": self.differs,
        }

    def describe(self) -> str:
        text = f"SELinux {self.runtime}"
        if not self.present:
            text += " (no selinuxfs)"
        text += f", {CONFIG_SHOWN}: " + (f"SELINUX={self.configured}" if self.configured else
                                         "no SELINUX= setting" if self.config_present else "missing")
        if self.policy:
            text += f", policy {self.policy}"
        if self.reboot_required:
            text += f"; reboot required to become {self.configured}"
        elif self.differs:
            text += f"; the next boot is {self.configured}"
        return text


def _reboot_required(runtime: str, configured: str | None) -> bool:
    """Enabling or disabling SELinux needs a reboot; enforcing <-> permissive does not."""
    if configured is None:
        return False
    return (runtime == "disabled") != (configured == "disabled")


def _read_runtime(selinuxfs: Path) -> tuple[bool, str]:
    enforce = selinuxfs / "enforce"
    try:
        text = enforce.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return False, "disabled"
    except OSError as err:
        raise StateError(str(enforce), f"cannot read ({err.strerror})", "run as root") from None
    if text == "1":
        return True, "enforcing"
    if text == "0":
        return True, "permissive"
    raise StateError(str(enforce), f"unexpected content {text[:20]!r} (expected 0 or 1)",
                     "is selinuxfs mounted there? set HOSTPREP_SELINUXFS to its mount point")


def _read_config(config: Path) -> tuple[str | None, str | None]:
    """``SELINUX=`` and ``SELINUXTYPE=`` of the config file.

    The first valid line of each wins (libselinux reads the first ``SELINUX=``);
    comments, blank lines, lines without ``=``, unknown keys and unknown modes
    are ignored.  Keys are upper case as libselinux expects; mode values are
    case-insensitive; a trailing ``# comment`` is dropped.
    """
    try:
        text = config.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as err:
        raise StateError(str(config), f"cannot read ({err.strerror})", "run as root") from None
    mode: str | None = None
    policy: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        words = value.split("#", 1)[0].split()
        if key.strip() != key or len(words) != 1:
            continue
        value = words[0]
        if key == "SELINUX" and mode is None and value.lower() in MODES:
            mode = value.lower()
        elif key == "SELINUXTYPE" and policy is None:
            policy = value
    return mode, policy


def read_state(selinuxfs: Path, config: Path) -> SelinuxState:
    """Read ``<selinuxfs>/enforce`` and the config file; changes nothing.

    No selinuxfs directory or no ``enforce`` file: not present, runtime
    disabled.  ``reboot_required`` only when enabling or disabling SELinux is
    pending (config enforcing/permissive while disabled now, or config disabled
    while enabled now).  Config enforcing with runtime permissive is *not* a
    reboot: ``setenforce 1`` fixes it at once; ``differs`` reports it.
    """
    present, runtime = _read_runtime(selinuxfs)
    configured, policy = _read_config(config)
    return SelinuxState(present, runtime, configured, policy, _reboot_required(runtime, configured),
                        config.is_file())


def default_paths(root: Path) -> tuple[Path, Path]:
    """(selinuxfs, config): selinuxfs from ``HOSTPREP_SELINUXFS`` (default
    /sys/fs/selinux, not under the root prefix: it is the kernel's), the config
    under the ``HOSTPREP_ROOT`` prefix (``Paths.root``)."""
    selinuxfs = Path(os.environ.get("HOSTPREP_SELINUXFS") or SELINUXFS_DEFAULT)
    return selinuxfs, Path(root) / "etc/selinux/config"


# -- the check before apply -----------------------------------------------------

def ignore_from_core(core: Path | None) -> bool:
    """``NGX_IGNORE_SELINUX`` of the core.env given with ``--core`` (default false)."""
    if core is None:
        return False
    env = read_env(Path(core), "--core")
    value = env.get(IGNORE_KEY)
    if value is None:
        return False
    if value.lower() == "true":
        return True
    if value.lower() == "false":
        return False
    raise InputError(f"{IGNORE_KEY} in {env.path}", f"is not in expected format. Input Provided= {value!r}",
                     "Expected true or false (default false)")


def install_hint() -> str:
    """The packages that bring SELinux to this host (by its package manager)."""
    if shutil.which("dnf") or shutil.which("yum"):
        return "dnf install selinux-policy-targeted, set SELINUX=enforcing in /etc/selinux/config, reboot"
    if shutil.which("apt-get"):
        return "apt-get install selinux-basics selinux-policy-default, run selinux-activate, reboot"
    return "install the distribution's SELinux policy packages (selinux-policy-targeted on RHEL)"


def _how_to_enforce(state: SelinuxState) -> str:
    if state.runtime == "permissive":
        steps = "run `setenforce 1`"
        if state.configured != "enforcing":
            steps += f" and set SELINUX=enforcing in {CONFIG_SHOWN}"
        return steps
    if state.configured == "enforcing":
        steps = "run `touch /.autorelabel` and reboot"
    else:
        steps = f"set SELINUX=enforcing in {CONFIG_SHOWN}, run `touch /.autorelabel` and reboot"
    if state.configured in ("enforcing", "permissive"):
        steps += (" (if it stays disabled, remove selinux=0 from the kernel command line: "
                  "`grubby --update-kernel ALL --remove-args selinux`)")
    return steps


def check_enforcing(state: SelinuxState, ignore_flag: bool, ignore_core: bool) -> list[str]:
    """Refuse (``RefusedError``) unless SELinux is enforcing or the check is skipped.

    Returns warnings for the CLI to print: which switch skipped the check and
    what it skipped; and, when SELinux is enforcing now but the config file says
    otherwise, that the next boot will not be enforcing.
    """
    configured = f"SELINUX={state.configured}" if state.configured else \
        "no SELINUX= setting" if state.config_present else "missing"
    if state.runtime == "enforcing":
        if state.configured in ("permissive", "disabled"):
            return [f"SELinux is enforcing now but {CONFIG_SHOWN} has {configured}: the next boot will not "
                    f"be enforcing (set SELINUX=enforcing there)"]
        return []
    skip = f"to skip this check: --ignore-selinux, or {IGNORE_KEY}=true in the core.env given with --core"
    if not (ignore_flag or ignore_core) and not state.installed:
        raise RefusedError("SELinux", f"not installed on this host (no {CONFIG_SHOWN})",
                           f"to install it: {install_hint()}; {skip}")
    if not (ignore_flag or ignore_core):
        raise RefusedError(
            "SELinux", f"not enforcing (runtime: {state.runtime}, {CONFIG_SHOWN}: {configured})",
            f"to enable enforcing mode: {_how_to_enforce(state)}; to skip this check: --ignore-selinux, "
            f"or {IGNORE_KEY}=true in the core.env given with --core")
    by = []
    if ignore_flag:
        by.append("--ignore-selinux")
    if ignore_core:
        by.append(f"{IGNORE_KEY}=true in core.env (--core)")
    what = "not installed" if not state.installed else state.runtime
    return [f"SELinux check skipped ({' and '.join(by)}): SELinux is {what}, the proxy containers are not "
            "confined"]


# -- the policy module for HOST_WORKING_DIR ---------------------------------------

# Characters semanage fcontext would read as regular-expression syntax, or that
# cannot be passed through its file_contexts.local file unambiguously.
_SPACE_QUOTE = re.compile(r"""[\s'"`]""")
_REGEX_META = re.compile(r"[\\()\[\]{}*+?|^$]")
# Trees no proxy working directory belongs in: labelling DIR/ssl or DIR/conf
# there would take system files away from the domains that use them.
_SYSTEM_TREES = ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev", "/run", "/bin", "/sbin", "/lib", "/lib64",
                 "/var/lib/selinux")


def _check_chars(text: str) -> None:
    if _SPACE_QUOTE.search(text):
        raise InputError("--working-dir", f"{text!r} contains whitespace, a newline or a quote",
                         "use a directory path without them (semanage fcontext and restorecon take it verbatim)")
    if _REGEX_META.search(text):
        raise InputError("--working-dir", f"{text!r} contains one of \\ ( ) [ ] {{ }} * + ? | ^ $",
                         "use a plain directory path: semanage fcontext reads the path as a regular expression")


def validate_working_dir(path: Path, must_exist: bool = True) -> Path:
    """The working directory as an absolute real path, or ``InputError``.

    Refused: relative paths, whitespace/newline/quote or regex characters, ``/``
    and top-level directories, system trees (/etc, /usr, ...), and (when
    ``must_exist``) a path that is not an existing directory.  Symbolic links
    are resolved because file contexts match real paths.
    """
    text = str(path)
    _check_chars(text)
    if not text.startswith("/"):
        raise InputError("--working-dir", f"{text!r} is not an absolute path",
                         "give the full path of HOST_WORKING_DIR, e.g. /home/nginxuser/reverse_proxy/finesse")
    real = Path(os.path.realpath(text))
    _check_chars(str(real))
    if must_exist and not real.exists():
        raise InputError("--working-dir", f"{text} does not exist",
                         "give the container's HOST_WORKING_DIR (default ~/reverse_proxy/<container>)")
    if real.exists() and not real.is_dir():
        raise InputError("--working-dir", f"{text} is not a directory", "give the container's HOST_WORKING_DIR")
    shown = text if str(real) == text else f"{text} (= {real})"
    if len(real.parts) <= 2:
        raise InputError("--working-dir", f"{shown} is / or a top-level directory",
                         "give the container's own directory, e.g. /home/nginxuser/reverse_proxy/finesse")
    for tree in _SYSTEM_TREES:
        if real == Path(tree) or Path(tree) in real.parents:
            raise InputError("--working-dir", f"{shown} is inside {tree}",
                             "keep HOST_WORKING_DIR out of system trees; labelling it would change system files")
    return real


def fcontext_spec(working_dir: Path, sub: str) -> str:
    """The semanage fcontext pattern of one subdirectory: ``DIR/sub(/.*)?`` with dots escaped."""
    return str(working_dir).replace(".", r"\.") + f"/{sub}(/.*)?"


def preview_install(working_dir: Path, devel_makefile: Path = DEVEL_MAKEFILE) -> list[list[str]]:
    """The commands ``install`` runs on an SELinux host, for a dry run where SELinux is not
    enabled (nothing can be queried, so every file context is shown as added)."""
    wd = validate_working_dir(working_dir, must_exist=True)
    pp = f"<build dir>/{MODULE_NAME}.pp"
    return ([["make", "-C", "<build dir>", "-f", str(devel_makefile), f"{MODULE_NAME}.pp"],
             ["semodule", "-i", pp]]
            + [["semanage", "fcontext", "-a", "-t", type_, fcontext_spec(wd, sub)] for sub, type_ in CONTEXTS]
            + [["restorecon", "-R", "-F", "-v", str(wd)]])


def _require_selinux(state: SelinuxState, action: str) -> None:
    if not state.present or state.runtime == "disabled":
        why = "no selinuxfs" if not state.present else "disabled"
        raise RefusedError("SELinux", f"not enabled on this host ({why}): nothing to {action}",
                           (f"install SELinux first ({install_hint()})" if not state.installed else
                            f"enable SELinux first (SELINUX=enforcing in {CONFIG_SHOWN}, `touch /.autorelabel`, "
                            "reboot)") + ", then run this again")


def _require_tools(runner: Runner, binaries: tuple[str, ...], makefile: Path | None = None) -> None:
    for binary in binaries:
        if runner.which(binary) is None:
            raise SelinuxToolMissing(binary)
    if makefile is not None and not makefile.is_file():
        raise SelinuxToolMissing(str(makefile), "file not found (the reference policy development files)")


def loaded_modules(runner: Runner) -> set[str]:
    """Names of the loaded policy modules (``semodule -l``, read-only)."""
    out = runner.run(["semodule", "-l"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def local_fcontexts(runner: Runner) -> dict[str, str]:
    """Local file-context customisations: pattern -> type (``semanage fcontext -l -C``)."""
    out = runner.run(["semanage", "fcontext", "-l", "-C"]).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] == "SELinux":
            continue
        context = words[-1].split(":")
        if len(context) >= 3:
            found[words[0]] = context[2]
    return found


def install(runner: Runner, working_dir: Path, state: SelinuxState, module_dir: Path = MODULE_DIR, *,
            devel_makefile: Path = DEVEL_MAKEFILE) -> list[str]:
    """Build and load hostprep_proxy, map DIR's subdirectories to its types, relabel DIR.

    Returns what was done, one line each, for the CLI to print.
    """
    _require_selinux(state, "install")
    wd = validate_working_dir(working_dir, must_exist=True)
    _require_tools(runner, ("semodule", "semanage", "restorecon", "make"), devel_makefile)
    te = Path(module_dir) / f"{MODULE_NAME}.te"
    if not te.is_file():
        raise StateError(str(te), "the policy module's source is missing", "reinstall hostprep")
    if "container" not in loaded_modules(runner):
        raise RefusedError("container-selinux", "the policy module 'container' is not loaded, so container_t "
                           "(the domain of Podman containers) does not exist",
                           "dnf install container-selinux (Podman normally pulls it in)")
    done: list[str] = []
    build = Path(tempfile.mkdtemp(prefix="hostprep-selinux-"))
    try:
        for ext in (".te", ".fc", ".if"):
            src = Path(module_dir) / f"{MODULE_NAME}{ext}"
            if src.is_file():
                shutil.copyfile(src, build / src.name)
        try:
            runner.run(["make", "-C", str(build), "-f", str(devel_makefile), f"{MODULE_NAME}.pp"])
        except CommandFailed as err:
            raise CommandFailed(str(te), f"does not compile ({err.problem})",
                                "scripts/check-selinux-module.sh shows the compiler's output") from None
        done.append(f"built {MODULE_NAME}.pp from {module_dir}")
        runner.run(["semodule", "-i", str(build / f"{MODULE_NAME}.pp")], mutates=True)
        done.append(f"loaded policy module {MODULE_NAME} (semodule -i)")
    finally:
        shutil.rmtree(build, ignore_errors=True)

    existing = local_fcontexts(runner)
    for sub, type_ in CONTEXTS:
        spec = fcontext_spec(wd, sub)
        if existing.get(spec) == type_:
            done.append(f"file context {spec} -> {type_} (already there)")
            continue
        if spec in existing:
            runner.run(["semanage", "fcontext", "-m", "-t", type_, spec], mutates=True)
            done.append(f"file context {spec} -> {type_} (changed from {existing[spec]})")
        else:
            runner.run(["semanage", "fcontext", "-a", "-t", type_, spec], mutates=True)
            done.append(f"file context {spec} -> {type_} (added)")

    # -F resets the whole context, the MCS level included: files that an earlier
    # run mounted with :Z carry that run's categories, which the next run (new
    # random categories) could not use.
    res = runner.run(["restorecon", "-R", "-F", "-v", str(wd)], mutates=True)
    relabelled = sum(1 for line in res.stdout.splitlines() if line.startswith("Relabeled"))
    done.append(f"relabelled {wd} (restorecon -R -F -v): {relabelled} path(s) changed")
    missing = [sub for sub, _ in CONTEXTS if not (wd / sub).is_dir()]
    if missing:
        done.append(f"not there yet: {', '.join(missing)}; run `restorecon -R {wd}` after creating them "
                    "(new directories inherit their parent's label)")
    return done


def remove(runner: Runner, working_dir: Path, state: SelinuxState) -> list[str]:
    """Undo ``install`` for DIR: its file contexts, the labels, then the module.

    Only mappings of DIR's subdirectories to hostprep's types are deleted.  The
    module stays loaded while another working directory still uses its types
    (two containers on one host).  DIR itself may be gone already.
    """
    _require_selinux(state, "remove")
    wd = validate_working_dir(working_dir, must_exist=False)
    _require_tools(runner, ("semodule", "semanage", "restorecon"))
    done: list[str] = []
    existing = local_fcontexts(runner)
    deleted = set()
    for sub, _type in CONTEXTS:
        spec = fcontext_spec(wd, sub)
        if spec not in existing:
            continue
        if existing[spec] not in TYPES:
            done.append(f"file context {spec} -> {existing[spec]} left alone (not a hostprep type)")
            continue
        runner.run(["semanage", "fcontext", "-d", spec], mutates=True)
        deleted.add(spec)
        done.append(f"file context {spec} -> {existing[spec]} deleted")
    if wd.is_dir():
        runner.run(["restorecon", "-R", str(wd)], mutates=True)
        done.append(f"relabelled {wd} to the policy's defaults (restorecon -R)")
    still = sorted(spec for spec, type_ in existing.items() if type_ in TYPES and spec not in deleted)
    if still:
        done.append(f"kept policy module {MODULE_NAME}: still used by {', '.join(still)}")
    elif MODULE_NAME in loaded_modules(runner):
        runner.run(["semodule", "-r", MODULE_NAME], mutates=True)
        done.append(f"removed policy module {MODULE_NAME} (semodule -r)")
    else:
        done.append(f"policy module {MODULE_NAME} was not loaded")
    return done


def module_status(runner: Runner, state: SelinuxState) -> dict:
    """For ``status``: is the module loaded, which paths map to its types (read-only).

    ``error`` says why nothing could be read (SELinux off, tools missing, not root).
    """
    out: dict = {"module": MODULE_NAME, "loaded": None, "file_contexts": {}, "error": None}
    try:
        _require_selinux(state, "show")
        _require_tools(runner, ("semodule", "semanage"))
        out["loaded"] = MODULE_NAME in loaded_modules(runner)
        out["file_contexts"] = {spec: type_ for spec, type_ in local_fcontexts(runner).items() if type_ in TYPES}
    except HostprepError as err:
        out["error"] = str(err)
    return out
