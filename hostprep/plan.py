"""Pure planning: diff(desired, observed) -> the changes, and the restore text.

``Observed`` is what the kernel has now (parsed from iptables-save by the
backend).  The plan says what ``status`` reports as missing or different and what
``apply`` loads: one ``iptables-restore --noflush`` transaction per family that
(re)declares only the hostprep chains whose rules differ, puts each jump first
in its built-in chain exactly once, and deletes hostprep chains and jumps that
are no longer wanted.  Foreign chains and rules are never named in the text, so
the restore cannot touch them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from hostprep.model import BUILTIN_CHAINS, MAX_LIST_ENTRIES, PREFIX, BanSet, Rule, Ruleset


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


@dataclass(frozen=True)
class FamilyPlan:
    family: int
    reload_chains: tuple[str, ...] = ()       # declared (created or flushed) and filled
    delete_chains: tuple[str, ...] = ()       # hostprep chains no longer wanted
    delete_jumps: tuple[LiveRule, ...] = ()   # jumps removed (stale, misplaced, duplicated)
    insert_jumps: tuple[Rule, ...] = ()       # jumps inserted at position 1
    notes: tuple[str, ...] = field(default=())  # human-readable reasons

    @property
    def empty(self) -> bool:
        return not (self.reload_chains or self.delete_chains or self.delete_jumps or self.insert_jumps)


def plan_family(desired: Ruleset | None, observed: Observed) -> FamilyPlan:
    """What to change so that hostprep's part of ``observed`` equals ``desired``.

    ``desired=None`` means "nothing of hostprep" (flush).
    """
    notes: list[str] = []
    want_chains = desired.chains if desired else ()
    live = set(observed.our_chains)
    reload_chains: list[str] = []
    for chain in want_chains:
        if chain.name not in live:
            reload_chains.append(chain.name)
            notes.append(f"chain {chain.name} missing")
        elif observed.chain_specs(chain.name) != chain.specs:
            reload_chains.append(chain.name)
            notes.append(f"chain {chain.name} differs")
    wanted_names = {c.name for c in want_chains}
    delete_chains = tuple(c for c in observed.our_chains if c not in wanted_names)
    notes.extend(f"chain {c} not wanted" for c in delete_chains)

    delete_jumps: list[LiveRule] = []
    insert_jumps: list[Rule] = []
    want_jumps = desired.jumps if desired else ()
    for builtin in BUILTIN_CHAINS:
        wanted = [j for j in want_jumps if j.chain == builtin]
        present = [r for r in observed.chain_rules(builtin) if jumps_into_hostprep(r.spec)]
        first = observed.chain_rules(builtin)[:len(wanted)]
        in_place = [r.spec for r in first] == [j.spec for j in wanted] and len(present) == len(wanted)
        if in_place:
            continue
        delete_jumps.extend(present)
        insert_jumps.extend(reversed(wanted))  # each -I ... 1 goes on top: insert in reverse
        if wanted:
            notes.append(f"jump from {builtin} missing or not first")
        elif present:
            notes.append(f"stale jump in {builtin}")
    # A jump living in some other (foreign) chain is stale too.
    for r in observed.our_jumps:
        if r.chain not in BUILTIN_CHAINS:
            delete_jumps.append(r)
            notes.append(f"stale jump in {r.chain}")
    return FamilyPlan(desired.family if desired else observed.family, tuple(reload_chains),
                      delete_chains, tuple(delete_jumps), tuple(insert_jumps), tuple(notes))


def restore_text(plan: FamilyPlan, desired: Ruleset | None) -> str:
    """The one ``iptables-restore --noflush`` transaction that carries out ``plan``."""
    lines = ["*filter"]
    lines += [f":{name} - [0:0]" for name in plan.reload_chains]
    for name in plan.reload_chains:
        chain = desired.chain(name) if desired else None
        assert chain is not None
        lines += [r.line() for r in chain.rules]
    lines += [f"-D {r.chain} {r.spec}" for r in plan.delete_jumps]
    lines += [f"-I {r.chain} 1 {r.spec}" for r in plan.insert_jumps]
    # Flush every unwanted chain before deleting any: they may reference each other.
    lines += [f"-F {name}" for name in plan.delete_chains]
    lines += [f"-X {name}" for name in plan.delete_chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def ruleset_from_observed(observed: Observed) -> Ruleset:
    """hostprep's live part as a Ruleset (the snapshot a failed apply rolls back to)."""
    from hostprep.model import Chain  # local: keeps the import list of this module short

    chains = tuple(Chain(c, tuple(Rule(c, s) for s in observed.chain_specs(c)))
                   for c in observed.our_chains)
    jumps = tuple(Rule(r.chain, r.spec) for r in observed.our_jumps if r.chain in BUILTIN_CHAINS)
    return Ruleset(observed.family, chains, jumps)


# -- ipsets (exempt lists of the containers) -----------------------------------

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
    import ipaddress
    return str(ipaddress.ip_network(text, strict=False))


def _v4_is_network(addr: str, plen: int) -> bool:
    value = 0
    for part in addr.split("."):
        value = value << 8 | int(part)
    return value & ((1 << (32 - plen)) - 1) == 0


@dataclass(frozen=True)
class SetPlan:
    create: tuple = ()      # IpSet: missing, created before the rules that use them
    replace: tuple = ()     # IpSet: members differ, filled into NAME-n and swapped in
    destroy: tuple = ()     # names of hostprep sets no rule wants any more

    @property
    def empty(self) -> bool:
        return not (self.create or self.replace or self.destroy)

    def notes(self) -> list[str]:
        return ([f"ipset {s.name} missing" for s in self.create]
                + [f"ipset {s.name} members differ" for s in self.replace]
                + [f"ipset {n} not wanted" for n in self.destroy])


def wanted_sets(desired) -> tuple:
    """The exempt/load-balancer sets and the ban sets (model.BanSet) ``desired`` wants."""
    return tuple(desired.sets) + tuple(getattr(desired, "bans", ())) if desired is not None else ()


def plan_sets(desired: tuple, live: dict[str, frozenset[str]]) -> SetPlan:
    """A ban set (model.BanSet) is only created when missing: its members are fail2ban's."""
    create, replace = [], []
    for s in desired:
        if s.name not in live:
            create.append(s)
        elif isinstance(s, BanSet):
            continue
        elif live[s.name] != frozenset(str(m) for m in s.members):
            replace.append(s)
    names = {s.name for s in desired}
    destroy = tuple(n for n in sorted(live) if n not in names)
    return SetPlan(tuple(create), tuple(replace), destroy)


TEMP_SUFFIX = "-n"


def ipset_fill_script(sets: tuple, suffix: str = "") -> str:
    """``ipset restore`` text creating each set (NAME+suffix) with its members.

    With a suffix the temporary set may be left over from an interrupted run,
    so it is created with -exist and flushed first.
    """
    lines: list[str] = []
    for s in sets:
        if isinstance(s, BanSet):
            lines.append(s.create_line())
            continue
        name = s.name + suffix
        family = "inet" if s.family == 4 else "inet6"
        maxelem = max(MAX_LIST_ENTRIES, 2 * len(s.members))
        lines.append(f"create {name} hash:net family {family} hashsize 1024 maxelem {maxelem}"
                     + (" -exist" if suffix else ""))
        if suffix:
            lines.append(f"flush {name}")
        lines += [f"add {name} {m}" for m in s.members]
    return "\n".join(lines) + "\n"


def ipset_swap_script(sets: tuple) -> str:
    return "".join(f"swap {s.name}{TEMP_SUFFIX} {s.name}\n" for s in sets)


def parse_ipset_save(text: str, prefix: str) -> dict[str, frozenset[str]]:
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "create" and parts[1].startswith(prefix):
            members.setdefault(parts[1], set())
        elif len(parts) >= 3 and parts[0] == "add" and parts[1].startswith(prefix):
            members.setdefault(parts[1], set()).add(normalise_member(parts[2]))
    return {k: frozenset(v) for k, v in members.items()}


def container_widening(before, after) -> list[str]:
    """What a re-up of one container opens wider than its recorded rules: one line each.

    ``before``/``after``: model.Container (the record, the new one).  Widening:
    hardening switched on (ports opened) or off (the container's limits removed),
    restricted mode off, load-balancer or exempt entries added, connection or rate
    limits raised, a longer IPv6 source prefix, ports added, another destination, fail2ban
    switched off (its bans lifted).  Narrowing changes are not listed.
    """
    def show(nets) -> str:
        items = [str(n) for n in nets]
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    out: list[str] = []
    if before.hardening != after.hardening:
        out.append("NGX_IPTABLES_HARDENING 1 -> 0: the container's limits, exemptions and load-balancer "
                   "restriction are removed (the base hardening keeps its ports closed)" if before.hardening else
                   f"NGX_IPTABLES_HARDENING 0 -> 1: ports {','.join(map(str, after.ports))} on {after.dest} "
                   "are opened to the internet")
    if not (after.hardening and before.hardening):
        return out      # closed before (everything opens, said above) or closed now
    if getattr(before, "fail2ban", False) and not getattr(after, "fail2ban", False):
        out.append("fail2ban off (--no-fail2ban): the addresses banned for brute force get in again")
    if before.restricted and not after.restricted:
        out.append(f"NGX_TRAFFIC_RESTRICTED true -> false: every source may reach ports "
                   f"{','.join(map(str, after.ports))}, not only the load balancers")
    if after.dest != before.dest:
        out.append(f"destination {before.dest} -> {after.dest}: the ports are opened on {after.dest}")
    new_ports = [p for p in after.ports if p not in before.ports]
    if new_ports:
        out.append(f"ports added: {','.join(map(str, new_ports))}")
    for kind, what in (("lb", "load balancers (NGX_LOAD_BALANCER_IPS)"),
                       ("ex", "exempt from the limits (NGX_RATELIMIT_DISABLE_IPS, NGX_CLOUDCONNECT_CLIENT_IPS)")):
        old = set(before.networks(kind)) if before.family == after.family else set()
        added = [n for n in after.networks(kind) if n not in old]
        if added:
            out.append(f"{what} added ({len(added)}): {show(added)}")
    b, a = before.limits, after.limits
    for label, old_v, new_v in (("IPTABLES_CONNECTION_LIMIT_ABOVE", b.connlimit_above, a.connlimit_above),
                                ("IPTABLES_HASH_LIMIT_UPTO", b.hash_upto, a.hash_upto),
                                ("IPTABLES_HASH_LIMIT_BURST", b.hash_burst, a.hash_burst)):
        if new_v > old_v:
            out.append(f"{label} raised {old_v} -> {new_v}")
    # A longer IPv6 source prefix splits one client's prefix into more sources, each with the limits.
    if after.family == 6 and after.source_prefix > (before.source_prefix if before.family == 6 else 128):
        out.append(f"HOSTPREP_IPV6_SOURCE_PREFIX raised {before.source_prefix} -> {after.source_prefix}: "
                   f"each /{after.source_prefix} gets the limits, not each /{before.source_prefix}")
    return out
