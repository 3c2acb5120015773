"""Issue 10, items 1 and 2, end to end as root: 'sandbox up' and 'selftest' run from a
directory another user prepared, with a state root another user prepared.

The attacker is uid 65534 (nobody).  Its directory holds a ``hostprep/__init__.py``
that leaves a file behind when imported: a child interpreter that imports from the
current directory would run it as root.  hostprep's own process is started as the
console script does (``-P``: its own directory, not the caller's, on sys.path), so
only the children are under test.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostprep.runner import Runner
from hostprep.sandbox import Sandbox

REPO = str(Path(__file__).resolve().parents[2])
NOBODY = 65534
_n = itertools.count()


def hostprep(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, SSH_CONNECTION="")
    env.pop("HOSTPREP_ROOT", None)
    return subprocess.run([sys.executable, "-P", "-m", "hostprep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(a directory of nobody's with a planted hostprep package, the file it leaves when imported)."""
    d = tmp_path / "proxyadmin-home"
    pkg = d / "hostprep"
    pkg.mkdir(parents=True)
    proof = tmp_path / "imported-as-root"
    (pkg / "__init__.py").write_text(f"open({str(proof)!r}, 'w').write('pwned')\n")
    (pkg / "__main__.py").write_text("")
    for p in (d, pkg, pkg / "__init__.py", pkg / "__main__.py"):
        os.chown(p, NOBODY, NOBODY)
    os.chmod(tmp_path, 0o755)
    return d, proof


@pytest.fixture
def name():
    n = f"hpl{os.getpid()}x{next(_n)}"
    yield n
    Sandbox(n).destroy(Runner())
    if Path(f"/var/tmp/{n}").is_symlink():
        Path(f"/var/tmp/{n}").unlink()
    shutil.rmtree(f"/var/tmp/{n}", ignore_errors=True)
    shutil.rmtree(f"/var/tmp/{n}-victim", ignore_errors=True)


def test_sandbox_up_from_another_users_directory_imports_nothing_from_it(evil, name):
    cwd, proof = evil
    res = hostprep("sandbox", "up", "--name", name, "--root", f"/var/tmp/{name}", cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert not proof.exists()
    assert "everything desired is live" in res.stdout
    down = hostprep("sandbox", "down", "--name", name, "--root", f"/var/tmp/{name}", cwd=cwd)
    assert down.returncode == 0, down.stderr
    assert not Path(f"/var/tmp/{name}").exists()
    assert Sandbox(name).exists(Runner()) == []


def test_selftest_from_another_users_directory_imports_nothing_from_it(evil):
    cwd, proof = evil
    res = hostprep("selftest", "-i", "eth1", "--json", cwd=cwd)
    assert not proof.exists()
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True


@pytest.mark.parametrize("kind", ["symlink", "owned", "writable"])
def test_sandbox_up_refuses_a_state_root_another_user_prepared(name, kind):
    root = Path(f"/var/tmp/{name}")
    # a root-only directory beside it (a link out of /var/tmp would be refused for that alone)
    victim = Path(f"/var/tmp/{name}-victim")
    victim.mkdir(mode=0o700)
    if kind == "symlink":
        root.symlink_to(victim)
    else:
        root.mkdir()
        if kind == "owned":
            os.chown(root, NOBODY, NOBODY)
        else:
            os.chmod(root, 0o777)
    res = hostprep("sandbox", "up", "--name", name, "--root", str(root), cwd=Path("/"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --root: ")
    assert Sandbox(name).exists(Runner()) == []          # refused before any namespace was made
    assert list(victim.iterdir()) == []
    if kind != "symlink":
        assert list(root.iterdir()) == []
