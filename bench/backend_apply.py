#!/usr/bin/env python3
"""Benchmark: the time of one ``container up`` with 10 / 1,000 / 65,536 exempt entries, on the
iptables backend (nft and legacy variants: ipset + iptables-restore per family) and on the native
nft backend (one ``nft -f`` with an interval set), side by side in one run, as ratios nft/iptables-nft
and nft/iptables-legacy.

65,536 is the most one list may hold (hostprep.model.MAX_LIST_ENTRIES, issue 10 item 14), so
the issue's 100,000 is measured at that cap.

As root, inside throwaway sandboxes only: for each backend a fresh ``hostprep.sandbox.Sandbox``
(``hpxba<pid>``), created here and deleted by name in a ``finally`` block; state roots and env
files in a temporary directory.  In the sandbox host: ``hostprep apply -i eth1 -y
--ignore-selinux``, then ``hostprep container up finesse -y --env finesse.env --core core-N.env``
for each N, smallest first, each timed end to end (Python start-up included, as an admin
sees it).  The exempt entries are the inet peer 203.0.113.7 plus /32s from 198.18.0.0/15 (no
packet is sent to them).  After each up the set is read back and its size checked.

    sudo .venv/bin/python bench/backend_apply.py [--entries 10,1000,65536] [--repeat 1]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

from hostprep.model import SET_PREFIX  # noqa: E402
from hostprep.observed import parse_nft_json  # noqa: E402
from hostprep.runner import Runner  # noqa: E402
from hostprep.sandbox import Sandbox  # noqa: E402

PY = sys.executable
BACKENDS = ("iptables-nft", "iptables-legacy", "nft")


def fillers(n: int) -> list[str]:
    return ["203.0.113.7"] + [f"198.18.{i // 256}.{i % 256}" for i in range(n - 1)]


def run_in(box: Sandbox, root: Path, backend: str, *args: str) -> float:
    argv = ["ip", "netns", "exec", box.host, "env", f"HOSTPREP_ROOT={root}", f"HOSTPREP_BACKEND={backend}",
            f"PYTHONPATH={REPO}", PY, "-m", "hostprep", *args]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"hostprep {' '.join(args[:3])} failed on {backend}:\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
    return took


def set_size(box: Sandbox, backend: str) -> int:
    if backend == "nft":
        # the list read back (its .addr and .net sets, merged): count the addresses it covers
        out = subprocess.run(["ip", "netns", "exec", box.host, "nft", "-j", "list", "table", "inet", "hostprep"],
                             capture_output=True, text=True, check=True).stdout
        sets = parse_nft_json(out, (4, 6), SET_PREFIX).sets
        return sum(ipaddress.ip_network(m).num_addresses for name, ms in sets.items() if name.endswith("-ex4")
                   for m in ms)
    out = subprocess.run(["ip", "netns", "exec", box.host, "ipset", "list", "-t"], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(ln.split(":")[1]) for ln in out.splitlines() if ln.startswith("Number of entries:"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", default="10,1000,65536")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("backend_apply.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.entries.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hpxba-"))
    (work / "finesse.env").write_text("TEMPLATE_TYPE=finesse\n")
    for n in sizes:
        (work / f"core-{n}.env").write_text("NGX_RATELIMIT_DISABLE_IPS=" + "|".join(fillers(n)) + "\n")
    times: dict[tuple[str, int], float] = {}
    runner = Runner()
    try:
        for backend in BACKENDS:
            box = Sandbox(f"hpxba{os.getpid()}")
            box.create(runner)
            try:
                root = work / f"root-{backend}"
                run_in(box, root, backend, "apply", "-i", "eth1", "-y", "--ignore-selinux")
                for n in sizes:
                    times[(backend, n)] = run_in(box, root, backend, "container", "up", "finesse", "-y", "--env",
                                                 str(work / "finesse.env"), "--core", str(work / f"core-{n}.env"))
                    got = set_size(box, backend)
                    if got != n:
                        raise SystemExit(f"{backend}: the exempt set holds {got} entries, not {n}")
            finally:
                box.destroy(runner)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("container up with N exempt entries (seconds, end to end), iptables-nft, iptables-legacy, native nft, "
          "one run")
    print(f"{'entries':>8}  {'iptables-nft':>12}  {'iptables-legacy':>15}  {'nft':>8}  {'nft/ipt-nft':>11}  "
          f"{'nft/ipt-legacy':>14}")
    for n in sizes:
        a, b, c = times[("iptables-nft", n)], times[("iptables-legacy", n)], times[("nft", n)]
        print(f"{n:>8,}  {a:>12.2f}  {b:>15.2f}  {c:>8.2f}  {c / a:>10.2f}x  {c / b:>13.2f}x")
    base = sizes[0]
    for backend in BACKENDS:
        print(f"{backend}: {sizes[-1]:,} vs {base:,} entries: "
              f"{times[(backend, sizes[-1])] / times[(backend, base)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
