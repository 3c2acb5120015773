#!/usr/bin/env python3
"""Benchmark: `hostprep apply` end to end vs one `iptables -A` per rule.

Issue text: "time `hostprep apply` end to end against a baseline that loads the
same rules with one `iptables -A` per rule (what a shell script does), at 10,
100 and 1,000 rules, both run in the same process, and print the ratio for
each size."

How it measures (as root, inside a throwaway sandbox only):

* The sandbox is ``hostprep.sandbox.Sandbox(name="hpbench<pid>")``: three
  network namespaces created here and deleted by name in a ``finally`` block
  (also on Ctrl-C / SIGTERM).  Nothing is loaded into the machine's own
  namespace; the state root is a temporary directory.
* Sizes are grown with ``-p`` ping sources (documentation addresses only:
  203.0.113.x, 198.51.100.x, 192.0.2.x /32s and 2001:db8::N /128s); each adds
  one rule to its own family.  A nominal size smaller than the full base
  hardening (88 rules for IPv4+IPv6) is run with ``-e -a`` and the actual rule
  count (``render.desired(policy).v4.rule_count + v6.rule_count``) is reported
  next to the nominal size.
* hostprep: ``ip netns exec <host ns> env HOSTPREP_ROOT=<tmp> HOSTPREP_BACKEND=iptables-<variant>
  python -m hostprep apply -i eth1 -y [-e -a] -p ...`` as a subprocess, timed
  with ``time.perf_counter``, after ``hostprep flush`` so every run loads
  everything.  The time includes ``ip netns exec`` and Python start-up (what
  an admin waits for); the ``ip netns exec`` overhead is printed separately.
* baseline: the same rules, taken from ``render.desired(policy)``: per family
  ``iptables -N`` per chain, one ``iptables -A CHAIN spec`` subprocess per rule,
  ``iptables -I BUILTIN 1 spec`` per jump, and ``nft -f`` for the ingress
  table when the policy has one, with the variant's own binaries
  (``iptables-nft``/``iptables-legacy``).  The subprocesses are started
  directly from this process, whose thread is switched into the sandbox's
  network namespace with setns(2) for the duration (no ``ip netns exec`` per
  rule, which would inflate the baseline).  Afterwards the rules are removed
  again (``-D`` jumps, ``-F``, ``-X``, ``nft delete table``); that is not timed.
* Once per size, the filter table (``iptables-save`` without counters) of
  both families and the nft ingress table produced by the baseline are checked
  to be equal to what hostprep produced, so the comparison is fair; the rule
  count in the kernel is checked against the rendered count too.
* Each measurement is repeated (``--repeat``, default 3; fewer when one cell
  would exceed ``--cell-budget`` seconds) and the median is reported.  There
  are no timed assertions: the script prints ratios.

Usage (as root, from the repository):
    .venv/bin/python bench/apply_scale.py [--variant nft|legacy|both] [--repeat N]
                                          [--sizes 10,100,1000] [--cell-budget S]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _netns import in_netns
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostprep import render  # noqa: E402
from hostprep.observed import normalise_nft  # noqa: E402
from hostprep.model import PREFIX, Desired, PingSource, Policy, Ruleset  # noqa: E402
from hostprep.runner import Runner  # noqa: E402
from hostprep.sandbox import EXT, Sandbox  # noqa: E402

PY = sys.executable
STEP_TIMEOUT = 300.0          # generous per-subprocess timeout (not a timed assertion)


class BenchError(RuntimeError):
    """Something did not behave; the message carries the evidence."""


# --------------------------------------------------------------------------- sizes


def ping_pool(count4: int, count6: int) -> list[str]:
    """``count4`` IPv4 /32s and ``count6`` IPv6 /128s, documentation ranges only."""
    v4: list[str] = []
    for net in ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24"):
        v4 += [str(h) for h in ipaddress.ip_network(net).hosts()]
    if count4 > len(v4):
        raise BenchError(f"only {len(v4)} IPv4 documentation host addresses; asked for {count4}")
    base6 = int(ipaddress.ip_address("2001:db8::"))
    v6 = [str(ipaddress.ip_address(base6 + i + 1)) for i in range(count6)]
    return v4[:count4] + v6


def policy_for(flags: tuple[str, ...], pings: list[str]) -> Policy:
    nets = tuple(PingSource(p, (ipaddress.ip_network(p),)) for p in pings)
    return Policy(EXT, "-e" in flags, "-a" in flags, nets)


def total_rules(desired: Desired) -> int:
    return desired.v4.rule_count + desired.v6.rule_count


@dataclass(frozen=True)
class Size:
    nominal: int
    flags: tuple[str, ...]      # () or ("-e", "-a")
    pings: tuple[str, ...]
    desired: Desired

    @property
    def actual(self) -> int:
        return total_rules(self.desired)

    @property
    def n4(self) -> int:
        return sum(1 for p in self.pings if ":" not in p)

    @property
    def n6(self) -> int:
        return len(self.pings) - self.n4


def plan_size(nominal: int) -> Size:
    """Full hardening when it fits in ``nominal``, else ``-e -a``; pad with -p sources."""
    flags: tuple[str, ...] = ()
    base = total_rules(render.desired(policy_for(flags, [])))
    if base > nominal:
        flags = ("-e", "-a")
        base = total_rules(render.desired(policy_for(flags, [])))
    need = max(0, nominal - base)
    n4 = min((need + 1) // 2, 762)
    pings = ping_pool(n4, need - n4)
    desired = render.desired(policy_for(flags, pings))
    if total_rules(desired) != base + need:
        raise BenchError(f"size {nominal}: {len(pings)} -p sources gave {total_rules(desired)} rules, "
                         f"expected {base + need} (each -p should add exactly one rule)")
    return Size(nominal, flags, tuple(pings), desired)


# --------------------------------------------------------------------------- namespaces




# --------------------------------------------------------------------------- bench


@dataclass
class Bench:
    box: Sandbox
    variant: str
    root: Path

    # -- helpers (all run inside the sandbox host namespace) ----------------------------
    def ns(self, argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["ip", "netns", "exec", self.box.host, *argv], input=input,
                             capture_output=True, text=True, timeout=STEP_TIMEOUT)
        if check and res.returncode != 0:
            raise BenchError(f"{shlex.join(argv[:6])}{' ...' if len(argv) > 6 else ''} failed "
                             f"(exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return res

    def hostprep_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.box.host, "env", f"HOSTPREP_ROOT={self.root}",
                f"HOSTPREP_BACKEND=iptables-{self.variant}", f"PYTHONPATH={REPO}", PY, "-m", "hostprep", *args]

    def hostprep(self, *args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(self.hostprep_argv(*args), capture_output=True, text=True, timeout=STEP_TIMEOUT)
        if res.returncode != 0:
            shown = " ".join(args[:8]) + (f" ... ({len(args)} args)" if len(args) > 8 else "")
            raise BenchError(f"hostprep {shown} failed (exit {res.returncode}) on {self.variant}:\n"
                             f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def ipt(self, family: int) -> str:
        return f"{'iptables' if family == 4 else 'ip6tables'}-{self.variant}"

    def save(self, family: int) -> str:
        """The filter table without counters and '#' lines (what equality is judged on)."""
        out = self.ns([f"{self.ipt(family)}-save", "-t", "filter"]).stdout
        return "\n".join(ln for ln in out.splitlines() if not ln.startswith("#")) + "\n"

    def nft_table(self) -> str | None:
        res = self.ns(["nft", "list", "table", "netdev", "hostprep"], check=False)
        return normalise_nft(res.stdout) if res.returncode == 0 else None

    def snapshot(self) -> dict:
        return {"v4": self.save(4), "v6": self.save(6), "nft": self.nft_table()}

    def assert_clean(self, when: str) -> None:
        snap = self.snapshot()
        left = [f"IPv{f}: {ln}" for f, key in ((4, "v4"), (6, "v6")) for ln in snap[key].splitlines()
                if PREFIX in ln]
        if snap["nft"] is not None:
            left.append("nft table netdev hostprep")
        if left:
            raise BenchError(f"{when}: hostprep rules still loaded in the sandbox:\n  " + "\n  ".join(left[:10]))

    # -- hostprep -----------------------------------------------------------------------
    def time_hostprep(self, size: Size) -> tuple[float, str]:
        # The sandbox is not a proxy host (and may have no SELinux): as `sandbox up` does.
        args = ["apply", "-i", EXT, "-y", "--ignore-selinux", *size.flags]
        for p in size.pings:
            args += ["-p", p]
        argv = self.hostprep_argv(*args)
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise BenchError(f"hostprep apply ({size.actual} rules, {self.variant}) failed "
                             f"(exit {res.returncode}):\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        want = f"IPv4 {size.desired.v4.rule_count} rules, IPv6 {size.desired.v6.rule_count} rules"
        if want not in res.stdout:
            raise BenchError(f"hostprep apply did not report '{want}' (did it load everything?):\n"
                             f"{res.stdout[-2000:]}")
        return elapsed, res.stdout

    # -- baseline: one command per rule ---------------------------------------------------
    def _run_each(self, cmds: list[list[str]]) -> None:
        for argv in cmds:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, timeout=STEP_TIMEOUT)
            if res.returncode != 0:
                raise BenchError(f"baseline command failed (exit {res.returncode}): {shlex.join(argv)}\n"
                                 f"{res.stderr.decode(errors='replace')}")

    def load_cmds(self, ruleset: Ruleset) -> list[list[str]]:
        ipt = [self.ipt(ruleset.family), "-w"]
        cmds = [[*ipt, "-N", c.name] for c in ruleset.chains]
        cmds += [[*ipt, "-A", r.chain, *shlex.split(r.spec)] for c in ruleset.chains for r in c.rules]
        # Jumps go to position 1 of their built-in chain, as hostprep puts them (reverse: each lands on top).
        cmds += [[*ipt, "-I", j.chain, "1", *shlex.split(j.spec)] for j in reversed(ruleset.jumps)]
        return cmds

    def unload_cmds(self, ruleset: Ruleset) -> list[list[str]]:
        ipt = [self.ipt(ruleset.family), "-w"]
        cmds = [[*ipt, "-D", j.chain, *shlex.split(j.spec)] for j in ruleset.jumps]
        cmds += [[*ipt, "-F", c.name] for c in ruleset.chains]
        cmds += [[*ipt, "-X", c.name] for c in ruleset.chains]
        return cmds

    def time_baseline(self, size: Size, nft_file: Path | None) -> tuple[float, int]:
        d = size.desired
        cmds = self.load_cmds(d.v4) + self.load_cmds(d.v6)
        if d.nft is not None:
            assert nft_file is not None
            cmds.append(["nft", "-f", str(nft_file)])
        with in_netns(self.box.host):
            t0 = time.perf_counter()
            self._run_each(cmds)
            elapsed = time.perf_counter() - t0
        return elapsed, len(cmds)

    def unload_baseline(self, size: Size) -> None:
        d = size.desired
        cmds = self.unload_cmds(d.v4) + self.unload_cmds(d.v6)
        if d.nft is not None:
            cmds.append(["nft", "delete", "table", "netdev", "hostprep"])
        with in_netns(self.box.host):
            self._run_each(cmds)

    def overheads(self, n: int = 5) -> tuple[float, float]:
        """Medians of `ip netns exec <ns> true` and of hostprep's start-up (`--version`), for context."""
        def median_of(argv: list[str]) -> float:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, timeout=60, stdout=subprocess.DEVNULL)
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)
        return (median_of(["ip", "netns", "exec", self.box.host, "true"]),
                median_of(self.hostprep_argv("--version")))


def kernel_rule_count(snap: dict) -> int:
    """hostprep's rules in the kernel: rules of HOSTPREP-* chains plus jumps into them."""
    n = 0
    for key in ("v4", "v6"):
        for ln in snap[key].splitlines():
            if ln.startswith("-A ") and PREFIX in ln:
                n += 1
    return n


def first_difference(a: str, b: str) -> str:
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"line {i + 1}:\n  hostprep: {x}\n  baseline: {y}"
    return f"lengths differ: hostprep {len(la)} lines, baseline {len(lb)} lines"


@dataclass
class Cell:
    variant: str
    size: Size
    hostprep: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    commands: int = 0
    verified: bool = False

    @property
    def ratio(self) -> float:
        return statistics.median(self.baseline) / statistics.median(self.hostprep)


def run_cell(bench: Bench, size: Size, repeat: int, budget: float, nft_file: Path | None) -> Cell:
    cell = Cell(bench.variant, size)
    planned = repeat
    i = 0
    while i < planned:
        bench.hostprep("flush")
        bench.assert_clean(f"before hostprep run {i + 1}")
        t_h, _ = bench.time_hostprep(size)
        cell.hostprep.append(t_h)
        ref = bench.snapshot() if not cell.verified else None
        bench.hostprep("flush")
        bench.assert_clean(f"before baseline run {i + 1}")
        t_b, cell.commands = bench.time_baseline(size, nft_file)
        cell.baseline.append(t_b)
        if ref is not None:
            got = bench.snapshot()
            for key in ("v4", "v6"):
                if got[key] != ref[key]:
                    raise BenchError(f"{bench.variant} size {size.nominal}: baseline's IPv{key[1]} filter table "
                                     f"differs from hostprep's; {first_difference(ref[key], got[key])}")
            if got["nft"] != ref["nft"]:
                raise BenchError(f"{bench.variant} size {size.nominal}: nft ingress tables differ:\n"
                                 f"hostprep:\n{ref['nft']}\nbaseline:\n{got['nft']}")
            in_kernel = kernel_rule_count(ref)
            if in_kernel != size.actual:
                raise BenchError(f"{bench.variant} size {size.nominal}: kernel holds {in_kernel} hostprep "
                                 f"rules, rendered {size.actual}")
            cell.verified = True
        bench.unload_baseline(size)
        bench.assert_clean(f"after baseline run {i + 1}")
        i += 1
        if i == 1 and repeat > 1:
            per_run = t_h + t_b
            fit = max(1, int(budget // per_run))
            if fit < planned:
                planned = fit
                print(f"    ({bench.variant} {size.nominal}: one run took {per_run:.1f} s of timed work; "
                      f"{planned} repetition(s) fit the {budget:.0f} s cell budget)", flush=True)
        print(f"    {bench.variant:6} {size.nominal:>5} run {i}: hostprep {t_h:.3f} s, baseline {t_b:.3f} s",
              flush=True)
    return cell


def print_table(cells: list[Cell], overhead: dict[str, tuple[float, float]]) -> None:
    head = ("variant", "nominal", "actual rules (v4+v6)", "flags / -p", "n",
            "hostprep median s", "baseline median s", "ratio baseline/hostprep")
    rows = []
    for c in cells:
        s = c.size
        flags = " ".join(s.flags) or "full"
        rows.append((c.variant, str(s.nominal), f"{s.actual} ({s.desired.v4.rule_count}+{s.desired.v6.rule_count})",
                     f"{flags}, {s.n4}+{s.n6} -p", str(len(c.hostprep)),
                     f"{statistics.median(c.hostprep):.3f}", f"{statistics.median(c.baseline):.3f}",
                     f"{c.ratio:.2f}x"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cols: "  ".join(col.rjust(w) if i >= 4 else col.ljust(w)  # noqa: E731
                                  for i, (col, w) in enumerate(zip(cols, widths)))
    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for r in rows:
        print(line(r))
    print()
    print("hostprep time = `ip netns exec ... python -m hostprep apply` end to end (Python start-up, "
          "observe, test, load, verify, record);")
    print("  for context (medians): `ip netns exec <ns> true` "
          + ", ".join(f"{v} {t[0] * 1000:.1f} ms" for v, t in overhead.items())
          + "; `hostprep --version` the same way (start-up only) "
          + ", ".join(f"{v} {t[1]:.3f} s" for v, t in overhead.items()))
    print("baseline time = one subprocess per chain (-N), rule (-A), jump (-I) and one `nft -f` "
          "(when the ingress table is wanted), started from this process inside the sandbox namespace;")
    print("  commands per size: " + ", ".join(f"{c.variant} {c.size.nominal}: {c.commands}" for c in cells))
    print("every size verified once: baseline's iptables-save (both families) and nft table == hostprep's")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("nft", "legacy", "both"), default="both",
                    help="iptables variant to measure (default: both)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per cell; the median is reported (default 3)")
    ap.add_argument("--sizes", default="10,100,1000", help="nominal rule counts, comma-separated (default 10,100,1000)")
    ap.add_argument("--cell-budget", type=float, default=60.0,
                    help="timed seconds one cell may take; fewer repetitions when one run says it would "
                         "exceed it (default 60)")
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: {args.sizes!r} is not a comma-separated list of integers")
    if not args.sizes or any(s < 1 for s in args.sizes):
        ap.error("--sizes: give positive integers")
    if args.repeat < 1:
        ap.error("--repeat: at least 1")
    return args


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (creates network namespaces)", file=sys.stderr)
        return 2
    variants = ["nft", "legacy"] if args.variant == "both" else [args.variant]
    sizes = [plan_size(n) for n in args.sizes]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    start = time.perf_counter()
    runner = Runner()
    box = Sandbox(name=f"hpbench{os.getpid()}")
    root = Path(tempfile.mkdtemp(prefix="hpbench-root-"))
    nft_dir = Path(tempfile.mkdtemp(prefix="hpbench-nft-"))
    cells: list[Cell] = []
    overhead: dict[str, tuple[float, float]] = {}
    try:
        box.create(runner)
        print(f"sandbox {', '.join(box.namespaces)}; state root {root}", flush=True)
        for variant in variants:
            bench = Bench(box, variant, root)
            overhead[variant] = bench.overheads()
            for size in sizes:
                nft_file = None
                if size.desired.nft is not None:
                    nft_file = nft_dir / f"ingress-{size.nominal}.nft"
                    nft_file.write_text(size.desired.nft.script)
                cells.append(run_cell(bench, size, args.repeat, args.cell_budget, nft_file))
            bench.hostprep("flush")
        print()
        print_table(cells, overhead)
        return 0
    except BenchError as err:
        print(f"\nBENCH FAILED: {err}", file=sys.stderr)
        if cells:
            print("\ncells finished before the failure:", file=sys.stderr)
            print_table(cells, overhead)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the sandbox", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        sys.stdout.flush()
        gone = box.destroy(runner)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(nft_dir, ignore_errors=True)
        print(f"removed namespaces: {', '.join(gone) or 'none'}; total {time.perf_counter() - start:.1f} s",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
