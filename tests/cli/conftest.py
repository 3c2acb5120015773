"""Transcript tests: what an admin sees, compared with golden files in golden/.

They need a real firewall, so they run as root in a sandbox of network
namespaces: the ``host`` fixture of tests/kernel/conftest.py (loaded from its
file, so the two conftest modules do not clash), with no backend asked for
(HOSTPREP_BACKEND empty): the backend an admin gets by default, the native nft
backend where nft and the kernel support it, as here (the kernel tests run every
backend).

``HOSTPREP_REGEN=1`` rewrites the golden files; without it a missing golden
file fails the test (it is never written silently).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if os.geteuid() != 0:
    pytest.skip("transcript tests need root (they create network namespaces)", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("kernel_conftest", Path(__file__).resolve().parents[1]
                                               / "kernel" / "conftest.py")
kernel_conftest = importlib.util.module_from_spec(_spec)
sys.modules["kernel_conftest"] = kernel_conftest
_spec.loader.exec_module(kernel_conftest)

# Its own copy of the counter: start far from the kernel tests' hpt<pid>x<n> names, so
# that a run of the whole suite never reuses a namespace name.
kernel_conftest._counter = itertools.count(1000)
host = kernel_conftest.host
GOLDEN = Path(__file__).resolve().parent / "golden"
# What an admin at an 80-column terminal sees, without colours.
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "HOSTPREP_BACKEND": ""}


@pytest.fixture(params=["native"])
def variant(request) -> str:
    return request.param


def normalise(text: str, host) -> str:
    """Replace what varies between runs: temp paths, times, change ids, the MAC and its
    link-local address, PIDs, packet counters of the groups table."""
    text = text.replace(str(host.root.parent), "<TMP>").replace(host.box.host, "<NS>")
    text = re.sub(r"\d{8}T\d{6}-\d+-[0-9a-f]+", "<CHANGE>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", "<TIME>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "<TIME>", text)
    # the same width, so that table borders stay in place
    # the link-local address follows the random MAC, and may not be there yet right after the
    # sandbox is made: left out
    text = re.sub(r"(, )?fe80::[0-9a-f:]+/64", lambda m: " " * len(m.group(0)), text)
    text = re.sub(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", lambda m: "<MAC>".ljust(len(m.group(0))), text)
    text = re.sub(r"PID \d+", "PID <PID>", text)
    text = re.sub(r"(nft netdev ingress on \S+, )\d+( packets dropped)", r"\1N\2", text)
    # the attack lines: counters of the sandbox's traffic (late neighbour discovery may move them)
    # and the machine's own conntrack bound (a namespace shows it read-only)
    text = re.sub(r"^(ingress \(\S+\) dropped: )[\d,]+( fragments, )[\d,]+", r"\1N\2N", text, flags=re.M)
    text = re.sub(r"^conntrack: [\d,]+ of [\d,]+ entries, [\d,]+", "conntrack: N of N entries, N", text, flags=re.M)
    # Counters of the groups table: neighbour discovery may move them; keep the layout.
    lines = []
    for line in text.split("\n"):
        if re.match(r"^(fastpath|ddos|spoof|ssh|icmp|udp|containers|deny) ", line):
            line = re.sub(r"( +)(\d+)(?= |$)", lambda m: " " * (len(m.group(0)) - 1) + "N", line)
        if line[:1] in "┌│├└":
            # the NIC table is as wide as its longest (link-local) address: keep its content only
            line = re.sub(r" {2,}│", " │", re.sub(r"─+", "─", line))
        lines.append(line.rstrip())
    return "\n".join(lines)


class Transcript:
    """Commands run in the sandbox host and what they printed, as one text."""

    def __init__(self, host):
        self.host = host
        self.parts: list[str] = []

    def run(self, *args: str, check_code: int | None = 0) -> "subprocess.CompletedProcess":
        res = self.host.hostprep(*args, check=False, env=ENV)
        self.parts.append(f"$ hostprep {' '.join(args)}\n{res.stdout}"
                          + (f"--- stderr\n{res.stderr}" if res.stderr else "")
                          + f"[exit {res.returncode}]\n")
        if check_code is not None:
            assert res.returncode == check_code, res.stdout + res.stderr
        return res

    def note(self, text: str) -> None:
        self.parts.append(f"# {text}\n")

    def text(self) -> str:
        return normalise("\n".join(self.parts), self.host)


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("HOSTPREP_REGEN") == "1":
        path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"no golden file {path}: run with HOSTPREP_REGEN=1 to write it, then review it")
    want = path.read_text()
    if text != want:
        import difflib
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "this run"))
        assert text == want, f"differs from the golden file (HOSTPREP_REGEN=1 rewrites it):\n{diff}"


@pytest.fixture
def transcript(host):
    return Transcript(host)


@pytest.fixture
def check_golden():
    """``check_golden(name, text)``: compare with golden/NAME.txt (HOSTPREP_REGEN=1 writes it)."""
    return _check_golden
