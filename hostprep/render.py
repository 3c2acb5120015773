"""Pure rendering: a validated Policy -> iptables-restore text and nft text.

The rule content lives in the Jinja2 templates in rules/ (with the why of every
block); this module renders them and parses the result into the frozen model,
so that the plan can diff it against the live ruleset.
"""

from __future__ import annotations

import jinja2

from hostprep.model import (BOGUS_TCP_FLAGS, BUILTIN_CHAINS, PREFIX, SPOOF_SOURCES, SYNPROXY_BURST,
                            SYNPROXY_HOLD_S, SYNPROXY_OPTIONS, SYNPROXY_RATE, Chain, Container, Desired,
                            NftIngress, Policy, Rule, Ruleset, bogus_flag_bytes, nft_tcp_flags)
from hostprep.paths import data_dir

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
    from hostprep import validate
    validate.interface_name(interface)
    return _ENV.get_template("failsafe.rules.j2").render(family=family, iface=interface)


def container_text(containers: tuple[Container, ...], family: int, *, cookies: bool = False) -> str:
    """The containers' chains of one family (only containers whose hardening is on); ``cookies``
    (the ddos group is on): their SYN cookie rules in HOSTPREP-COOKIES too."""
    mine = [c for c in containers if c.family == family and c.hardening]
    return _ENV.get_template("container.rules.j2").render(containers=mine, cookies=cookies)


def ban_text(containers: tuple[Container, ...], family: int) -> str:
    """The ban rules of one family (rules/ban.rules.j2), "" when no container of it has fail2ban on.

    The nft backend (issue 13) implements the same contract with an nft set with
    ``flags timeout`` in its own table; this function and ``Container.ban_set`` are the seam.
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


def restore_header() -> str:
    return "*filter\n"


def is_ours(chain: str) -> bool:
    return chain.startswith(PREFIX)
