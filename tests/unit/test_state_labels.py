"""SELinux contexts of the files ``state.write_atomic`` writes (state.FileLabels).

The Vagrant bed found it: a systemd unit (``hostprep boot``, the confirm timer's
rollback) runs as ``init_t``, whose new files in /etc become ``etc_runtime_t``, so
systemd-sysctl was denied reading /etc/sysctl.d/90-hostprep.conf after a rewrite.
The new file must carry the replaced file's context, or the policy's default for
its path, before the rename.  Fake xattr functions and a fake runner stand in for
the kernel and matchpathcon (this machine runs without SELinux).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hostprep import state
from hostprep.errors import StateError
from hostprep.state import FileLabels, write_atomic

ETC_T = b"system_u:object_r:etc_t:s0"
ADMIN_T = b"system_u:object_r:admin_custom_t:s0"


class FakeXattrs:
    """security.selinux kept per inode, as the kernel does (it follows a rename); ``refuse``:
    context -> errno of setxattr.  ``labels``: the starting contexts, by path."""

    def __init__(self, labels: dict[str, bytes] | None = None, refuse: dict[bytes, int] | None = None) -> None:
        self.by_inode = {os.lstat(p).st_ino: v for p, v in (labels or {}).items()}
        self.refuse = refuse or {}
        self.gets: list[str] = []
        self.sets: list[tuple[str, bytes]] = []

    def label_of(self, path) -> bytes | None:
        return self.by_inode.get(os.lstat(path).st_ino)

    def relabel(self, path, value: bytes) -> None:
        self.by_inode[os.lstat(path).st_ino] = value

    def getxattr(self, path, name, *, follow_symlinks=True):
        assert (name, follow_symlinks) == ("security.selinux", False)
        self.gets.append(str(path))
        if not os.path.lexists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if self.label_of(path) is None:
            raise OSError(errno.ENODATA, "No data available", str(path))
        return self.label_of(path)

    def setxattr(self, path, name, value, *, follow_symlinks=True):
        assert (name, follow_symlinks) == ("security.selinux", False)
        if value in self.refuse:
            raise OSError(self.refuse[value], os.strerror(self.refuse[value]), str(path))
        self.sets.append((str(path), value))
        self.relabel(path, value)


@pytest.fixture
def selinuxfs(tmp_path):
    """A stand-in selinuxfs with SELinux on (its enforce file)."""
    fs = tmp_path / "selinuxfs"
    fs.mkdir()
    (fs / "enforce").write_text("1")
    return fs


@pytest.fixture
def etc(tmp_path):
    d = tmp_path / "etc/sysctl.d"
    d.mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "etc", 0o755)
    os.chmod(d, 0o755)
    return d


def labels(monkeypatch, selinuxfs: Path, xattrs: FakeXattrs, runner) -> FakeXattrs:
    monkeypatch.setattr(state, "LABELS", FileLabels(selinuxfs, runner, getxattr=xattrs.getxattr,
                                                    setxattr=xattrs.setxattr))
    return xattrs


def matchpathcon(path: Path, reply: tuple[int, str, str]) -> dict:
    return {("matchpathcon", "-n", "-m", "file", str(path)): reply}


def temp_of(path: Path, name: str) -> bool:
    """``name`` is a temporary file of write_atomic for ``path`` (same directory, hidden)."""
    return Path(name).parent == path.parent and Path(name).name.startswith(f".{path.name}.")


def test_selinux_off_nothing_is_read_set_or_run(fake_runner, monkeypatch, tmp_path, etc):
    xattrs, runner = FakeXattrs(), fake_runner()
    labels(monkeypatch, tmp_path / "no-selinuxfs", xattrs, runner)
    f = etc / "90-hostprep.conf"
    f.write_text("old\n")
    write_atomic(f, "new\n", 0o644)
    assert (f.read_text(), xattrs.gets, xattrs.sets, runner.calls) == ("new\n", [], [], [])
    assert xattrs.label_of(f) is None


def test_the_replaced_file_keeps_its_context(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    f.write_text("old\n")
    xattrs, runner = FakeXattrs({str(f): ETC_T}), fake_runner()
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert f.read_text() == "new\n"
    assert len(xattrs.sets) == 1 and temp_of(f, xattrs.sets[0][0]) and xattrs.sets[0][1] == ETC_T
    assert xattrs.label_of(f) == ETC_T             # set on the temporary file, before the rename
    assert runner.calls == []                      # no matchpathcon: the old context is known


def test_an_admins_context_is_kept_not_the_default(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    f.write_text("old\n")
    xattrs = FakeXattrs({str(f): ADMIN_T})
    runner = fake_runner(matchpathcon(f, (0, ETC_T.decode() + "\n", "")))
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert ([v for _, v in xattrs.sets], xattrs.label_of(f)) == ([ADMIN_T], ADMIN_T)


def test_a_new_file_gets_the_policy_default_for_its_path(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    xattrs = FakeXattrs()
    runner = fake_runner(matchpathcon(f, (0, "system_u:object_r:etc_t:s0\n", "")))
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert runner.calls == [(["matchpathcon", "-n", "-m", "file", str(f)], None, False)]
    assert len(xattrs.sets) == 1 and temp_of(f, xattrs.sets[0][0]) and xattrs.sets[0][1] == ETC_T
    assert f.read_text() == "new\n"


def test_a_context_the_policy_does_not_know_falls_back_to_the_default(fake_runner, monkeypatch, selinuxfs, etc):
    """A file labelled under another policy: EINVAL for its context, the default instead."""
    f = etc / "90-hostprep.conf"
    f.write_text("old\n")
    gone = b"system_u:object_r:removed_type_t:s0"
    xattrs = FakeXattrs({str(f): gone}, refuse={gone: errno.EINVAL})
    runner = fake_runner(matchpathcon(f, (0, ETC_T.decode() + "\n", "")))
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert ([v for _, v in xattrs.sets], xattrs.label_of(f)) == ([ETC_T], ETC_T)


def test_a_refused_context_is_an_error_and_the_old_file_stays(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    f.write_text("old\n")
    xattrs = FakeXattrs({str(f): ETC_T}, refuse={ETC_T: errno.EACCES})
    labels(monkeypatch, selinuxfs, xattrs, fake_runner())
    with pytest.raises(StateError) as err:
        write_atomic(f, "new\n", 0o644)
    assert err.value.line().startswith(f"{f}: not written: cannot give it its SELinux context (Permission denied)")
    assert (f.read_text(), sorted(p.name for p in etc.iterdir())) == ("old\n", ["90-hostprep.conf"])


def test_a_file_system_without_labels_is_written_as_is(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    xattrs = FakeXattrs(refuse={ETC_T: errno.EOPNOTSUPP})
    runner = fake_runner(matchpathcon(f, (0, ETC_T.decode() + "\n", "")))
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert (f.read_text(), xattrs.sets, [c[0][0] for c in runner.calls]) == ("new\n", [], ["matchpathcon"])


def test_without_matchpathcon_restorecon_labels_the_new_file(fake_runner, monkeypatch, selinuxfs, etc):
    f = etc / "90-hostprep.conf"
    xattrs = FakeXattrs()
    runner = fake_runner(installed={"restorecon"})
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert (xattrs.sets, runner.calls) == ([], [(["restorecon", "-F", str(f)], None, True)])
    assert f.read_text() == "new\n"


@pytest.mark.parametrize("reply", [(1, "", "matchpathcon(/x) failed: No such file or directory"),
                                   (0, "<<none>>\n", ""), (0, "", "")])
def test_no_default_context_falls_back_to_restorecon(fake_runner, monkeypatch, selinuxfs, etc, reply):
    f = etc / "90-hostprep.conf"
    xattrs = FakeXattrs()
    runner = fake_runner(matchpathcon(f, reply))
    labels(monkeypatch, selinuxfs, xattrs, runner)
    write_atomic(f, "new\n", 0o644)
    assert xattrs.sets == []
    assert [c[0] for c in runner.calls] == [["matchpathcon", "-n", "-m", "file", str(f)],
                                            ["restorecon", "-F", str(f)]]


def test_apply_kernel_rewriting_the_sysctl_dropin_keeps_etc_t(fake_runner, monkeypatch, selinuxfs, tmp_path):
    """The bed's case: a second apply_kernel (the confirm timer's rollback, hostprep boot) rewrites
    90-hostprep.conf: it keeps etc_t; kernel.json, new, gets its path's default."""
    from hostprep import sysctl
    from hostprep.paths import Paths
    root = tmp_path / "root"
    root.mkdir()
    paths = Paths(root)
    dropin = root / "etc/sysctl.d/90-hostprep.conf"
    state_json = paths.state_dir / "kernel.json"
    xattrs = FakeXattrs()
    var_lib_t = "system_u:object_r:var_lib_t:s0"
    runner = fake_runner({**matchpathcon(dropin, (0, ETC_T.decode() + "\n", "")),
                         **matchpathcon(state_json, (0, var_lib_t + "\n", ""))})
    labels(monkeypatch, selinuxfs, xattrs, runner)
    k = sysctl.Kernel(net_root=tmp_path / "proc-net", other_root=tmp_path / "proc-other", in_namespace=False)
    for s in sysctl.profile():
        k.path(s.key).parent.mkdir(parents=True, exist_ok=True)
        k.path(s.key).write_text("0\n")
    sysctl.apply_kernel(k, paths)
    assert (xattrs.label_of(dropin), xattrs.label_of(state_json)) == (ETC_T, var_lib_t.encode())
    # rewritten: both keep their contexts (an admin's too), matchpathcon is not asked again
    xattrs.relabel(dropin, ADMIN_T)
    runner.calls.clear()
    sysctl.apply_kernel(k, paths)
    assert (xattrs.label_of(dropin), xattrs.label_of(state_json)) == (ADMIN_T, var_lib_t.encode())
    assert runner.calls == []
