"""Issue 10, item 1: a state root, a snapshot or a file another local user prepared never
makes root write where that user chose.

The attacker here is uid 65534 (nobody): the directories and files are chowned to it
(as root; the tests that need chown skip otherwise).  Every test goes through the
interfaces hostprep uses (Paths.from_env, write_atomic, Store.journal,
snapshot.load_snapshot/restore, txn.recover, the sandbox root of 'sandbox up').
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hostprep import snapshot as snapmod
from hostprep import txn
from hostprep.cli.sandbox import sandbox_root
from hostprep.errors import InputError, RefusedError, StateError
from hostprep.paths import Paths, untrusted_reason
from hostprep.sandbox import SANDBOX_MARKER
from hostprep.state import Store, write_atomic

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def safe(tmp_path: Path) -> Path:
    """A directory only the test's user can write (pytest's tmp_path is 0700)."""
    d = tmp_path / "safe"
    d.mkdir(mode=0o700)
    return d


def from_env(monkeypatch, root: Path | str) -> Paths:
    monkeypatch.setenv("HOSTPREP_ROOT", str(root))
    return Paths.from_env()


# -- HOSTPREP_ROOT ---------------------------------------------------------------------


def test_a_root_of_roots_own_is_accepted(monkeypatch, safe):
    assert from_env(monkeypatch, safe).root == safe
    assert from_env(monkeypatch, safe / "not-yet").root == safe / "not-yet"   # made later under a safe parent
    monkeypatch.delenv("HOSTPREP_ROOT")
    assert Paths.from_env().root == Path("/")


@as_root
def test_a_root_owned_by_another_user_is_refused(monkeypatch, safe):
    os.chown(safe, NOBODY, NOBODY)
    with pytest.raises(RefusedError) as exc:
        from_env(monkeypatch, safe)
    assert exc.value.field == "HOSTPREP_ROOT"
    assert f"{safe} is owned by uid {NOBODY}, not root" in exc.value.line()


@as_root
def test_a_group_or_world_writable_root_is_refused(monkeypatch, safe):
    for mode in (0o770, 0o707, 0o1777):
        os.chmod(safe, mode)
        with pytest.raises(RefusedError) as exc:
            from_env(monkeypatch, safe)
        assert f"{safe} is writable by group or others (mode {mode:o})" in exc.value.line()


@as_root
def test_a_symlink_on_the_path_is_refused(monkeypatch, safe):
    (safe / "real").mkdir(mode=0o700)
    (safe / "link").symlink_to(safe / "real")
    for given in (safe / "link", safe / "link" / "below"):
        if given.name == "below":
            (safe / "real" / "below").mkdir(mode=0o700)
        with pytest.raises(RefusedError) as exc:
            from_env(monkeypatch, given)
        assert f"{safe / 'link'} is a symlink" in exc.value.line()


@as_root
def test_a_root_still_to_be_made_in_a_world_writable_directory_is_refused(monkeypatch, safe):
    # /tmp/<name> that does not exist yet: another user could make it first
    os.chmod(safe, 0o1777)
    with pytest.raises(RefusedError) as exc:
        from_env(monkeypatch, safe / "later")
    assert exc.value.field == "HOSTPREP_ROOT"
    with pytest.raises(RefusedError):
        from_env(monkeypatch, "relative/root")


def test_sticky_ancestors_are_fine_but_the_root_itself_must_not_be_writable(safe):
    os.chmod(safe, 0o1777)                       # like /tmp
    inner = safe / "mine"
    inner.mkdir(mode=0o700)
    assert untrusted_reason(inner) is None
    assert untrusted_reason(safe) == f"{safe} is writable by group or others (mode 1777)"


# -- files written under the root -------------------------------------------------------


def test_write_atomic_refuses_a_symlinked_directory(safe, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (safe / "etc").symlink_to(elsewhere)
    with pytest.raises(StateError) as exc:
        write_atomic(safe / "etc" / "hostprep.service", "[Service]\n", 0o644)
    assert "is a symlink" in exc.value.line()
    assert list(elsewhere.iterdir()) == []


def test_write_atomic_replaces_a_symlink_at_the_name_instead_of_following_it(safe, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (safe / "settings.json").symlink_to(victim)
    write_atomic(safe / "settings.json", "{}\n", 0o644)
    assert victim.read_text() == "precious\n"
    assert not (safe / "settings.json").is_symlink()
    assert oct((safe / "settings.json").stat().st_mode & 0o777) == oct(0o644)


def test_directories_are_made_with_an_explicit_mode_whatever_the_umask(safe):
    old = os.umask(0)
    try:
        write_atomic(safe / "var/lib/hostprep/applied.json", "{}\n")
    finally:
        os.umask(old)
    for d in (safe / "var", safe / "var/lib", safe / "var/lib/hostprep"):
        assert oct(d.stat().st_mode & 0o777) == oct(0o755)


def test_the_journal_is_never_written_through_a_symlink(safe, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    store = Store(Paths(safe))
    store.paths.log_dir.mkdir(parents=True)
    store.paths.journal.symlink_to(victim)
    store.journal("hostprep apply", "something", "ok")
    assert victim.read_text() == "precious\n"
    assert "journal" in capsys.readouterr().err


def test_the_journal_is_created_0640_and_an_older_wider_one_is_narrowed(safe):
    store = Store(Paths(safe))
    store.paths.log_dir.mkdir(parents=True)
    store.paths.journal.write_text("old line\n")
    os.chmod(store.paths.journal, 0o644)
    store.journal("hostprep apply", "something", "ok")
    assert oct(store.paths.journal.stat().st_mode & 0o777) == oct(0o640)
    assert store.paths.journal.read_text().startswith("old line\n")


# -- snapshots ----------------------------------------------------------------------------


def snapshot(store: Store, cid: str, **extra) -> None:
    snap = {"version": snapmod.SNAPSHOT_VERSION, "time": "t", "command": "hostprep apply", "pid": 1,
            "backend": None, "files": {"etc/hostprep/settings.json": '{"interface": "eth1"}\n'}}
    snap.update(extra)
    path = snapmod.snapshot_file(store, cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(snap))


@pytest.mark.parametrize("rel", ["../../../etc/cron.d/x", "/etc/cron.d/x", "etc/hostprep/../../x",
                                 "var/lib/hostprep/containers/../../../../x.json",
                                 "var/lib/hostprep/containers/bad name.json", "etc/shadow"])
def test_a_snapshot_naming_a_file_hostprep_does_not_own_is_refused(safe, rel):
    store = Store(Paths(safe / "root"))
    snapshot(store, "20260101T000000-1-abcdef", files={rel: "* * * * * root sh -c id\n"})
    with pytest.raises(StateError) as exc:
        snapmod.load_snapshot(store, "20260101T000000-1-abcdef")
    assert f"it names a file hostprep does not own ({rel!r})" in exc.value.line()
    with pytest.raises(StateError):
        snapmod.restore(None, store, snapmod.Snapshot.from_dict({"version": 1, "files": {rel: "x\n"}}))
    assert sorted(p.name for p in safe.rglob("*") if p.is_file()) == ["20260101T000000-1-abcdef.json"]


def test_a_snapshot_naming_a_kernel_key_outside_the_profile_is_refused(safe):
    store = Store(Paths(safe))
    snapshot(store, "20260101T000000-1-abcdef", sysctl={"kernel.core_pattern": "|/tmp/evil"})
    with pytest.raises(StateError) as exc:
        snapmod.load_snapshot(store, "20260101T000000-1-abcdef")
    assert "outside hostprep's profile ('kernel.core_pattern')" in exc.value.line()


def test_recover_restores_nothing_from_a_tampered_snapshot(safe, tmp_path):
    store = Store(Paths(safe))
    target = tmp_path / "cron.d" / "x"
    rel = os.path.relpath(target, safe)
    assert rel.startswith("..")
    snapshot(store, "20260101T000000-1-abcdef", files={rel: "* * * * * root id\n"})
    write_atomic(txn.inflight_file(store), json.dumps({"id": "20260101T000000-1-abcdef", "pid": 1,
                                                       "command": "hostprep apply"}) + "\n")
    notes = txn.recover(None, store)
    assert len(notes) == 1 and "snapshot not usable" in notes[0] and "does not own" in notes[0]
    assert not target.exists()
    assert not txn.inflight_file(store).exists()


@pytest.mark.parametrize("cid", ["../../x", "a/b", ""])
def test_a_change_id_that_is_not_one_is_refused(safe, cid):
    store = Store(Paths(safe))
    (safe / "x.json").write_text("{}")          # ../../x.json seen from rollback/ would resolve near here
    with pytest.raises(StateError) as exc:
        snapmod.load_snapshot(store, cid)
    assert f"{cid!r} is not a change id hostprep makes" in exc.value.line()


# -- the sandbox's state root ----------------------------------------------------------------


def test_the_sandbox_root_is_made_0700_with_its_marker(monkeypatch):
    root = Path("/tmp") / f"hp-unit-{os.getpid()}"
    try:
        assert sandbox_root(root) is True
        assert oct(root.stat().st_mode & 0o7777) == oct(0o700)
        assert (root / SANDBOX_MARKER).read_text() == "made by hostprep sandbox up\n"
        assert sandbox_root(root) is False       # an earlier sandbox's root is accepted again
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


@as_root
def test_a_sandbox_root_another_user_prepared_is_refused(tmp_path):
    import shutil
    base = Path("/tmp") / f"hp-unit-{os.getpid()}"
    victim = tmp_path / "victim"
    victim.mkdir()
    cases = []
    try:
        owned = Path(f"{base}-owned")
        owned.mkdir(mode=0o755)
        os.chown(owned, NOBODY, NOBODY)
        cases.append((owned, f"is owned by uid {NOBODY}, not root"))
        link = Path(f"{base}-link")
        link.symlink_to(victim)
        cases.append((link, "is a symlink"))
        wide = Path(f"{base}-wide")
        wide.mkdir()
        os.chmod(wide, 0o777)
        cases.append((wide, "is writable by group or others"))
        full = Path(f"{base}-full")
        full.mkdir(mode=0o700)
        (full / "something").write_text("x\n")
        cases.append((full, "was not made by 'hostprep sandbox up'"))
        for root, why in cases:
            with pytest.raises(RefusedError) as exc:
                sandbox_root(root)
            assert exc.value.field == "--root"
            assert why in exc.value.line()
        assert list(victim.iterdir()) == []
        assert not (owned / SANDBOX_MARKER).exists()
        with pytest.raises(InputError):
            sandbox_root(Path("/etc/hostprep-sandbox"))
    finally:
        for p in (Path(f"{base}-owned"), Path(f"{base}-wide"), Path(f"{base}-full")):
            shutil.rmtree(p, ignore_errors=True)
        Path(f"{base}-link").unlink(missing_ok=True)
