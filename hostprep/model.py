"""Frozen, validated data: the policy to render and the rulesets it becomes.

Nothing here runs a command or touches the host.  About 580 lines, over the ~500 of the
rest: every validated type of the flow (policy, containers and their limits, sets, ban
sets, the SYN-cookie and flag constants the templates share) is defined here once, so
that render, plan and the records read one definition.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shlex
from dataclasses import dataclass, field

from hostprep import validate
from hostprep.errors import InputError

PREFIX = "HOSTPREP-"
BUILTIN_CHAINS = ("INPUT", "FORWARD", "OUTPUT")

# The hardening groups, in the order they judge a packet, and the chains that
# hold each group's rules.  Status reports present/missing and counters per group.
GROUPS: dict[str, tuple[str, ...]] = {
    "fastpath": ("HOSTPREP-FAST",),
    "ddos": ("HOSTPREP-RST", "HOSTPREP-DDOS", "HOSTPREP-COOKIES", "HOSTPREP-SYNPROXY"),
    "spoof": ("HOSTPREP-SPOOF",),
    "ssh": ("HOSTPREP-SSH", "HOSTPREP-OUT"),
    "icmp": ("HOSTPREP-ICMP",),
    "udp": ("HOSTPREP-UDP",),
    "containers": ("HOSTPREP-CONTAINERS",),   # plus one HOSTPREP-C-<name> chain per container
    "deny": ("HOSTPREP-DENY",),
}
DISPATCH_CHAIN = "HOSTPREP-IN"

# The sources the spoof group drops on the external NIC, per family.  The one copy
# of the list: rules/filter.rules.j2 renders it, and `apply -p` refuses a ping source
# inside it unless -a leaves the spoof group out (its pings could never arrive).
# IPv4 is X1's list: RFC 1918, link-local, TEST-NET-1, "this network", multicast
# and reserved (224.0.0.0/3 covers 240.0.0.0/5), loopback.  IPv6: loopback,
# IPv4-mapped, unique-local, deprecated site-local, multicast; link-local and ::
# stay out (neighbour discovery and duplicate address detection use them).
# Written as iptables-save prints them back (it keeps ::ffff:0.0.0.0/96 dotted).
SPOOF_SOURCES: dict[int, tuple[str, ...]] = {
    4: ("224.0.0.0/3", "169.254.0.0/16", "172.16.0.0/12", "192.0.2.0/24", "192.168.0.0/16",
        "10.0.0.0/8", "0.0.0.0/8", "240.0.0.0/5", "127.0.0.0/8"),
    6: ("::1/128", "::ffff:0.0.0.0/96", "fc00::/7", "fec0::/10", "ff00::/8"),
}


# TCP flag combinations that never occur in real TCP (the ddos group): (mask, set flags)
# as iptables' --tcp-flags writes them.  The one copy: rules/filter.rules.j2 renders one
# rule each, rules/ingress.nft.j2 one set of the flag bytes they match (bogus_flag_bytes).
BOGUS_TCP_FLAGS: tuple[tuple[str, str], ...] = (
    ("FIN,SYN,RST,PSH,ACK,URG", "NONE"),                   # NULL
    ("FIN,SYN", "FIN,SYN"),
    ("SYN,RST", "SYN,RST"),
    ("FIN,RST", "FIN,RST"),
    ("FIN,ACK", "FIN"),                                     # FIN without ACK
    ("ACK,URG", "URG"),
    ("PSH,ACK", "PSH"),
    ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,RST,PSH,ACK,URG"), # all set
    ("FIN,SYN,RST,PSH,ACK,URG", "FIN,PSH,URG"),             # XMAS
    ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,PSH,URG"),
    ("FIN,SYN,RST,PSH,ACK,URG", "FIN,SYN,RST,ACK,URG"),
)
_TCP_FLAG_BITS = {"FIN": 1, "SYN": 2, "RST": 4, "PSH": 8, "ACK": 16, "URG": 32}


def bogus_flag_bytes() -> tuple[int, ...]:
    """Every value of the six flags FIN..URG that one of BOGUS_TCP_FLAGS matches."""
    def bits(names: str) -> int:
        return 0 if names == "NONE" else sum(_TCP_FLAG_BITS[n] for n in names.split(","))
    return tuple(v for v in range(64) if any(v & bits(m) == bits(c) for m, c in BOGUS_TCP_FLAGS))


def nft_tcp_flags(value: int) -> str:
    """A flag byte in nft syntax: ``fin | syn``, ``0x0`` for none."""
    names = [n.lower() for n, b in _TCP_FLAG_BITS.items() if value & b]
    return " | ".join(names) if names else "0x0"


# SYN cookies in front of the container ports (synproxy, issue 12 item 2).  The nft
# ingress chain counts the SYNs to the container ports of each family; while they stay
# within SYNPROXY_RATE/s (burst SYNPROXY_BURST) every SYN is tracked as before (the
# per-source limits judge it, the client sees the container's own SYN-ACK, a closed port
# its RST).  Above it the family's ports are "flooded" for SYNPROXY_HOLD_S seconds after
# the last SYN over the rate: every SYN to them skips conntrack (notrack at ingress) and
# is answered with a SYN cookie by the SYNPROXY target; only a client that returns a valid
# cookie gets a conntrack entry and meets the connection and rate limits (see
# rules/filter.rules.j2).  200/s is about 3 times the calm rate of a proxy of 2,000 agents
# (one new connection per agent every 30 s) and far above what the per-source limits let
# one source do (Finesse: 6/s); the burst covers a reconnect storm of a few hundred agents.
SYNPROXY_RATE = 200
SYNPROXY_BURST = 400
SYNPROXY_HOLD_S = 10
# The TCP options the SYN-ACK cookie announces on the container's behalf, as a Linux
# server behind them announces them (RHEL 9 defaults: SACK, timestamps, window scale 7);
# the MSS of a 1500-byte MTU (IPv4 40, IPv6 60 bytes of headers).  A cookie can encode
# only 4 MSS values (536, 1300, 1440, 1460): a client announcing less is given the next
# lower one.  Written as iptables-save prints them back.
SYNPROXY_OPTIONS: dict[int, str] = {4: "--sack-perm --timestamp --wscale 7 --mss 1460",
                                    6: "--sack-perm --timestamp --wscale 7 --mss 1440"}


def spoof_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network
                ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The first range of the spoof list that ``net`` overlaps (its sources are dropped), or None."""
    return next((r for r in map(ipaddress.ip_network, SPOOF_SOURCES[net.version]) if net.overlaps(r)), None)


BAN_CHAIN = "HOSTPREP-BAN"     # rules/ban.rules.j2: counted with the containers


def group_of_chain(chain: str) -> str | None:
    if chain.startswith("HOSTPREP-C-") or chain == BAN_CHAIN:
        return "containers"
    for group, chains in GROUPS.items():
        if chain in chains:
            return group
    return None


def _check_token_text(text: str, what: str) -> None:
    if "\n" in text or "\r" in text or "\x00" in text:
        raise InputError(what, "contains a line break or NUL", "this is a bug in a template")


@dataclass(frozen=True)
class Rule:
    """One rule of a chain, as the canonical iptables-save spec after ``-A CHAIN``."""

    chain: str
    spec: str

    def __post_init__(self) -> None:
        _check_token_text(self.spec, f"rule in {self.chain}")
        try:
            tokens = shlex.split(self.spec)
        except ValueError as err:
            raise InputError(f"rule in {self.chain}", f"unbalanced quoting ({err})") from None
        if "-j" not in tokens:
            raise InputError(f"rule in {self.chain}", f"no target in {self.spec!r}")

    @property
    def target(self) -> str:
        tokens = shlex.split(self.spec)
        return tokens[tokens.index("-j") + 1]

    def line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX) or len(self.name) > 28:
            raise InputError("chain", f"{self.name!r} is not a hostprep chain name")
        for rule in self.rules:
            if rule.chain != self.name:
                raise InputError("chain", f"rule of {rule.chain} listed under {self.name}")

    @property
    def specs(self) -> tuple[str, ...]:
        return tuple(r.spec for r in self.rules)


@dataclass(frozen=True)
class Ruleset:
    """hostprep's chains and jumps of one family in the filter table."""

    family: int
    chains: tuple[Chain, ...]
    jumps: tuple[Rule, ...]  # rules in built-in chains whose target is a hostprep chain

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise InputError("family", f"{self.family} is not 4 or 6")
        names = [c.name for c in self.chains]
        if len(set(names)) != len(names):
            raise InputError("ruleset", "a chain is declared twice")
        for jump in self.jumps:
            if jump.chain not in BUILTIN_CHAINS or not jump.target.startswith(PREFIX):
                raise InputError("ruleset", f"{jump.line()!r} is not a jump into hostprep")
        known = set(names)
        for chain in self.chains:
            for rule in chain.rules:
                if rule.target.startswith(PREFIX) and rule.target not in known:
                    raise InputError("ruleset", f"{rule.line()!r} jumps to an undeclared chain")

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)

    @property
    def rule_count(self) -> int:
        return len(self.jumps) + sum(len(c.rules) for c in self.chains)

    @property
    def groups(self) -> tuple[str, ...]:
        names = {c.name for c in self.chains}
        return tuple(g for g, chains in GROUPS.items() if any(c in names for c in chains))


@dataclass(frozen=True)
class NftIngress:
    """The nft netdev table on the external NIC (ddos group): the stateless drops (fragments,
    bogus TCP flags) and the SYN counting that switches the container ports to SYN cookies."""

    device: str
    script: str  # the full `nft -f` text, replaces the table atomically


@dataclass(frozen=True)
class PingSource:
    """One -p value as given, and the networks it stands for."""

    given: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Policy:
    """Validated settings of one apply: everything the templates need.

    ``ping`` holds the -p values with hostnames already resolved (that happens
    at apply time, outside this module).
    """

    interface: str
    skip_ddos: bool = False
    allow_private: bool = False
    ping: tuple[PingSource, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate.interface_name(self.interface)
        for src in self.ping:
            if not src.networks:
                raise InputError("-p/--ping-from", f"{src.given!r} resolved to no address")

    def ping_networks(self, family: int) -> tuple[str, ...]:
        seen: list[str] = []
        for src in self.ping:
            for net in src.networks:
                if net.version == family and str(net) not in seen:
                    seen.append(str(net))
        return tuple(seen)


@dataclass(frozen=True)
class Desired:
    policy: Policy
    v4: Ruleset
    v6: Ruleset
    nft: NftIngress | None
    containers: tuple["Container", ...] = ()
    sets: tuple["IpSet", ...] = ()
    bans: tuple["BanSet", ...] = ()       # containers with fail2ban: created when missing, never refilled

    def ruleset(self, family: int) -> Ruleset:
        return self.v4 if family == 4 else self.v6


# -- per-container port rules -------------------------------------------------

CONTAINER_DISPATCH = "HOSTPREP-CONTAINERS"
CONTAINER_CHAIN_PREFIX = "HOSTPREP-C-"
SET_PREFIX = "hostprep-"
# The native backend keeps one list in two nft sets (render.nft_set_parts): NAME.addr, its
# single addresses in a hash set (a lookup that does not grow with the list), and NAME.net,
# its networks in an interval set.  They read back as the one list NAME
# (observed.parse_nft_json); a rule on the .net set is shown as part of the one before it.
NFT_SET_PARTS = (".addr", ".net")
_CONTAINER_NAME = __import__("re").compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_SHORTENED = __import__("re").compile(r".{8}-[0-9a-f]{8}")


def container_name(value: str, field: str = "NAME") -> str:
    if not isinstance(value, str) or not _CONTAINER_NAME.fullmatch(value):
        raise InputError(field, f"{value!r} is not a safe container name",
                         "use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class Limits:
    """The IPTABLES_* values of one component (after defaults), all positive integers."""

    connlimit_above: int
    hash_upto: int          # new connections per second per source+port
    hash_burst: int
    log_limit: int          # log lines per minute
    log_burst: int

    def __post_init__(self) -> None:
        for name, value, top in (("connlimit_above", self.connlimit_above, 65535),
                                 ("hash_upto", self.hash_upto, 1000), ("hash_burst", self.hash_burst, 10000),
                                 ("log_limit", self.log_limit, 10000), ("log_burst", self.log_burst, 10000)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise InputError(name, f"{value!r} is outside 1..{top}")

    @property
    def log_rate(self) -> str:
        """The log limit as iptables-save prints it back (60/min is shown as 1/sec)."""
        return f"{self.log_limit // 60}/sec" if self.log_limit % 60 == 0 else f"{self.log_limit}/min"

    def as_dict(self) -> dict:
        return {"connlimit_above": self.connlimit_above, "hash_upto": self.hash_upto,
                "hash_burst": self.hash_burst, "log_limit": self.log_limit, "log_burst": self.log_burst}


# IPv6 per-source keys: connlimit and hashlimit count one "source" per /64 by default.
# A /64 is the smallest prefix an IPv6 network hands to one subscriber (one LAN, one
# mobile device): keyed on the /128, one client holding a /64 opened 171 connections
# against a limit of 10 from 19 addresses.  HOSTPREP_IPV6_SOURCE_PREFIX in the
# component .env changes it (48..128): 128 where many real clients share one /64
# (an office LAN of agents), shorter where one attacker holds more (a /56 or /48 site).
IPV6_SOURCE_PREFIX_DEFAULT = 64
IPV6_SOURCE_PREFIX_MIN = 48

# The bounds of each container port's hashlimit table (issue 12, item 3).  Without them
# the kernel sizes it from RAM (8,192 buckets, at most 65,536 entries, 10 s expiry on
# hosts with more than 1 GB) and a spoofed SYN flood of 6,554 new sources a second fills it.
# When the table is full the kernel drops the packet that would need a new entry
# (hotdrop: no rule counts it, "xt_hashlimit: max count of N reached" in the kernel log):
# sources already in the table keep their limits, new sources cannot connect until
# entries expire.  See LimiterBounds for the why of each value.
HASHLIMIT_HTABLE_MAX = 131072
HASHLIMIT_HTABLE_SIZE = HASHLIMIT_HTABLE_MAX // 8


@dataclass(frozen=True)
class LimiterBounds:
    """The explicit bounds of one hashlimit table (``--hashlimit-htable-*``).

    - ``htable_max`` 131,072 entries: twice the kernel's default, so a spoofed flood
      must bring max / expire new sources a second (65,536/s with Finesse's limits)
      before the table is full; at about 128 bytes an entry that is at most 16 MiB
      of kernel memory per container port.
    - ``htable_size`` max / 8 buckets: the kernel's own ratio (its default max is 8 x
      size), so a full table still walks about 8 entries per lookup.
    - ``htable_expire_ms``: the time an idle source's bucket takes to fill up again
      (burst / rate), rounded up to whole seconds: an entry that expired earlier
      would give its source a fresh burst before the limit allows one, one that
      lives longer holds room a flood needs.  The kernel's 10 s kept a spoofed
      source 5 times longer than needed with Finesse's limits (6/s burst 8: 2 s).
      At least 2 s: iptables-save leaves out an expiry of exactly 1000 ms (measured,
      both variants), so a 1 s rule could not be compared line by line; the kernel's
      garbage collection runs once a second, so 1 s would not be kept exactly anyway.
    """

    htable_size: int
    htable_max: int
    htable_expire_ms: int

    @classmethod
    def for_limits(cls, limits: "Limits") -> "LimiterBounds":
        refill_s = -(-limits.hash_burst // limits.hash_upto)      # ceil(burst / rate)
        return cls(HASHLIMIT_HTABLE_SIZE, HASHLIMIT_HTABLE_MAX, 1000 * max(2, refill_s))

    def as_dict(self) -> dict:
        return {"htable_size": self.htable_size, "htable_max": self.htable_max,
                "htable_expire_ms": self.htable_expire_ms}


# The most entries one IP list of an env file may hold (and one container's exempt set):
# 65,536 is the maxelem hostprep's ipsets are created with (plan.ipset_fill_script), and
# parsing, loading and comparing a list costs time and memory at every up, status
# and boot (1,000,000 entries: 26 s and 860 MB for one up).
MAX_LIST_ENTRIES = 65536


@dataclass(frozen=True)
class EnvFile:
    """An env file a container was brought up from, as recorded and logged.

    No plain hash of the content (core.env holds NGX_JWT_SECRET: a sha256 in a log is
    an offline oracle for a guessable secret): ``digest`` is an HMAC-SHA256 with a key
    only root can read (``state.Store.file_key``), "" when none was used; size and
    mtime name the version of the file for a reader.  ``role``: env, core or installer
    (what ``container up NAME`` re-reads).
    """

    path: str
    digest: str = ""
    role: str = ""
    size: int = 0
    mtime: float = 0.0

    def as_dict(self) -> dict:
        # "sha256" stays, empty: hostprep before issue 10 needs the key to read a record, and
        # a boot unit or a downgrade that cannot read one leaves the container's ports closed.
        return {"path": self.path, "role": self.role, "size": self.size, "mtime": self.mtime,
                "hmac": self.digest, "sha256": ""}

    @classmethod
    def from_dict(cls, d: dict, index: int) -> "EnvFile":
        role = d.get("role")
        if role is None:
            # Records before roles were kept: env first, then core and/or installer,
            # told apart by the installer's file names (anything else is not remembered).
            base = d["path"].rsplit("/", 1)[-1]
            role = "env" if index == 0 else "core" if base == "core.env" else \
                "installer" if base == "installer.env" else ""
        # A legacy "sha256" is not carried on: it is the hash the log must not show
        # (records written now keep the key, empty, for older readers).
        return cls(str(d["path"]), str(d.get("hmac", "")), str(role), int(d.get("size", 0)),
                   float(d.get("mtime", 0.0)))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Container:
    """One proxy container's port rules, resolved from its env files (already validated)."""

    name: str
    template: str
    ports: tuple[int, ...]
    dest: ipaddress.IPv4Address | ipaddress.IPv6Address   # PROXY_BINDING_IP
    limits: Limits
    hardening: bool = True                                 # NGX_IPTABLES_HARDENING
    restricted: bool = False                               # NGX_TRAFFIC_RESTRICTED
    load_balancers: tuple[Network, ...] = ()
    exempt: tuple[Network, ...] = ()                       # rate-limit-disable + Cloud Connect clients
    files: tuple[EnvFile, ...] = ()
    ipv6_source_prefix: int = IPV6_SOURCE_PREFIX_DEFAULT   # HOSTPREP_IPV6_SOURCE_PREFIX
    fail2ban: bool = False                                 # container up --fail2ban (hostprep/fail2ban.py)

    def __post_init__(self) -> None:
        container_name(self.name)
        if self.hardening and not self.ports:
            raise InputError(self.name, "no port to open", "check the port properties of the component .env")
        for p in self.ports:
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
                raise InputError(self.name, f"port {p!r} is outside 1..65535")
        if len(set(self.ports)) != len(self.ports):
            raise InputError(self.name, "a port is listed twice")
        p6 = self.ipv6_source_prefix
        if not isinstance(p6, int) or isinstance(p6, bool) or not IPV6_SOURCE_PREFIX_MIN <= p6 <= 128:
            raise InputError("HOSTPREP_IPV6_SOURCE_PREFIX", f"{p6!r} is outside {IPV6_SOURCE_PREFIX_MIN}..128")
        if self.restricted and not self.networks("lb"):
            raise InputError("NGX_TRAFFIC_RESTRICTED", f"is true but NGX_LOAD_BALANCER_IPS has no IPv{self.family} "
                             f"address for {self.dest}: nobody could reach the container",
                             "list the load balancers, or set it to false")

    @property
    def family(self) -> int:
        return self.dest.version

    @property
    def key(self) -> str:
        return _short_hash(self.name)

    @property
    def chain(self) -> str:
        # xtables chain names have at most 28 characters.
        # A name that already looks like a shortened one is shortened too, so two
        # containers never share a chain.
        fits = len(self.name) <= 17 and not _SHORTENED.fullmatch(self.name)
        short = self.name if fits else f"{self.name[:8]}-{self.key}"
        return CONTAINER_CHAIN_PREFIX + short

    def set_name(self, kind: str) -> str:
        """ipset names (at most 31 characters): hostprep-<hash>-lb4 / -ex6 ..."""
        return f"{SET_PREFIX}{self.key}-{kind}{self.family}"

    @property
    def source_prefix(self) -> int:
        """The prefix length that is one "source" for connlimit and hashlimit: /32 for IPv4,
        ``ipv6_source_prefix`` (default /64) for IPv6."""
        return 32 if self.family == 4 else self.ipv6_source_prefix

    @property
    def limiter(self) -> "LimiterBounds":
        return LimiterBounds.for_limits(self.limits)

    def hashlimit_name(self, port: int) -> str:
        # hashlimit table names have at most 15 characters and are global per netns.
        # The kernel keeps an existing table's whole configuration (rate, burst, source
        # mask, size, max, expiry) when a rule with the same name is loaded again, so
        # the name changes with every one of them: a new option set gets a new table
        # (and is enforced), the old one goes with the old rule.
        lim, b = self.limits, self.limiter
        key = (f"{self.name}|{self.dest}|{lim.hash_upto}|{lim.hash_burst}|/{self.source_prefix}"
               f"|{b.htable_size}|{b.htable_max}|{b.htable_expire_ms}")
        return f"HP_{port}_{_short_hash(key, 6)}"

    def networks(self, which: str) -> tuple[Network, ...]:
        nets = self.load_balancers if which == "lb" else self.exempt
        return tuple(n for n in nets if n.version == self.family)

    def sets(self) -> tuple["IpSet", ...]:
        out = []
        for kind in ("lb", "ex"):
            members = self.networks(kind)
            if members and self.hardening:
                out.append(IpSet(self.set_name(kind), self.family, tuple(sorted(set(members), key=str))))
        return tuple(out)

    def as_dict(self) -> dict:
        return {"name": self.name, "template": self.template, "ports": list(self.ports),
                "dest": str(self.dest), "limits": self.limits.as_dict(), "hardening": self.hardening,
                "restricted": self.restricted, "load_balancers": [str(n) for n in self.load_balancers],
                "exempt": [str(n) for n in self.exempt],
                "files": [f.as_dict() for f in self.files], "ipv6_source_prefix": self.ipv6_source_prefix,
                **({"fail2ban": True} if self.fail2ban else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Container":
        return cls(d["name"], d["template"], tuple(int(p) for p in d["ports"]), ipaddress.ip_address(d["dest"]),
                   Limits(**d["limits"]), bool(d["hardening"]), bool(d["restricted"]),
                   tuple(ipaddress.ip_network(n) for n in d["load_balancers"]),
                   tuple(ipaddress.ip_network(n) for n in d["exempt"]),
                   tuple(EnvFile.from_dict(f, i) for i, f in enumerate(d.get("files", []))),
                   # records before issue 12 have no prefix: the default (/64) applies to them too
                   int(d.get("ipv6_source_prefix", IPV6_SOURCE_PREFIX_DEFAULT)),
                   bool(d.get("fail2ban", False)))

    def ban_set(self) -> "BanSet | None":
        """The set fail2ban's hostprep-ban action fills (container up --fail2ban), of the
        container's family: its ports are open on PROXY_BINDING_IP only."""
        return BanSet(self.set_name("bn"), self.family) if self.fail2ban and self.hardening else None

    def file(self, role: str) -> "EnvFile | None":
        """The recorded env file of ``role`` (env, core, installer), if any."""
        return next((f for f in self.files if f.role == role), None)


@dataclass(frozen=True)
class IpSet:
    """An ipset of source networks (hash:net), so a rule's cost does not grow with the list."""

    name: str
    family: int
    members: tuple[Network, ...]

    def __post_init__(self) -> None:
        if not self.name.startswith(SET_PREFIX) or len(self.name) > 31:
            raise InputError("ipset", f"{self.name!r} is not a hostprep set name")


BAN_SET = __import__("re").compile(r"hostprep-[0-9a-f]{8}-bn[46]")
BAN_SET_MAXELEM = 65536


def is_ban_set(name: str) -> bool:
    """A container's ban set (its members are fail2ban's bans, never hostprep's to set)."""
    return BAN_SET.fullmatch(name) is not None


@dataclass(frozen=True)
class BanSet:
    """A container's ban set: hash:ip with a timeout, created when missing and never
    flushed, filled or swapped by hostprep (fail2ban adds and deletes the members;
    each member carries the jail's bantime as its own timeout, so a ban ends even when
    fail2ban is gone).  ``apply``, ``container up`` and ``boot`` reload hostprep's rules
    around it and leave the bans in place; ``container down`` and ``flush`` destroy it.
    """

    name: str
    family: int

    def __post_init__(self) -> None:
        if not is_ban_set(self.name) or self.name[-1] != str(self.family):
            raise InputError("ipset", f"{self.name!r} is not a hostprep ban set name")

    @property
    def members(self) -> tuple:
        return ()

    def create_line(self, exist: bool = False) -> str:
        """The one ``create`` line, for ``ipset restore`` and fail2ban's actionstart alike
        (the same parameters, so either may create it first at boot)."""
        family = "inet" if self.family == 4 else "inet6"
        return (f"create {self.name} hash:ip family {family} hashsize 1024 maxelem {BAN_SET_MAXELEM} timeout 0"
                + (" -exist" if exist else ""))
