"""Pure rendering: a validated Policy -> iptables-restore text and nft text.

The rule content lives in the Jinja2 templates in rules/ (with the why of every
block); this module renders them and parses the result into the frozen model,
so that the plan can diff it against the live ruleset.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import re

import jinja2

from hostprep import validate
from hostprep.data import data_dir
from hostprep.model import (BAN_SET_MAXELEM, BOGUS_TCP_FLAGS, BUILTIN_CHAINS, SPOOF_SOURCES, SYNPROXY_BURST,
                            SYNPROXY_HOLD_S, SYNPROXY_OPTIONS, SYNPROXY_RATE, BanSet, Chain, Container, Desired,
                            IpSet, NFT_SET_PARTS, NftIngress, Policy, Rule, Ruleset, bogus_flag_bytes,
                            nft_tcp_flags)

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(data_dir("rules"))),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)


def filter_text(policy: Policy, family: int) -> str:
    """The rendered template (with its why-comments) for one family."""
    return _ENV.get_template("filter.rules.j2").render(
        family=family,
        iface=policy.interface,
        ddos=not policy.skip_ddos,
        spoof=not policy.allow_private,
        spoof_sources=SPOOF_SOURCES[family],
        bogus_patterns=BOGUS_TCP_FLAGS,
        synproxy_options=SYNPROXY_OPTIONS[family],
        ping=policy.ping_networks(family),
    )


def parse_rules(text: str, family: int) -> Ruleset:
    """Parse restore-style lines (``:CHAIN``, ``-A CHAIN spec``, ``#``) into a Ruleset."""
    order: list[str] = []
    rules: dict[str, list[Rule]] = {}
    jumps: list[Rule] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name not in rules:
                order.append(name)
                rules[name] = []
            continue
        if not line.startswith("-A "):
            raise ValueError(f"unexpected line in rendered rules: {line!r}")
        _, chain, spec = line.split(" ", 2)
        rule = Rule(chain, spec)
        if chain in BUILTIN_CHAINS:
            jumps.append(rule)
        else:
            if chain not in rules:
                raise ValueError(f"rule for undeclared chain {chain}")
            rules[chain].append(rule)
    return Ruleset(family, tuple(Chain(n, tuple(rules[n])) for n in order), tuple(jumps))


def cookie_ports(containers: tuple[Container, ...]) -> dict[int, list[str]]:
    """The container ports behind SYN cookies, per family, as nft ``address . port`` elements:
    every port of a hardened container that is not restricted to its load balancers."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for c in containers:
        if c.hardening and not c.restricted:
            out[c.family] += [f"{c.dest} . {p}" for p in c.ports]
    return out


def nft_text(policy: Policy, containers: tuple[Container, ...] = ()) -> str:
    """The ingress table (rules/ingress.nft.j2) with the containers' SYN cookie ports."""
    return _ENV.get_template("ingress.nft.j2").render(
        iface=policy.interface, bogus_patterns=BOGUS_TCP_FLAGS,
        bogus_values=[nft_tcp_flags(v) for v in bogus_flag_bytes()], cookie=cookie_ports(containers),
        rate=SYNPROXY_RATE, burst=SYNPROXY_BURST, hold=SYNPROXY_HOLD_S)


FAILSAFE_CHAIN = "HOSTPREP-FAILSAFE"


def failsafe_text(interface: str, family: int) -> str:
    """The fail-safe of one family (an iptables-restore --noflush file; see rules/failsafe.rules.j2)."""
    validate.interface_name(interface)
    return _ENV.get_template("failsafe.rules.j2").render(family=family, iface=interface)


def container_text(containers: tuple[Container, ...], family: int, *, cookies: bool = False) -> str:
    """The containers' chains of one family (only containers whose hardening is on); ``cookies``
    (the ddos group is on): their SYN cookie rules in HOSTPREP-COOKIES too."""
    mine = [c for c in containers if c.family == family and c.hardening]
    return _ENV.get_template("container.rules.j2").render(containers=mine, cookies=cookies)


def ban_text(containers: tuple[Container, ...], family: int) -> str:
    """The ban rules of one family (rules/ban.rules.j2), "" when no container of it has fail2ban on.

    The native nft backend implements the same contract with nft sets ``flags timeout`` in a
    table of their own (``ban_nft_text``, rules/ban.nft.j2); ``Container.ban_set`` is the seam.
    """
    bans = [(c, c.ban_set(), c.set_name("lb") if c.networks("lb") else None)
            for c in containers if c.family == family and c.ban_set() is not None]
    if not bans:
        return ""
    return _ENV.get_template("ban.rules.j2").render(bans=bans)


def desired(policy: Policy, containers: tuple[Container, ...] = ()) -> Desired:
    """The whole desired state: base hardening plus every container that is up.

    Containers are ordered by name, so every command renders the same dispatch
    chain whatever order the containers came up in.
    """
    containers = tuple(sorted(containers, key=lambda c: c.name))
    cookies = not policy.skip_ddos
    v4 = parse_rules(ban_text(containers, 4) + filter_text(policy, 4)
                     + container_text(containers, 4, cookies=cookies), 4)
    v6 = parse_rules(ban_text(containers, 6) + filter_text(policy, 6)
                     + container_text(containers, 6, cookies=cookies), 6)
    nft = None if policy.skip_ddos else NftIngress(policy.interface, nft_text(policy, containers))
    sets = tuple(s for c in containers for s in c.sets())
    bans = tuple(b for c in containers if (b := c.ban_set()) is not None)
    return Desired(policy, v4, v6, nft, tuple(containers), sets, bans)


# -- the native nftables backend (rules/hostprep.nft.j2) --------------------------------

NFT_HEADER = "table inet hostprep\ndelete table inet hostprep\n"
# The line before the netdev ingress table in rules/hostprep.nft.j2 (its last block): the
# backend loads the script without that table while the external NIC is absent.
NFT_INGRESS_MARK = "\n# Fragments on the external NIC's ingress hook"
NFT_BASE_CHAINS = {"input": "INPUT", "forward": "FORWARD", "output": "OUTPUT"}


def _set_members(c: Container, kind: str) -> list[str]:
    """A list's networks merged (overlapping and adjacent ones), as an anonymous set of the
    ban table's rules takes them (rules/ban.nft.j2: a ban never drops a load balancer)."""
    return [str(n) for n in ipaddress.collapse_addresses(c.networks(kind))]


@dataclasses.dataclass(frozen=True)
class NftSetPart:
    """One nft set of an exempt or load-balancer list: ``interval`` False, the single addresses
    (/32, /128) in a hash set (a lookup that does not grow with the list); True, the networks in
    an interval set (its lookup grows with the number of networks, O(log n))."""

    name: str
    interval: bool
    members: tuple[str, ...]


def nft_set_parts(c: Container, kind: str) -> list[NftSetPart]:
    """A list as the native backend declares it: its single addresses in the hash set
    ``NAME.addr``, its networks in the interval set ``NAME.net`` (model.NFT_SET_PARTS); a part
    with no member is left out.  Overlapping and adjacent networks are merged (an interval set
    refuses overlapping elements; ipset's hash:net took them); an address inside one of the
    networks is left to the network.  Both sets read back as one list (observed.parse_nft_json)."""
    nets = c.networks(kind)
    full = 32 if c.family == 4 else 128
    merged = list(ipaddress.collapse_addresses(n for n in nets if n.prefixlen < full))
    starts = [int(n.network_address) for n in merged]
    ends = [int(n.broadcast_address) for n in merged]

    def covered(a: int) -> bool:
        i = bisect.bisect_right(starts, a) - 1
        return i >= 0 and a <= ends[i]

    addrs = sorted({int(n.network_address) for n in nets if n.prefixlen == full})
    addrs = [a for a in addrs if not covered(a)]
    name = c.set_name(kind)
    parts = [NftSetPart(name + NFT_SET_PARTS[0], False,
                        tuple(str(ipaddress.ip_address(a)) for a in addrs)),   # no /32: not an interval
             NftSetPart(name + NFT_SET_PARTS[1], True, tuple(str(n) for n in merged))]
    return [p for p in parts if p.members]


def _source_mask(c: Container) -> str:
    return str(ipaddress.ip_network(f"::/{c.source_prefix}").netmask) if c.family == 6 else \
        str(ipaddress.ip_network(f"0.0.0.0/{c.source_prefix}").netmask)


def _nft_rate(limits) -> str:
    return f"{limits.log_limit // 60}/second" if limits.log_limit % 60 == 0 else f"{limits.log_limit}/minute"


def nft_synproxy_options(family: int) -> str:
    """model.SYNPROXY_OPTIONS of ``family`` in the words of nft's synproxy statement
    (``--mss 1460`` -> ``mss 1460``, ``--sack-perm`` -> ``sack-perm``), in nft's own order."""
    words = SYNPROXY_OPTIONS[family].split()
    opts: dict[str, str | None] = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            opts[w[2:]] = nxt
    order = ("mss", "wscale", "timestamp", "sack-perm")
    assert set(opts) <= set(order), f"a SYNPROXY option nft's statement does not have: {opts}"
    return " ".join(k if opts[k] is None else f"{k} {opts[k]}" for k in order if k in opts)


def nft_limiter_set(c: Container, kind: str, port: int) -> str:
    """The nft backend's limiter set of a container port: ``rl`` (rate), ``cl`` (connection count)."""
    return f"{kind}{c.family}_{c.key}_{port}"


def nft_backend_text(policy: Policy, containers: tuple[Container, ...] = ()) -> str:
    """The whole of hostprep's nft ruleset (both families, sets, the ban table, ingress) as one ``nft -f`` file."""
    containers = tuple(sorted((c for c in containers if c.hardening), key=lambda c: c.name))
    fams = [{"family": fam, "spoof_sources": SPOOF_SOURCES[fam], "ping": policy.ping_networks(fam),
             # the same networks as one interval set (which refuses overlaps: 224/3 holds 240/5)
             "spoof_set": [str(n) for n in ipaddress.collapse_addresses(map(ipaddress.ip_network, SPOOF_SOURCES[fam]))],
             "containers": [c for c in containers if c.family == fam]} for fam in (4, 6)]
    script = _ENV.get_template("hostprep.nft.j2").render(
        iface=policy.interface, ddos=not policy.skip_ddos, spoof=not policy.allow_private, fams=fams,
        set_parts=nft_set_parts, limiter_set=nft_limiter_set, source_mask=_source_mask, nft_rate=_nft_rate,
        synproxy={fam: nft_synproxy_options(fam) for fam in (4, 6)},
        # rules/ingress.nft.j2, included as the netdev table
        bogus_patterns=BOGUS_TCP_FLAGS, bogus_values=[nft_tcp_flags(v) for v in bogus_flag_bytes()],
        cookie=cookie_ports(containers), rate=SYNPROXY_RATE, burst=SYNPROXY_BURST, hold=SYNPROXY_HOLD_S)
    bans = ban_nft_text(policy.interface, containers)
    if not bans:
        return script
    # before the ingress table: the backend cuts that off while the external NIC is absent
    head, mark, tail = script.partition(NFT_INGRESS_MARK)
    return head.rstrip("\n") + "\n" + bans + mark + tail


# The ban table of the native backend (rules/ban.nft.j2): never deleted by a change, only by
# flush or when no container has fail2ban on any more (its sets hold fail2ban's bans).
BAN_TABLE = ("inet", "hostprep_ban")
BAN_CHAIN_PREFIX = "HOSTPREP-BAN-v"


def ban_nft_text(iface: str, containers: tuple[Container, ...]) -> str:
    """The ban table's part of the native script (rules/ban.nft.j2), "" when no container has
    fail2ban on: its sets declared (never flushed), its chains flushed and filled."""
    containers = tuple(sorted(containers, key=lambda c: c.name))
    fams = []
    for fam in (4, 6):
        bans = [(c, c.ban_set(), _set_members(c, "lb")) for c in containers
                if c.family == fam and c.ban_set() is not None]
        if bans:
            fams.append({"family": fam, "bans": bans})
    if not fams:
        return ""
    return _ENV.get_template("ban.nft.j2").render(iface=iface, fams=fams, set_line=ban_set_line)


_BAN_OBJECT = re.compile(r"^\s*(set|chain) (\S+) \{")


def ban_objects(text: str) -> tuple[list[str], list[str]]:
    """The sets and chains of the ban table in ``text`` (a listing of it, or a script holding it)."""
    sets: list[str] = []
    chains: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("table "):
            inside = line.split()[1:3] == list(BAN_TABLE)
            continue
        if line.startswith("}"):
            inside = False
            continue
        m = _BAN_OBJECT.match(line)
        if inside and m:
            names = sets if m.group(1) == "set" else chains
            if m.group(2) not in names:
                names.append(m.group(2))
    return sets, chains


def ban_restore_text(listing: str) -> str:
    """A script that puts the ban table back as ``listing`` (``nft -s -t list table inet
    hostprep_ban``) has it, whatever is there now, and leaves the members of its sets: the
    table, sets and chains declared, each chain flushed, then the listing (its rules) again."""
    decl: list[str] = []
    in_chain = False
    for line in listing.splitlines():
        stripped = line.strip()
        if re.match(r"^\s*chain \S+ \{", line):
            in_chain = True
        elif in_chain and stripped == "}":
            in_chain = False
        elif in_chain and not stripped.startswith("type "):
            continue                    # a rule: declared chains stay empty until the flush
        decl.append(line)
    table = " ".join(BAN_TABLE)
    flushes = "".join(f"flush chain {table} {c}\n" for c in ban_objects(listing)[1])
    return "\n".join(decl) + "\n" + flushes + listing


def ban_set_line(ban: BanSet) -> str:
    """The ``add set`` command of a ban set, as rules/ban.nft.j2 and fail2ban's actionstart
    (fail2ban.d/action.conf) both say it: the same parameters whoever creates it first."""
    kind = "ipv4_addr" if ban.family == 4 else "ipv6_addr"
    return f"add set {' '.join(BAN_TABLE)} {ban.name} {{ type {kind}; size {BAN_SET_MAXELEM}; flags timeout; }}"


_CT_ORIG_PORT = re.compile(r"(?<!meta l4proto tcp )\bct original proto-dst ")


def nft_loadable(listing: str) -> str:
    """``nft -s list table ...`` made loadable again: nft (1.0.6) lists ``meta l4proto tcp ct
    original proto-dst 8445 tcp flags ...`` without its ``meta l4proto tcp`` (the later ``tcp``
    implies it) and then refuses its own line ("Can't parse symbolic invalid expressions").
    hostprep's ``ct original proto-dst`` matches are all TCP (container ports), so the
    protocol is put back before each one that lost it."""
    return _CT_ORIG_PORT.sub("meta l4proto tcp ct original proto-dst ", listing)


_NFT_CHAIN = re.compile(r"^\s*chain (\S+) \{")
_NFT_COMMENT = re.compile(r'comment "([^"]*)"\s*$')
_NFT_JUMP = re.compile(r'\b(?:jump|goto) (\S+)(?:\s+comment "[^"]*")?\s*$')
_NFT_VERDICT = re.compile(r"\b(accept|drop|return)\s+comment \"")
_NFT_SYNPROXY = re.compile(r"\bsynproxy\b[^\"]*comment \"")
_NFT_IFNAME = re.compile(r'\b([io])ifname "([^"]+)"')
_NFT_LOG = re.compile(r"\blog prefix \"[^\"]*\"\s+comment \"")
_NFT_NET_PART = re.compile(r"@\S+" + re.escape(NFT_SET_PARTS[1]) + r"\s")


def nft_view_spec(comment: str | None, verdict: str | None, target: str | None = None) -> str | None:
    """How the nft backend shows one rule to the plan and status, in the iptables spec form the
    model holds: ``-j HOSTPREP-X`` for a jump (the family suffix dropped; a jump with a comment,
    as the SYN cookie rules have, with it first), else its comment and verdict (``accept`` ->
    ``-j ACCEPT``, a log rule ``-j LOG``, the synproxy statement ``-j SYNPROXY``); None for a
    rule hostprep does not write."""
    if target is not None:
        jump = "-j " + nft_strip_family(target)[0]
        return jump if comment is None else f'-m comment --comment "{comment}" {jump}'
    if comment is None or verdict is None:
        return None
    return f'-m comment --comment "{comment}" -j {verdict.upper()}'


def nft_strip_family(chain: str) -> tuple[str, int | None]:
    """``HOSTPREP-IN-v4`` -> ("HOSTPREP-IN", 4); a base chain ``input`` -> ("INPUT", None)."""
    if chain in NFT_BASE_CHAINS:
        return NFT_BASE_CHAINS[chain], None
    for fam in (4, 6):
        if chain.endswith(f"-v{fam}"):
            return chain[:-3], fam
    return chain, None


def nft_splice(chains: dict[str, list[tuple[str | None, str | None, object]]]) -> dict[str, list[tuple]]:
    """Inline each sub-chain (``PARENT.suffix``, e.g. a port's connection-limit chain) at the jump to
    it, so the view shows PARENT's rules as the iptables chain of the same name has them."""
    out: dict[str, list[tuple]] = {}
    for name, items in chains.items():
        if "." in name:
            continue
        flat: list[tuple] = []
        for spec, target, extra in items:
            if target is not None and "." in target:
                flat.extend(chains.get(target, []))
            else:
                flat.append((spec, target, extra))
        out[name] = flat
    return out


def nft_view(script: str) -> dict[int, Ruleset]:
    """The per-family view of a rendered nft script: hostprep's chains without the family
    suffix, each rule as ``nft_view_spec`` shows it; jumps from the base chains as jumps."""
    raw: dict[str, list[tuple[str | None, str | None, object]]] = {}
    current: str | None = None
    table = ""
    for rawline in script.splitlines():
        line = rawline.strip()
        if line.startswith("table ") and line.endswith("{"):
            table = line
            continue
        m = _NFT_CHAIN.match(rawline)
        if m:
            current = m.group(1) if table.startswith("table inet ") else None
            if current is not None:
                # the ban table's input/forward add their jumps after inet hostprep's, as the
                # backend reads both back (observed.merge_ban_table)
                raw.setdefault(current, [])
            continue
        if line == "}":
            if rawline.startswith("}"):
                table = ""
            current = None
            continue
        if current is None or not line or line.startswith(("#", "type ")):
            continue
        c, j = _NFT_COMMENT.search(line), _NFT_JUMP.search(line)
        v = _NFT_VERDICT.search(line)
        verdict = (v.group(1) if v else "log" if _NFT_LOG.search(line) else
                   "synproxy" if _NFT_SYNPROXY.search(line) else None)
        target = j.group(1) if j else None
        spec = nft_view_spec(c.group(1) if c else None, verdict, target)
        dev = _NFT_IFNAME.search(line)
        if spec is not None and dev and current in NFT_BASE_CHAINS:
            spec = f"-{dev.group(1)[0]} {dev.group(2)} {spec}"      # "-i eth1 -j HOSTPREP-IN", as iptables
        if spec is None:
            raise ValueError(f"rule without comment or jump in rendered nft rules: {line!r}")
        if _NFT_NET_PART.search(line) and raw[current] and raw[current][-1][0] == spec:
            continue        # a list's networks (NAME.net) after its addresses: one rule, as on iptables
        raw[current].append((spec, target, None))
    chains: dict[int, dict[str, list[Rule]]] = {4: {}, 6: {}}
    jumps: dict[int, list[Rule]] = {4: [], 6: []}
    for nftname, items in nft_splice(raw).items():
        name, fam = nft_strip_family(nftname)
        if fam is not None:
            chains[fam][name] = [Rule(name, spec) for spec, _, _ in items]
            continue
        for spec, target, _ in items:         # a base chain: the family is the jump target's
            tfam = nft_strip_family(target)[1] if target else None
            assert tfam is not None, f"base chain rule without a family: {spec}"
            jumps[tfam].append(Rule(name, spec))
    return {fam: Ruleset(fam, tuple(Chain(n, tuple(rs)) for n, rs in chains[fam].items()), tuple(jumps[fam]))
            for fam in (4, 6)}


def nft_desired(desired: Desired) -> Desired:
    """``desired`` in the form the nft backend loads and observes: the one script (as ``nft``),
    the per-family view of it (as v4/v6), the exempt and load-balancer sets with their members merged;
    the ban sets (``bans``) as they are: created when missing, never refilled (rules/ban.nft.j2)."""
    script = nft_backend_text(desired.policy, desired.containers)
    view = nft_view(script)
    sets = tuple(IpSet(s.name, s.family, tuple(ipaddress.collapse_addresses(s.members))) for s in desired.sets)
    return dataclasses.replace(desired, v4=view[4], v6=view[6], nft=NftIngress(desired.policy.interface, script),
                               sets=sets)
