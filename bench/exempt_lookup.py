#!/usr/bin/env python3
"""Benchmark: the kernel's cost per packet of an exempt-list lookup at 10 vs 100,000 entries,
native nft (hash set of the addresses) vs iptables-nft and iptables-legacy (ipset hash:net), one run.

Issue 13 item 6: "per-packet cost of an exempt lookup at 10 vs 100,000 entries", goal
"flat from 10 to 100,000 entries (ratio <= 1.1)".

How it measures (as root, inside throwaway namespaces only):

* Per backend a fresh ``hostprep.sandbox.Sandbox("hpxlk<pid>")`` (deleted by name in a
  ``finally`` block, also on Ctrl-C/SIGTERM/SIGHUP) and a temporary ``HOSTPREP_ROOT``.  In the
  sandbox host: ``hostprep apply -i eth1 -y --ignore-selinux``, then ``hostprep container up
  finesse`` with the smallest exempt list (hostprep's own set and rule), limits at the most an
  env file allows (IPTABLES_CONNECTION_LIMIT_ABOVE=65535, IPTABLES_HASH_LIMIT_UPTO=1000,
  IPTABLES_HASH_LIMIT_BURST=10000) so that every packet that misses the set takes the same
  path (connlimit, then "within rate": accepted), whatever the limiter's state.  ``hostprep
  status`` must say everything desired is live before the bench touches anything.
* The larger lists (100,000 is above the 65,536 one env-file list may hold, so ``container
  up`` refuses it) are loaded by the bench into a set of its own in the sandbox host, with
  hostprep's declaration: for nft the same ``type``/``flags`` as hostprep's set, declared in
  hostprep's table with its elements as hostprep's script does (``set NAME { type ...;
  elements = { ... } }``; /32s only, so hostprep's NAME.addr hash set: render.nft_set_parts), for
  ipset hostprep's own ``ipset restore`` text (``hostprep.plan.ipset_fill_script``).  Members are
  distinct, never adjacent /32s spread over 100.64.0.0/10 (RFC 6598 shared address space:
  not routed on the internet, not in hostprep's spoof list; no packet is sent to them), so
  nothing merges and the set really holds N entries (read back and checked).
* Configurations, switched in place of hostprep's exempt rule in the container chain (one
  ``nft -f`` / ``iptables-restore --noflush`` each, the rest of hostprep's rules untouched):
  ``set N`` hostprep's rule pointing at the N-entry set (the smallest is hostprep's own
  set); ``none`` no exempt rule at all; ``linear L`` (the contrast that shows the method sees a
  per-packet cost when there is one) L rules of one source each, walked by every miss; and
  ``floor``: the bench's own ingress drop on eth1, before hostprep, conntrack and routing
  (what sending and the veth cost); on native also ``interval N``: the same /32 members in a
  set with ``flags interval`` (the contrast: hostprep's declaration before the lists were split
  into NAME.addr and NAME.net, an rbtree lookup that grows with the list).
* Traffic: ``bench/lookup_sender.c`` (compiled here) in the sandbox's internet namespace
  sends SYNs to 198.51.100.10:8445 with an AF_PACKET socket, at most ``--rate`` packets/s,
  ``--packets`` per block.  "hit": from the members of the set measured (all of them up to
  ``--sources``, else ``--sources`` spread evenly over it); "miss": ``--sources`` addresses of
  the same range that no set holds.  Every SYN is NEW for conntrack, walks hostprep's base
  hardening to the container chain and its exempt lookup; what hostprep accepts the bench
  drops at priority 50 of the input hook (``-t security`` / an nft chain), before conntrack
  confirms it: no entry, no reply, the same fate in every configuration.  The address of the
  container is taken out of hostprep's SYN-cookie set (netdev ingress) for the bench: above
  200 SYN/s the ingress hook sends every SYN to SYN cookies, and none would reach the
  exempt set.
* Cost = CPU time of the sending thread per packet (CLOCK_THREAD_CPUTIME_ID): on a veth pair
  the receiver's whole path runs in softirq inside sendmmsg() on that CPU, and this kernel
  (no CONFIG_IRQ_TIME_ACCOUNTING) charges it to the thread; time other processes take on
  the CPU is not charged.  "receiver" = cost - floor of the same round.  ksoftirqd's CPU time
  on the sending CPU is read per block: work deferred there is not charged to the sender,
  and the report prints how much there was.
* ``--rounds`` rounds; in each, every configuration once (order rotated and reversed
  round by round), a warm-up then a measured block per kind.  Reported: medians over
  rounds; ratios taken round by round (measured side by side in time), median and quartiles.
  Honesty checks: after every block, the bench's drop after hostprep counted exactly the
  packets sent (each went through hostprep's rules and was accepted; the floor: none got
  there, its own drop counted them all); after every configuration, the exempt rule counted
  exactly the hits sent since the switch (0 for misses and without a set), the linear rules 0.
  No timed assertions: the bench prints ratios.
* On native, ``nft list`` of hostprep's table reads every element of its sets (seconds with
  100,000), so the switch lists nothing: the rules in the exempt rule's place are deleted and
  inserted by handle, the new handles taken from ``nft -e -a``.

    sudo .venv/bin/python bench/exempt_lookup.py [--backends native,iptables-nft,iptables-legacy]
        [--entries 10,100000] [--linear 100] [--sources 1000] [--packets 20000] [--rounds 9]
        [--rate 50000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostprep.model import IpSet  # noqa: E402
from hostprep.plan import ipset_fill_script  # noqa: E402
from hostprep.runner import Runner  # noqa: E402
from hostprep.sandbox import EXT, HOST_EXT4, Sandbox  # noqa: E402

PY = sys.executable
PORT = 8445
SPACE = ipaddress.ip_network("100.64.0.0/10")        # RFC 6598: members (even) and misses (odd)
STEP_TIMEOUT = 600.0
BACKENDS = ("native", "iptables-nft", "iptables-legacy")
ENV_BACKEND = {"native": "nft", "iptables-nft": "iptables-nft", "iptables-legacy": "iptables-legacy"}
EXEMPT_COMMENT = "hostprep containers: finesse exempt"
LINEAR_COMMENT = "hpbench linear"
BENCH_TABLE = "hpxlk"                                  # the bench's own nft tables (floor, end drop)


class BenchError(RuntimeError):
    """Something did not behave; the message carries the evidence."""


def addr(offset: int) -> str:
    return str(SPACE.network_address + offset)


@dataclass(frozen=True)
class Lists:
    """Set members per size and the senders' source lists (deterministic from the seed)."""

    members: dict[int, list[str]]
    hits: dict[int, list[str]]
    misses: list[str]
    linear: list[str]

    @classmethod
    def make(cls, sizes: list[int], sources: int, linear: int, seed: int) -> "Lists":
        rng = random.Random(seed)
        half = SPACE.num_addresses // 2
        picked = rng.sample(range(half), max(sizes) + linear)
        members = {n: [addr(2 * k) for k in picked[:n]] for n in sizes}
        hits = {}
        for n, ms in members.items():
            ordered = sorted(ms, key=lambda a: int(ipaddress.ip_address(a)))
            hits[n] = ordered if n <= sources else [ordered[i * n // sources] for i in range(sources)]
            rng.shuffle(hits[n])
        misses = [addr(2 * k + 1) for k in rng.sample(range(half), sources)]
        return cls(members, hits, misses, [addr(2 * k) for k in picked[max(sizes):]])


# --------------------------------------------------------------------------- the sandbox host


@dataclass
class Host:
    box: Sandbox
    backend: str
    root: Path
    files: Path

    def ns(self, argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["ip", "netns", "exec", self.box.host, *argv], input=input, capture_output=True,
                             text=True, timeout=STEP_TIMEOUT)
        if check and res.returncode != 0:
            raise BenchError(f"{' '.join(argv[:6])} failed (exit {res.returncode}) on {self.backend}:\n"
                             f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return res

    def hostprep(self, *args: str) -> tuple[float, str]:
        argv = ["env", f"HOSTPREP_ROOT={self.root}", f"HOSTPREP_BACKEND={ENV_BACKEND[self.backend]}",
                f"PYTHONPATH={REPO}", PY, "-m", "hostprep", *args]
        t0 = time.perf_counter()
        res = self.ns(argv, check=False)
        if res.returncode != 0:
            raise BenchError(f"hostprep {' '.join(args[:3])} failed (exit {res.returncode}) on {self.backend}:\n"
                             f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return time.perf_counter() - t0, res.stdout + res.stderr

    def nft(self, script: str) -> None:
        self.ns(["nft", "-f", "-"], input=script)

    def nft_json(self, *what: str) -> list[dict]:
        return json.loads(self.ns(["nft", "-j", "list", *what]).stdout)["nftables"]

    # -- shared by every backend: the bench's instruments -------------------------------------
    def take_out_of_cookies(self) -> str:
        """Remove the container's address.port from hostprep's SYN-cookie set, if there is one."""
        res = self.ns(["nft", "-j", "list", "set", "netdev", "hostprep", "cookie4"], check=False)
        if res.returncode != 0:
            return "no SYN-cookie set (netdev hostprep cookie4) on this backend"
        elem = f"{HOST_EXT4} . {PORT}"
        self.nft(f"delete element netdev hostprep cookie4 {{ {elem} }}\n")
        return f"{elem} taken out of netdev hostprep cookie4 (SYNs stay tracked and reach the exempt set)"

    def floor(self, on: bool) -> None:
        if on:
            self.nft(f"table netdev {BENCH_TABLE} {{\n chain floor {{\n"
                     f"  type filter hook ingress device \"{EXT}\" priority -1000; policy accept;\n"
                     f"  ip daddr {HOST_EXT4} tcp dport {PORT} counter drop\n }}\n}}\n")
        else:
            self.nft(f"delete table netdev {BENCH_TABLE}\n")

    def floor_packets(self) -> int:
        res = self.ns(["nft", "-j", "list", "chain", "netdev", BENCH_TABLE, "floor"], check=False)
        if res.returncode != 0:
            return 0
        return sum(counter_of(o["rule"]) for o in json.loads(res.stdout)["nftables"] if "rule" in o)


def counter_of(rule: dict) -> int:
    return sum(int(e["counter"]["packets"]) for e in rule.get("expr", []) if isinstance(e.get("counter"), dict))


@dataclass
class Counts:
    end: int             # the bench's drop after hostprep accepted (input hook, priority 50)
    floor: int           # the bench's ingress drop


class Native:
    """hostprep's inet table: the exempt rule is swapped by handle, one `nft -f` per change."""

    def __init__(self, host: Host) -> None:
        self.h = host
        self.chain = ""
        self.rule = ""           # hostprep's exempt rule, re-addable text
        self.set = ""            # hostprep's set name
        self.current: list[int] = []  # handles of the rules now in the exempt rule's place
        self.after = 0                # handle of the rule after it (never touched)
        self.sets: dict[int, str] = {}
        self.intervals: dict[int, str] = {}  # the same /32 members in a set with `flags interval`

    def prepare(self, lists: Lists, sizes: list[int]) -> list[str]:
        table = self.h.nft_json("table", "inet", "hostprep")
        for o in table:
            if "rule" in o and o["rule"].get("comment") == EXEMPT_COMMENT and o["rule"]["chain"].endswith("-v4"):
                self.chain = o["rule"]["chain"]
        if not self.chain:
            raise BenchError("native: no IPv4 rule commented '" + EXEMPT_COMMENT + "' in inet hostprep")
        rules = [o["rule"] for o in table if "rule" in o and o["rule"]["chain"] == self.chain]
        at = next(i for i, r in enumerate(rules) if r.get("comment") == EXEMPT_COMMENT)
        if sum(r.get("comment") == EXEMPT_COMMENT for r in rules) != 1:
            raise BenchError("native: more than one exempt rule in " + self.chain + " (hostprep's list "
                             "has networks too: NAME.net); the bench's small list must be /32s only")
        self.current, self.after = [rules[at]["handle"]], rules[at + 1]["handle"]
        # The exempt rule as text (nft 1.0.6 cannot read back some of hostprep's other rules as it
        # lists them, "tcp flags syn / fin,syn,rst,ack"; they are never touched).
        listed = self.h.ns(["nft", "-a", "list", "chain", "inet", "hostprep", self.chain]).stdout
        line = next(ln for ln in listed.splitlines() if ln.rstrip().endswith(f"# handle {self.current[0]}"))
        self.rule = re.sub(r"counter packets \d+ bytes \d+", "counter", line.split(" # handle ")[0].strip())
        self.set = re.search(r"@(\S+)", self.rule).group(1)
        decl = next(o["set"] for o in table if "set" in o and o["set"]["name"] == self.set)
        flags = ", ".join(decl.get("flags", []))
        notes = [f"hostprep's set {self.set}: type {decl['type']}, flags {flags or '-'}"]
        self.sets[sizes[0]] = self.set
        for n in sizes[1:]:
            name = f"hpbench-{n}"
            t0 = time.perf_counter()
            self.declare(name, decl["type"], flags, lists.members[n])
            notes.append(f"bench set {name}: {n:,} entries loaded in {time.perf_counter() - t0:.1f} s (nft -f, "
                         "declared as hostprep declares its sets)")
            self.sets[n] = name
        for n in sizes:
            name = f"hpbench-interval-{n}"
            self.declare(name, decl["type"], "interval", lists.members[n])
            self.intervals[n] = name
        for n, name in list(self.sets.items()) + list(self.intervals.items()):
            got = self.entries(name)
            if got != n:
                raise BenchError(f"native: set {name} holds {got} entries, not {n}")
        self.h.nft(f"table inet {BENCH_TABLE} {{\n chain end {{\n  type filter hook input priority 50; policy accept;\n"
                   f"  iifname \"{EXT}\" ip daddr {HOST_EXT4} tcp dport {PORT} counter drop\n }}\n}}\n")
        return notes

    def declare(self, name: str, type_: str, flags: str, members: list[str]) -> None:
        """A set in hostprep's table, declared with its elements the way rules/hostprep.nft.j2 does."""
        self.h.nft(f"table inet hostprep {{\n\tset {name} {{\n\t\ttype {type_}\n"
                   + (f"\t\tflags {flags}\n" if flags else "")
                   + f"\t\telements = {{ {', '.join(members)} }}\n\t}}\n}}\n")

    def entries(self, name: str) -> int:
        obj = self.h.nft_json("set", "inet", "hostprep", name)
        return sum(len(o["set"].get("elem", [])) for o in obj if "set" in o)

    def switch(self, config: str, size: int, linear: list[str]) -> None:
        """The rules in the exempt rule's place replaced in one transaction, as ``config`` says; their
        handles from nft's echo (a listing of hostprep's table reads every element of its sets:
        seconds with 100,000)."""
        if config in ("set", "interval"):
            name = (self.sets if config == "set" else self.intervals)[size]
            new = [self.rule.replace(f"@{self.set} ", f"@{name} ")]
        elif config == "linear":
            m = self.rule.split(" ip saddr ")[0]
            new = [f'{m} ip saddr {a} counter accept comment "{LINEAR_COMMENT}"' for a in linear]
        else:
            new = []
        script = [f"delete rule inet hostprep {self.chain} handle {h}" for h in self.current]
        script += [f"insert rule inet hostprep {self.chain} position {self.after} {r}" for r in new]
        echo = self.h.ns(["nft", "-e", "-a", "-f", "-"], input="\n".join(script) + "\n").stdout
        self.current = [int(m) for m in re.findall(r"^insert rule .* # handle (\d+)$", echo, re.M)]
        if len(self.current) != len(new):
            raise BenchError(f"native: inserted {len(new)} rules, nft echoed {len(self.current)}:\n{echo[-2000:]}")

    def end_packets(self) -> int:
        return sum(counter_of(o["rule"]) for o in self.h.nft_json("chain", "inet", BENCH_TABLE, "end") if "rule" in o)

    def chain_counts(self) -> tuple[int, int]:
        """(exempt rule, linear rules) packets since the last switch."""
        rules = [o["rule"] for o in self.h.nft_json("chain", "inet", "hostprep", self.chain) if "rule" in o]
        return (sum(counter_of(r) for r in rules if r.get("comment") == EXEMPT_COMMENT),
                sum(counter_of(r) for r in rules if r.get("comment") == LINEAR_COMMENT))


class Iptables:
    """hostprep's container chain rewritten in place (one `iptables-restore --noflush` per change)."""

    def __init__(self, host: Host, variant: str) -> None:
        self.h = host
        self.variant = variant       # "nft" or "legacy"
        self.chain = ""
        self.lines: list[str] = []   # the chain as hostprep loaded it (iptables-save lines)
        self.at = 0                  # index of the exempt rule in it
        self.set = ""
        self.sets: dict[int, str] = {}

    def ipt(self, kind: str = "") -> str:
        return f"iptables-{self.variant}" + (f"-{kind}" if kind else "")

    def prepare(self, lists: Lists, sizes: list[int]) -> list[str]:
        save = self.h.ns([self.ipt("save"), "-t", "filter"]).stdout.splitlines()
        found = [ln for ln in save if ln.startswith("-A ") and f'"{EXEMPT_COMMENT}"' in ln]
        if len(found) != 1:
            raise BenchError(f"{self.variant}: expected one rule commented '{EXEMPT_COMMENT}', found {len(found)}")
        self.chain = found[0].split()[1]
        self.lines = [ln for ln in save if ln.startswith(f"-A {self.chain} ")]
        self.at = self.lines.index(found[0])
        self.set = re.search(r"--match-set (\S+) src", found[0]).group(1)
        self.sets[sizes[0]] = self.set
        notes = [f"hostprep's set {self.set}: " + self.h.ns(["ipset", "save", self.set]).stdout.splitlines()[0]]
        for n in sizes[1:]:
            name = f"hpbench-{n}"
            s = IpSet(self.set, 4, tuple(ipaddress.ip_network(a) for a in lists.members[n]))
            t0 = time.perf_counter()
            self.h.ns(["ipset", "restore"], input=ipset_fill_script((s,)).replace(self.set, name))
            notes.append(f"bench set {name}: {n:,} entries loaded in {time.perf_counter() - t0:.1f} s "
                         "(hostprep's ipset restore text)")
            self.sets[n] = name
        for n, name in self.sets.items():
            got = self.entries(name)
            if got != n:
                raise BenchError(f"{self.variant}: ipset {name} holds {got} entries, not {n}")
        self.h.ns([self.ipt(), "-t", "security", "-A", "INPUT", "-i", EXT, "-d", HOST_EXT4, "-p", "tcp",
                   "--dport", str(PORT), "-j", "DROP"])
        return notes

    def entries(self, name: str) -> int:
        for line in self.h.ns(["ipset", "list", "-t", name]).stdout.splitlines():
            if line.startswith("Number of entries:"):
                return int(line.split(":", 1)[1])
        raise BenchError(f"ipset list -t {name}: no 'Number of entries' line")

    def switch(self, config: str, size: int, linear: list[str]) -> None:
        rule = self.lines[self.at]
        if config == "set":
            new = [rule.replace(f"--match-set {self.set} ", f"--match-set {self.sets[size]} ")]
        elif config == "linear":
            m = rule.split(" -m set ")[0]
            new = [f'{m} -s {a}/32 -m comment --comment "{LINEAR_COMMENT}" -j ACCEPT' for a in linear]
        else:
            new = []
        body = self.lines[:self.at] + new + self.lines[self.at + 1:]
        self.h.ns([self.ipt("restore"), "--noflush"], input=f"*filter\n:{self.chain} - [0:0]\n"
                  + "\n".join(body) + "\nCOMMIT\n")

    def end_packets(self) -> int:
        return sum(int(m.group(1)) for m in re.finditer(r"^\[(\d+):\d+\] -A INPUT .*-j DROP$",
                   self.h.ns([self.ipt("save"), "-c", "-t", "security"]).stdout, re.M))

    def chain_counts(self) -> tuple[int, int]:
        """(exempt rule, linear rules) packets since the last switch."""
        ex = lin = 0
        for line in self.h.ns([self.ipt("save"), "-c", "-t", "filter"]).stdout.splitlines():
            m = re.match(r"\[(\d+):\d+\] -A (\S+) (.*)", line)
            if m and m.group(2) == self.chain:
                if f'"{EXEMPT_COMMENT}"' in m.group(3):
                    ex += int(m.group(1))
                elif f'"{LINEAR_COMMENT}"' in m.group(3):
                    lin += int(m.group(1))
        return ex, lin


# --------------------------------------------------------------------------- the sender


def compile_sender(work: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("exempt_lookup.py: a C compiler is needed (apt-get install gcc / dnf install gcc)")
    out = work / "lookup_sender"
    subprocess.run([cc, "-O2", "-o", str(out), str(Path(__file__).resolve().parent / "lookup_sender.c")],
                   check=True)
    return out


def mac(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]["address"]


def ksoftirqd_ns(cpu: int) -> tuple[int, int]:
    """(pid, CPU time in ns) of ksoftirqd/<cpu>."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(p.name), int((p / "schedstat").read_text().split()[0])
            except OSError:
                continue
    return 0, 0


class Sender:
    def __init__(self, exe: Path, box: Sandbox, lists: dict[str, list[str]], work: Path, rate: int,
                 cpu: int) -> None:
        self.index = {}
        files = []
        for k, (name, addrs) in enumerate(lists.items()):
            f = work / f"src-{k}.txt"
            f.write_text("\n".join(addrs) + "\n")
            files.append(str(f))
            self.index[name] = k
        argv = ["ip", "netns", "exec", box.inet, str(exe), "eth0", mac(box.inet, "eth0"), mac(box.host, EXT),
                HOST_EXT4, str(PORT), str(rate), "30", *files]
        self.cpu = cpu
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        line = self.proc.stdout.readline()
        if not line.startswith('{"ready"'):
            raise BenchError(f"the sender did not start: {line!r}")

    def send(self, name: str, count: int) -> dict:
        self.proc.stdin.write(f"send {self.index[name]} {count}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError("the sender ended")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- one backend


@dataclass
class Result:
    backend: str
    per: dict[tuple[str, str], list[float]] = field(default_factory=dict)   # (config, kind) -> ns/pkt per round
    notes: list[str] = field(default_factory=list)
    softirqd: float = 0.0        # ksoftirqd CPU time on the sending CPU / sender CPU time, all blocks
    packets: int = 0


def configs(sizes: list[int], linear: int, native: bool) -> list[tuple[str, int, tuple[str, ...]]]:
    """(config, size, kinds) measured every round."""
    out = [("floor", 0, ("miss",)), ("none", 0, ("miss",))]
    out += [("set", n, ("hit", "miss")) for n in sizes]
    if native:      # the contrast for nft: the same /32 members in an interval set (the old declaration)
        out += [("interval", n, ("hit", "miss")) for n in sizes]
    if linear:
        out.append(("linear", linear, ("miss",)))
    return out


def label(config: str, size: int) -> str:
    return {"floor": "floor", "none": "none"}.get(config, f"{config} {size}")


def run_backend(backend: str, args: argparse.Namespace, lists: Lists, exe: Path, work: Path,
                runner: Runner, cpu: int) -> Result:
    res = Result(backend)
    box = Sandbox(f"hpxlk{os.getpid()}")
    box.create(runner)
    try:
        (work / backend).mkdir()
        host = Host(box, backend, work / backend / "root", work / backend)
        (host.files / "finesse.env").write_text(
            f"TEMPLATE_TYPE=finesse\nNGX_PRXY_FIN_PORT={PORT}\nIPTABLES_CONNECTION_LIMIT_ABOVE=65535\n"
            "IPTABLES_HASH_LIMIT_UPTO=1000\nIPTABLES_HASH_LIMIT_BURST=10000\n")
        small = args.entries[0]
        (host.files / "core.env").write_text("NGX_IPTABLES_HARDENING=1\nNGX_RATELIMIT_DISABLE_IPS="
                                             + "|".join(lists.members[small]) + "\n")
        t, _ = host.hostprep("apply", "-i", EXT, "-y", "--ignore-selinux")
        u, _ = host.hostprep("container", "up", "finesse", "-y", "--env", str(host.files / "finesse.env"),
                             "--core", str(host.files / "core.env"))
        _, st = host.hostprep("status")
        if "everything desired is live" not in st:
            raise BenchError(f"{backend}: hostprep status after container up:\n{st[-3000:]}")
        res.notes.append(f"hostprep apply {t:.1f} s, container up with {small} exempt entries {u:.1f} s, "
                         "status: everything desired is live")
        fw = Native(host) if backend == "native" else Iptables(host, backend.split("-")[1])
        res.notes += fw.prepare(lists, args.entries)
        res.notes.append(host.take_out_of_cookies())
        sources = {"miss": lists.misses} | {f"hit{n}": lists.hits[n] for n in args.entries}
        sender = Sender(exe, box, sources, host.files, args.rate, cpu)
        soft_ns = sent_cpu = 0
        try:
            plan = configs(args.entries, args.linear, backend == "native")
            for rnd in range(args.rounds):
                order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]
                if rnd % 2:
                    order.reverse()
                for config, size, kinds in order:
                    if config == "floor":
                        host.floor(True)
                    else:
                        fw.switch(config, size, lists.linear[:args.linear])
                    hits = 0
                    for kind in (kinds if rnd % 2 == 0 else tuple(reversed(kinds))):
                        src = "miss" if kind == "miss" else f"hit{size}"
                        sender.send(src, args.warmup)
                        if kind == "hit":
                            hits += args.warmup
                        before = Counts(fw.end_packets(), host.floor_packets())
                        _, k0 = ksoftirqd_ns(cpu)
                        got = sender.send(src, args.packets)
                        _, k1 = ksoftirqd_ns(cpu)
                        n = got["sent"]
                        if n != args.packets:
                            raise BenchError(f"{backend}: the sender sent {n} of {args.packets} packets "
                                             "(its 30 s bound per block)")
                        if kind == "hit":
                            hits += n
                        # every packet went through hostprep and was accepted (the floor: none got there)
                        seen = Counts(fw.end_packets() - before.end, host.floor_packets() - before.floor)
                        want = Counts(0, n) if config == "floor" else Counts(n, 0)
                        if seen != want:
                            raise BenchError(f"{backend} round {rnd + 1}, {label(config, size)} {kind}: "
                                             f"{seen}, expected {want}" + (
                                                 " (a miss source over 1,000 SYN/s, burst 10,000, is dropped by "
                                                 "hostprep's limiter: more --sources or fewer --packets)"
                                                 if kind == "miss" and seen.end < want.end else ""))
                        res.per.setdefault((label(config, size), kind), []).append(got["cpu_ns"] / n)
                        soft_ns += k1 - k0
                        sent_cpu += got["cpu_ns"]
                        res.packets += n + args.warmup
                    if config != "floor":
                        # since the switch: the exempt rule matched exactly the hits, the linear rules nothing
                        ex, lin = fw.chain_counts()
                        want_ex = hits if config in ("set", "interval") else 0
                        if (ex, lin) != (want_ex, 0):
                            raise BenchError(f"{backend} round {rnd + 1}, {label(config, size)}: exempt rule "
                                             f"{ex} packets (expected {want_ex}), linear rules {lin} (expected 0)")
                    if config == "floor":
                        host.floor(False)
                print(f"  {backend} round {rnd + 1}/{args.rounds}: " + ", ".join(
                    f"{c} {k} {v[-1]:.0f}" for (c, k), v in res.per.items()) + " ns/pkt", flush=True)
        finally:
            sender.stop()
        res.softirqd = soft_ns / sent_cpu if sent_cpu else 0.0
    finally:
        box.destroy(runner)
    return res


# --------------------------------------------------------------------------- report


def med_q(values: list[float]) -> tuple[float, str]:
    m = statistics.median(values)
    if len(values) < 4:
        return m, ""
    q = statistics.quantiles(values, n=4)
    return m, f"{q[0]:.2f}-{q[2]:.2f}"


def report(results: list[Result], args: argparse.Namespace) -> None:
    small, big = args.entries[0], args.entries[-1]
    rows = [("floor", "miss"), ("none", "miss")] + [(f"{c} {n}", k) for c in ("set", "interval") for n in args.entries
                                                    for k in ("hit", "miss")]
    if args.linear:
        rows.append((f"linear {args.linear}", "miss"))
    print()
    print("CPU time per packet on the sending CPU, ns (median of rounds); receiver = minus the floor of the round")
    head = f"{'configuration':<16}{'kind':<6}" + "".join(f"{r.backend + ' total':>22}{'receiver':>10}"
                                                           for r in results)
    print(head)
    for c, k in rows:
        line = f"{c:<16}{k:<6}"
        for r in results:
            v = r.per.get((c, k))
            if not v:
                line += f"{'-':>22}{'-':>10}"
                continue
            recv = [a - f for a, f in zip(v, r.per[("floor", "miss")])]
            line += f"{statistics.median(v):>22.0f}{statistics.median(recv):>10.0f}"
        print(line)
    print()
    print(f"ratios {big:,} vs {small:,} entries, round by round (median, quartiles); goal <= 1.1")
    for r in results:
        floor = r.per[("floor", "miss")]
        for config in ("set", "interval"):
            for kind in ("hit", "miss"):
                if (f"{config} {big}", kind) not in r.per:
                    continue
                a, b = r.per[(f"{config} {big}", kind)], r.per[(f"{config} {small}", kind)]
                tot, tq = med_q([x / y for x, y in zip(a, b)])
                rec, rq = med_q([(x - f) / (y - f) for x, y, f in zip(a, b, floor)])
                what = "hostprep's set" if config == "set" else "interval (contrast)"
                print(f"  {r.backend:<16} {what:<20} {kind:<5} total {tot:.3f} ({tq})  receiver {rec:.3f} ({rq})")
    print()
    print("the lookup itself: miss with the set minus no exempt rule at all, ns per packet (median of rounds)")
    for r in results:
        none = r.per[("none", "miss")]
        parts = [f"{c} {n:,}: {statistics.median([x - y for x, y in zip(r.per[(f'{c} {n}', 'miss')], none)]):+.0f}"
                 for c in ("set", "interval") for n in args.entries if (f"{c} {n}", "miss") in r.per]
        if args.linear:
            lin = statistics.median([x - y for x, y in zip(r.per[(f"linear {args.linear}", "miss")], none)])
            parts.append(f"linear {args.linear} rules: {lin:+.0f}")
        print(f"  {r.backend:<16} " + ", ".join(parts))
    print()
    for r in results:
        for n in r.notes:
            print(f"{r.backend}: {n}")
        print(f"{r.backend}: {r.packets:,} packets sent; ksoftirqd on the sending CPU ran {100 * r.softirqd:.1f}% "
              "of the sender's CPU time during the blocks (work not charged to the sender)")
    print(f"{args.rounds} rounds of {args.packets:,} packets per configuration and kind (after {args.warmup:,} "
          f"warm-up), at most {args.rate:,} packets/s; sources per kind: {args.sources:,}; every block's "
          "counters checked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of " + ", ".join(BACKENDS))
    ap.add_argument("--entries", default="10,100000", help="set sizes; the smallest through container up")
    ap.add_argument("--linear", type=int, default=100, help="rules of the linear contrast (0: none)")
    ap.add_argument("--sources", type=int, default=1000, help="source addresses per kind (default 1000)")
    ap.add_argument("--packets", type=int, default=20000, help="packets per measured block (default 20000)")
    ap.add_argument("--warmup", type=int, default=2000, help="packets before each block (default 2000)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    ap.add_argument("--rate", type=int, default=50000, help="packets per second at most (default 50000)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        ap.error(f"--backends: a comma list of {', '.join(BACKENDS)}")
    try:
        args.entries = sorted({int(x) for x in args.entries.split(",") if x.strip()})
    except ValueError:
        ap.error("--entries: comma-separated integers")
    if len(args.entries) < 2 or args.entries[0] < 1 or args.entries[0] > 65536 or args.entries[-1] > 1_000_000:
        ap.error("--entries: at least two sizes, the smallest 1..65536 (it goes through container up), "
                 "the largest at most 1,000,000")
    if not (0 <= args.linear <= 5000 and 1 <= args.sources <= 40000 and 1000 <= args.packets <= 1_000_000
            and 0 <= args.warmup <= 100_000 and 1 <= args.rounds <= 100 and 1000 <= args.rate <= 200_000):
        ap.error("out of bounds: --linear 0..5000, --sources 1..40000, --packets 1000..1000000, --warmup "
                 "0..100000, --rounds 1..100, --rate 1000..200000")
    return args


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("exempt_lookup.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    work = Path(tempfile.mkdtemp(prefix="hpxlk-"))
    runner = Runner()
    results: list[Result] = []
    start = time.perf_counter()
    try:
        exe = compile_sender(work)
        lists = Lists.make(args.entries, args.sources, args.linear, args.seed)
        print(f"sender on CPU {cpu}; load average {os.getloadavg()[0]:.1f}", flush=True)
        for backend in args.backends:
            results.append(run_backend(backend, args, lists, exe, work, runner, cpu))
        report(results, args)
        print(f"load average {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s")
        return 0
    except BenchError as err:
        print(f"\nBENCH FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the sandbox", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        Sandbox(f"hpxlk{os.getpid()}").destroy(runner)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
