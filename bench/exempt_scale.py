#!/usr/bin/env python3
"""Benchmark: accepted-packet cost with 10 vs 65,536 exempt sources (ipset), vs a linear chain.

Issue text: "Exempt lists of any size: use sets (ipset ...) so the cost per
packet does not grow with the list; bench/exempt_scale.py shows accepted-packet
cost with 10 vs 100,000 exempt entries, as a ratio."  Since issue 10 (item 14) a list
holds at most 65,536 entries (``hostprep.model.MAX_LIST_ENTRIES``), so the default large
size is that cap.

How it measures (as root, inside a throwaway sandbox only):

* Sandbox: ``hostprep.sandbox.Sandbox(name="hpxbench<pid>")``, three network
  namespaces created here and deleted by name in a ``finally`` block (also on
  Ctrl-C, SIGTERM, SIGHUP); a fresh one per iptables variant, so nothing of
  one variant (tables, sets, conntrack entries) is left for the next.  State
  roots and env files live in a temporary directory.  The machine's own
  namespace is never touched; packets only flow between the sandbox's
  namespaces.
* hostprep: ``hostprep apply -i eth1 -y --ignore-selinux`` in the sandbox host
  (the machine's SELinux state is not the point, as in ``hostprep sandbox up``),
  then ``hostprep container up finesse --env finesse.env --core core-<N>.env``
  for each size N of ``--entries``, smallest first (TEMPLATE_TYPE=finesse,
  port 8445 on 198.51.100.10), each timed end to end (``ip netns exec`` and
  Python start-up included).  core.env's NGX_RATELIMIT_DISABLE_IPS holds the
  inet peer's address 203.0.113.7 plus filler /32s from 198.18.0.0/15 (RFC 2544
  benchmark range; no packet is ever sent to them) up to N entries.  All are
  IPv4: the container is an IPv4 one and hostprep puts only IPv4 entries into
  its IPv4 set, so the set really holds N members (checked with ``ipset list -t``).
* A ``container up`` that does not finish within ``--up-timeout`` seconds is
  killed and the table says so; that size is then put in place by the
  benchmark instead, with hostprep's own set (name from its model) and its own
  ``ipset restore`` text (``hostprep.plan.ipset_fill_script``, filled into
  NAME-n and swapped in, as hostprep's apply does), so the packet measurement
  stays meaningful.  The pure env-file parse (``hostprep.envfiles.load_container``)
  is then timed in this process at growing sizes, as a diagnosis.  A size that
  timed out on one variant is not retried on the next (the parse does not
  depend on the variant).
* Traffic: a listener on 198.51.100.10:8445 in the sandbox host, in its own
  process on the other CPU (accepts, waits for the client's RST, closes: the
  host never sends a FIN and keeps no TIME_WAIT socket, so a reused client port
  starts a clean connection with exactly one SYN).  From the inet namespace
  this process opens new TCP connections from 203.0.113.7 (connect, then close
  with SO_LINGER 0, an RST).  Every SYN takes INPUT -> HOSTPREP-IN -> FAST ->
  DDOS -> SPOOF -> SSH -> CONTAINERS -> HOSTPREP-C-finesse and is accepted by
  the exempt rule; the rest of each connection takes the ESTABLISHED fast path.
* Cost = the duration of connect(): the SYN's trip through the host's rules,
  the SYN-ACK and the ACK run in softirq inside that call, on this thread
  (pinned to one CPU).  The time of the whole connection (socket() to close())
  is shown too.  Medians of thousands of connections: robust against the
  moments another process has the CPU.
* Noise on a shared 2-core machine moves whole stretches of time (the same
  configuration measured 0.25 s apart gave medians of 30 and 63 µs), so the
  sizes are compared inside the same stretches of time, not one after another:
  - ipset: hostprep's set keeps its name, and the benchmark swaps the other
    size's members in and out with ``ipset swap`` (O(1), atomic; the contents
    are hostprep's, the spare copy is ``hpxbench-spare-<N>``) every ``--block``
    connections, in alternating order;
  - linear baseline (the contrast that shows why sets matter): hostprep's set
    rule is replaced, in place, by one rule per source,
    ``-s X/32 -p tcp -m conntrack --ctorigdstport 8445 -j ACCEPT``, loaded with
    one ``iptables-restore --noflush``; for each size L of ``--linear`` one
    client address of the inet namespace (203.0.113.7, 203.0.113.8, then
    addresses added to the inet namespace) is the L-th rule, so its SYNs walk
    exactly L rules, as if it were last in a chain of L; the connections
    alternate between the addresses one by one.  Default 10 and 10,000 (one
    load of 10,000 rules takes under 1 s; 100,000 linear rules took 12 s (nft) /
    6 s (legacy) to load here and ~4 ms (nft) / ~1 ms (legacy) per connection,
    which ``--linear 10,100000`` measures anyway).
* ``--repeat`` rounds of ``--connections`` connections per size (after a
  warm-up), in blocks of ``--block`` per size.  Reported per size: the median
  connect() over all its connections; the ratio against the smallest size of
  the same kind is the median of the block-by-block ratios (blocks measured
  side by side in time), printed with their quartiles.  Honesty checks after
  every round: the packet counter of the accepting rule (the exempt set rule;
  each address's linear rule) grew by exactly the number of connections made
  from that address, and the set held the size it was measured as.  At the
  end, ``hostprep container up`` puts hostprep's own chain back and
  ``hostprep status`` must say everything desired is live.  There are no timed
  assertions.

Usage (as root, from the repository):
    .venv/bin/python bench/exempt_scale.py [--variant nft|legacy|both] [--entries 10,65536]
        [--linear 10,10000] [--connections 3000] [--repeat 5] [--block 250] [--up-timeout 60]
"""

from __future__ import annotations

import argparse
import ipaddress
import math
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
import time
from contextlib import contextmanager

from _netns import in_netns
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostprep import envfiles  # noqa: E402
from hostprep.model import Container, IpSet, Limits  # noqa: E402
from hostprep.plan import TEMP_SUFFIX, ipset_fill_script, ipset_swap_script  # noqa: E402
from hostprep.observed import parse_save  # noqa: E402
from hostprep.runner import Runner  # noqa: E402
from hostprep.sandbox import EXT, HOST_EXT4, INET_EXTRA4, Sandbox  # noqa: E402

PY = sys.executable
STEP_TIMEOUT = 300.0              # generous per-subprocess timeout (not a timed assertion)
NAME = "finesse"
PORT = 8445
SOURCE = INET_EXTRA4[0]           # 203.0.113.7, an address of the inet namespace, the exempt client
FILLER_NET = ipaddress.ip_network("198.18.0.0/15")   # RFC 2544 benchmark range
CONNECT_TIMEOUT = 3.0             # a dropped SYN would show up as a 1 s retransmission, then this
WARMUP = 300
SPARE = "hpxbench-spare-"         # the benchmark's copies of the other sizes (not hostprep's prefix)


class BenchError(RuntimeError):
    """Something did not behave; the message carries the evidence."""


# --------------------------------------------------------------------------- inputs


def fillers(count: int) -> list[str]:
    base = int(FILLER_NET.network_address)
    return [str(ipaddress.IPv4Address(base + i)) for i in range(count)]


def exempt_list(n: int) -> list[str]:
    """203.0.113.7 first, then n-1 filler /32s from 198.18.0.0/15."""
    return [SOURCE] + fillers(n - 1)


def core_env_text(n: int) -> str:
    return ("# written by bench/exempt_scale.py\nNGX_IPTABLES_HARDENING=1\nNGX_LOAD_BALANCER_IPS=\n"
            "NGX_TRAFFIC_RESTRICTED=false\nNGX_RATELIMIT_DISABLE_IPS=" + "|".join(exempt_list(n)) + "\n")


FINESSE_ENV = f"# written by bench/exempt_scale.py\nTEMPLATE_TYPE=finesse\nNGX_PRXY_FIN_PORT={PORT}\n"


def model_container() -> Container:
    """Only for the names hostprep derives (chain, set); the limits do not matter here."""
    return Container(NAME, "finesse", (PORT,), ipaddress.ip_address(HOST_EXT4), Limits(10, 6, 8, 1, 1))


def linear_sources(count: int) -> list[str]:
    """Client addresses for the linear sizes: 203.0.113.7, .8 (the sandbox has them), then .9, .10 ..."""
    out = list(INET_EXTRA4) + [f"203.0.113.{i}" for i in range(9, 9 + max(0, count - len(INET_EXTRA4)))]
    return out[:count]


# --------------------------------------------------------------------------- namespaces, CPUs




def cpus() -> tuple[int | None, int | None]:
    """(CPU for the connecting loop, CPU for the listener); None, None on a single CPU."""
    mine = sorted(os.sched_getaffinity(0))
    return (mine[0], mine[1]) if len(mine) >= 2 else (None, None)


@contextmanager
def pinned(cpu: int | None):
    """This thread on one CPU for the duration (the SYN's softirq work runs on it too)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


LISTENER_CODE = r"""
import os, socket, sys, threading
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(4096)
accepted = 0
def watch():
    sys.stdin.read()                      # EOF: the benchmark is done (or gone)
    print(accepted, flush=True)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    # Wait for the client's RST before closing: the host then never sends a FIN,
    # so it keeps no TIME_WAIT socket, and a client port reused later starts a
    # clean connection (exactly one SYN each; a SYN that meets a TIME_WAIT socket
    # is answered with an ACK and sent again, and the counter check would fail).
    conn.settimeout(timeout)
    try:
        conn.recv(1)
    except OSError:
        pass
    conn.close()
    accepted += 1
"""


class Listener:
    """A TCP listener on 198.51.100.10:8445 in the sandbox host, in its own process.

    Its own process, not a thread of this one: a thread would compete for the
    GIL with the connecting loop and add jitter to the connect() calls it times.
    Pinned to another CPU than the connecting loop (when there are two): woken
    on the same CPU it would preempt the loop inside some connect() calls.
    """

    def __init__(self, ns: str, cpu: int | None) -> None:
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", LISTENER_CODE, HOST_EXT4, str(PORT),
                                      str(CONNECT_TIMEOUT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=pin)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise BenchError(f"the listener in {ns} did not start: {line!r} {err[-1000:]}")
        self.accepted: int | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                out, _ = self.proc.communicate(input="", timeout=10)
                self.accepted = int(out.split()[-1]) if out.split() else None
            except (subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.communicate()


_LINGER0 = struct.pack("ii", 1, 0)


@dataclass
class Samples:
    """Per-connection durations of one size in one round (seconds)."""

    connect: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)

    def extend(self, other: "Samples") -> None:
        self.connect += other.connect
        self.whole += other.whole


def drive(ns: str, sources: list[str], cpu: int | None) -> tuple[dict[str, Samples], list[str]]:
    """One new connection to the listener from each address of ``sources``, in that order.

    Returns, per source address, the duration of each connect() (SYN out,
    through the host's rules, SYN-ACK back, ACK out: the softirq work runs
    inside the call on this thread) and of the whole connection (socket() to
    close()); and the connections that took over 0.5 s (a SYN retransmission).
    """
    out = {src: Samples() for src in set(sources)}
    slow: list[str] = []
    clock = time.perf_counter
    with in_netns(ns), pinned(cpu):
        for i, src in enumerate(sources):
            t0 = clock()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                s.settimeout(CONNECT_TIMEOUT)
                s.bind((src, 0))
                t1 = clock()
                s.connect((HOST_EXT4, PORT))
                d = clock() - t1
                if d > 0.5:
                    slow.append(f"#{i + 1} from {src} port {s.getsockname()[1]} {d:.2f} s")
            except OSError as err:
                raise BenchError(f"connection {i + 1} of {len(sources)} from {src} to {HOST_EXT4}:{PORT} "
                                 f"failed: {err}") from None
            finally:
                s.close()
            t2 = clock()
            out[src].connect.append(d)
            out[src].whole.append(t2 - t0)
    return out, slow


def us(values: list[float]) -> float:
    return statistics.median(values) * 1e6


# --------------------------------------------------------------------------- bench


@dataclass
class Row:
    variant: str
    kind: str                  # "ipset" or "linear"
    size: int
    loaded_by: str = ""
    load_s: float | None = None                              # container up / iptables-restore, seconds
    note: str = ""                                           # why container up did not put it in place
    samples: Samples = field(default_factory=Samples)        # every measured connection
    blocks: list[tuple[float, float]] = field(default_factory=list)   # per block: median connect, whole (s)
    rounds: int = 0

    @property
    def connect(self) -> float:
        return us(self.samples.connect)

    @property
    def whole(self) -> float:
        return us(self.samples.whole)

    def ratios(self, base: "Row", which: int) -> list[float]:
        """Block by block against ``base``: the blocks were measured side by side in time."""
        return [mine[which] / theirs[which] for mine, theirs in zip(self.blocks, base.blocks)]


@dataclass
class Bench:
    box: Sandbox
    variant: str
    root: Path
    files: Path
    up_timeout: float
    connections: int
    block: int
    skip_up: dict[int, str]    # size -> variant where its container up timed out (not retried)
    rows: dict[tuple[str, int], Row] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    driven: int = 0            # connections made in this variant (warm-ups included)
    container: Container = field(default_factory=model_container)
    cpu: int | None = None

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
                f"HOSTPREP_BACKEND=iptables-{self.variant}", f"PYTHONPATH={REPO}", PY, "-m", "hostprep", *args]

    def hostprep(self, *args: str, timeout: float | None = STEP_TIMEOUT) -> tuple[float, str] | None:
        """Run hostprep in the sandbox host; (seconds, output), or None when killed at ``timeout``."""
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

    def container_up(self, n: int, timeout: float | None = STEP_TIMEOUT) -> tuple[float, str] | None:
        # -y: every larger list adds exempt entries, which widens access (issue 10 item 7)
        return self.hostprep("container", "up", NAME, "-y", "--env", str(self.files / "finesse.env"),
                             "--core", str(self.files / f"core-{n}.env"), timeout=timeout)

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

    def set_rule_packets(self) -> int:
        rules = [r for r in self.chain_rules() if "--match-set" in r.spec and " exempt" in r.spec]
        if len(rules) != 1:
            raise BenchError(f"{self.container.chain}: expected one exempt set rule, found {len(rules)}")
        return rules[0].counter.packets

    def linear_packets(self) -> dict[str, int]:
        return {r.spec.split()[1].split("/")[0]: r.counter.packets for r in self.chain_rules()
                if r.spec.startswith("-s 203.0.113.")}

    def connect_all(self, sources: list[str]) -> dict[str, Samples]:
        samples, slow = drive(self.box.inet, sources, self.cpu)
        self.driven += len(sources)
        if slow:
            self.log.append(f"{self.variant}: connections over 0.5 s (SYN sent again): {', '.join(slow[:5])}")
        return samples

    # -- ipset: hostprep's set, the sizes swapped in and out ----------------------------------
    def ipset_phase(self, entries: list[int], repeat: int) -> None:
        name = self.container.set_name("ex")
        for n in entries:                                   # smallest first: it creates the set and rules
            row = self.row("ipset", n)
            if n in self.skip_up:
                row.note = f"container up not retried: killed at {self.up_timeout:.0f} s on {self.skip_up[n]}"
            else:
                res = self.container_up(n, timeout=self.up_timeout or None)
                if res is not None:
                    row.load_s, row.loaded_by = res[0], "hostprep container up"
                    print(f"    {self.variant:6} container up with {n} exempt entries: {res[0]:.2f} s", flush=True)
                else:
                    self.skip_up[n] = self.variant
                    row.note = f"container up killed at {self.up_timeout:.0f} s"
                    self.log.append(f"{self.variant}: `hostprep container up` with {n} exempt entries did not "
                                    f"finish within {self.up_timeout:.0f} s: killed; the benchmark loads this "
                                    "size itself (hostprep's set name, type and ipset restore text)")
                    print(f"    {self.log[-1]}", flush=True)
            if not row.loaded_by:
                if self.set_entries(name) is None:
                    raise BenchError(f"ipset {name} does not exist: the smallest size must come up through hostprep")
                s = IpSet(name, 4, tuple(sorted({ipaddress.ip_network(a) for a in exempt_list(n)}, key=str)))
                script = ipset_fill_script((s,), TEMP_SUFFIX) + ipset_swap_script((s,)) + \
                    f"destroy {name}{TEMP_SUFFIX}\n"
                t0 = time.perf_counter()
                self.ns(["ipset", "restore"], input=script)
                row.load_s, row.loaded_by = time.perf_counter() - t0, "bench: ipset restore+swap"
            got = self.set_entries(name)
            if got != n:
                raise BenchError(f"{row.loaded_by} with {n} exempt entries: ipset {name} holds {got}")
        # Spare copies of the other sizes, same type and members as hostprep would make them.
        live = entries[-1]
        holder: dict[int, str] = {live: name}
        for n in entries[:-1]:
            spare = f"{SPARE}{n}"
            s = IpSet(name, 4, tuple(sorted({ipaddress.ip_network(a) for a in exempt_list(n)}, key=str)))
            self.ns(["ipset", "restore"], input=ipset_fill_script((s,)).replace(name, spare))
            holder[n] = spare

        def make_live(n: int) -> None:
            nonlocal live
            if n != live:
                other = holder[n]
                self.ns(["ipset", "swap", name, other])
                holder[n], holder[live] = name, other
                live = n

        self.connect_all([SOURCE] * WARMUP)
        for rnd in range(repeat):
            before = self.set_rule_packets()
            made = 0
            for b, start in enumerate(range(0, self.connections, self.block)):
                count = min(self.block, self.connections - start)
                got: dict[int, Samples] = {}
                # ABBA: the order turns at every block, so neither size always goes first.
                for n in (entries if (rnd + b) % 2 == 0 else list(reversed(entries))):
                    make_live(n)
                    got[n] = self.connect_all([SOURCE] * count)[SOURCE]
                    made += count
                    if b == 0 and self.set_entries(name) != n:
                        raise BenchError(f"ipset {name} does not hold {n} members after the swap")
                self.add_block("ipset", got)
            counted = self.set_rule_packets() - before
            if counted != made:
                raise BenchError(self.counter_evidence(f"round {rnd + 1}: the exempt set rule counted {counted} "
                                                       f"packets for {made} connections"))
            self.report_round("ipset", rnd, entries)
        for n, holder_name in holder.items():
            if holder_name != name:
                self.ns(["ipset", "destroy", holder_name])

    # -- linear baseline: one rule per source, in place of the set rule -----------------------
    def linear_phase(self, sizes: list[int], repeat: int) -> dict[int, str]:
        chain = self.container.chain
        srcs = dict(zip(sizes, linear_sources(len(sizes))))
        for src in list(srcs.values())[len(INET_EXTRA4):]:
            with in_netns(self.box.inet):
                subprocess.run(["ip", "addr", "add", f"{src}/32", "dev", "eth0"], check=True, timeout=30)
        # Rule k (1-based) is the source of the size k, a filler otherwise.
        rules: list[str] = fillers(max(sizes))
        for n, src in srcs.items():
            rules[n - 1] = src
        live = self.ns([self.ipt("save"), "-t", "filter"]).stdout
        lines = [ln for ln in live.splitlines() if ln.startswith(f"-A {chain} ")]
        set_lines = [i for i, ln in enumerate(lines) if "--match-set" in ln and " exempt" in ln]
        if len(set_lines) != 1:
            raise BenchError(f"{chain}: cannot find the exempt set rule to replace:\n" + "\n".join(lines))
        where = set_lines[0]
        match = f"-p tcp -m conntrack --ctorigdstport {PORT}"
        mine = [f"-A {chain} -s {a}/32 {match} -j ACCEPT" for a in rules]
        text = "*filter\n" + f":{chain} - [0:0]\n" + "\n".join(lines[:where] + mine + lines[where + 1:]) + \
            "\nCOMMIT\n"
        t0 = time.perf_counter()
        self.ns([self.ipt("restore"), "--noflush"], input=text)
        load = time.perf_counter() - t0
        after = [r for r in self.chain_rules() if r.spec.startswith("-s ")]
        for n, src in srcs.items():
            if len(after) < n or not after[n - 1].spec.startswith(f"-s {src}/32 "):
                raise BenchError(f"{chain}: rule {n} is not the one for {src} after loading {len(rules)} rules")
            row = self.row("linear", n)
            row.load_s, row.loaded_by = load, f"bench: iptables-restore ({len(rules)} rules)"
        if len(after) != len(rules):
            raise BenchError(f"{chain}: {len(after)} linear rules live, {len(rules)} loaded")
        self.connect_all(list(srcs.values()) * (WARMUP // len(srcs)))
        for rnd in range(repeat):
            seq = list(srcs.values()) if rnd % 2 == 0 else list(reversed(srcs.values()))
            before = self.linear_packets()
            for start in range(0, self.connections, self.block):
                got = self.connect_all(seq * min(self.block, self.connections - start))
                self.add_block("linear", {n: got[src] for n, src in srcs.items()})
            after_p = self.linear_packets()
            for n, src in srcs.items():
                counted = after_p.get(src, 0) - before.get(src, 0)
                if counted != self.connections:
                    raise BenchError(self.counter_evidence(f"round {rnd + 1}: the linear rule for {src} counted "
                                                           f"{counted} packets for {self.connections} connections"))
            self.report_round("linear", rnd, sizes)
        return srcs

    def add_block(self, kind: str, got: dict[int, Samples]) -> None:
        for n, smp in got.items():
            row = self.row(kind, n)
            row.samples.extend(smp)
            row.blocks.append((statistics.median(smp.connect), statistics.median(smp.whole)))

    def report_round(self, kind: str, rnd: int, sizes: list[int]) -> None:
        rows = [self.row(kind, n) for n in sizes]
        per_round = len(rows[0].blocks) // (rnd + 1)
        parts = []
        for row in rows:
            row.rounds = rnd + 1
            recent = row.blocks[-per_round:]
            parts.append(f"{row.size}: {statistics.median(b[0] for b in recent) * 1e6:6.1f}")
        ratio = statistics.median(rows[-1].ratios(rows[0], 0)[-per_round:])
        print(f"    {self.variant:6} {kind:6} round {rnd + 1}: connect µs (median of blocks) " + ", ".join(parts)
              + f"; ratio {ratio:.2f}x (paired blocks); counters == connections", flush=True)

    def counter_evidence(self, head: str) -> str:
        rules = "\n".join(f"  [{r.counter.packets}] {r.spec[:150]}" for r in self.chain_rules()
                          if not r.spec.startswith("-s 198.18."))
        nstat = self.ns(["nstat", "-a"], check=False).stdout
        return f"{self.variant}: {head}; chain now:\n{rules}\nhost nstat:\n{nstat}"


def run_variant(bench: Bench, entries: list[int], linear: list[int], repeat: int) -> dict:
    extra: dict = {}
    # The sandbox is not a proxy host: the machine's SELinux state is not the point
    # here (as in `hostprep sandbox up`).
    res = bench.hostprep("apply", "-i", EXT, "-y", "--ignore-selinux")
    extra["apply"] = res[0]
    (bench.files / "finesse.env").write_text(FINESSE_ENV)
    for n in entries:
        (bench.files / f"core-{n}.env").write_text(core_env_text(n))
    bench.cpu, listener_cpu = cpus()
    listener = Listener(bench.box.host, listener_cpu)
    try:
        bench.ipset_phase(entries, repeat)
        extra["linear_sources"] = bench.linear_phase(linear, repeat)
        # hostprep puts its own chain (and set) back, and says everything is live.
        t = bench.container_up(entries[0])
        st = bench.hostprep("status")
        if "everything desired is live" not in st[1]:
            raise BenchError(f"after the linear baseline, `container up` + `status` do not report everything "
                             f"live:\n{st[1][-3000:]}")
        extra["restore"] = t[0]
    finally:
        listener.stop()
    extra["accepted_by_listener"] = listener.accepted
    extra["driven"] = bench.driven
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


def quartiles(values: list[float]) -> str:
    if len(values) < 4:
        return "-"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def print_table(rows: list[Row], extras: dict[str, dict], log: list[str], diag: list[tuple[int, float]] | None,
                args: argparse.Namespace) -> None:
    head = ("variant", "exempt list", "entries", "put in place by", "load s", "conns", "connect µs", "Δ µs",
            "ratio", "(p25-p75)", "whole conn µs", "ratio")
    table = []
    ratios: list[str] = []
    for r in rows:
        if not r.blocks:
            continue
        base = next(x for x in rows if x.variant == r.variant and x.kind == r.kind and x.blocks)
        rs, ws = r.ratios(base, 0), r.ratios(base, 1)
        ratio, wratio = statistics.median(rs), statistics.median(ws)
        if r is not base:
            label = "ipset " if r.kind == "ipset" else "linear"
            ratios.append(f"{r.variant:6} {label}: cost({r.size})/cost({base.size}) = {ratio:.2f}x "
                          f"(connect; whole connection {wratio:.2f}x)")
        by = r.loaded_by + (f" ({r.note})" if r.note else "")
        what = "ipset, 1 rule" if r.kind == "ipset" else "linear, 1 rule/source"
        size = str(r.size) if r.kind == "ipset" else f"{r.size}th rule"
        table.append((r.variant, what, size, by, "-" if r.load_s is None else f"{r.load_s:.2f}",
                      str(len(r.samples.connect)), f"{r.connect:.1f}", f"{r.connect - base.connect:+.1f}",
                      f"{ratio:.2f}x", quartiles(rs) if r is not base else "", f"{r.whole:.1f}", f"{wratio:.2f}x"))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)] if table else [len(h) for h in head]
    line = lambda cols: "  ".join(col.ljust(w) if i in (0, 1, 3) else col.rjust(w)  # noqa: E731
                                  for i, (col, w) in enumerate(zip(cols, widths)))
    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for t in table:
        print(line(t))
    print()
    for text in ratios:
        print(text)
    print()
    print(f"connect µs = median duration of connect() to {HOST_EXT4}:{PORT} over all the connections of the row (the SYN "
          "through the host's rules to the accepting rule, SYN-ACK, ACK);")
    print("  whole conn µs = the same for socket() .. close(); Δ against the smallest size of the same kind;")
    print(f"  ratio = median over blocks of {args.block} connections measured side by side in time (their quartiles in "
          "brackets), against the smallest size of the same kind")
    print(f"ipset rows: from {SOURCE}, hostprep's exempt set rule; the sizes swapped in and out of hostprep's set "
          f"(ipset swap), a block each in turn, ABBA order; {args.repeat} rounds of {args.connections} connections "
          "per size")
    for variant, e in extras.items():
        srcs = ", ".join(f"{src} is rule {n}" for n, src in e["linear_sources"].items())
        print(f"linear rows ({variant}): one chain in place of the set rule, {srcs}; connections alternate between "
              "these addresses one by one")
    print("every round verified: the accepting rule's packet counter grew by exactly the connections made from "
          "its address (one SYN each), and the set held the size measured")
    for variant, e in extras.items():
        print(f"{variant}: hostprep apply {e['apply']:.2f} s; after the baseline, container up restored hostprep's "
              f"chain and set in {e['restore']:.2f} s and status said everything desired is live; the listener "
              f"accepted {e['accepted_by_listener']} of the {e['driven']} connections made")
    for msg in log:
        print(f"NOTE {msg}")
    if diag:
        parts = ", ".join(f"{n} entries {s:.2f} s" for n, s in diag)
        (n1, s1), (n2, s2) = diag[0], diag[-1]
        exp = math.log(s2 / s1) / math.log(n2 / n1) if s1 > 0 and s2 > 0 else float("nan")
        big = max(r.size for r in rows if r.kind == "ipset")
        print(f"NOTE diagnosis: hostprep.envfiles.load_container alone (the env-file parse, pure, run in this "
              f"process): {parts}; time grows ~n^{exp:.1f}; at n^2 from {n2} entries, {big} entries would take "
              f"~{s2 * (big / n2) ** 2:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("nft", "legacy", "both"), default="both",
                    help="iptables variant to measure (default: both)")
    ap.add_argument("--entries", default="10,65536", help="exempt list sizes in the ipset (default 10,65536, "
                    "65,536 being the most an env-file list may hold)")
    ap.add_argument("--linear", default="10,10000",
                    help="sizes of the linear baseline, one rule per source (default 10,10000)")
    ap.add_argument("--connections", type=int, default=3000,
                    help="connections per size per round (default 3000)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds (counters checked after each, ABBA order turns) (default 5)")
    ap.add_argument("--block", type=int, default=250,
                    help="connections per size in one block; a ratio is taken per block pair (default 250)")
    ap.add_argument("--up-timeout", type=float, default=60.0,
                    help="seconds `hostprep container up` may take before it is killed and the benchmark "
                         "loads the set itself; 0: wait as long as it takes (default 60)")
    args = ap.parse_args(argv)
    for key in ("entries", "linear"):
        try:
            sizes = [int(s) for s in getattr(args, key).split(",") if s.strip()]
        except ValueError:
            ap.error(f"--{key}: {getattr(args, key)!r} is not a comma-separated list of integers")
        if len(sizes) < 2 or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
            ap.error(f"--{key}: give at least two distinct positive integers")
        if max(sizes) - 1 > FILLER_NET.num_addresses:
            ap.error(f"--{key}: at most {FILLER_NET.num_addresses + 1}")
        setattr(args, key, sorted(sizes))
    if len(args.linear) > 200:
        ap.error("--linear: at most 200 sizes (one client address each)")
    if args.connections < 1 or args.repeat < 1 or args.block < 1:
        ap.error("--connections, --repeat and --block: at least 1")
    if args.up_timeout < 0:
        ap.error("--up-timeout: 0 or more")
    return args


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (creates network namespaces)", file=sys.stderr)
        return 2
    variants = ["nft", "legacy"] if args.variant == "both" else [args.variant]
    # Explicitly, SIGINT too: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    start = time.perf_counter()
    runner = Runner()
    box = Sandbox(name=f"hpxbench{os.getpid()}")
    tmp = Path(tempfile.mkdtemp(prefix="hpxbench-"))
    rows: list[Row] = []
    extras: dict[str, dict] = {}
    log: list[str] = []
    skip_up: dict[int, str] = {}
    try:
        for variant in variants:
            box.create(runner)
            print(f"{variant}: sandbox {', '.join(box.namespaces)}; files under {tmp}", flush=True)
            (tmp / variant / "files").mkdir(parents=True)
            bench = Bench(box, variant, tmp / variant / "root", tmp / variant / "files", args.up_timeout,
                          args.connections, args.block, skip_up)
            try:
                extras[variant] = run_variant(bench, args.entries, args.linear, args.repeat)
            finally:
                rows += [bench.rows[k] for k in sorted(bench.rows)]
                log += bench.log
                box.destroy(runner)
        diag = parse_diagnosis() if skip_up else None
        print()
        print_table(rows, extras, log, diag, args)
        return 0
    except BenchError as err:
        print(f"\nBENCH FAILED: {err}", file=sys.stderr)
        if any(r.blocks for r in rows):
            print("\nmeasured before the failure:", file=sys.stderr)
            print_table(rows, extras, log, None, args)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the sandbox", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)         # let the clean-up finish
        sys.stdout.flush()
        gone = box.destroy(runner)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed namespaces: {', '.join(gone) or 'none left (each variant removed its own)'}; "
              f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
