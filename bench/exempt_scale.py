#!/usr/bin/env python3
"""Benchmark: accepted-packet cost with 10 vs 100,000 exempt sources (ipset), vs a linear chain.

Issue text: "Exempt lists of any size: use sets (ipset ...) so the cost per
packet does not grow with the list; bench/exempt_scale.py shows accepted-packet
cost with 10 vs 100,000 exempt entries, as a ratio."

How it measures (as root, inside a throwaway sandbox only):

* Sandbox: ``hostprep.sandbox.Sandbox(name="hpxbench<pid>")``, three network
  namespaces created here and deleted by name in a ``finally`` block (also on
  Ctrl-C, SIGTERM, SIGHUP); a fresh one per iptables variant, so nothing of
  one variant (tables, conntrack entries) is left for the next.  State roots
  and env files live in a temporary directory.  The machine's own namespace is
  never touched; packets only flow between the sandbox's namespaces.
* hostprep: ``hostprep apply -i eth1 -y --ignore-selinux`` in the sandbox host, then
  ``hostprep container up finesse --env finesse.env --core core-<N>.env``
  (TEMPLATE_TYPE=finesse, port 8445 on 198.51.100.10).  core.env's
  NGX_RATELIMIT_DISABLE_IPS holds the inet peer's address 203.0.113.7 plus
  filler /32s from 198.18.0.0/15 (RFC 2544 benchmark range; no packet is ever
  sent to them) up to N entries.  All entries are IPv4: the container is an
  IPv4 one and hostprep puts only IPv4 entries into its IPv4 set, so the set
  really holds N members (checked with ``ipset list -t``).  ``container up`` is
  timed end to end (``ip netns exec`` + Python start-up included).
* If ``container up`` does not finish within ``--up-timeout`` seconds it is
  killed, the table says so, and that size is put in place by the benchmark
  instead: the same set (name, type and members from hostprep's own model and
  ``ipset restore`` script, ``hostprep.plan.ipset_fill_script``) is filled into
  NAME-n and swapped in, which is what hostprep's apply does.  The packet
  measurement stays meaningful; the ``container up`` problem is reported, with
  a timing of the pure env-file parse (``hostprep.envfiles.load_container``,
  run in this process) at growing sizes as a diagnosis.  A size that timed out
  on one variant is not retried on the next (the parse does not depend on it).
* Accepted-packet cost: a listener on 198.51.100.10:8445 in the sandbox host
  (accepts and closes); from the inet namespace, ``--connections`` new TCP
  connections from 203.0.113.7 (connect, then close with SO_LINGER 0, i.e. an
  RST, so no TIME_WAIT eats the ephemeral ports).  Every SYN takes the path
  INPUT -> HOSTPREP-IN -> ... -> HOSTPREP-CONTAINERS -> HOSTPREP-C-finesse and
  is accepted by the exempt rule.  Cost = wall time per connection; the
  sockets are made in the namespaces with setns(2) from this process (no
  subprocess per connection).  Honesty check after every run: the exempt
  rule's packet counter grew by exactly the number of connections (only SYNs
  reach it; the rest of each connection takes the ESTABLISHED fast path).
* Baseline (the contrast that shows why sets matter), in the same process: the
  set rule of HOSTPREP-C-finesse is replaced, in place, by one rule per source,
  ``-s X/32 -p tcp -m conntrack --ctorigdstport 8445 -j ACCEPT`` with
  203.0.113.7 LAST (the worst case, and the path of every source that is not
  exempt), loaded with one ``iptables-restore --noflush``; sizes ``--linear``
  (default 10 and 10,000: 100,000 linear rules load too slowly for a bench
  run).  Afterwards ``hostprep container up`` puts hostprep's chain back and
  ``hostprep status`` must say everything desired is live.
* Runs alternate the sizes (ABBA order over ``--repeat`` rounds) after one
  warm-up run; medians are reported.  Ratios: cost(N)/cost(smallest N) for the
  set and for the linear chain.  There are no timed assertions.

Usage (as root, from the repository):
    .venv/bin/python bench/exempt_scale.py [--variant nft|legacy|both] [--entries 10,100000]
        [--linear 10,10000] [--connections 3000] [--repeat 5] [--up-timeout 60]
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostprep import envfiles  # noqa: E402
from hostprep.model import Container, IpSet, Limits  # noqa: E402
from hostprep.plan import TEMP_SUFFIX, ipset_fill_script, ipset_swap_script, parse_save  # noqa: E402
from hostprep.runner import Runner  # noqa: E402
from hostprep.sandbox import EXT, HOST_EXT4, INET_EXTRA4, Sandbox  # noqa: E402

PY = sys.executable
CLONE_NEWNET = 0x40000000
STEP_TIMEOUT = 300.0              # generous per-subprocess timeout (not a timed assertion)
NAME = "finesse"
PORT = 8445
SOURCE = INET_EXTRA4[0]           # 203.0.113.7, an address of the inet namespace
FILLER_NET = ipaddress.ip_network("198.18.0.0/15")   # RFC 2544 benchmark range
CONNECT_TIMEOUT = 3.0             # a dropped SYN would show up as a 1 s retransmission, then this
WARMUP = 300


class BenchError(RuntimeError):
    """Something did not behave; the message carries the evidence."""


# --------------------------------------------------------------------------- inputs


def exempt_list(n: int) -> list[str]:
    """203.0.113.7 first, then n-1 filler /32s from 198.18.0.0/15."""
    if n < 1 or n - 1 > FILLER_NET.num_addresses:
        raise BenchError(f"{n} entries: give 1..{FILLER_NET.num_addresses + 1}")
    base = int(FILLER_NET.network_address)
    return [SOURCE] + [str(ipaddress.IPv4Address(base + i)) for i in range(n - 1)]


def core_env_text(n: int) -> str:
    return ("# written by bench/exempt_scale.py\nNGX_IPTABLES_HARDENING=1\nNGX_LOAD_BALANCER_IPS=\n"
            "NGX_TRAFFIC_RESTRICTED=false\nNGX_RATELIMIT_DISABLE_IPS=" + "|".join(exempt_list(n)) + "\n")


FINESSE_ENV = f"# written by bench/exempt_scale.py\nTEMPLATE_TYPE=finesse\nNGX_PRXY_FIN_PORT={PORT}\n"


def model_container() -> Container:
    """Only for the names hostprep derives (chain, set); the limits do not matter here."""
    return Container(NAME, "finesse", (PORT,), ipaddress.ip_address(HOST_EXT4), Limits(10, 6, 8, 1, 1))


# --------------------------------------------------------------------------- namespaces


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str):
    """Run this thread (and the sockets and subprocesses it creates) inside netns ``name``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


class Listener:
    """A TCP listener on 198.51.100.10:8445 in the sandbox host: accept, close."""

    def __init__(self, ns: str) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_EXT4, PORT))
        self.sock.listen(4096)
        self.accepted = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="listener", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            conn.close()
            self.accepted += 1

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


_LINGER0 = struct.pack("ii", 1, 0)


def drive(ns: str, count: int) -> float:
    """``count`` new connections from 203.0.113.7 to the listener; returns the wall time."""
    with in_netns(ns):
        t0 = time.perf_counter()
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                s.settimeout(CONNECT_TIMEOUT)
                s.bind((SOURCE, 0))
                s.connect((HOST_EXT4, PORT))
            except OSError as err:
                raise BenchError(f"connection {i + 1} of {count} from {SOURCE} to {HOST_EXT4}:{PORT} "
                                 f"failed: {err}") from None
            finally:
                s.close()
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- bench


@dataclass
class Measurement:
    kind: str                  # "ipset" or "linear"
    size: int
    seconds: float
    connections: int

    @property
    def us_per_conn(self) -> float:
        return self.seconds / self.connections * 1e6


@dataclass
class Row:
    variant: str
    kind: str
    size: int
    loaded_by: str = ""
    load_times: list[float] = field(default_factory=list)   # container up / iptables-restore, seconds
    up_timed_out: bool = False
    costs: list[float] = field(default_factory=list)        # µs per connection
    verified: int = 0                                       # runs whose counter == connections

    @property
    def median(self) -> float:
        return statistics.median(self.costs)


@dataclass
class Bench:
    box: Sandbox
    variant: str
    root: Path
    files: Path
    up_timeout: float
    connections: int
    skip_up: set[int]          # sizes whose container up timed out before (not retried)
    rows: dict[tuple[str, int], Row] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    container: Container = field(default_factory=model_container)

    # -- helpers (all run inside the sandbox host namespace) ---------------------------------
    def ns(self, argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["ip", "netns", "exec", self.box.host, *argv], input=input,
                             capture_output=True, text=True, timeout=STEP_TIMEOUT)
        if check and res.returncode != 0:
            raise BenchError(f"{shlex.join(argv[:6])}{' ...' if len(argv) > 6 else ''} failed "
                             f"(exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return res

    def hostprep_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.box.host, "env", f"HOSTPREP_ROOT={self.root}",
                f"HOSTPREP_BACKEND={self.variant}", f"PYTHONPATH={REPO}", PY, "-m", "hostprep", *args]

    def hostprep(self, *args: str, timeout: float = STEP_TIMEOUT) -> tuple[float, str] | None:
        """Run hostprep in the sandbox host; (seconds, stdout), or None when killed at ``timeout``."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.hostprep_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0 and not (args[0] == "status" and proc.returncode == 1):
            raise BenchError(f"hostprep {' '.join(args[:4])} failed (exit {proc.returncode}) on {self.variant}:\n"
                             f"stdout: {out[-2000:]}\nstderr: {err[-2000:]}")
        return elapsed, out + err

    def ipt(self, kind: str = "") -> str:
        return f"iptables-{self.variant}" + (f"-{kind}" if kind else "")

    def chain_rules(self):
        """The live rules of the container chain, with counters (hostprep's own parser)."""
        out = self.ns([self.ipt("save"), "-c", "-t", "filter"]).stdout
        return parse_save(out, 4).chain_rules(self.container.chain)

    def set_entries(self, name: str) -> int | None:
        res = self.ns(["ipset", "list", "-t", name], check=False)
        if res.returncode != 0:
            return None
        for line in res.stdout.splitlines():
            if line.startswith("Number of entries:"):
                return int(line.split(":", 1)[1])
        raise BenchError(f"ipset list -t {name}: no 'Number of entries' line:\n{res.stdout}")

    def row(self, kind: str, size: int) -> Row:
        return self.rows.setdefault((kind, size), Row(self.variant, kind, size))

    # -- putting a size in place -------------------------------------------------------------
    def write_files(self, sizes: list[int]) -> None:
        (self.files / "finesse.env").write_text(FINESSE_ENV)
        for n in sizes:
            (self.files / f"core-{n}.env").write_text(core_env_text(n))

    def set_rule(self):
        rules = [r for r in self.chain_rules() if "--match-set" in r.spec and " exempt" in r.spec]
        if len(rules) != 1:
            raise BenchError(f"{self.container.chain}: expected one exempt set rule, found {len(rules)}")
        return rules[0]

    def ipset_in_place(self, n: int) -> None:
        """Size n of the exempt list live: by container up, or (after a timeout) by the same ipset swap."""
        row = self.row("ipset", n)
        name = self.container.set_name("ex")
        if n not in self.skip_up:
            res = self.hostprep("container", "up", NAME, "--env", str(self.files / "finesse.env"),
                                "--core", str(self.files / f"core-{n}.env"), timeout=self.up_timeout)
            if res is not None:
                row.load_times.append(res[0])
                row.loaded_by = row.loaded_by or "hostprep container up"
                got = self.set_entries(name)
                if got != n:
                    raise BenchError(f"after container up with {n} entries, ipset {name} holds {got}")
                return
            self.skip_up.add(n)
            row.up_timed_out = True
            self.log.append(f"{self.variant}: `hostprep container up` with {n} exempt entries did not finish "
                            f"within {self.up_timeout:.0f} s: killed; this size is loaded by the benchmark "
                            "from now on (hostprep's set name, type and fill/swap script)")
            print(f"    {self.log[-1]}", flush=True)
        elif not row.loaded_by:
            row.up_timed_out = True
        if self.set_entries(name) is None:
            raise BenchError(f"ipset {name} does not exist: the smallest size must come up through hostprep first")
        members = tuple(ipaddress.ip_network(a) for a in exempt_list(n))
        s = IpSet(name, 4, tuple(sorted(set(members), key=str)))
        script = (ipset_fill_script((s,), TEMP_SUFFIX) + ipset_swap_script((s,))
                  + f"destroy {name}{TEMP_SUFFIX}\n")
        t0 = time.perf_counter()
        self.ns(["ipset", "restore"], input=script)
        row.load_times.append(time.perf_counter() - t0)
        row.loaded_by = "bench: ipset restore + swap"
        got = self.set_entries(name)
        if got != n:
            raise BenchError(f"after the benchmark's ipset swap with {n} entries, ipset {name} holds {got}")

    def linear_in_place(self, n: int) -> None:
        """Replace the exempt set rule, in place, by n rules `-s X/32 ... -j ACCEPT` (203.0.113.7 last)."""
        row = self.row("linear", n)
        live = self.ns([self.ipt("save"), "-t", "filter"]).stdout
        chain = self.container.chain
        lines = [ln for ln in live.splitlines() if ln.startswith(f"-A {chain} ")]
        set_lines = [ln for ln in lines if "--match-set" in ln and " exempt" in ln]
        linear = [ln for ln in lines if ln.startswith(f"-A {chain} -s ")]
        if len(set_lines) == 1:
            where = lines.index(set_lines[0])
        elif len(set_lines) == 0 and linear:
            where = lines.index(linear[0])      # a previous linear load: replace it in place
        else:
            raise BenchError(f"{chain}: cannot find the exempt rule to replace:\n" + "\n".join(lines))
        drop = set(set_lines) | set(linear)
        rest = [ln for ln in lines if ln not in drop]
        sources = exempt_list(n)[1:] + [SOURCE]
        match = f"-p tcp -m conntrack --ctorigdstport {PORT}"
        mine = [f"-A {chain} -s {a}/32 {match} -j ACCEPT" for a in sources]
        text = "*filter\n" + f":{chain} - [0:0]\n" + "\n".join(rest[:where] + mine + rest[where:]) + "\nCOMMIT\n"
        t0 = time.perf_counter()
        self.ns([self.ipt("restore"), "--noflush"], input=text)
        row.load_times.append(time.perf_counter() - t0)
        row.loaded_by = "bench: iptables-restore --noflush"
        after = [r for r in self.chain_rules() if r.spec.startswith("-s ")]
        if len(after) != n or not after[-1].spec.startswith(f"-s {SOURCE}/32 "):
            raise BenchError(f"{chain}: after loading {n} linear rules the kernel holds {len(after)}, "
                             f"last {after[-1].spec if after else None!r}")

    # -- one measurement ---------------------------------------------------------------------
    def accepted_counter(self, kind: str) -> int:
        if kind == "ipset":
            return self.set_rule().counter.packets
        last = [r for r in self.chain_rules() if r.spec.startswith(f"-s {SOURCE}/32 ")]
        if len(last) != 1:
            raise BenchError(f"{self.container.chain}: expected one rule for {SOURCE}, found {len(last)}")
        return last[0].counter.packets

    def measure(self, kind: str, size: int, count: int, record: bool = True) -> Measurement:
        before = self.accepted_counter(kind)
        seconds = drive(self.box.inet, count)
        after = self.accepted_counter(kind)
        m = Measurement(kind, size, seconds, count)
        if after - before != count:
            rules = "\n".join(f"  [{r.counter.packets}] {r.spec[:150]}" for r in self.chain_rules()
                              if not r.spec.startswith("-s ") or r.spec.startswith(f"-s {SOURCE}/"))
            raise BenchError(f"{self.variant} {kind} {size}: the accepting rule counted {after - before} "
                             f"packets for {count} connections; chain now:\n{rules}")
        if record:
            row = self.row(kind, size)
            row.costs.append(m.us_per_conn)
            row.verified += 1
            print(f"    {self.variant:6} {kind:6} {size:>6}: {m.us_per_conn:8.1f} µs/conn "
                  f"({count / seconds:7.0f} conn/s), counter +{after - before} == {count}", flush=True)
        return m


def abba(sizes: list[int], rounds: int) -> list[list[int]]:
    return [list(sizes) if r % 2 == 0 else list(reversed(sizes)) for r in range(rounds)]


def run_variant(bench: Bench, entries: list[int], linear: list[int], repeat: int) -> dict:
    extra: dict = {}
    # The sandbox is not a proxy host: the machine's SELinux state is not the point here
    # (as `hostprep sandbox up` does).
    res = bench.hostprep("apply", "-i", EXT, "-y", "--ignore-selinux")
    extra["apply"] = res[0]
    bench.write_files(entries)
    listener = Listener(bench.box.host)
    try:
        # ipset: the smallest size first (it creates the set and the rules), then alternate.
        bench.ipset_in_place(entries[0])
        bench.measure("ipset", entries[0], WARMUP, record=False)
        for order in abba(entries, repeat):
            for n in order:
                bench.ipset_in_place(n)
                bench.measure("ipset", n, bench.connections)
        # linear baseline, in place of the set rule.
        bench.linear_in_place(linear[0])
        bench.measure("linear", linear[0], WARMUP, record=False)
        for order in abba(linear, repeat):
            for n in order:
                bench.linear_in_place(n)
                bench.measure("linear", n, bench.connections)
        # hostprep puts its own chain back, and says everything is live.
        t = bench.hostprep("container", "up", NAME, "--env", str(bench.files / "finesse.env"),
                           "--core", str(bench.files / f"core-{entries[0]}.env"))
        st = bench.hostprep("status")
        if "everything desired is live" not in st[1]:
            raise BenchError(f"after the linear baseline, `container up` + `status` do not report everything "
                             f"live:\n{st[1][-3000:]}")
        extra["restore"] = t[0]
        extra["accepted_by_listener"] = listener.accepted
    finally:
        listener.stop()
    return extra


def parse_diagnosis(sizes=(1000, 2000, 4000)) -> list[tuple[int, float]]:
    """Time hostprep's pure env-file parse (no system access) at growing sizes, in this process."""
    out = []
    with tempfile.TemporaryDirectory(prefix="hpxbench-parse-") as d:
        env = Path(d) / "finesse.env"
        env.write_text(FINESSE_ENV)
        for n in sizes:
            core = Path(d) / f"core-{n}.env"
            core.write_text(core_env_text(n))
            t0 = time.perf_counter()
            c = envfiles.load_container(NAME, env, core, None, EXT, [f"{HOST_EXT4}/24"])
            out.append((n, time.perf_counter() - t0))
            if len(c.networks("ex")) != n:
                raise BenchError(f"load_container with {n} entries gave {len(c.networks('ex'))} exempt networks")
    return out


def print_table(rows: list[Row], extras: dict[str, dict], log: list[str], diag: list[tuple[int, float]] | None,
                up_timeout: float, connections: int) -> None:
    head = ("variant", "exempt list", "entries", "put in place by", "load s (median)", "runs",
            "µs/conn median", "conn/s", "Δ µs vs smallest", "ratio cost/smallest")
    table = []
    ratios: dict[tuple[str, str], str] = {}
    for r in rows:
        if not r.costs:
            continue
        base = next(x for x in rows if x.variant == r.variant and x.kind == r.kind and x.costs)
        ratio = r.median / base.median
        if r is not base:
            ratios[(r.variant, r.kind)] = f"{ratio:.2f}x ({r.size} vs {base.size})"
        load = f"{statistics.median(r.load_times):.3f}" if r.load_times else "-"
        if r.up_timed_out:
            load += f" (container up > {up_timeout:.0f} s, killed)" if r.kind == "ipset" else ""
        what = "ipset hash:net, 1 rule" if r.kind == "ipset" else "linear: 1 rule per source"
        table.append((r.variant, what, str(r.size), r.loaded_by, load, f"{r.verified}",
                      f"{r.median:.1f}", f"{1e6 / r.median:.0f}", f"{r.median - base.median:+.1f}",
                      f"{ratio:.2f}x"))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)] if table else [len(h) for h in head]
    line = lambda cols: "  ".join(col.rjust(w) if i in (2, 5, 6, 7, 8, 9) else col.ljust(w)  # noqa: E731
                                  for i, (col, w) in enumerate(zip(cols, widths)))
    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for t in table:
        print(line(t))
    print()
    for (variant, kind), text in ratios.items():
        label = "ipset " if kind == "ipset" else "linear"
        print(f"{variant:6} {label}: cost(large)/cost(small) = {text}")
    print()
    print(f"cost = wall time per new TCP connection ({connections} per run: connect from {SOURCE}, close with RST) "
          f"to {HOST_EXT4}:{PORT} in the sandbox host;")
    print("  every run verified: the accepting rule's packet counter (the exempt set rule, or the linear rule for "
          f"{SOURCE}, which is LAST in the chain) grew by exactly the number of connections")
    for variant, e in extras.items():
        print(f"  {variant}: hostprep apply {e['apply']:.2f} s; after the baseline, container up restored "
              f"hostprep's chain in {e['restore']:.2f} s and status said everything is live; "
              f"listener accepted {e['accepted_by_listener']} connections")
    for msg in log:
        print(f"NOTE {msg}")
    if diag:
        parts = ", ".join(f"{n} entries {s:.2f} s" for n, s in diag)
        (n1, s1), (n2, s2) = diag[0], diag[-1]
        exp = 0.0 if s1 <= 0 else __import__("math").log(s2 / s1) / __import__("math").log(n2 / n1)
        big = max(r.size for r in rows if r.kind == "ipset")
        print(f"NOTE diagnosis: hostprep.envfiles.load_container (pure env-file parse, in this process): {parts}; "
              f"time grows ~n^{exp:.1f}; extrapolated to {big} entries: ~{s2 * (big / n2) ** exp:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("nft", "legacy", "both"), default="both",
                    help="iptables variant to measure (default: both)")
    ap.add_argument("--entries", default="10,100000", help="exempt list sizes in the ipset (default 10,100000)")
    ap.add_argument("--linear", default="10,10000",
                    help="sizes of the linear baseline, one rule per source (default 10,10000)")
    ap.add_argument("--connections", type=int, default=3000, help="new connections per run (default 3000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per size, alternating; medians (default 5)")
    ap.add_argument("--up-timeout", type=float, default=60.0,
                    help="seconds `hostprep container up` may take before it is killed and the benchmark "
                         "loads the set itself (default 60)")
    args = ap.parse_args(argv)
    for key in ("entries", "linear"):
        try:
            sizes = [int(s) for s in getattr(args, key).split(",") if s.strip()]
        except ValueError:
            ap.error(f"--{key}: {getattr(args, key)!r} is not a comma-separated list of integers")
        if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
            ap.error(f"--{key}: give distinct positive integers")
        if max(sizes) - 1 > FILLER_NET.num_addresses:
            ap.error(f"--{key}: at most {FILLER_NET.num_addresses + 1}")
        setattr(args, key, sorted(sizes))
    if args.connections < 1 or args.repeat < 1:
        ap.error("--connections and --repeat: at least 1")
    return args


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (creates network namespaces)", file=sys.stderr)
        return 2
    variants = ["nft", "legacy"] if args.variant == "both" else [args.variant]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    start = time.perf_counter()
    runner = Runner()
    box = Sandbox(name=f"hpxbench{os.getpid()}")
    tmp = Path(tempfile.mkdtemp(prefix="hpxbench-"))
    rows: list[Row] = []
    extras: dict[str, dict] = {}
    log: list[str] = []
    skip_up: set[int] = set()
    diag = None
    try:
        for variant in variants:
            box.create(runner)
            print(f"{variant}: sandbox {', '.join(box.namespaces)}; files under {tmp}", flush=True)
            (tmp / variant / "files").mkdir(parents=True)
            bench = Bench(box, variant, tmp / variant / "root", tmp / variant / "files", args.up_timeout,
                          args.connections, skip_up)
            try:
                extras[variant] = run_variant(bench, args.entries, args.linear, args.repeat)
            finally:
                rows += [bench.rows[k] for k in sorted(bench.rows)]
                log += bench.log
                box.destroy(runner)
        if skip_up:
            diag = parse_diagnosis()
        print()
        print_table(rows, extras, log, diag, args.up_timeout, args.connections)
        return 0
    except BenchError as err:
        print(f"\nBENCH FAILED: {err}", file=sys.stderr)
        if rows:
            print("\nmeasured before the failure:", file=sys.stderr)
            print_table(rows, extras, log, None, args.up_timeout, args.connections)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the sandbox", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        sys.stdout.flush()
        gone = box.destroy(runner)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed namespaces: {', '.join(gone) or 'none (already removed per variant)'}; "
              f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
