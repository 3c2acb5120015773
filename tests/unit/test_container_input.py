"""Issue 10, items 7, 11 and 14 on the unit level: the container log's mode, no plain
hash of an env file, the host's file key, what a re-up widens, the remembered files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from pathlib import Path

import pytest

from hostprep.errors import StateError
from hostprep.model import Container, EnvFile, Limits
from hostprep.paths import Paths
from hostprep.state import Store

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "env"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(Paths(tmp_path / "root"))


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- item 11: the container log ------------------------------------------------------

def test_container_log_created_0640_whatever_the_umask(store, open_umask):
    store.write_container_log("fin", "one\n", append=False)
    assert (mode(store.container_log("fin")), store.container_log("fin").read_text()) == (0o640, "one\n")


def test_container_log_existing_world_readable_file_is_fixed(store, open_umask):
    log = store.container_log("fin")
    log.parent.mkdir(parents=True)
    log.write_text("old\n")
    log.chmod(0o644)
    store.write_container_log("fin", "more\n", append=True)
    assert (mode(log), log.read_text()) == (0o640, "old\nmore\n")
    log.chmod(0o666)
    store.write_container_log("fin", "new\n", append=False)
    assert (mode(log), log.read_text()) == (0o640, "new\n")


def test_container_log_symlink_refused(store, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    log = store.container_log("fin")
    log.parent.mkdir(parents=True)
    log.symlink_to(target)
    with pytest.raises(StateError):
        store.write_container_log("fin", "x\n", append=False)
    assert target.read_text() == "precious\n"


def test_file_key_made_once_0600_and_not_by_a_dry_run(store, open_umask):
    assert store.file_key(create=False) is None
    assert store.file_key_path.exists() is False
    key = store.file_key()
    assert (len(key), mode(store.file_key_path), store.file_key(), store.file_key(create=False)) == (
        32, 0o600, key, key)


def test_file_key_of_the_wrong_size_refused(store):
    store.file_key_path.parent.mkdir(parents=True)
    store.file_key_path.write_bytes(b"short")
    with pytest.raises(StateError):
        store.file_key()


def test_log_text_names_files_without_their_sha256(store):
    from hostprep import envfiles
    from hostprep.cli import container_log_text
    c = envfiles.load_container("fin", FIX / "finesse.env", FIX / "core.env", FIX / "installer.env", "eth1",
                                ["192.0.2.10/24"], key=store.file_key())
    text = container_log_text("fin", c, [], [], "up")
    files = [ln for ln in text.splitlines() if ln.startswith("# file ")]
    core = FIX / "core.env"
    assert len(files) == 3
    assert files[1].startswith(f"# file {core.resolve()} (core): {core.stat().st_size} bytes, modified ")
    assert files[1].endswith(f", hmac-sha256 {c.file('core').digest} (host key)")
    for f in ("finesse.env", "core.env", "installer.env"):
        assert hashlib.sha256((FIX / f).read_bytes()).hexdigest() not in text
