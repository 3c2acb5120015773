"""What the kernel holds, parsed: pure types and parsers, no command is run here.

The backend runs ``iptables-save``, ``ipset save`` and ``nft list`` and hands
their text to these parsers; plan, engine, status and snapshot read the result.
``LiveState`` is the whole of hostprep's part of the kernel at one moment (what
a plan is made from, what verify reads back).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass, field

from hostprep.model import NFT_SET_PARTS, PREFIX


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
    # the native backend: the entries of each limiter set (render.nft_limiter_set) now
    limiters: dict[str, int] = field(default_factory=dict)


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


# -- the native nftables backend: `nft -j list table inet hostprep` -------------------------

_NFT_BASE = {"input": "INPUT", "forward": "FORWARD", "output": "OUTPUT"}
_NFT_VERDICTS = ("accept", "drop", "return", "log", "synproxy")


def _strip_family(chain: str) -> tuple[str, int | None]:
    if chain in _NFT_BASE:
        return _NFT_BASE[chain], None
    for fam in (4, 6):
        if chain.endswith(f"-v{fam}"):
            return chain[:-3], fam
    return chain, None


def _elem_network(elem) -> str | None:
    """One element of an nft interval set as JSON shows it, as a network string."""
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"].get("val")
    if isinstance(elem, str):
        return str(ipaddress.ip_network(elem, strict=False))
    if isinstance(elem, dict) and "prefix" in elem:
        return str(ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}", strict=False))
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return ",".join(str(n) for n in nets)
    return None


@dataclass(frozen=True)
class NftTable:
    """hostprep's ``inet hostprep`` table as the nft backend reads it back: a per-family view in
    the shape the plan and status take (chains without the family suffix, each rule shown as
    render.nft_view_spec shows it, with its counter), the lists' members (NAME.addr and NAME.net as one), the NIC the
    base chains jump on."""

    observed: dict[int, Observed]
    sets: dict[str, frozenset[str]]
    device: str
    counters: dict[str, Counter]
    limiters: dict[str, int] = field(default_factory=dict)   # the other sets (the limiters'): entries now


def parse_nft_json(text: str, families: tuple[int, ...], set_prefix: str) -> NftTable:
    """Parse ``nft -j list table inet hostprep``.  A sub-chain (``PARENT.suffix``) is shown
    inlined in its parent at the jump to it (render.nft_splice does the same to the script)."""
    data = json.loads(text)["nftables"]
    raw: dict[str, list[tuple[str, str | None, Counter]]] = {}
    sets: dict[str, set[str]] = {}
    counters: dict[str, Counter] = {}
    limiters: dict[str, int] = {}
    device = ""
    for obj in data:
        if "set" in obj:
            s = obj["set"]
            if s["name"].startswith(set_prefix):
                # NAME.addr and NAME.net (render.nft_set_parts) are the one list NAME
                members = sets.setdefault(_set_list_name(s["name"]), set())
                for e in s.get("elem", []):
                    net = _elem_network(e)
                    if net:
                        members.update(net.split(","))
            else:
                limiters[s["name"]] = len(s.get("elem", []))
        elif "chain" in obj:
            raw.setdefault(obj["chain"]["name"], [])
        elif "rule" in obj:
            r = obj["rule"]
            comment = r.get("comment")
            counter, verdict, target, dev = Counter(), None, None, ""
            for e in r.get("expr", []):
                if "counter" in e and isinstance(e["counter"], dict):
                    counter = Counter(int(e["counter"].get("packets", 0)), int(e["counter"].get("bytes", 0)))
                for v in _NFT_VERDICTS:
                    if v in e:
                        verdict = v
                for k in ("jump", "goto"):
                    if k in e:
                        target = e[k]["target"]
                if "match" in e and r["chain"] in _NFT_BASE:
                    left = e["match"].get("left", {})
                    if isinstance(left, dict) and left.get("meta", {}).get("key") in ("iifname", "oifname"):
                        device = device or str(e["match"].get("right"))
                        dev = f"-{left['meta']['key'][0]} {e['match'].get('right')} "
            if target is not None and comment is None:
                spec = dev + "-j " + _strip_family(target)[0]      # "-i eth1 -j HOSTPREP-IN", as iptables
            elif target is not None and verdict is None and "." not in target:
                # a jump with a comment (the SYN cookie rules), as render.nft_view_spec shows it
                spec = f'{dev}-m comment --comment "{comment}" -j {_strip_family(target)[0]}'
            elif comment is not None and verdict is not None and target is None:
                spec = f'-m comment --comment "{comment}" -j {verdict.upper()}'
            else:
                # A rule hostprep does not write (added by hand): shown as it is, so the
                # plan sees the chain differ.
                spec = f"-m comment --comment {json.dumps(json.dumps(r.get('expr', [])))} -j FOREIGN"
            if comment is not None and target is None:
                counters[comment] = counters.get(comment, Counter()) + counter
            items = raw.setdefault(r["chain"], [])
            if _looks_up_net_part(r) and items and items[-1][0] == spec:
                # a list's networks (NAME.net) after its addresses: one rule, as on iptables
                items[-1] = (spec, target, items[-1][2] + counter)
                continue
            items.append((spec, target, counter))
    chains: dict[int, list[str]] = {fam: [] for fam in families}
    rules: dict[int, list[LiveRule]] = {fam: [] for fam in families}
    base: dict[int, list[LiveRule]] = {fam: [] for fam in families}
    for nftname, items in _splice(raw).items():
        name, fam = _strip_family(nftname)
        if fam is None and nftname in _NFT_BASE:
            for spec, target, counter in items:
                tfam = _strip_family(target)[1] if target else None
                if tfam in base:
                    base[tfam].append(LiveRule(name, spec, counter))
        elif fam in chains:
            chains[fam].append(name)
            rules[fam] += [LiveRule(name, spec, counter) for spec, _, counter in items]
    observed = {fam: Observed(fam, tuple(["INPUT", "FORWARD", "OUTPUT"] + chains[fam]),
                              tuple(sorted(base[fam], key=lambda r: ("INPUT", "FORWARD", "OUTPUT").index(r.chain))
                                    + rules[fam]))
                for fam in families}
    return NftTable(observed, {k: frozenset(str(n) for n in ipaddress.collapse_addresses(
        ipaddress.ip_network(m) for m in v)) for k, v in sets.items()}, device, counters, limiters)


def _set_list_name(name: str) -> str:
    """The list an nft set holds part of: ``hostprep-x-ex4.addr`` -> ``hostprep-x-ex4``."""
    for part in NFT_SET_PARTS:
        if name.endswith(part):
            return name[:-len(part)]
    return name


def _looks_up_net_part(rule: dict) -> bool:
    """The rule matches against a list's interval set (``@NAME.net``)."""
    return any(isinstance(e.get("match"), dict) and isinstance(e["match"].get("right"), str)
               and e["match"]["right"].startswith("@") and e["match"]["right"].endswith(NFT_SET_PARTS[1])
               for e in rule.get("expr", []))


def _splice(chains: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for name, items in chains.items():
        if "." in name:
            continue
        flat: list[tuple] = []
        for item in items:
            target = item[1]
            if target is not None and "." in target:
                flat.extend(chains.get(target, []))
            else:
                flat.append(item)
        out[name] = flat
    return out


def merge_ban_table(table: NftTable | None, ban: NftTable, families: tuple[int, ...]) -> NftTable:
    """``inet hostprep`` and the ban table (``inet hostprep_ban``, rules/ban.nft.j2) as one view:
    the ban table's jumps from INPUT/FORWARD after hostprep's own (as render.nft_view reads the
    script, which holds it after ``inet hostprep``), its chain HOSTPREP-BAN, its sets (the bans);
    the limiters' fill stays ``inet hostprep``'s."""
    order = ("INPUT", "FORWARD", "OUTPUT")
    observed: dict[int, Observed] = {}
    for fam in families:
        main = table.observed[fam] if table is not None else Observed(fam, order)
        extra = ban.observed[fam]
        base = sorted([r for r in main.rules if r.chain in order] + [r for r in extra.rules if r.chain in order],
                      key=lambda r: order.index(r.chain))
        chains = main.chains + tuple(c for c in extra.chains if c not in main.chains)
        rules = [r for r in main.rules if r.chain not in order] + [r for r in extra.rules if r.chain not in order]
        observed[fam] = Observed(fam, chains, tuple(base + rules))
    sets = dict(table.sets) if table is not None else {}
    sets.update(ban.sets)
    counters = dict(table.counters) if table is not None else {}
    for k, v in ban.counters.items():
        counters[k] = counters.get(k, Counter()) + v
    # the limiters' fill (attack.section's "bound reached" on the native backend) is hostprep's table's
    limiters = dict(table.limiters) if table is not None else {}
    return NftTable(observed, sets, (table.device if table is not None else "") or ban.device, counters, limiters)
