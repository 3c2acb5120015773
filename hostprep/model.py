"""Frozen, validated data: the policy to render and the rulesets it becomes.

Nothing here runs a command or touches the host.
"""

from __future__ import annotations

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
    "ddos": ("HOSTPREP-RST", "HOSTPREP-DDOS"),
    "spoof": ("HOSTPREP-SPOOF",),
    "ssh": ("HOSTPREP-SSH", "HOSTPREP-OUT"),
    "icmp": ("HOSTPREP-ICMP",),
    "udp": ("HOSTPREP-UDP",),
    "deny": ("HOSTPREP-DENY",),
}
DISPATCH_CHAIN = "HOSTPREP-IN"


def group_of_chain(chain: str) -> str | None:
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
    """The nft netdev table that drops fragments on the external NIC."""

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

    def to_settings(self) -> dict:
        """What is remembered for the next plain ``hostprep apply`` (the -p values as given)."""
        return {
            "interface": self.interface,
            "skip_ddos": self.skip_ddos,
            "allow_private": self.allow_private,
            "ping_from": [s.given for s in self.ping],
        }


@dataclass(frozen=True)
class Desired:
    policy: Policy
    v4: Ruleset
    v6: Ruleset
    nft: NftIngress | None

    def ruleset(self, family: int) -> Ruleset:
        return self.v4 if family == 4 else self.v6
