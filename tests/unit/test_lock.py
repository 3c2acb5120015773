"""One change at a time: the state-directory lock (no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hostprep.errors import StateError
from hostprep.paths import Paths
from hostprep.state import Store

ROOT = Path(__file__).resolve().parents[2]


def hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock for ``seconds`` (prints "held" once it has it)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from hostprep.paths import Paths
        from hostprep.state import Store
        with Store(Paths(Path({str(root)!r}))).lock():
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_fails_after_timeout_naming_the_pid(tmp_path):
    proc = hold_lock(tmp_path, 5)
    try:
        with pytest.raises(StateError) as err:
            with Store(Paths(tmp_path)).lock(timeout=0.3):
                pass
        assert err.value.field == "lock"
        assert f"PID {proc.pid}" in err.value.problem
    finally:
        proc.kill()
        proc.wait()


def test_second_holder_waits_and_then_gets_it(tmp_path):
    proc = hold_lock(tmp_path, 0.5)
    start = time.monotonic()
    with Store(Paths(tmp_path)).lock(timeout=10):
        waited = time.monotonic() - start
        assert (tmp_path / "var/lib/hostprep/lock").read_text().strip() == str(os.getpid())
    proc.wait()
    assert waited > 0.2  # it really waited for the holder (which held it for 0.5 s)


def test_reentrant_in_one_process_and_released(tmp_path):
    store = Store(Paths(tmp_path))
    with store.lock(timeout=0.1):
        with store.lock(timeout=0.1):
            pass
        assert store._lock_depth == 1
    assert store._lock_depth == 0
    with Store(Paths(tmp_path)).lock(timeout=0.1):  # free again
        pass


def test_cli_command_waiting_on_the_lock_gives_one_line(tmp_path):
    proc = hold_lock(tmp_path, 5)
    try:
        res = subprocess.run([sys.executable, "-m", "hostprep", "container", "down", "x"],
                             capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, HOSTPREP_ROOT=str(tmp_path), HOSTPREP_LOCK_TIMEOUT="0.3",
                                      HOSTPREP_BACKEND="nft", PYTHONPATH=str(ROOT)))
    finally:
        proc.kill()
        proc.wait()
    if os.geteuid() != 0:
        pytest.skip("the CLI asks for root before taking the lock")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: lock: another hostprep (PID {proc.pid}) is changing this host; waited 0 s "
        "(wait for it to finish, or check that process)"]
