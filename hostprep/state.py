"""Remembered settings, the record of the last apply, and the journal.

Everything lives under the ``HOSTPREP_ROOT`` prefix (see paths.py).  Files are
written atomically (temporary file, fsync, rename) so a crash leaves either the
old or the new record.

Under SELinux every file ``write_atomic`` writes gets its label before the rename:
the replaced file's context, or for a new file the policy's default for the path
(``matchpathcon``; ``restorecon`` semantics), never the label of whoever wrote it.
A systemd unit (``hostprep boot``, the confirm timer's rollback) runs as ``init_t``,
whose files created in /etc become ``etc_runtime_t``: systemd-sysctl was denied
reading /etc/sysctl.d/90-hostprep.conf after such a rewrite (found by the Vagrant
bed).  With SELinux off (no selinuxfs) nothing of this runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import pwd
import stat
import sys
import tempfile
import time
from pathlib import Path

from hostprep import faults
from hostprep.errors import StateError
from hostprep.model import Container
from hostprep.settings import Settings
from hostprep.paths import Paths, make_dirs, open_nofollow, untrusted_reason
from hostprep.runner import Runner


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def who() -> str:
    """The user behind a change: the effective user, and SUDO_USER when run through sudo."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    if os.environ.get("SUDO_USER"):
        user += f" (sudo from {os.environ['SUDO_USER']})"
    return user


SELINUX_XATTR = "security.selinux"


class FileLabels:
    """The SELinux context a file written by ``write_atomic`` gets (no PyPI ``selinux``: DESIGN.md).

    Nothing when SELinux is off (no ``<selinuxfs>/enforce``: not mounted); else the context
    of the file now at ``path`` (its ``security.selinux`` attribute), else the policy's
    default for ``path`` (``matchpathcon -n -m file``, which reads the policy's
    file_contexts and the local ``semanage fcontext`` customisations, as ``restorecon`` does).
    ``selinuxfs`` is the kernel's, not ``HOSTPREP_SELINUXFS`` (a stand-in the tests give the
    enforcing check); tests swap the xattr functions and the runner.
    """

    def __init__(self, selinuxfs: Path = Path("/sys/fs/selinux"), runner: Runner | None = None, *,
                 getxattr=os.getxattr, setxattr=os.setxattr) -> None:
        self.selinuxfs = Path(selinuxfs)
        self.runner = runner
        self.getxattr = getxattr
        self.setxattr = setxattr

    def _runner(self) -> Runner:
        return self.runner or Runner()

    def enabled(self) -> bool:
        return (self.selinuxfs / "enforce").exists()

    def current(self, path: Path) -> bytes | None:
        """The context of the file at ``path`` (None: no file, or no label on it)."""
        try:
            return self.getxattr(str(path), SELINUX_XATTR, follow_symlinks=False) or None
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return None
            raise

    def default(self, path: Path) -> bytes | None:
        """The policy's context for a regular file at ``path`` (None: no rule, or no matchpathcon)."""
        runner = self._runner()
        if runner.which("matchpathcon") is None:
            return None
        res = runner.run(["matchpathcon", "-n", "-m", "file", str(path)], check=False)
        words = res.stdout.split()
        if res.returncode != 0 or len(words) != 1 or words[0].count(":") < 3 or "<<none>>" in words[0]:
            return None
        return words[0].encode()

    def label(self, tmp: str, path: Path) -> bool:
        """Give the temporary file ``tmp`` (to be renamed to ``path``) its context.

        False: SELinux is on but no context is known (no matchpathcon): ``after_rename``
        then runs ``restorecon``.  A context the loaded policy does not know (a file
        labelled under another policy) falls back to the default; a file system without
        labels is left alone; a refusal (EACCES, EPERM) raises OSError.
        """
        if not self.enabled():
            return True
        kept = self.current(path)
        if kept is not None:
            try:
                self.setxattr(tmp, SELINUX_XATTR, kept, follow_symlinks=False)
                return True
            except OSError as err:
                if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    return True
                if err.errno != errno.EINVAL:
                    raise
        ctx = self.default(path)
        if ctx is None:
            return False
        try:
            self.setxattr(tmp, SELINUX_XATTR, ctx, follow_symlinks=False)
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        return True

    def after_rename(self, path: Path) -> None:
        """``restorecon -F`` of ``path`` where no context could be set before the rename."""
        runner = self._runner()
        if runner.which("restorecon") is not None:
            runner.run(["restorecon", "-F", str(path)], check=False, mutates=True)


# The labels of write_atomic's files (tests swap it).
LABELS = FileLabels()


def write_atomic(path: Path, text: str, mode: int = 0o600, fault: str | None = None) -> None:
    """Write ``path`` through a temporary file, fsync and rename: a crash leaves old or new.

    Under SELinux the new file gets the old one's context, or the policy's default for
    ``path`` (``FileLabels``), before the rename.
    """
    try:
        if fault:
            faults.hit(fault)
        make_dirs(path.parent)
        _check_parent(path)
        # mkstemp creates with O_EXCL and rename replaces a symlink at the
        # final name instead of following it: nothing here writes through a link.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            try:
                labelled = LABELS.label(tmp, path)
            except OSError as err:
                raise StateError(str(path), f"not written: cannot give it its SELinux context "
                                 f"({err.strerror})", "run hostprep as root in an unconfined domain "
                                 "(sudo from an admin's login, or its systemd units)") from None
            os.replace(tmp, path)
        except (OSError, StateError):
            # a full disk must not fill up with half-written temporaries
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise StateError(str(path), f"cannot write ({err.strerror})",
                         "check that the state directory is writable and the disk not full") from None
    if not labelled:
        LABELS.after_rename(path)


def _check_parent(path: Path) -> None:
    """The directory a file goes into: no symlink, root's, writable by nobody else."""
    st = os.lstat(path.parent)
    if stat.S_ISLNK(st.st_mode) or (os.geteuid() == 0 and st.st_uid != 0) or st.st_mode & 0o022:
        raise StateError(str(path.parent), f"not written: {untrusted_reason(path.parent) or 'not a safe directory'}",
                         "make it a directory of root's that no one else can write, with no symlink")


def read_text(path: Path) -> str | None:
    """The text of ``path``; None when it does not exist."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateError(str(path), f"cannot read ({err.strerror})", "run as root") from None


def discard(path: Path) -> None:
    """Remove ``path`` if it exists."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(str(path), f"cannot read ({err})", "remove or repair the file") from None
    if not isinstance(data, dict):
        raise StateError(str(path), "is not a JSON object", "remove or repair the file")
    return data


class Store:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._lock_fd: int | None = None
        self._lock_depth = 0
        # the command of the change open on this store (txn.change), None: none is open
        self.open_change: str | None = None
        # container records parsed in this process, by file: (device, inode, size, mtime_ns) -> Container.
        # A record is replaced by rename (write_atomic), so a changed one has another inode.
        self._parsed: dict[Path, tuple[tuple[int, int, int, int], object]] = {}

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None):
        """One change at a time: an exclusive flock on <state dir>/lock.

        A second apply, flush or container up/down waits up to ``timeout``
        seconds (env HOSTPREP_LOCK_TIMEOUT, default 60) and then fails naming the
        PID of the holder.  Re-entrant within one process; ``status`` never takes it.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        if timeout is None:
            try:
                wait = float(os.environ.get("HOSTPREP_LOCK_TIMEOUT", "60"))
            except ValueError:
                raise StateError("HOSTPREP_LOCK_TIMEOUT", f"{os.environ['HOSTPREP_LOCK_TIMEOUT']!r} is not a "
                                 "number of seconds", "e.g. HOSTPREP_LOCK_TIMEOUT=60") from None
        else:
            wait = timeout
        path = self.paths.state_dir / "lock"
        try:
            make_dirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(str(path), f"cannot open the lock ({err.strerror})") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StateError("lock", f"another hostprep (PID {holder}) is changing this host; "
                                     f"waited {wait:.0f} s", "wait for it to finish, or check that process")
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd, self._lock_depth = fd, 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def settings(self) -> Settings | None:
        """settings.json, validated (a malformed one is one clear error); None when there is none."""
        d = read_json(self.paths.settings_file)
        return None if d is None else Settings.from_dict(d, str(self.paths.settings_file))

    def save_settings(self, update: Settings) -> None:
        """Save the parts ``update`` has (firewall and kernel parts are saved apart).  A malformed
        file is replaced: saving is how it gets repaired."""
        try:
            current = self.settings() or Settings()
        except StateError:
            current = Settings()
        write_atomic(self.paths.settings_file, json.dumps(current.updated(update).to_dict(), indent=2) + "\n",
                     0o644)

    def applied(self) -> dict | None:
        return read_json(self.paths.state_file)

    def save_applied(self, record: dict) -> None:
        write_atomic(self.paths.state_file, json.dumps(record, indent=2) + "\n", fault="record")

    def clear_applied(self) -> None:
        try:
            self.paths.state_file.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StateError(str(self.paths.state_file), f"cannot remove ({err.strerror})") from None

    # -- containers that are up ------------------------------------------------
    @property
    def containers_dir(self) -> Path:
        return self.paths.state_dir / "containers"

    def containers(self) -> dict:
        """name -> Container for every container whose rules are recorded as up.

        A record that cannot be read is an error (one line naming the file).
        """
        out, bad = self._read_containers()
        if bad:
            raise bad[0]
        return out

    def containers_tolerant(self) -> tuple[dict, list[str]]:
        """As containers(), but an unreadable record is skipped and reported (boot fails closed)."""
        out, bad = self._read_containers()
        return out, [err.line() for err in bad]

    def _read_containers(self) -> tuple[dict, list[StateError]]:
        try:
            files = sorted(self.containers_dir.glob("*.json")) if self.containers_dir.is_dir() else []
        except OSError as err:
            return {}, [StateError(str(self.containers_dir), f"cannot read ({err.strerror})", "run as root")]
        out, bad = {}, []
        for f in files:
            try:
                # A record of 65,536 exempt entries takes ~0.3 s to parse and validate:
                # parsed once per process (status, container up and boot read the registry
                # more than once), parsed again only when the file changed.
                try:
                    st = f.stat()
                    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                except OSError:
                    stamp = None
                cached = self._parsed.get(f)
                if stamp is not None and cached is not None and cached[0] == stamp:
                    out[cached[1].name] = cached[1]
                    continue
                data = read_json(f)
                if data:
                    c = Container.from_dict(data)
                    out[c.name] = c
                    if stamp is not None:
                        self._parsed[f] = (stamp, c)
            except StateError as err:
                bad.append(err)
            except Exception as err:  # noqa: BLE001 - any malformed record (from_dict validates deeply)
                bad.append(StateError(str(f), f"malformed container record ({type(err).__name__}: {err})",
                                      "remove or repair it, then run 'hostprep container up' again"))
        return out, bad

    def save_container(self, c) -> None:
        write_atomic(self.containers_dir / f"{c.name}.json", json.dumps(c.as_dict(), indent=2) + "\n",
                     fault="record")

    def remove_container(self, name: str) -> None:
        try:
            (self.containers_dir / f"{name}.json").unlink()
        except FileNotFoundError:
            pass

    def container_log(self, name: str) -> Path:
        return self.paths.log_dir / "iptables_logs" / f"{name}.log"

    def write_container_log(self, name: str, text: str, *, append: bool) -> None:
        """0640 from creation, as logrotate's 'create' makes it; an existing file's mode is fixed;
        a symlink in its place is refused (O_NOFOLLOW)."""
        path = self.container_log(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o640)
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fd, 0o640)
                fh.write(text)
        except OSError as err:
            raise StateError(str(path), f"cannot write ({err.strerror})") from None

    @property
    def file_key_path(self) -> Path:
        return self.paths.state_dir / "filekey"

    def file_key(self, create: bool = True) -> bytes | None:
        """The host-local key of the env files' HMACs (32 random bytes, kept as 64 hex digits, 0600, made once).

        The record and the container log name an env file by an HMAC with this key
        rather than a plain sha256: only who can read the key (root, who can read the
        files too) can test a guess of a secret in core.env against it.  None when it
        does not exist and ``create`` is False (a dry run writes nothing).
        """
        path = self.file_key_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                return None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                key = os.urandom(32)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(key.hex() + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                return key
            except FileExistsError:
                return self.file_key(create=False)      # another hostprep made it just now
            except OSError as err:
                raise StateError(str(path), f"cannot create the file key ({err.strerror})") from None
        except OSError as err:
            raise StateError(str(path), f"cannot read the file key ({err.strerror})", "run as root") from None
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(200).decode("ascii", "replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise StateError(str(path), "is not a file key (64 hex digits)",
                             "remove it; the next 'container up' makes a new one")
        return key

    def journal(self, command: str, changed: str, result: str) -> None:
        """One line per change: time, user (and SUDO_USER), command, what changed, result."""
        line = f"{now()}\t{who()}\t{command}\t{changed}\t{result}\n"
        try:
            make_dirs(self.paths.log_dir)
            # 0640 as logrotate's 'create' makes it: commands and users are not for everyone;
            # never through a symlink planted at its name
            fd = open_nofollow(self.paths.journal, 0o640, append=True)
            with os.fdopen(fd, "a") as fh:
                fh.write(line)
        except OSError as err:
            print(f"warning: journal {self.paths.journal} not written ({err.strerror})", file=sys.stderr)
