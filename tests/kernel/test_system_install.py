"""The system install (scripts/install.sh) survives deleting the source tree (issue 15, item 1).

As an admin would: install from a copy of the source tree (into a temporary prefix and
sbin directory instead of /opt/hostprep and /usr/local/sbin), harden the sandbox host with
the installed command, delete the source tree, "reboot" (a fresh sandbox, nothing loaded)
and run the boot unit's command exactly as systemd would: the hardening comes back.  An
upgrade (install.sh again) switches 'current' and keeps the state; --uninstall refuses
while the boot unit still starts the install.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from test_persistence import EMPTY, boot_unit, kernel_state, run_as_systemd, spare  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info", ".pytest_cache")


def install(src: Path, prefix: Path, sbin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(src / "scripts/install.sh"), "--no-packages", "--prefix", str(prefix),
                           "--sbindir", str(sbin), *args], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, cwd="/")


@pytest.mark.parametrize("variant", ["native"])        # the backend a fresh RHEL 9 host gets (auto)
def test_the_system_install_keeps_the_hardening_after_the_source_tree_is_gone(host, tmp_path, spare):
    src = tmp_path / "hostprep-src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    prefix, sbin = tmp_path / "opt-hostprep", tmp_path / "sbin"
    res = install(src, prefix, sbin)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-2:] == [
        "next: hostprep sandbox up          (try it in a throwaway sandbox)",
        "  or: hostprep apply -i <external NIC>   (harden this host; 'hostprep apply --help' first)"]
    cmd = sbin / "hostprep"
    assert cmd.resolve().parent.parent.parent == prefix

    applied = host.run(host.box.host, [str(cmd), "apply", "-i", "eth1", "-y"],
                       env={"HOSTPREP_ROOT": str(host.root), "HOSTPREP_BACKEND": host.backend,
                            "HOSTPREP_SELINUXFS": str(host.selinuxfs), "SSH_CONNECTION": ""})
    assert "boot persistence: hostprep.service" in applied.stdout
    unit = boot_unit(host)
    assert unit.argv == [str(prefix / "current/bin/python"), "-m", "hostprep", "boot"]
    live = kernel_state(host, host.box.host)

    shutil.rmtree(src)                                   # the clone is gone
    b = spare.sandbox()                                  # "reboot": nothing loaded
    hb = dataclasses.replace(host, box=b)
    assert kernel_state(hb, b.host) == EMPTY
    booted = run_as_systemd(b.host, unit)
    assert booted.returncode == 0, booted.stdout + booted.stderr
    assert kernel_state(hb, b.host) == live

    # an upgrade from a new copy switches 'current' and keeps the state root untouched
    src2 = tmp_path / "hostprep-src-2"
    shutil.copytree(REPO, src2, ignore=IGNORE)
    before = sorted(str(p) for p in host.root.rglob("*"))
    old = (prefix / "current").resolve()
    assert install(src2, prefix, sbin).returncode == 0
    assert (prefix / "current").resolve() != old and not old.exists()
    assert sorted(str(p) for p in host.root.rglob("*")) == before
    assert run_as_systemd(b.host, unit).returncode == 0

    # uninstall: refused while the boot unit starts the install; then the program goes, the records stay
    refused = subprocess.run(["env", f"HOSTPREP_ROOT={host.root}", "sh", str(src2 / "scripts/install.sh"),
                              "--prefix", str(prefix), "--sbindir", str(sbin), "--uninstall"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[1:3] == [
        "  hostprep flush --persistent     (the firewall rules and the boot units)",
        "  hostprep flush --kernel         (the kernel profile, if 'apply -k' was used)"]
    assert prefix.exists()
    gone = install(src2, prefix, sbin, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not prefix.exists() and not cmd.is_symlink()
    assert (host.root / "var/lib/hostprep/applied.json").is_file()
