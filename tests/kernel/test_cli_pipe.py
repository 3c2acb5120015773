"""'hostprep status | head' (issue 10, item 15): the reader going away ends hostprep
quietly with 141, for the table (Rich) and for --json (print)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PY = sys.executable

REPO = str(Path(__file__).resolve().parents[2])

NATIVE = True      # runs on the native nft backend too (conftest.variant)


def test_status_into_a_closed_pipe_exits_141_quietly(host):
    host.apply()
    for args in (["status"], ["status", "--json"], ["container", "list", "--json"]):
        argv = ["ip", "netns", "exec", host.box.host, "env", f"HOSTPREP_ROOT={host.root}",
                f"HOSTPREP_BACKEND={host.backend}", f"PYTHONPATH={REPO}", f"HOSTPREP_SELINUXFS={host.selinuxfs}",
                PY, "-P", "-m", "hostprep", *args]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        p.stdout.close()
        err = p.stderr.read()
        assert (args, p.wait(timeout=120), err) == (args, 141, b"")
