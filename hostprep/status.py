"""Observe the host and report desired vs live, with counters.  Changes nothing.

The report is one JSON-able dict (schema in README.md, "status --json"); the CLI
prints it as tables.  ``exit_code``: 0 everything desired is live, 1 something is
missing or different (``problems`` says what), 2 on error (raised, not returned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hostprep import attack, persist, records, render, selinux, snapshot, sysctl, timers, txn
from hostprep import fail2ban as f2b
from hostprep import plan as planmod
from hostprep.backend import FirewallBackend, name_of
from hostprep.errors import HostprepError
from hostprep.model import DISPATCH_CHAIN, GROUPS
from hostprep.nic import check_recorded, nic_info
from hostprep.observed import Counter, Observed, jumps_into_hostprep
from hostprep.runner import Runner
from hostprep.state import Store, read_json, read_text

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Section:
    """One part of the status report: its JSON-able dict, and the lines it adds to the report's
    ``problems`` (exit 1) or ``warnings``."""

    report: dict
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def service_warnings(runner: Runner) -> list[str]:
    """firewalld or the nftables service active next to hostprep's rules."""
    if runner.which("systemctl") is None:
        return []
    out: list[str] = []
    for unit in ("firewalld", "nftables"):
        res = runner.run(["systemctl", "is-active", unit], check=False)
        if res.stdout.strip() == "active":
            out.append(f"{unit} is active: its rules judge every packet as well as hostprep's "
                       f"(the installer expects: systemctl mask --now {unit})")
    return out


def _group_report(group: str, fam: int, desired, observed: Observed,
                  fplan: planmod.FamilyPlan) -> dict:
    chains = GROUPS[group]
    want = [c for c in desired.chains if c.name in chains] if desired else []
    counter = Counter()
    for chain in chains:
        for r in observed.chain_rules(chain):
            # A jump into another hostprep chain (icmp -> spoof, ddos -> rst) only passes the
            # packet on: the target's own rules count it, in their group.
            if not jumps_into_hostprep(r.spec):
                counter = counter + r.counter
    if not want:
        return {"wanted": False, "present": False, "packets": counter.packets, "bytes": counter.bytes}
    differs = [c.name for c in want if c.name in fplan.reload_chains]
    dispatch_ok = DISPATCH_CHAIN not in fplan.reload_chains
    # A misplaced jump from a built-in chain is reported once, as "jumps_in_place",
    # not as every group missing.
    return {"wanted": True, "present": not differs and dispatch_ok,
            "packets": counter.packets, "bytes": counter.bytes}


def _container_report(c, observed: Observed | None, desired_rs) -> dict:
    def packets(comment_tail: str) -> int:
        if observed is None:
            return 0
        return sum(r.counter.packets for r in observed.chain_rules(c.chain)
                   if f'"hostprep containers: {c.name} {comment_tail}"' in r.spec)

    want = desired_rs.chain(c.chain) if (desired_rs is not None and c.hardening) else None
    live = observed.chain_specs(c.chain) if observed is not None else ()
    return {
        "name": c.name, "template": c.template, "ports": list(c.ports), "dest": str(c.dest),
        "hardening": c.hardening, "restricted": c.restricted, "limits": c.limits.as_dict(),
        # what one "source" of the limits is (a /32, an IPv6 /64...) and the hashlimit table's bounds
        "source_prefix": c.source_prefix, "limiter": c.limiter.as_dict(),
        "load_balancers": len(c.networks("lb")), "exempt": len(c.networks("ex")),
        "present": (want is not None and live == want.specs) if c.hardening else None,
        "accepted_within_rate": packets("within rate"),
        # over the limit, or (native backend) not countable: the connection-count set was full
        "dropped_connlimit": packets("connlimit drop") + packets("connlimit full"),
        "dropped_rate": packets("rate drop"),
        "dropped_restricted": packets("restricted to load balancers"),
        "files": [f.path for f in c.files],
    }


def collect(runner: Runner, backend: FirewallBackend, store: Store, chosen=None) -> dict:
    """``chosen``: backend.Chosen, why this backend (asked, remembered, auto) for "backend_choice"."""
    warnings = service_warnings(runner) + backend.other_firewalls()
    remembered = store.settings()
    record = records.load_applied(store)
    report: dict = {"schema": SCHEMA_VERSION, "backend": backend.name, "warnings": warnings,
                    "backend_choice": {"why": chosen.why, "detail": chosen.detail} if chosen is not None else None,
                    "settings": remembered.to_dict() if remembered is not None else None, "last_apply": None,
                    "nic": None, "families": {},
                    "fragments": None, "ipv6_parity": None, "containers": [], "problems": []}
    problems: list[str] = report["problems"]
    desired = None
    if record:
        report["last_apply"] = {"time": record.time, "settings": record.settings.to_dict(),
                                "backend": name_of(record.backend)}
        desired = backend.target(render.desired(record.policy(), tuple(store.containers().values())))
        if record.backend != backend.variant:
            problems.append(f"last apply used the {name_of(record.backend)} backend, this host now uses "
                            f"{backend.name}: run 'hostprep apply'")
    elif remembered is not None and remembered.firewall is not None:
        problems.append("hostprep is not applied (settings remembered): run 'hostprep apply'")
    elif not (remembered is not None and remembered.kernel):
        problems.append("nothing applied yet: run 'hostprep apply -i <external NIC>'")
    if not getattr(backend, "releases_in_load", False):
        # Another backend holds a part too (an interrupted switch); the native backend's own
        # view shows hostprep's iptables chains already.
        for other in backend.others():
            part = other.part()
            if part:
                problems.append(f"hostprep's {other.name} part is live too ({'; '.join(part)}): the next "
                                f"hostprep change removes it (one backend holds hostprep: {backend.name})")
    iface = (record.interface if record else None) or \
        (remembered.firewall.interface if remembered is not None and remembered.firewall else None)
    if iface:
        check = check_recorded(runner, iface, record, settle=False) if record else None
        try:
            report["nic"] = nic_info(iface).as_dict()
            if not report["nic"]["up"]:
                problems.append(f"external NIC {iface} is down")
        except HostprepError as err:
            report["nic"] = {"name": iface, "error": err.problem}
            if check is None or not check.failed:
                problems.append(f"external NIC {iface} is not present")
        if check is not None:
            # Is the NIC of that name still the device hardened at apply (its MAC)?
            report["nic"]["identity"] = check.as_dict()
            if check.failed:
                problems.append(check.line())
            elif check.state != "ok":
                warnings.append(check.line())
    snap = backend.observe()
    failsafe = [fam for fam, obs in snap.observed.items() if render.FAILSAFE_CHAIN in obs.our_chains]
    report["failsafe"] = {"live": failsafe, "installed": [
        fam for fam in (4, 6) if persist.failsafe_file(store.paths, fam).is_file()]}
    if failsafe:
        problems.append(f"the FAIL-SAFE is live ({', '.join(f'IPv{f}' for f in failsafe)}: chain "
                        f"{render.FAILSAFE_CHAIN}): 'hostprep boot' did not run or did not finish after it was "
                        "loaded; everything inbound on the external NIC but established traffic, ICMP errors and "
                        "IPv6 neighbour discovery is dropped, the containers' ports too; see 'systemctl status "
                        "hostprep' and the journal, then run 'hostprep boot'")
    if 6 not in snap.observed:
        warnings.append("IPv6 is disabled in this kernel (ipv6.disable=1): only IPv4 rules apply")
    for fam in snap.observed:
        want = desired.ruleset(fam) if desired else None
        fplan = planmod.plan_family(want, snap.observed[fam])
        groups = {g: _group_report(g, fam, want, snap.observed[fam], fplan) for g in GROUPS}
        jumps = [f"-A {r.chain} {r.spec}" for r in snap.observed[fam].our_jumps]
        report["families"][str(fam)] = {"groups": groups, "jumps": jumps,
                                        "jumps_in_place": not (fplan.insert_jumps or fplan.delete_jumps),
                                        "differences": list(fplan.notes)}
        if want is not None:
            problems.extend(f"IPv{fam}: {n}" for n in fplan.notes)
        elif snap.observed[fam].our_chains:
            problems.append(f"IPv{fam}: hostprep chains are loaded but nothing is recorded as applied")
    if snap.nft is not None:
        report["fragments"] = {"device": snap.nft.device, "counters": {
            k: {"packets": v.packets, "bytes": v.bytes} for k, v in snap.nft.counters.items()}}
    report["attack"], attack_warnings = attack.section(backend.proc, store.paths.state_file.parent,
                                                       tuple(store.containers().values()), snap.nft)
    warnings.extend(attack_warnings)
    for c in store.containers().values():
        rep = _container_report(c, snap.observed.get(c.family),
                                desired.ruleset(c.family) if desired is not None else None)
        report["containers"].append(rep)
        if c.hardening and not rep["present"]:
            problems.append(f"container {c.name}: its rules are not live as recorded")
    # fail2ban (issue 14): bans per container, the server, hostprep's jails
    report["fail2ban"] = f2b.collect(runner, f2b.Files(store.paths.root), store.containers().values(), snap.sets,
                                     f2b.ban_kind(backend.variant))
    problems.extend(f2b.problems(report["fail2ban"]))
    warnings.extend(f2b.warnings(report["fail2ban"]))
    if desired is not None:
        sets = planmod.plan_sets(planmod.wanted_sets(desired), snap.sets)
        problems.extend(sets.notes())
    kernel = kernel_section(store)
    report["kernel"] = kernel.report
    problems.extend(kernel.problems)
    sel = selinux_section(store)
    report["selinux"] = sel.report
    warnings.extend(sel.warnings)
    nplan = planmod.plan_nft(desired, snap.nft, record.nft if record else None)
    if desired is not None and nplan.action != "none":
        problems.append(f"nft ingress table: {nplan.reason}")
    try:
        tx = transaction_section(backend, store, runner)
    except HostprepError as err:
        tx = Section({"error": err.line()}, problems=[f"transaction state: {err.line()}"])
    report["transaction"] = tx.report
    problems.extend(tx.problems)
    firewall_problems = [p for p in problems if p.startswith(("IPv", "container ", "ipset ", "nft "))]
    # The units were written for the remembered NIC: a flush keeps both (and the units load nothing).
    report["persistence"] = persist.report(store.paths, iface)
    pers = report["persistence"]
    # While a change waits for confirmation the next boot rolls it back: not what is live.
    pers["matches_live"] = (None if not record else not firewall_problems and nplan.action == "none"
                            and not (report["transaction"] or {}).get("pending"))
    if record and not pers["installed"]:
        problems.append("boot persistence: hostprep.service is not installed: the hardening is gone after a "
                        "reboot (run 'hostprep apply')")
    elif record and not pers["up_to_date"]:
        problems.append("boot persistence: out of date: " + ", ".join(pers["stale"]) + " (run 'hostprep apply')")
    if desired is not None and 6 in snap.observed:
        g4 = [g for g, v in report["families"]["4"]["groups"].items() if v["present"]]
        g6 = [g for g, v in report["families"]["6"]["groups"].items() if v["present"]]
        report["ipv6_parity"] = g4 == g6
        if g4 != g6:
            problems.append(f"IPv6 parity: IPv4 has {', '.join(g4)}; IPv6 has {', '.join(g6)}")
    report["verdict"] = verdict(report)
    return report


# Problems that leave the firewall as it should be: the host is protected, with these below.
NOT_FIREWALL = ("kernel:", "boot persistence:")


def verdict(report: dict) -> dict:
    """Am I protected?  ``state``: "protected", "not protected" or "pending" (a change waits for
    'hostprep confirm'); from the problems: any firewall problem (or nothing applied) is
    "not protected"; kernel drift or stale boot units alone leave it "protected"."""
    tx = report.get("transaction") or {}
    pending = tx.get("pending")
    firewall = [p for p in report["problems"] if not p.startswith(NOT_FIREWALL)
                and not (pending and p.startswith(f"change {pending.get('id')} "))
                and not (pending and p.startswith(f"the rollback timer of change {pending.get('id')} "))]
    if firewall or not report.get("last_apply"):
        state = "not protected"
    elif pending:
        state = "pending"
    else:
        state = "protected"
    return {"state": state, "problems": len(report["problems"]), "firewall_problems": len(firewall)}


def kernel_section(store: Store) -> Section:
    """Each profile key: desired, live, source file; drift is a problem (exit 1)."""

    state = sysctl.KernelState(store.paths).load()
    if not state or not state.get("applied"):
        return Section({"applied": False})
    keys = sysctl.check(sysctl.Kernel(), store.paths)
    problems = [f"kernel: {k.key} {k.state}: wanted {k.desired}, {k.detail}" for k in keys
                if k.state in ("drift", "overridden")]
    if not (store.paths.root / "etc/sysctl.d" / sysctl.DROPIN_NAME).is_file():
        problems.append(f"kernel: the drop-in {sysctl.DROPIN_NAME} is missing: run 'hostprep apply -k'")
    return Section({"applied": True, "dropin": str(store.paths.root / "etc/sysctl.d" / sysctl.DROPIN_NAME),
                    "keys": [k.as_dict() for k in keys]}, problems=problems)


def selinux_section(store: Store) -> Section:

    fs, config = selinux.default_paths(store.paths.root)
    state = selinux.read_state(fs, config)
    # Not installed at all: the details line says so; advice belongs to apply's refusal.
    warnings = [] if state.runtime == "enforcing" or not state.installed else \
        [f"SELinux is not enforcing: {state.describe()}"]
    return Section(state.as_dict(), warnings=warnings)


def exit_code(report: dict) -> int:
    return 1 if report["problems"] else 0


def transaction_section(backend, store: Store, runner: Runner) -> Section:
    """A change waiting for confirmation, an interrupted one, the change 'rollback' undoes."""
    out: dict = {"pending": None, "interrupted": None, "rollback_available": None, "rolled_back": None}
    problems: list[str] = []
    # The last change was rolled back (its confirm timer fired, or 'hostprep rollback'): kept
    # until the next change, so a new session after a lost one learns what happened.
    gone = read_json(snapshot.rollback_dir(store) / "rolled-back.json")
    if gone:
        out["rolled_back"] = {k: gone.get(k) for k in ("id", "command", "why", "time")}
    p = timers.pending(store)
    if p:
        left = p.deadline - time.time()
        alive = timers.timer_alive(runner, p)
        out["pending"] = {"id": p.id, "command": p.command, "deadline": p.deadline_text,
                          "seconds_left": max(0, int(left)), "mechanism": p.mechanism,
                          "timer_alive": alive, "watcher_pid": p.watcher_pid, "unit": p.unit}
        problems.append(f"change {p.id} ({p.command}) waits for 'hostprep confirm' until "
                        f"{p.deadline_text} ({max(0, int(left))} s left); then it is rolled back")
        if alive is False:
            problems.append(f"the rollback timer of change {p.id} is not running ({p.mechanism}): "
                            "run 'hostprep confirm' or 'hostprep rollback'")
    marker = txn.read_inflight(store)
    if marker:
        running = txn.owner_alive(store)
        entry = {"id": marker.id, "kind": marker.kind, "command": marker.command,
                 "pid": marker.pid, "running": running, "kernel": None}
        if not running:
            try:
                snap = snapshot.load_snapshot(store, marker.id)
                differs = snapshot.firewall_differs(snapshot.backend_for(snap, backend), snap)
                entry["kernel"] = "old" if not differs else "changed"
                entry["differences"] = differs
            except HostprepError as err:
                entry["kernel"] = f"unknown ({err.problem})"
            if entry["kind"] == "rollback":
                problems.append(f"the rollback of change {marker.id} ({marker.command}) by PID "
                                f"{marker.pid} was interrupted; the firewall "
                                + ("holds the state before that change again" if entry["kernel"] == "old" else
                                   "is partly rolled back" if entry["kernel"] == "changed" else entry["kernel"])
                                + "; the next hostprep command finishes the rollback")
            else:
                problems.append(f"change {marker.id} ({marker.command}, PID {marker.pid}) was "
                                "interrupted; the firewall "
                                + ("still holds the state before it" if entry["kernel"] == "old" else
                                   "holds part or all of it" if entry["kernel"] == "changed" else entry["kernel"])
                                + "; the next hostprep change (or 'hostprep rollback') restores the state before it")
        out["interrupted"] = entry
    last = read_text(snapshot.last_file(store))
    if last and snapshot.snapshot_file(store, last.strip()).is_file() and not marker:
        out["rollback_available"] = last.strip()
    return Section(out, problems=problems)
