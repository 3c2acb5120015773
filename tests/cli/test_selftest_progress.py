"""selftest on a terminal shows its progress as it goes, then one line per probe group;
through a pipe it prints no progress (issue 15, item 6).  Runs the real selftest (as root:
it builds its own sandbox namespaces hpself<pid> and removes them)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])


def env(tmp_path: Path) -> dict:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    return dict(os.environ, HOSTPREP_ROOT=str(root), PYTHONPATH=REPO, COLUMNS="100", TERM="xterm")


def on_a_pty(argv: list[str], environ: dict) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: hostprep with the pty as its terminal
        os.chdir("/")
        os.execve(argv[0], argv, environ)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:                             # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def test_selftest_on_a_terminal_shows_progress_then_groups(tmp_path):
    code, raw = on_a_pty([sys.executable, "-P", "-m", "hostprep", "selftest", "-i", "eth1"], env(tmp_path))
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    steps = re.findall(r"selftest: (building the sandbox|applying in the sandbox|base probes from the internet "
                       r"peer|done)", plain)
    assert (code, [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s]) == \
        (0, ["building the sandbox", "applying in the sandbox", "base probes from the internet peer", "done"]), plain
    lines = [ln.strip() for ln in plain.replace("\r", "\n").splitlines()]
    assert [ln for ln in lines if ln.startswith("base probes from the internet peer: ")] != [], plain
    assert re.search(r"selftest: all \d+ probes as expected \([0-9.]+ s\); --json or a pipe shows each probe",
                     plain) is not None, plain


def test_selftest_through_a_pipe_prints_no_progress(tmp_path):
    res = subprocess.run([sys.executable, "-P", "-m", "hostprep", "selftest", "-i", "eth1"], env=env(tmp_path),
                         capture_output=True, text=True, cwd="/", timeout=300)
    assert (res.returncode, "selftest: building the sandbox" in res.stdout + res.stderr,
            "\x1b[" in res.stdout) == (0, False, False), res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("selftest: all "), res.stdout
