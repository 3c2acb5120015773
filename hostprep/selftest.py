"""``hostprep selftest``: prove the current settings on real packets, in a throwaway sandbox.

The machine's own network namespace is never touched: selftest builds a
``Sandbox`` named ``hpself<pid>`` (hostprep/sandbox.py: a host with the external
``eth1`` and the internal ``eth0``, an "internet" peer and an "admin" peer), runs
``python -m hostprep apply -i eth1 -y --ignore-selinux [-e] [-a] [-p ...]`` and
``container up`` *inside* the sandbox host with a temporary ``HOSTPREP_ROOT``,
sends the probe matrix from the peers with the shared probe code
(``python -m hostprep.probe``, one call per namespace per phase), and judges every
probe twice: by the answer the peer saw, and by the hostprep rule counter the
packet must have matched (``iptables-save -c``, or on the native nft backend
``nft -j list table inet hostprep`` seen per family as ``status`` sees it, and
``nft list table netdev hostprep`` of the sandbox host, read before and after each
phase).  The backend is ``--backend``/``HOSTPREP_BACKEND``, else apply's automatic
choice (``backend_name``: the native nft backend where ``nft -c`` accepts the probe
script, iptables as ``iptables -V`` says otherwise).  The sandbox is destroyed in ``finally`` and on SIGINT/SIGTERM;
its namespaces carry the run's pid, so concurrent runs never share one.

The module has a pure part (the matrix: ``Probe``, ``CounterCheck``,
``build_matrix``; the judging: ``judge_phase``; the env files written for
``container up``) and the runner (``run_selftest``), which runs commands only
through ``Runner`` and never prints (the CLI prints ``report_table``).

Why one module of about 1,000 lines (the one module of hostprep over ~500): each
probe's expectation, the counter that must match it and the way it is sent are
read together when a probe fails; the sections below keep them apart (matrix,
judging, env files, options, the run), and the pure sections import nothing that
touches the host.

Notes on the sandbox (also in the report):

* The sandbox is not a proxy host: apply runs with ``--ignore-selinux`` and the
  kernel profile (``-k``) is not applied (its keys are not per namespace).
* ``-p``: selftest adds 203.0.113.7 and 2001:db8:f::7 (addresses of the inet peer)
  as ``-p`` sources so that the allow-list is probed from a real allowed source;
  the user's ``-p`` values are loaded too (hostnames resolved here, as ``apply``
  does) but packets are only sent from the sandbox's own addresses.
* Containers: the ports and limits of the containers that are up (the registry
  under HOSTPREP_ROOT) or of the ``--env``/``--core`` files; each binding IP is
  rewritten to an address of the sandbox's ``eth1`` of the same family
  (198.51.100.10, 2001:db8:e::10, then .11, ::11 ... for further binding IPs).
* The connection-limit probe makes the sandbox host drop its own RSTs to one
  probe source (an nft output chain before conntrack), so that every accepted
  SYN of that source stays an open connection, as a client holding connections.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich.table import Table

from hostprep import nic as nicmod
from hostprep import render, settings, validate
from hostprep.backend import IptablesBackend, choose
from hostprep.envfiles import PORTS, load_container
from hostprep.errors import CommandFailed, HostprepError, InputError, RefusedError
from hostprep.model import SET_PREFIX, Container, Network, Policy
from hostprep.observed import Observed, parse_nft_json, parse_nft_listing, parse_save
from hostprep.probe import KINDS
from hostprep.runner import PACKAGE_PARENT, Runner, python_module
from hostprep.sandbox import (ADMIN4, ADMIN6, EXT, SANDBOX_MARKER, HOST_EXT4, HOST_EXT6, HOST_INT4, HOST_INT6, INET4, INET6,
                              INET_EXTRA4, INET_EXTRA6, INT, Sandbox)

SCHEMA = 1
ROLES = ("inet", "admin", "host")
EXPECT = ("dropped", "answered")
PHASES = ("base", "limits")
JUDGES = ("reply", "counter")

# The -p sources selftest adds itself (they live in the inet peer), and sources
# that are not allowed to ping.
PING_ALLOWED4, PING_OTHER4 = INET_EXTRA4
PING_ALLOWED6, PING_OTHER6 = INET_EXTRA6
SPOOFED4, SPOOFED6 = "10.1.2.3", "fd00::1"     # RFC 1918 / unique-local: never real on the internet side
CLOSED_PORT = 40404                             # a port no container opens (another one if a container does)

# A probe that must stay unanswered costs its timeout.  A veth round trip is < 1 ms; an
# answer that came later than this would still not pass as "dropped": the drop rule's
# counter would not have counted it.
QUIET = 0.3
QUIET6 = 0.3
FRAG_QUIET = 0.6
ANSWER = 2.0     # timeout of a probe that must be answered (only paid when it is not)
SSH_OUT = 0.8    # connect() from the host: below the 1 s SYN retransmission, so exactly one SYN
RST_FLOOD = 50   # RSTs sent within one second (the ddos group lets 2/s burst 2 through)
CONNECT_COST = 0.0005    # seconds per refused connect() of a burst (generous: measured 0.05 ms)
CONNLIMIT_BUDGET = 12.0  # seconds the connection-limit probe of one container may take

# The extra addresses selftest gives the sandbox (documentation ranges only).
# Fresh probe sources, added to the inet peer as they are needed (two ranges each, in case
# a -p network or a container's exempt list covers one of them).
# Probe sources of the container probes.  IPv6: one address (::100) in each /48 of
# 2001:db8:100::/40, so that no two probes are one source of a container's limits
# whatever its HOSTPREP_IPV6_SOURCE_PREFIX (48..128; the default /64 groups by /64).
POOLS = {4: ("203.0.113.32/27", "198.51.100.128/26"), 6: ("2001:db8:100::/40",)}
POOL6_PREFIX = 48
BIND4 = [f"198.51.100.{n}" for n in range(10, 20)]    # binding IPs on the sandbox host's eth1
BIND6 = [f"2001:db8:e::{n}" for n in range(10, 20)]
INTERNAL = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64"))
SANDBOX_ADDRS = {ipaddress.ip_address(a) for a in (HOST_EXT4, HOST_EXT6, HOST_INT4, HOST_INT6, INET4, INET6,
                                                   ADMIN4, ADMIN6, *INET_EXTRA4, *INET_EXTRA6, *BIND4, *BIND6)}
RST_TABLE = "hpselftest"


# --------------------------------------------------------------------------- the matrix (pure)

@dataclass(frozen=True)
class CounterCheck:
    """A hostprep rule counter a probe must (or must not) move.

    iptables: ``family`` 4 or 6, ``chain`` and ``match``, a substring of the rule
    spec as iptables-save prints it (the rule's comment, quoted); every rule of
    the chain containing it is summed.  nft: ``family`` None, ``chain`` "" and
    ``match`` the comment of a rule of table netdev hostprep.  ``lo``..``hi``
    (``hi`` None: no upper bound) is what the probe adds to it; with
    ``from_result`` the probe adds exactly that field of its results (fragments).
    """

    family: int | None
    chain: str
    match: str
    lo: int = 1
    hi: int | None = 1
    from_result: str | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6, None):
            raise ValueError(f"family {self.family!r}")
        if (self.family is None) != (self.chain == ""):
            raise ValueError("an nft counter has no chain, an iptables counter has one")
        if not self.match or "\n" in self.match:
            raise ValueError("a counter needs a match text")
        if self.lo < 0 or (self.hi is not None and self.hi < self.lo):
            raise ValueError(f"counter range {self.lo}..{self.hi}")

    @property
    def key(self) -> tuple:
        return (self.family, self.chain, self.match)

    @property
    def label(self) -> str:
        """Short: the chain (or the nft ingress chain) and the comment without "hostprep <group>: "."""
        text = self.match.strip('"')
        if text.startswith("hostprep ") and ": " in text:
            text = text.split(": ", 1)[1]
        if self.family is None:
            return f"nft ingress: {text}"
        return f"v{self.family} {self.chain}: {text}"

    def contribution(self, results: list[dict]) -> tuple[int, int | None]:
        if self.from_result:
            n = sum(int(r.get(self.from_result) or 0) for r in results)
            return n, n
        return self.lo, self.hi

    def but(self, lo: int, hi: int | None) -> "CounterCheck":
        return CounterCheck(self.family, self.chain, self.match, lo, hi, None)


@dataclass(frozen=True)
class Step:
    """A setup command run inside one of the sandbox's namespaces before a probe's phase."""

    role: str
    argv: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}")
        if not self.argv:
            raise ValueError("empty setup command")


@dataclass(frozen=True)
class Probe:
    """One line of the matrix: a packet (or a burst) from one peer and what must happen to it.

    ``probe`` is the input of hostprep.probe (sent ``repeat`` times in a row).
    ``expected``: "dropped" or "answered".  With ``judge`` "reply" the peer's
    answers decide (a repeated probe expecting "dropped": every attempt but the
    last answered, the last one not; expecting "answered": all answered); with
    "counter" (floods, held connections) the counter decides.  ``counter`` is
    the rule that must count it, ``also`` further counters checked; the counters
    of one phase are read once, so a counter several probes of a phase check is
    judged on their sum.
    """

    name: str
    role: str
    probe: dict
    expected: str
    counter: CounterCheck
    phase: str = "base"
    repeat: int = 1
    judge: str = "reply"
    also: tuple[CounterCheck, ...] = ()
    setup: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a probe needs a name")
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role {self.role!r} is not one of {ROLES}")
        if self.expected not in EXPECT:
            raise ValueError(f"{self.name}: expected {self.expected!r} is not one of {EXPECT}")
        if not isinstance(self.counter, CounterCheck) or not all(isinstance(c, CounterCheck) for c in self.also):
            raise ValueError(f"{self.name}: counters must be CounterCheck")
        if self.probe.get("kind") not in KINDS:
            raise ValueError(f"{self.name}: probe kind {self.probe.get('kind')!r} is not one of {sorted(KINDS)}")
        if self.phase not in PHASES or self.judge not in JUDGES or self.repeat < 1:
            raise ValueError(f"{self.name}: phase {self.phase!r}, judge {self.judge!r}, repeat {self.repeat}")
        object.__setattr__(self, "probe", dict(self.probe))

    @property
    def checks(self) -> tuple[CounterCheck, ...]:
        return (self.counter,) + self.also


@dataclass(frozen=True)
class ProbeSettings:
    """The firewall settings the sandbox gets (the user's, plus selftest's own -p sources)."""

    skip_ddos: bool = False
    allow_private: bool = False
    ping: tuple[Network, ...] = ()          # every -p network loaded in the sandbox
    ipv6: bool = True

    @property
    def ddos(self) -> bool:
        return not self.skip_ddos

    @property
    def spoof(self) -> bool:
        return not self.allow_private


@dataclass(frozen=True)
class Matrix:
    probes: tuple[Probe, ...]
    notes: tuple[str, ...] = ()


def ipt(family: int, chain: str, comment: str, lo: int = 1, hi: int | None = 1) -> CounterCheck:
    """The counter of the rules of ``chain`` whose comment is exactly ``comment``."""
    return CounterCheck(family, chain, f'"{comment}"', lo, hi)


def deny(family: int, lo: int = 1, hi: int | None = 1) -> CounterCheck:
    return ipt(family, "HOSTPREP-DENY", "hostprep deny: default deny", lo, hi)


@functools.lru_cache(maxsize=None)
def spoof_networks(family: int) -> tuple[Network, ...]:
    """The sources the spoof group drops, read from the rendered rules (not a second copy of the list)."""
    ruleset = render.desired(Policy(EXT)).ruleset(family)
    chain = ruleset.chain("HOSTPREP-SPOOF")
    return tuple(ipaddress.ip_network(spec.split()[1]) for spec in chain.specs) if chain else ()


def tcp(dst: str, dport: int, timeout: float, **kw) -> dict:
    return {"kind": "tcp", "dst": dst, "dport": dport, "timeout": timeout, **kw}


def connect(dst: str, port: int, timeout: float, src: str | None = None) -> dict:
    p = {"kind": "connect", "dst": dst, "port": port, "timeout": timeout}
    if src:
        p["src"] = src
    return p


def closed_port(containers: tuple[Container, ...]) -> int:
    used = {p for c in containers for p in c.ports}
    port = CLOSED_PORT
    while port in used:
        port += 1
    return port


def base_probes(s: ProbeSettings, port: int, src: Sources, notes: list[str]) -> list[Probe]:
    """The base hardening: default deny, SSH both ways, ICMP and its allow-list, UDP, spoofed
    sources, the ddos group (bad flags, odd MSS, bare ACK, fragments, RST flood), IPv4 and IPv6."""
    out: list[Probe] = []
    for fam in ((4, 6) if s.ipv6 else (4,)):
        v = f"v{fam}"
        ext, inet, intl = (HOST_EXT4, INET4, HOST_INT4) if fam == 4 else (HOST_EXT6, INET6, HOST_INT6)
        admin = ADMIN4 if fam == 4 else ADMIN6
        quiet = QUIET if fam == 4 else QUIET6
        allowed = PING_ALLOWED4 if fam == 4 else PING_ALLOWED6
        other = other_ping_source(s, fam) or src.maybe(fam)
        if other is None:
            notes.append(f"{v}: every probe source is allowed to ping (-p): echo requests from a source that is "
                         "not allowed are not probed")
        from_other = add_source(other) if other else ()
        spoofed = SPOOFED4 if fam == 4 else SPOOFED6
        spoof_net = "10.0.0.0/8" if fam == 4 else "fc00::/7"
        icmp_other = ipt(fam, "HOSTPREP-ICMP", "hostprep icmp: other icmp")
        ddos = (lambda comment: ipt(fam, "HOSTPREP-DDOS", f"hostprep ddos: {comment}")) if s.ddos \
            else (lambda comment: deny(fam))
        via = "" if s.ddos else " (-e: default deny)"
        # stateless junk is dropped at the NIC's ingress hook (rules/ingress.nft.j2), before conntrack
        bogus = CounterCheck(None, "", "hostprep ddos: bogus tcp flags") if s.ddos else deny(fam)
        ssh_in = ipt(fam, "HOSTPREP-SSH", "hostprep ssh: no ssh in")
        udp = ipt(fam, "HOSTPREP-UDP", "hostprep udp: udp dropped")
        out += [
            Probe(f"{v} SYN to closed port {port}", "inet", tcp(ext, port, quiet), "dropped", deny(fam)),
            Probe(f"{v} SYN to closed port {port}, internal NIC (control)", "admin", tcp(intl, port, ANSWER),
                  "answered", deny(fam, 0, 0)),
            Probe(f"{v} SSH in (port 22)", "inet", tcp(ext, 22, quiet), "dropped", ssh_in),
            Probe(f"{v} SSH out through the external NIC", "host", connect(inet, 22, SSH_OUT), "dropped",
                  ipt(fam, "HOSTPREP-OUT", "hostprep ssh: no ssh out")),
            Probe(f"{v} SSH out through the internal NIC (control)", "host", connect(admin, 22, ANSWER),
                  "answered", ipt(fam, "HOSTPREP-OUT", "hostprep ssh: no ssh out", 0, 0)),
            Probe(f"{v} echo request from {allowed} (-p)", "inet",
                  {"kind": "icmp", "dst": ext, "src": allowed, "timeout": ANSWER}, "answered",
                  ipt(fam, "HOSTPREP-ICMP", "hostprep icmp: ping allowed (-p)")),
        ]
        if other:
            out.append(Probe(f"{v} echo request from {other} (not -p)", "inet",
                             {"kind": "icmp", "dst": ext, "src": other, "timeout": quiet}, "dropped", icmp_other,
                             setup=from_other))
        out += [
            Probe(f"{v} echo request, internal NIC (control)", "admin",
                  {"kind": "icmp", "dst": intl, "timeout": ANSWER}, "answered", icmp_other.but(0, 0)),
            Probe(f"{v} UDP to port 5353", "inet", {"kind": "udp", "dst": ext, "dport": 5353, "timeout": quiet},
                  "dropped", udp),
            Probe(f"{v} spoofed private source {spoofed}" + ("" if s.spoof else " (-a: default deny)"), "inet",
                  tcp(ext, port, quiet, src=spoofed), "dropped",
                  ipt(fam, "HOSTPREP-SPOOF", f"hostprep spoof: {spoof_net}") if s.spoof else deny(fam)),
            Probe(f"{v} XMAS flags (FIN,PSH,URG){via}", "inet", tcp(ext, port, quiet, flags="FPU"), "dropped",
                  bogus),
            Probe(f"{v} SYN with MSS {'100' if fam == 4 else '1000'}{via}", "inet",
                  tcp(ext, port, quiet, mss=100 if fam == 4 else 1000), "dropped", ddos("odd mss")),
            Probe(f"{v} bare ACK (NEW without SYN){via}", "inet", tcp(ext, port, quiet, flags="A"), "dropped",
                  ddos("new without syn")),
        ]
        if s.ddos or other:
            # from a source not allowed to ping: with -e the reassembled echo meets the icmp group
            frag_src = other or inet
            out.append(Probe(f"{v} fragmented echo request from {frag_src}"
                             + ("" if s.ddos else " (-e: reassembled, icmp group)"), "inet",
                             {"kind": "frag", "dst": ext, "src": frag_src, "timeout": FRAG_QUIET}, "dropped",
                             CounterCheck(None, "", f"hostprep ddos: ipv{fam} fragment", from_result="fragments")
                             if s.ddos else icmp_other, setup=from_other))
        out += [
            Probe(f"{v} fragmented echo request, internal NIC (control)", "admin",
                  {"kind": "frag", "dst": intl, "timeout": ANSWER}, "answered",
                  CounterCheck(None, "", f"hostprep ddos: ipv{fam} fragment", 0, 0) if s.ddos
                  else icmp_other.but(0, 0)),
        ]
        if fam == 4:
            out += [
                Probe("v4 SSH in, internal NIC (control)", "admin", tcp(intl, 22, ANSWER), "answered",
                      ssh_in.but(0, 0)),
                Probe("v4 UDP to port 5353, internal NIC (control)", "admin",
                      {"kind": "udp", "dst": intl, "dport": 5353, "timeout": ANSWER}, "answered", udp.but(0, 0)),
                Probe(f"v4 NULL flags{via}", "inet", tcp(ext, port, quiet, flags=""), "dropped", bogus),
                Probe(f"v4 SYN+FIN{via}", "inet", tcp(ext, port, quiet, flags="SF"), "dropped", bogus),
                Probe(f"v4 SYN+RST{via}", "inet", tcp(ext, port, quiet, flags="SR"), "dropped", bogus),
                Probe(f"v4 unsolicited SYN+ACK{via}", "inet", tcp(ext, port, quiet, flags="SA"), "dropped",
                      ddos("invalid")),
                Probe("v4 bare ACK, internal NIC (control)", "admin", tcp(intl, port, ANSWER, flags="A"),
                      "answered", ddos("new without syn").but(0, 0)),
            ]
        else:
            out.append(Probe("v6 neighbour solicitation", "inet",
                             {"kind": "ns", "dst": ext, "src": inet, "iface": "eth0", "timeout": ANSWER},
                             "answered", CounterCheck(6, "HOSTPREP-ICMP", '"hostprep icmp: neighbour discovery"',
                                                      1, None)))   # the comment: the same on every backend
    # RSTs: 2/s burst 2 go on (and are dropped as INVALID), the rest is dropped as a flood.
    flood = {"kind": "flood", "dst": HOST_EXT4, "dport": port, "flags": "R", "count": RST_FLOOD, "seconds": 1.0}
    if s.ddos:
        out.append(Probe(f"v4 RST flood ({RST_FLOOD} in 1 s; 2/s burst 2 pass)", "inet", flood, "dropped",
                         ipt(4, "HOSTPREP-RST", "hostprep ddos: rst flood", RST_FLOOD - 5, RST_FLOOD - 2),
                         phase="limits", judge="counter",
                         also=(ipt(4, "HOSTPREP-RST", "hostprep ddos: rst within 2/s", 2, 5),)))
    else:
        out.append(Probe(f"v4 RST flood ({RST_FLOOD} in 1 s) (-e: default deny)", "inet", flood, "dropped",
                         deny(4, RST_FLOOD, RST_FLOOD), phase="limits", judge="counter"))
    return out


def other_ping_source(s: ProbeSettings, family: int) -> str | None:
    """An inet address no -p network covers (the user may have allowed 203.0.113.0/24)."""
    for cand in ((PING_OTHER4,) if family == 4 else (PING_OTHER6,)):
        if not any(ipaddress.ip_address(cand) in n for n in s.ping if n.version == family):
            return cand
    return None


class Sources:
    """Fresh probe source addresses for the container probes (each limit gets a source of its own;
    an IPv6 one in a /48 of its own: see POOLS)."""

    def __init__(self, avoid: tuple[Network, ...]) -> None:
        self.avoid = avoid
        self._iters = {4: (a for net in POOLS[4] for a in ipaddress.ip_network(net).hosts()),
                       6: (sub[0x100] for net in POOLS[6]
                           for sub in ipaddress.ip_network(net).subnets(new_prefix=POOL6_PREFIX))}

    def maybe(self, family: int) -> str | None:
        for addr in self._iters[family]:
            if not any(addr in n for n in self.avoid if n.version == family):
                return str(addr)
        return None

    def fresh(self, family: int) -> str:
        addr = self.maybe(family)
        if addr is None:
            raise InputError("selftest", f"no free IPv{family} probe source left in {', '.join(POOLS[family])}: "
                             "-p networks or exempt lists cover them", "probe fewer containers at a time (--env)")
        return addr


def add_source(addr: str) -> tuple[Step, ...]:
    """Give the inet peer the address (unless it has it from the sandbox), so that the host's
    answers to it come back there."""
    if addr in (INET4, INET6, *INET_EXTRA4, *INET_EXTRA6):
        return ()
    if ipaddress.ip_address(addr).version == 4:
        return (Step("inet", ("ip", "addr", "add", f"{addr}/32", "dev", "eth0")),)
    return (Step("inet", ("ip", "addr", "add", f"{addr}/128", "dev", "eth0", "nodad")),)


def usable_source(nets: tuple[Network, ...], s: ProbeSettings,
                  exclude: tuple[Network, ...] = ()) -> tuple[str | None, str]:
    """A source address out of ``nets`` the inet peer can send from, or (None, why not)."""
    spoof = spoof_networks(4) + spoof_networks(6) if s.spoof else ()
    why = "none listed"
    for net in nets:
        cands = [net[0]] if net.num_addresses == 1 else [net[1], net[-2]]
        for a in cands:
            if any(a in n for n in exclude if n.version == a.version):
                why = f"{a} is also a load balancer"
            elif a.is_loopback or a.is_multicast or a.is_unspecified or a.is_link_local:
                why = f"{a} cannot be a source on the external NIC"
            elif a in SANDBOX_ADDRS or any(a in n for n in INTERNAL if n.version == a.version):
                why = f"{a} is an address of the sandbox's own networks"
            elif any(a in n for n in spoof if n.version == a.version):
                why = (f"{a} is a private/reserved source: the spoof group drops it on the external NIC before "
                       "the container rules (-a leaves the spoof group out)")
            else:
                return str(a), ""
    return None, why


def container_probes(c: Container, s: ProbeSettings, src: Sources) -> tuple[list[Probe], list[str]]:
    """A container's ports open, its load balancers, restricted mode, exempt sources, rate and
    connection limits (on its first port), from the inet peer to its binding IP in the sandbox."""
    fam, dest, name, chain = c.family, str(c.dest), c.name, c.chain
    quiet = QUIET if fam == 4 else QUIET6

    def cc(what: str, lo: int = 1, hi: int | None = 1) -> CounterCheck:
        return ipt(fam, chain, f"hostprep containers: {name} {what}", lo, hi)

    probes: list[Probe] = []
    notes: list[str] = []
    if not c.hardening:
        a = src.fresh(fam)
        for p in c.ports:
            probes.append(Probe(f"{name}: port {p} closed (NGX_IPTABLES_HARDENING=0)", "inet",
                                connect(dest, p, quiet, a), "dropped", deny(fam), setup=add_source(a)))
        return probes, notes
    first = c.ports[0]
    lb, lb_why = usable_source(c.networks("lb"), s)
    if c.restricted:
        a = src.fresh(fam)
        probes.append(Probe(f"{name}: port {first} from a source that is no load balancer (restricted)", "inet",
                            connect(dest, first, quiet, a), "dropped", cc("restricted to load balancers"),
                            setup=add_source(a)))
    else:
        a = src.fresh(fam)
        for p in c.ports:
            probes.append(Probe(f"{name}: port {p} open", "inet", connect(dest, p, ANSWER, a), "answered",
                                cc("within rate"), setup=add_source(a)))
    if lb:
        probes.append(Probe(f"{name}: port {first} from load balancer {lb}", "inet", connect(dest, first, ANSWER, lb),
                            "answered", cc("load balancer"), setup=add_source(lb)))
    elif c.networks("lb"):
        notes.append(f"{name}: load balancers not probed ({lb_why})")
    if c.restricted:
        notes.append(f"{name}: restricted to load balancers: no rate, connection or exempt limits to probe")
        return probes, notes
    lim = c.limits
    # Exempt sources: a burst beyond the limits, every SYN answered.
    ex, ex_why = usable_source(c.networks("ex"), s, exclude=c.networks("lb"))
    if ex:
        n = lim.hash_burst + 2
        probes.append(Probe(f"{name}: {n} SYNs at once from exempt source {ex}", "inet",
                            connect(dest, first, ANSWER, ex), "answered", cc("exempt", n, n), phase="limits",
                            repeat=n, setup=add_source(ex)))
    elif c.networks("ex"):
        notes.append(f"{name}: exempt sources not probed ({ex_why})")
    # Rate: burst+1 SYNs back to back from one source: the burst is answered, the next one dropped.
    n = lim.hash_burst + 1
    if lim.connlimit_above < n:
        notes.append(f"{name}: rate limit not probed: the connection limit {lim.connlimit_above} is below "
                     f"the burst {lim.hash_burst} + 1, so it would drop first")
    elif lim.hash_upto * n * CONNECT_COST > 0.5:
        notes.append(f"{name}: rate limit not probed: {lim.hash_upto}/s refills the bucket within a burst")
    else:
        a = src.fresh(fam)
        probes.append(Probe(f"{name}: rate {lim.hash_upto}/s burst {lim.hash_burst}: {n} SYNs at once, "
                            f"the last dropped", "inet", connect(dest, first, quiet, a), "dropped", cc("rate drop"),
                            phase="limits", repeat=n, also=(cc("within rate", lim.hash_burst, lim.hash_burst),),
                            setup=add_source(a)))
    # Connections: connlimit_above held connections, the next one dropped.
    n = lim.connlimit_above + 1
    pace = connlimit_pace(lim.connlimit_above, lim.hash_upto, lim.hash_burst)
    if pace is None or n * pace > CONNLIMIT_BUDGET:
        notes.append(f"{name}: connection limit {lim.connlimit_above} not probed: holding that many connections "
                     f"within {lim.hash_upto}/s would take more than {CONNLIMIT_BUDGET:.0f} s")
    else:
        a = src.fresh(fam)
        probes.append(Probe(f"{name}: connection limit {lim.connlimit_above}: {n} held connections, the last "
                            "dropped", "inet", connect(dest, first, pace, a), "dropped", cc("connlimit drop"),
                            phase="limits", repeat=n, judge="counter",
                            also=(cc("within rate", lim.connlimit_above, lim.connlimit_above),),
                            setup=add_source(a) + hold_connections(a)))
    return probes, notes


def connlimit_pace(above: int, rate: int, burst: int) -> float | None:
    """Seconds between the SYNs of the connection-limit probe, so that the rate limit lets
    ``above`` of them through (each attempt waits that long for an answer that never comes);
    None when it would need one second or more (the client would retransmit its SYN)."""
    need = max(0.0, (above - burst) / (rate * max(above - 1, 1)))
    pace = round(need * 1.3 + 0.03, 3)
    return pace if pace < 0.9 else None


def hold_connections(addr: str) -> tuple[Step, ...]:
    """The sandbox host drops its own RSTs to ``addr`` before conntrack sees them (priority -310),
    so each SYN accepted from ``addr`` stays a connection conntrack (and connlimit) counts."""
    ip = "ip" if ipaddress.ip_address(addr).version == 4 else "ip6"
    return (Step("host", ("nft", f"add table inet {RST_TABLE}")),
            Step("host", ("nft", f"add chain inet {RST_TABLE} out {{ type filter hook output priority -310 ; "
                                 "policy accept ; }")),
            Step("host", ("nft", f"add rule inet {RST_TABLE} out oifname {EXT} {ip} daddr {addr} "
                                 "tcp flags & rst == rst counter drop")))


def build_matrix(s: ProbeSettings, containers: tuple[Container, ...] = ()) -> Matrix:
    """Every probe of one selftest run, in the order of the table."""
    avoid = tuple(s.ping) + tuple(n for c in containers for n in c.load_balancers + c.exempt)
    src = Sources(avoid)
    notes: list[str] = []
    probes = base_probes(s, closed_port(containers), src, notes)
    for c in containers:
        if c.family == 6 and not s.ipv6:
            notes.append(f"{c.name}: IPv6 binding IP, but this kernel has IPv6 disabled")
            continue
        ps, ns = container_probes(c, s, src)
        probes += ps
        notes += ns
    names = [p.name for p in probes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"probe names not unique: {dup}")
    return Matrix(tuple(probes), tuple(notes))


# --------------------------------------------------------------------------- judging (pure)

@dataclass(frozen=True)
class Counters:
    """The counters of one moment: the filter tables (iptables-save -c) and the nft rules."""

    v4: Observed
    v6: Observed
    nft: dict[str, int] = field(default_factory=dict)

    def packets(self, check: CounterCheck) -> int:
        if check.family is None:
            return self.nft.get(check.match, 0)
        obs = self.v4 if check.family == 4 else self.v6
        return sum(r.counter.packets for r in obs.chain_rules(check.chain) if check.match in r.spec)


@dataclass(frozen=True)
class CounterResult:
    """A counter's packets during the phase (``delta``) against what the phase's probes should
    add together (``lo``..``hi``); ``own_lo``..``own_hi`` is this probe's part of it."""

    label: str
    delta: int
    lo: int
    hi: int | None
    own_lo: int
    own_hi: int | None
    ok: bool

    def packets(self) -> str:
        """"+1"; "+5 (phase), 1 here" when probes of the phase share the counter; the wanted value when not ok."""
        shared = (self.lo, self.hi) != (self.own_lo, self.own_hi)
        text = f"+{self.delta}" + (" (phase)" if shared else "")
        if not self.ok:
            text += f", wanted {want_text([self.lo, self.hi])}"
        if shared:
            text += f", {want_text([self.own_lo, self.own_hi])} here"
        return text


@dataclass(frozen=True)
class Verdict:
    probe: Probe
    observed: str
    ok: bool
    counters: tuple[CounterResult, ...]
    replies: tuple[str | None, ...]


def observation(p: Probe, results: list[dict], counter_ok: bool) -> str:
    """What the peer saw, in the words of ``expected``."""
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        return f"error: {errors[0]}"
    if p.judge == "counter":
        return p.expected if counter_ok else f"not {p.expected}"
    answers = [bool(r.get("answered")) for r in results]
    if len(answers) == 1:
        return "answered" if answers[0] else "dropped"
    if all(answers):
        return "answered"
    if p.expected == "dropped" and all(answers[:-1]):
        return "dropped"        # the burst answered, the one beyond the limit not
    return f"{sum(answers)} of {len(answers)} answered"


def judge_phase(probes: list[Probe], results: dict[str, list[dict]], before: Counters,
                after: Counters) -> list[Verdict]:
    """Judge the probes of one phase: their answers, and the counters against the sum of
    what the phase's probes add to each."""
    want: dict[tuple, list] = {}
    labels: dict[tuple, CounterCheck] = {}
    for p in probes:
        for chk in p.checks:
            lo, hi = chk.contribution(results.get(p.name, []))
            w = want.setdefault(chk.key, [0, 0])
            w[0] += lo
            w[1] = None if (w[1] is None or hi is None) else w[1] + hi
            labels[chk.key] = chk
    delta = {k: after.packets(chk) - before.packets(chk) for k, chk in labels.items()}
    verdicts = []
    for p in probes:
        res = results.get(p.name, [])
        crs = []
        for chk in p.checks:
            lo, hi = want[chk.key]
            own_lo, own_hi = chk.contribution(res)
            d = delta[chk.key]
            crs.append(CounterResult(chk.label, d, lo, hi, own_lo, own_hi, lo <= d and (hi is None or d <= hi)))
        observed = observation(p, res, crs[0].ok) if res else "not sent"
        ok = observed == p.expected and all(c.ok for c in crs)
        verdicts.append(Verdict(p, observed, ok, tuple(crs), tuple(r.get("reply") for r in res)))
    return verdicts


# --------------------------------------------------------------------------- env files for the sandbox (pure)

def sandbox_dests(containers: list[Container]) -> dict[str, str]:
    """Each distinct binding IP -> an address of the sandbox's eth1 of the same family."""
    pools = {4: list(BIND4), 6: list(BIND6)}
    out: dict[str, str] = {}
    for c in containers:
        key = str(c.dest)
        if key in out:
            continue
        if not pools[c.family]:
            raise InputError("selftest", f"more than {len(BIND4)} IPv{c.family} binding IPs",
                             "probe fewer containers at a time (--env)")
        out[key] = pools[c.family].pop(0)
    return out


def env_texts(c: Container, dest: str) -> dict[str, str]:
    """The component .env, core.env and installer.env that make ``container up`` rebuild ``c``
    (ports, limits, hardening switch, load balancers, exempt sources, restriction) bound to ``dest``."""

    def line(k: str, v) -> str:
        return f"{k}='{v}'\n"

    keys = PORTS[c.template]
    ports = list(c.ports) or [default for _, default in keys]
    env = line("TEMPLATE_TYPE", c.template)
    if c.template == "chat":
        env += line(keys[0][0], ports[0])
        if len(ports) > 1:
            env += line("NGX_CHAT_HOST1_PROXY", "/".join(f"sandbox:{p}" for p in ports[1:]))
    else:
        for i, (k, _) in enumerate(keys):
            env += line(k, ports[min(i, len(ports) - 1)])
    if c.template == "cloudconnect":
        env += line("NGX_CLOUDCONNECT_CLIENT_IPS", "")      # its clients are in the exempt list below
    lim = c.limits
    for k, v in (("IPTABLES_CONNECTION_LIMIT_ABOVE", lim.connlimit_above),
                 ("IPTABLES_HASH_LIMIT_UPTO", lim.hash_upto), ("IPTABLES_HASH_LIMIT_BURST", lim.hash_burst),
                 ("IPTABLES_LOG_LIMIT", lim.log_limit), ("IPTABLES_LOG_LIMIT_BURST", lim.log_burst)):
        env += line(k, v)
    core = (line("NGX_IPTABLES_HARDENING", "1" if c.hardening else "0")
            + line("NGX_LOAD_BALANCER_IPS", "|".join(str(n) for n in c.load_balancers))
            + line("NGX_RATELIMIT_DISABLE_IPS", "|".join(str(n) for n in c.exempt))
            + line("NGX_TRAFFIC_RESTRICTED", "true" if c.restricted else "false"))
    return {"env": env, "core": core, "installer": line("PROXY_BINDING_IP", dest)}


def rebind(c: Container, dest: str) -> Container:
    return Container(c.name, c.template, c.ports, ipaddress.ip_address(dest), c.limits, c.hardening, c.restricted,
                     c.load_balancers, c.exempt, ())


# --------------------------------------------------------------------------- options

@dataclass(frozen=True)
class EnvPair:
    name: str
    env: Path
    core: Path | None = None


@dataclass(frozen=True)
class Options:
    """What to prove: the settings (as given or remembered) and the containers."""

    skip_ddos: bool = False
    allow_private: bool = False
    ping_from: tuple[str, ...] = ()
    source: str = "defaults"                  # "command line", "remembered settings", "defaults"
    interface: str | None = None              # the host's external NIC (informative: the sandbox's is eth1)
    env_files: tuple[EnvPair, ...] = ()       # --env/--core; empty: the containers that are up
    registry: tuple[Container, ...] = ()      # the containers that are up (when no --env)
    backend: str | None = None
    keep: bool = False


def env_pairs(envs: list[Path], cores: list[Path]) -> tuple[EnvPair, ...]:
    """--env/--core: one --core for all, or one per --env (in order)."""
    if cores and not envs:
        raise InputError("--core", "given without --env", "pass the component .env with --env")
    if len(cores) not in (0, 1, len(envs)):
        raise InputError("--core", f"{len(cores)} core files for {len(envs)} env files",
                         "give one --core for all, or one --core after each --env")
    out: list[EnvPair] = []
    for i, env in enumerate(envs):
        core = cores[i] if len(cores) == len(envs) else (cores[0] if cores else None)
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", env.name[:-4] if env.name.endswith(".env") else env.name)
        base = base.lstrip("._-")[:50] or "container"
        name, k = base, 2
        while name in {p.name for p in out}:
            name, k = f"{base}-{k}", k + 1
        out.append(EnvPair(name, env, core))
    return tuple(out)


def resolve_options(interface: str | None, skip_ddos: bool, allow_private: bool, ping_from: list[str],
                    envs: list[Path], cores: list[Path], backend: str | None, keep: bool, store) -> Options:
    """Flags when any of -i/-e/-a/-p is given, else the remembered settings of the last apply;
    the --env/--core containers, else the containers that are up."""
    pairs = env_pairs(envs, cores)
    resolved = settings.resolve("selftest", settings.Flags(interface, skip_ddos, allow_private, tuple(ping_from)),
                                store)
    fw = resolved.firewall
    registry = () if pairs else tuple(store.containers().values())
    return Options(fw.skip_ddos, fw.allow_private, fw.ping_from, resolved.source, fw.interface, pairs, registry, backend,
                   keep)


# --------------------------------------------------------------------------- the run (impure)

class InSandbox:
    """Runs commands inside the selftest's namespaces (never in the machine's own)."""

    def __init__(self, runner: Runner, box: Sandbox) -> None:
        self.runner = runner
        self.box = box

    def ns(self, role: str) -> str:
        return {"host": self.box.host, "inet": self.box.inet, "admin": self.box.admin}[role]

    def run(self, role: str, argv: list[str], *, env: dict | None = None, unset: tuple[str, ...] = (),
            input: str | None = None, check: bool = True):
        prefix = ["ip", "netns", "exec", self.ns(role)]
        if env or unset:
            prefix += ["env", *[a for u in unset for a in ("-u", u)], *[f"{k}={v}" for k, v in env.items()]]
        return self.runner.run(prefix + argv, input=input, check=check, mutates=True, cwd="/")


def backend_name(runner, asked: str | None) -> str:
    """The backend the sandbox runs (nft, iptables-nft, iptables-legacy): --backend, else
    HOSTPREP_BACKEND, else apply's automatic choice (backend.choose: the native nft backend
    where ``nft -c`` accepts its probe script, iptables otherwise); not the host's remembered
    backend: the sandbox is a host of its own."""
    return choose(runner, asked).backend.name


def read_counters(sb: InSandbox, variant: str, families: tuple[int, ...]) -> Counters:
    """hostprep's counters in the sandbox host as ``variant`` (a backend name) shows them."""
    if variant == "nft":
        res = sb.run("host", ["nft", "-j", "list", "table", "inet", "hostprep"], check=False)
        obs = parse_nft_json(res.stdout, families, SET_PREFIX).observed if res.returncode == 0 else {}
    else:
        be = IptablesBackend(sb.runner, variant.split("-", 1)[1])
        obs = {fam: parse_save(sb.run("host", [be.tool(fam, "save"), "-c", "-t", "filter"]).stdout, fam)
               for fam in families}
    res = sb.run("host", ["nft", "list", "table", "netdev", "hostprep"], check=False)
    nft = {k: c.packets for k, c in parse_nft_listing(res.stdout).counters.items()} if res.returncode == 0 else {}
    return Counters(obs.get(4, Observed(4)), obs.get(6, Observed(6)), nft)


def send(sb: InSandbox, role: str, probes: list[Probe]) -> dict[str, list[dict]]:
    """One ``python -m hostprep.probe`` call for all the probes of one namespace in one phase."""
    batch = [p.probe for p in probes for _ in range(p.repeat)]
    if not batch:
        return {}
    res = sb.run(role, python_module("hostprep.probe"), env={"PYTHONPATH": PACKAGE_PARENT},
                 input=json.dumps(batch), check=False)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise CommandFailed("hostprep.probe", f"in {sb.ns(role)}: exit {res.returncode}: "
                            + (lines[-1] if lines else "no output"),
                            "is scapy installed? pip install 'hostprep[probe]'")
    flat = json.loads(res.stdout)
    out: dict[str, list[dict]] = {}
    i = 0
    for p in probes:
        out[p.name] = flat[i:i + p.repeat]
        i += p.repeat
    return out


def hostprep_in_sandbox(sb: InSandbox, root: Path, variant: str, args: list[str]):
    """``python -m hostprep ARGS`` in the sandbox host with the temporary state root."""
    res = sb.run("host", [*python_module("hostprep"), *args],
                 env={"HOSTPREP_ROOT": str(root), "HOSTPREP_BACKEND": variant, "PYTHONPATH": PACKAGE_PARENT},
                 unset=("HOSTPREP_SELINUXFS",), check=False)
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        detail = lines[-1].removeprefix("error: ") if lines else f"exit {res.returncode}"
        raise CommandFailed(f"hostprep {args[0]}{' ' + args[1] if args[0] == 'container' else ''} in the sandbox",
                            detail)
    return res


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like SIGINT, so ``finally`` cleans up for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Cleanup is not cut short by a second Ctrl-C or SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def prepare_containers(options: Options) -> list[tuple[str, Container, dict | None]]:
    """(name, container as given or recorded, user files or None) for every container to bring up."""
    out = []
    for pair in options.env_files:
        c = load_container(pair.name, pair.env, pair.core, None, EXT, [f"{HOST_EXT4}/24", f"{HOST_EXT6}/64"])
        out.append((pair.name, c, {"env": pair.env, "core": pair.core}))
    for c in options.registry:
        out.append((c.name, c, None))
    return out


def bring_up(sb: InSandbox, root: Path, variant: str, options: Options, prepared: list, sandboxed: tuple,
             dests: dict[str, str], sandbox_ping: list[str]) -> None:
    """The binding IPs on eth1, apply with the settings, then ``container up`` for each container."""
    for addr in sorted(set(dests.values()) - {HOST_EXT4, HOST_EXT6}):
        v6 = ipaddress.ip_address(addr).version == 6
        sb.run("host", ["ip", "addr", "add", f"{addr}/{64 if v6 else 24}", "dev", EXT] + (["nodad"] if v6 else []))
    apply_args = ["apply", "-i", EXT, "-y", "--ignore-selinux"] + (["-e"] if options.skip_ddos else []) \
        + (["-a"] if options.allow_private else []) + [a for n in sandbox_ping for a in ("-p", n)]
    hostprep_in_sandbox(sb, root, variant, apply_args)
    envdir = root / "selftest-env"
    envdir.mkdir(parents=True)
    for (name, c, files), sc in zip(prepared, sandboxed):
        texts = env_texts(c, str(sc.dest))
        installer = envdir / f"{name}.installer.env"
        installer.write_text(texts["installer"])
        if files is None:
            # A recorded container: its env files are rebuilt from the registry's ports and limits.
            (envdir / f"{name}.env").write_text(texts["env"])
            (envdir / f"{name}.core.env").write_text(texts["core"])
            files = {"env": envdir / f"{name}.env", "core": envdir / f"{name}.core.env"}
        args = ["container", "up", name, "--env", str(files["env"])]
        if files.get("core"):
            args += ["--core", str(files["core"])]
        hostprep_in_sandbox(sb, root, variant, args + ["--installer", str(installer)])


ROLE_WORDS = {"inet": "from the internet peer", "admin": "from the admin peer", "host": "from the host itself"}


def run_selftest(options: Options, runner: Runner | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Build the sandbox, apply, bring the containers up, probe, judge; returns the report.

    The sandbox and the temporary root are removed before returning (and when
    interrupted), unless ``options.keep``.  ``progress(done, total, what)`` is
    called before each step (sandbox, apply, each phase's probes per peer) and
    once at the end; it prints nothing here (the CLI decides).
    """
    step = [0, 0]     # done, total (known once the matrix is built)

    def tell(what: str) -> None:
        if progress is not None:
            progress(step[0], step[1], what)
        step[0] += 1

    started = time.monotonic()
    runner = runner or Runner(timeout=120)
    if importlib.util.find_spec("scapy") is None:
        raise RefusedError("selftest", "scapy is not installed (the probes need it)",
                           "install the probe extra: pip install 'hostprep[probe]'")
    variant = backend_name(runner, options.backend)
    ipv6 = Path("/proc/sys/net/ipv6").is_dir()
    families = (4, 6) if ipv6 else (4,)
    sources = nicmod.resolve_ping_sources(list(options.ping_from), allow_private=options.allow_private)
    user_nets = [str(n) for src in sources for n in src.networks]
    sandbox_ping = user_nets + [a for a in (PING_ALLOWED4, PING_ALLOWED6) if a not in user_nets]
    probe_settings = ProbeSettings(options.skip_ddos, options.allow_private,
                        tuple(ipaddress.ip_network(n) for n in sandbox_ping), ipv6)
    prepared = prepare_containers(options)
    dests = sandbox_dests([c for _, c, _ in prepared])
    sandboxed = tuple(rebind(c, dests[str(c.dest)]) for _, c, _ in prepared)
    matrix = build_matrix(probe_settings, sandboxed)
    step[1] = 2 + len({(p.phase, p.role) for p in matrix.probes})

    box = Sandbox(f"hpself{os.getpid()}")
    root: Path | None = None
    sb = InSandbox(runner, box)
    notes = ["the sandbox is not a proxy host: apply ran there with --ignore-selinux, and the kernel profile "
             "(-k) is not part of the selftest",
             f"-p {PING_ALLOWED4} and -p {PING_ALLOWED6} were added by selftest (the allowed ping sources it probes "
             "from); packets are sent from the sandbox's own addresses only"]
    if options.interface and options.interface != EXT:
        notes.append(f"the external NIC {options.interface} is {EXT} in the sandbox")
    for src in sources:
        if not validate.looks_numeric(src.given):
            notes.append(f"-p {src.given} -> {', '.join(str(n) for n in src.networks)}")
    verdicts: list[Verdict] = []
    timings: dict[str, float] = {}
    with interruptible():
        failed = True
        try:
            tell(f"building the sandbox {box.name}")
            root = Path(tempfile.mkdtemp(prefix=f"{box.name}-", dir="/tmp"))
            (root / SANDBOX_MARKER).write_text("made by hostprep selftest\n")
            try:
                box.create(runner)
            except CommandFailed as err:
                raise RefusedError("selftest", f"network namespaces cannot be made here ({err.problem})",
                                   "run it as root on a host (or VM) that allows 'ip netns add'") from None
            timings["sandbox"] = round(time.monotonic() - started, 1)
            tell(f"applying in the sandbox (backend {variant}"
                 + (f", {len(prepared)} containers)" if prepared else ")"))
            bring_up(sb, root, variant, options, prepared, sandboxed, dests, sandbox_ping)
            timings["apply"] = round(time.monotonic() - started - sum(timings.values()), 1)
            done_steps: set[Step] = set()
            for phase in PHASES:
                probes = [p for p in matrix.probes if p.phase == phase]
                for st in (st for p in probes for st in p.setup):
                    if st not in done_steps:
                        sb.run(st.role, list(st.argv))
                        done_steps.add(st)
                before = read_counters(sb, variant, families)
                results: dict[str, list[dict]] = {}
                for role in ROLES:
                    mine = [p for p in probes if p.role == role]
                    if mine:
                        tell(f"{phase} probes {ROLE_WORDS[role]} ({len(mine)})")
                    results.update(send(sb, role, mine))
                after = read_counters(sb, variant, families)
                verdicts += judge_phase(probes, results, before, after)
                timings[phase] = round(time.monotonic() - started - sum(timings.values()), 1)
            failed = False
        finally:
            with uninterrupted():
                if not options.keep:
                    try:
                        box.destroy(runner)
                    except HostprepError:
                        if not failed:
                            raise
                    if root is not None:
                        shutil.rmtree(root, ignore_errors=True)
    tell("done")
    by_name = {v.probe.name: v for v in verdicts}
    rows = [by_name[p.name] for p in matrix.probes]
    return {
        "schema": SCHEMA,
        "ok": all(v.ok for v in rows),
        "sandbox": {"name": box.name, "namespaces": list(box.namespaces), "external_nic": EXT,
                    "internal_nic": INT, "kept": options.keep, "root": str(root) if options.keep else None},
        "backend": variant,
        "settings": {"source": options.source, "interface": options.interface, "skip_ddos": options.skip_ddos,
                     "allow_private": options.allow_private, "ping_from": list(options.ping_from),
                     "ping_from_in_sandbox": sandbox_ping},
        "containers": [{"name": name, "template": c.template, "ports": list(c.ports), "dest": str(c.dest),
                        "dest_in_sandbox": str(sc.dest), "limits": c.limits.as_dict(), "hardening": c.hardening,
                        "restricted": c.restricted, "from": "env files" if files else "registry"}
                       for (name, c, files), sc in zip(prepared, sandboxed)],
        "probes": [{"name": v.probe.name, "from": v.probe.role, "phase": v.probe.phase,
                    "expected": v.probe.expected, "observed": v.observed, "ok": v.ok,
                    "counter": v.counters[0].label, "counters": [
                        {"label": c.label, "match": m.match, "delta": c.delta, "want": [c.lo, c.hi],
                         "own": [c.own_lo, c.own_hi], "ok": c.ok} for c, m in zip(v.counters, v.probe.checks)],
                    "replies": list(v.replies)} for v in rows],
        "mismatches": sum(1 for v in rows if not v.ok),
        "notes": notes + list(matrix.notes),
        "seconds": round(time.monotonic() - started, 1),
        "timings": timings,
    }


def group_results(report: dict) -> list[tuple[str, int, int]]:
    """(group, passed, failed) per phase and peer, in the order they ran."""
    out: dict[str, list[int]] = {}
    for p in report["probes"]:
        key = f"{p['phase']} probes {ROLE_WORDS.get(p['from'], 'from ' + p['from'])}"
        out.setdefault(key, [0, 0])[0 if p["ok"] else 1] += 1
    order = [f"{ph} probes {ROLE_WORDS[r]}" for ph in PHASES for r in ROLES]
    return [(k, *out[k]) for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))]


def report_table(report: dict, only_failed: bool = False):
    """The report as a rich Table (the CLI prints it)."""
    t = Table(title=f"hostprep selftest in sandbox {report['sandbox']['name']} (backend {report['backend']})",
              caption="packets: what the counter counted during the probe's phase; \"(phase)\": several probes "
                      "of the phase share the counter, \"here\" is this probe's part")
    for col in ("probe", "from", "expected", "observed", "counter that matched", "packets", "result"):
        t.add_column(col)
    for p in report["probes"]:
        if only_failed and p["ok"]:
            continue
        crs = [CounterResult(c["label"], c["delta"], *c["want"], *c["own"], c["ok"]) for c in p["counters"]]
        t.add_row(p["name"], p["from"], p["expected"], p["observed"], "\n".join(c.label for c in crs),
                  "\n".join(c.packets() for c in crs), "ok" if p["ok"] else "MISMATCH")
    return t


def want_text(want: list) -> str:
    lo, hi = want
    return str(lo) if hi == lo else (f">= {lo}" if hi is None else f"{lo}..{hi}")
