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

from dataclasses import dataclass, field

from hostprep.model import BUILTIN_CHAINS, MAX_LIST_ENTRIES, BanSet, Chain, Desired, Rule, Ruleset
from hostprep.observed import LiveRule, LiveState, NftObserved, Observed, jumps_into_hostprep


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
    chains = tuple(Chain(c, tuple(Rule(c, s) for s in observed.chain_specs(c)))
                   for c in observed.our_chains)
    jumps = tuple(Rule(r.chain, r.spec) for r in observed.our_jumps if r.chain in BUILTIN_CHAINS)
    return Ruleset(observed.family, chains, jumps)


# -- ipsets (exempt lists of the containers) -----------------------------------

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


# -- one change: every family, the sets and the nft table ------------------------------

@dataclass(frozen=True)
class NftPlan:
    action: str          # "none", "load" or "delete"
    reason: str = ""


@dataclass(frozen=True)
class ApplyPlan:
    desired: Desired | None            # None: flush
    families: dict[int, FamilyPlan]
    texts: dict[int, str]
    nft: NftPlan
    live: LiveState
    sets: SetPlan = SetPlan()

    @property
    def empty(self) -> bool:
        return all(p.empty for p in self.families.values()) and self.nft.action == "none" and self.sets.empty

    def notes(self) -> list[str]:
        """The differences this plan removes (what --dry-run's "plan:" and status list)."""
        out = self.sets.notes()
        out += [f"IPv{fam}: {n}" for fam, p in self.families.items() for n in p.notes]
        if self.nft.action != "none":
            out.append(f"nft netdev hostprep: {self.nft.action} ({self.nft.reason})")
        return out

    def actions(self) -> list[str]:
        """What carrying out this plan does, one item each, as done ("added chain HOSTPREP-IN
        (3 rules)", "removed 43 rules in 11 chains"): the words of apply, flush and the journal."""
        out: list[str] = []
        for fam, p in self.families.items():
            out += [f"IPv{fam}: {a}" for a in _family_actions(p, self.desired.ruleset(fam) if self.desired else None,
                                                            self.live.observed.get(fam))]
        out += [f"created ipset {s.name} ({plural(len(s.members), 'member')})" for s in self.sets.create]
        out += [f"replaced the members of ipset {s.name} ({plural(len(s.members), 'member')})"
                for s in self.sets.replace]
        out += [f"destroyed ipset {n}" for n in self.sets.destroy]
        if self.nft.action == "load":
            dev = self.desired.nft.device if self.desired and self.desired.nft else "?"
            out.append(f"loaded the nft ingress table on {dev}" + ("" if self.nft.reason == "table missing"
                                                                   else f" ({self.nft.reason})"))
        elif self.nft.action == "delete":
            dev = self.live.nft.device if self.live.nft else "?"
            out.append(f"removed the nft ingress table on {dev}")
        return out

    def summary(self) -> str:
        """All of ``actions()`` in one line: "removed 90 rules in 22 chains, 6 jumps, 2 ipsets, ..."."""
        added = removed = chains_added = chains_removed = 0
        for fam, p in self.families.items():
            want = self.desired.ruleset(fam) if self.desired else None
            live = self.live.observed.get(fam)
            for c in p.reload_chains:
                added += len(want.chain(c).rules) if want and want.chain(c) else 0
                if live is not None and c in live.our_chains:
                    removed += len(live.chain_specs(c))
                else:
                    chains_added += 1
            for c in p.delete_chains:
                removed += len(live.chain_specs(c)) if live is not None else 0
                chains_removed += 1
        jumps_added = sum(len(p.insert_jumps) for p in self.families.values())
        jumps_removed = sum(len(p.delete_jumps) for p in self.families.values())
        plus, minus = [], []
        if added or chains_added:
            plus.append(plural(added, "rule") + (f" in {plural(chains_added, 'new chain')}" if chains_added else ""))
        if removed or chains_removed:
            minus.append(plural(removed, "rule") + (f" in {plural(chains_removed, 'chain')}" if chains_removed else ""))
        if jumps_added:
            plus.append(plural(jumps_added, "jump"))
        if jumps_removed:
            minus.append(plural(jumps_removed, "jump"))
        if self.sets.create:
            plus.append(plural(len(self.sets.create), "ipset"))
        if self.sets.destroy:
            minus.append(plural(len(self.sets.destroy), "ipset"))
        if self.nft.action == "load":
            plus.append("the nft ingress table")
        elif self.nft.action == "delete":
            minus.append("the nft ingress table")
        parts = ([f"added {_and(plus)}"] if plus else []) + ([f"removed {_and(minus)}"] if minus else []) \
            + ([f"replaced the members of {plural(len(self.sets.replace), 'ipset')}"] if self.sets.replace else [])
        return "; ".join(parts) or "nothing changed"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 rule``, ``2 rules`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


# More chains than this added (or replaced) at once are reported in one line.
_LIST_CHAINS = 3


def _family_actions(p: FamilyPlan, want, live: Observed | None) -> list[str]:
    """One family's part of ApplyPlan.actions()."""
    out: list[str] = []
    ours = set(live.our_chains) if live is not None else set()

    def rules(name: str) -> int:
        chain = want.chain(name) if want is not None else None
        return len(chain.rules) if chain is not None else 0

    for verb, names in (("added", [c for c in p.reload_chains if c not in ours]),
                        ("replaced", [c for c in p.reload_chains if c in ours])):
        if len(names) > _LIST_CHAINS:
            out.append(f"{verb} {plural(len(names), 'chain')} ({plural(sum(rules(c) for c in names), 'rule')})")
        else:
            out += [f"{verb} chain {c} ({plural(rules(c), 'rule')})" for c in names]
    if p.delete_chains:
        gone = sum(len(live.chain_specs(c)) for c in p.delete_chains) if live is not None else 0
        if len(p.delete_chains) == 1:
            out.append(f"removed chain {p.delete_chains[0]} ({plural(gone, 'rule')})")
        else:
            out.append(f"removed {plural(gone, 'rule')} in {plural(len(p.delete_chains), 'chain')}")
    inserted = list(dict.fromkeys(j.chain for j in p.insert_jumps))
    deleted = list(dict.fromkeys(r.chain for r in p.delete_jumps))
    again = [c for c in inserted if c in deleted]
    if again:
        out.append(f"put the jumps from {', '.join(again)} first again")
    if [c for c in inserted if c not in again]:
        out.append(f"added the jumps from {', '.join(c for c in inserted if c not in again)}")
    if [c for c in deleted if c not in again]:
        out.append(f"removed the jumps from {', '.join(c for c in deleted if c not in again)}")
    return out


@dataclass(frozen=True)
class NftRecord:
    """The nft ingress table as applied: the script loaded and the listing read back after it."""

    script: str
    live: str | None


def plan_nft(desired: Desired | None, live: NftObserved | None, recorded: NftRecord | None, *,
             keep: bool = False) -> NftPlan:
    """``keep``: the live table stays whatever it is (boot, while the external NIC is absent or
    another device: the table may be hooked on the renamed NIC, which still exists)."""
    if keep:
        return NftPlan("none")
    want = desired.nft if desired else None
    if want is None:
        return NftPlan("delete", "not wanted") if live is not None else NftPlan("none")
    if live is None:
        return NftPlan("load", "table missing")
    if live.device != want.device:
        return NftPlan("load", f"hooked on {live.device}, wanted on {want.device}")
    if recorded is None or recorded.script != want.script:
        return NftPlan("load", "rules changed")
    if recorded.live != live.text:
        return NftPlan("load", "live table differs from the recorded one")
    return NftPlan("none")


def plan_change(desired: Desired | None, live: LiveState, recorded_nft: NftRecord | None, *,
                keep_nft: bool = False) -> ApplyPlan:
    """Everything that brings ``live`` to ``desired`` (None: nothing of hostprep), per family,
    the sets and the nft table; ``recorded_nft``: the table as the last apply recorded it."""
    families: dict[int, FamilyPlan] = {}
    texts: dict[int, str] = {}
    for fam in live.observed:
        want = desired.ruleset(fam) if desired else None
        families[fam] = plan_family(want, live.observed[fam])
        texts[fam] = restore_text(families[fam], want)
    sets = plan_sets(wanted_sets(desired), live.sets)
    return ApplyPlan(desired, families, texts, plan_nft(desired, live.nft, recorded_nft, keep=keep_nft), live, sets)



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
