"""What the kernel holds, parsed: pure types and parsers, no command is run here.

The backend runs ``iptables-save``, ``ipset save`` and ``nft list`` and hands
their text to these parsers; plan, engine, status and snapshot read the result.
``LiveState`` is the whole of hostprep's part of the kernel at one moment (what
a plan is made from, what verify reads back).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field

from hostprep.model import PREFIX


def target_of(spec: str) -> str | None:
    """The ``-j``/``-g`` target of a live rule, None for rules without one (accounting rules)."""
    try:
        tokens = shlex.split(spec)
    except ValueError:
        return None
    for flag in ("-j", "-g", "--jump", "--goto"):
        if flag in tokens and tokens.index(flag) + 1 < len(tokens):
            return tokens[tokens.index(flag) + 1]
    return None


def jumps_into_hostprep(spec: str) -> bool:
    target = target_of(spec)
    return target is not None and target.startswith(PREFIX)


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: "Counter") -> "Counter":
        return Counter(self.packets + other.packets, self.bytes + other.bytes)


@dataclass(frozen=True)
class LiveRule:
    chain: str
    spec: str
    counter: Counter = Counter()


@dataclass(frozen=True)
class Observed:
    """The filter table of one family as iptables-save -c printed it."""

    family: int
    chains: tuple[str, ...] = ()          # every chain, built-in and user, in save order
    rules: tuple[LiveRule, ...] = ()      # every rule, in save order

    def chain_specs(self, chain: str) -> tuple[str, ...]:
        return tuple(r.spec for r in self.rules if r.chain == chain)

    def chain_rules(self, chain: str) -> tuple[LiveRule, ...]:
        return tuple(r for r in self.rules if r.chain == chain)

    @property
    def our_chains(self) -> tuple[str, ...]:
        return tuple(c for c in self.chains if c.startswith(PREFIX))

    @property
    def our_jumps(self) -> tuple[LiveRule, ...]:
        """Rules outside hostprep's chains that jump into one of them."""
        return tuple(r for r in self.rules if not r.chain.startswith(PREFIX) and jumps_into_hostprep(r.spec))

    def foreign(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """Foreign chains and rules (for the tests that prove they stay identical)."""
        chains = tuple(c for c in self.chains if not c.startswith(PREFIX))
        jumps = set((r.chain, r.spec) for r in self.our_jumps)
        rules = tuple((r.chain, r.spec) for r in self.rules
                      if not r.chain.startswith(PREFIX) and (r.chain, r.spec) not in jumps)
        return chains, rules


def parse_save(text: str, family: int) -> Observed:
    """Parse ``iptables-save -c -t filter`` output (counters optional)."""
    chains: list[str] = []
    rules: list[LiveRule] = []
    in_filter = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_filter = line == "*filter"
            continue
        if not in_filter or not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
            continue
        counter = Counter()
        if line.startswith("["):
            close = line.index("]")
            pkts, byts = line[1:close].split(":")
            counter = Counter(int(pkts), int(byts))
            line = line[close + 1:].strip()
        if line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            rules.append(LiveRule(chain, spec, counter))
    return Observed(family, tuple(chains), tuple(rules))


# -- ipsets ---------------------------------------------------------------------

_IPSET_V4 = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|"
                       r"[1-9]?[0-9])){3}")


def normalise_member(text: str) -> str:
    """ipset prints /32 and /128 members without a prefix; compare as networks.

    An IPv4 member as ipset prints it is already canonical (dotted quad without
    leading zeros; hash:net keeps the network with its host bits cleared), so it
    is not parsed again: only "/32" is added to a bare address.  That is the
    common case of a large exempt list (issue 10 item 14: status re-parsed every
    member of every loaded set).  IPv6 text forms vary, so they are parsed.
    """
    addr, slash, plen = text.partition("/")
    if _IPSET_V4.fullmatch(addr) and (not slash or (plen.isdigit() and int(plen) <= 32 and plen == str(int(plen)))):
        if not slash:
            return addr + "/32"
        net = f"{addr}/{plen}"
        if plen == "32" or _v4_is_network(addr, int(plen)):
            return net
    return str(ipaddress.ip_network(text, strict=False))


def _v4_is_network(addr: str, plen: int) -> bool:
    value = 0
    for part in addr.split("."):
        value = value << 8 | int(part)
    return value & ((1 << (32 - plen)) - 1) == 0


def parse_ipset_save(text: str, prefix: str) -> dict[str, frozenset[str]]:
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "create" and parts[1].startswith(prefix):
            members.setdefault(parts[1], set())
        elif len(parts) >= 3 and parts[0] == "add" and parts[1].startswith(prefix):
            members.setdefault(parts[1], set()).add(normalise_member(parts[2]))
    return {k: frozenset(v) for k, v in members.items()}


# -- the nft ingress table -----------------------------------------------------------

@dataclass(frozen=True)
class NftObserved:
    device: str
    text: str                       # normalised listing: no counters, no handles
    counters: dict[str, Counter]    # rule comment -> counter
    flooded: tuple[str, ...] = ()   # binding addresses whose container ports get SYN cookies now


_COUNTER = re.compile(r"counter packets (\d+) bytes (\d+)")
_COMMENT = re.compile(r'comment "([^"]*)"')
_DEVICE = re.compile(r'device "?([^";\s]+)"?')


_SET = re.compile(r"^\s*set (\S+) \{")
_FLOODED = re.compile(r"([0-9A-Fa-f:.]+) expires")


def _split_dynamic(text: str) -> tuple[list[str], tuple[str, ...]]:
    """The listing without the elements of the sets the kernel fills itself (flooded4/6: the
    addresses under SYN cookies now, with their expiry), and those addresses."""
    kept: list[str] = []
    flooded: list[str] = []
    current, skipping = "", False
    for ln in text.splitlines():
        m = _SET.match(ln)
        if m:
            current = m.group(1)
        if skipping or (current.startswith("flooded") and ln.strip().startswith("elements = {")):
            flooded += _FLOODED.findall(ln)
            skipping = not ln.rstrip().endswith("}")
            continue
        if ln.strip() == "}":
            current = ""
        kept.append(ln)
    return kept, tuple(flooded)


def normalise_nft(text: str) -> str:
    lines = [_COUNTER.sub("counter", ln.rstrip()) for ln in _split_dynamic(text)[0]]
    return "\n".join(ln for ln in lines if ln.strip()) + "\n"


def parse_nft_listing(text: str) -> NftObserved:
    counters: dict[str, Counter] = {}
    for line in text.splitlines():
        c, m = _COUNTER.search(line), _COMMENT.search(line)
        if c and m:
            counters[m.group(1)] = Counter(int(c.group(1)), int(c.group(2)))
    dev = _DEVICE.search(text)
    return NftObserved(dev.group(1) if dev else "", normalise_nft(text), counters, _split_dynamic(text)[1])


# -- all of it ----------------------------------------------------------------------

@dataclass(frozen=True)
class LiveState:
    """hostprep's part of the kernel as observed now: each family's filter table, the nft
    ingress table (None: absent) and hostprep's ipsets (name -> members)."""

    observed: dict[int, Observed]
    nft: NftObserved | None
    sets: dict[str, frozenset[str]] = field(default_factory=dict)
