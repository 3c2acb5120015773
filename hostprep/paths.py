"""Every path hostprep reads or writes goes through one root prefix.

``HOSTPREP_ROOT`` (default ``/``) lets tests and the sandbox demo keep their
state under a temporary directory instead of the real /etc, /var/lib, /var/log.

hostprep runs as root, so a root another local user could have prepared (a
directory they own, one they can write, or a symlink of theirs on its path)
would let them choose what root writes where.  ``trusted_dir`` refuses such a
directory, and ``Paths.from_env`` applies it to any ``HOSTPREP_ROOT`` it is
given; ``open_nofollow`` creates files without following a symlink planted in
their place.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hostprep.errors import RefusedError

def _trusted_owners() -> tuple[int, ...]:
    # As root only root's own directories are trusted; a user running a dry run
    # or a unit test may also use directories of their own.
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def untrusted_reason(path: Path) -> str | None:
    """Why ``path`` (an existing directory) could have been prepared by another user, or None.

    Every component from / down is checked with lstat: no symlink, owned by
    root (or by the user running hostprep when that is not root), and not
    writable by group or others, except an ancestor with the sticky bit (/tmp,
    /var/tmp: others cannot rename or remove what root made there).  The
    directory itself must not be group- or world-writable at all.
    """
    path = Path(os.path.abspath(path))
    owners = _trusted_owners()
    parts = path.parts
    current = Path(parts[0])
    for i, part in enumerate(parts):
        current = current / part if i else current
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return f"{current} does not exist"
        except OSError as err:
            return f"{current} cannot be checked ({err.strerror})"
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            return f"{current} is a symlink"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        if st.st_uid not in owners:
            return f"{current} is owned by uid {st.st_uid}, not root"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (last or not st.st_mode & stat.S_ISVTX):
            return f"{current} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted_dir(path: Path, field: str) -> Path:
    """Refuse (one line naming ``field``) a directory another local user could have prepared."""
    reason = untrusted_reason(path)
    if reason is not None:
        raise RefusedError(field, f"{path} is not a safe place for hostprep's files: {reason}",
                           "use a directory that only root can write, with no symlink on its path "
                           "(e.g. one made by 'mktemp -d' as root)")
    return path


def open_nofollow(path: Path, mode: int, *, append: bool = False) -> int:
    """Open ``path`` for writing without following a symlink at its place; created with ``mode``.

    An existing file gets ``mode`` too (a log created world-readable by an older
    version is narrowed).  Raises OSError (ELOOP for a symlink).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(21, "not a regular file")
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """mkdir -p with an explicit mode for every directory it creates (whatever the umask)."""
    missing = []
    p = Path(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        os.chmod(d, mode, follow_symlinks=False)


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls) -> "Paths":
        """The root from ``HOSTPREP_ROOT``; as root, refused when another user could have prepared it.

        (Without root hostprep changes nothing: a dry run may read whatever it can.)
        """
        given = os.environ.get("HOSTPREP_ROOT", "/") or "/"
        root = Path(given)
        if not root.is_absolute():
            raise RefusedError("HOSTPREP_ROOT", f"{given!r} is not an absolute path",
                               "give an absolute directory, or unset it for /")
        if os.geteuid() != 0:
            return cls(root)
        if root.exists() or root.is_symlink():
            trusted_dir(root, "HOSTPREP_ROOT")
        else:
            # created later (mkdir -p): the nearest existing ancestor must be safe
            parent = root.parent
            while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
                parent = parent.parent
            trusted_dir(parent, "HOSTPREP_ROOT")
        return cls(root)

    @property
    def etc(self) -> Path:
        return self.root / "etc/hostprep"

    @property
    def settings_file(self) -> Path:
        return self.etc / "settings.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/hostprep"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "applied.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log/hostprep"

    @property
    def journal(self) -> Path:
        return self.log_dir / "journal.log"
