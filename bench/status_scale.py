#!/usr/bin/env python3
"""Benchmark: the Python side of ``hostprep status`` with a small and a capped exempt list.

Issue 10 item 14: a 1,000,000-entry NGX_RATELIMIT_DISABLE_IPS made ``status`` take 32 s
and 1.3 GB.  Lists are now capped at 65,536 entries (``hostprep.model.MAX_LIST_ENTRIES``)
and status parses a container record once per process and does not parse the IPv4
members of a loaded set again.  This measures ``status.collect`` in this process with
a fake runner (no root, no kernel touched: the ``iptables-save`` and ``ipset save``
texts are what hostprep would have loaded, so everything is reported live), under a
temporary ``HOSTPREP_ROOT``, for each size of ``--entries``, and prints the time and the
ratio against the smallest size.  Not a test: no timed assertion.

Usage: .venv/bin/python bench/status_scale.py [--entries 10,65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostprep import records  # noqa: E402
from hostprep.observed import LiveState  # noqa: E402
from hostprep import plan as planmod  # noqa: E402
from hostprep import render, status  # noqa: E402
from hostprep.backend import IptablesBackend  # noqa: E402
from hostprep.model import Container, Limits, Policy  # noqa: E402
from hostprep.paths import Paths  # noqa: E402
from hostprep.runner import Result, Runner  # noqa: E402
from hostprep.state import Store  # noqa: E402


class Canned(Runner):
    """Answers the read-only commands status runs with the texts of a host where all is live."""

    def __init__(self, texts: dict[str, str]) -> None:
        super().__init__()
        self.texts = texts

    def which(self, binary: str) -> str | None:  # type: ignore[override]
        return f"/usr/sbin/{binary}"

    def run(self, argv, *, input=None, check=True, mutates=False):
        assert not mutates, argv
        tool = argv[0]
        if tool == "ipset":
            return Result(tuple(argv), 0, self.texts["ipset"], "")
        if "save" in tool:
            return Result(tuple(argv), 0, self.texts["6" if tool.startswith("ip6") else "4"], "")
        if tool == "nft":
            return Result(tuple(argv), 1, "", "Error: No such file or directory")
        if tool == "systemctl":
            return Result(tuple(argv), 3, "inactive\n", "")
        return Result(tuple(argv), 0, "", "")


def save_text(desired, fam: int) -> str:
    rs = desired.ruleset(fam)
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{ch.name} - [0:0]" for ch in rs.chains]
    lines += [f"[0:0] {r.line()}" for ch in rs.chains for r in ch.rules] + [f"[0:0] {j.line()}" for j in rs.jumps]
    return "\n".join(lines + ["COMMIT", ""])


def one(n: int) -> tuple[float, dict]:
    root = Path(tempfile.mkdtemp(prefix="hp-status-bench-"))
    try:
        os.environ["HOSTPREP_ROOT"] = str(root)
        os.environ["HOSTPREP_SELINUXFS"] = str(root / "no-selinuxfs")
        store = Store(Paths(root))
        base = int(ipaddress.ip_address("198.18.0.0"))          # RFC 2544 benchmark range
        exempt = tuple(ipaddress.ip_network(ipaddress.ip_address(base + i)) for i in range(n))
        c = Container("finesse", "finesse", (8445,), ipaddress.ip_address("198.51.100.10"),
                      Limits(10, 6, 8, 1, 1), exempt=exempt)
        desired = render.desired(Policy("eth1"), (c,))
        store.save_container(c)
        records.save_applied(store, records.AppliedRecord.of(desired, LiveState({}, None), "nft"))
        runner = Canned({"4": save_text(desired, 4), "6": save_text(desired, 6),
                         "ipset": planmod.ipset_fill_script(desired.sets)})
        be = IptablesBackend(runner, "nft", proc=root / "proc")
        fresh = Store(Paths(root))                              # a new process: nothing parsed yet
        start = time.perf_counter()
        report = status.collect(runner, be, fresh)
        return time.perf_counter() - start, report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", default="10,65536")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.entries.split(",")]
    medians = {}
    for n in sizes:
        times = []
        for _ in range(args.repeat):
            took, report = one(n)
            c = report["containers"][0]
            if not c["present"] or c["exempt"] != n or [p for p in report["problems"] if "ipset" in p]:
                print(f"status did not report the {n}-entry container live: {report['problems']}", file=sys.stderr)
                return 1
            times.append(took)
        medians[n] = statistics.median(times)
        print(f"{n:>8} exempt entries: status.collect median {medians[n]:.3f} s over {args.repeat} "
              f"(x{medians[n] / medians[sizes[0]]:.1f} of {sizes[0]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
