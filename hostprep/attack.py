"""Is the host under attack, and did a bound hold?  (``status``, issue 12 item 6)

Reads the kernel's own counters of the network namespace hostprep runs in (the /proc
root is injectable for tests): SYN cookies (/proc/net/stat/synproxy), conntrack fill
and its drops (/proc/sys/net/netfilter/nf_conntrack_count, _max, /proc/net/stat/
nf_conntrack), the fill of each container port's hashlimit table (/proc/net/
ipt_hashlimit/<name>, ip6t_; on the native nft backend the entries of the port's
limiter set, read back with the table), and the ingress table's counters per reason.  The
cumulative kernel counters are compared with a baseline taken at the last change
(apply, container up/down: ``save_baseline``), so a warning says "since the last apply".
Nothing here changes the kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

from hostprep.render import nft_limiter_set
from hostprep.state import read_json, write_atomic

BASELINE_NAME = "attack-baseline.json"
# conntrack -S / /proc/net/stat/nf_conntrack columns that mean "a connection was refused
# because the table was full" (drop: no room for a NEW entry; early_drop: an unassured entry
# evicted to make room; insert_failed: lost a race for the last slot).
CONNTRACK_FULL = ("drop", "early_drop", "insert_failed")
SYNPROXY_KEYS = ("syn_received", "cookie_invalid", "cookie_valid", "cookie_retrans", "conn_reopened")

# The ingress table's counters per reason (rules/ingress.nft.j2, by their comments).
INGRESS_REASONS = {
    "fragments": ("hostprep ddos: ipv4 fragment", "hostprep ddos: ipv6 fragment"),
    "bogus_flags": ("hostprep ddos: bogus tcp flags",),
    "syn_tracked": ("hostprep ddos: ipv4 syn tracked", "hostprep ddos: ipv6 syn tracked"),
    "syn_cookie": ("hostprep ddos: ipv4 syn over the cookie threshold", "hostprep ddos: ipv4 syn while flooded",
                   "hostprep ddos: ipv6 syn over the cookie threshold", "hostprep ddos: ipv6 syn while flooded"),
}


def _stat_table(path: Path) -> dict[str, int] | None:
    """A /proc/net/stat file: a header line, then one line of hex numbers per CPU; summed."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    keys = lines[0].split()
    total = dict.fromkeys(keys, 0)
    for ln in lines[1:]:
        for k, v in zip(keys, ln.split()):
            try:
                total[k] += int(v, 16)
            except ValueError:
                pass
    return total


def _int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def synproxy(proc: Path) -> dict[str, int] | None:
    """SYN cookies sent (syn_received) and checked (cookie_valid/invalid); None: no synproxy module."""
    t = _stat_table(proc / "net/stat/synproxy")
    return None if t is None else {k: t.get(k, 0) for k in SYNPROXY_KEYS}


def conntrack(proc: Path) -> dict | None:
    count, top = _int(proc / "sys/net/netfilter/nf_conntrack_count"), _int(proc / "sys/net/netfilter/nf_conntrack_max")
    if count is None or top is None:
        return None
    t = _stat_table(proc / "net/stat/nf_conntrack") or {}
    return {"count": count, "max": top, **{k: t.get(k, 0) for k in CONNTRACK_FULL}, "invalid": t.get("invalid", 0)}


def hashlimit_entries(proc: Path, family: int, name: str) -> int | None:
    """Entries of one hashlimit table (one line each); None when the table is not there."""
    path = proc / "net" / ("ipt_hashlimit" if family == 4 else "ip6t_hashlimit") / name
    try:
        return sum(1 for ln in path.read_text().splitlines() if ln.strip())
    except OSError:
        return None


def ingress_reasons(counters: dict) -> dict:
    """Packets per reason of the ingress table; a reason whose rules are not live is absent."""
    out: dict = {}
    for reason, comments in INGRESS_REASONS.items():
        live = [counters[c] for c in comments if c in counters]
        if live:
            out[reason] = sum(c.packets for c in live)
    return out


def baseline(proc: Path) -> dict:
    """The cumulative counters now (recorded at each change)."""
    return {"conntrack": conntrack(proc), "synproxy": synproxy(proc)}


def save_baseline(state_dir: Path, proc: Path = Path("/proc")) -> None:
    write_atomic(state_dir / BASELINE_NAME, json.dumps(baseline(proc), indent=2) + "\n")


def load_baseline(state_dir: Path) -> dict:
    data = read_json(state_dir / BASELINE_NAME)
    return data if isinstance(data, dict) else {}


def section(proc: Path, state_dir: Path, containers, nft) -> tuple[dict, list[str]]:
    """The ``attack`` part of status and its warnings.  ``containers``: the recorded ones;
    ``nft``: the observed ingress table (backend.NftObserved) or None."""
    base = load_baseline(state_dir)
    ct, sp = conntrack(proc), synproxy(proc)
    warnings: list[str] = []
    report: dict = {"conntrack": None, "syn_cookies": None, "limiters": [], "ingress": None,
                    "bound_reached": False}
    if ct is not None:
        before = base.get("conntrack") or {}
        since = {k: max(0, ct[k] - int(before.get(k, 0))) if before else None for k in CONNTRACK_FULL}
        report["conntrack"] = {**ct, "fill": round(ct["count"] / ct["max"], 4) if ct["max"] else None,
                               "full_since_last_change": since}
        refused = sum(v for v in since.values() if v)
        if ct["count"] >= ct["max"] or refused:
            report["bound_reached"] = True
            warnings.append(f"conntrack table reached its bound ({ct['count']:,} of {ct['max']:,} entries now; "
                            f"{refused:,} new connections refused since the last change)")
    if sp is not None or nft is not None:
        before = base.get("synproxy") or {}
        report["syn_cookies"] = {
            "flooded": list(nft.flooded) if nft is not None else [],
            **(sp or {}),
            "since_last_change": ({k: max(0, sp[k] - int(before.get(k, 0))) for k in SYNPROXY_KEYS}
                                  if sp is not None and before else None)}
        if nft is not None and nft.flooded:
            warnings.append(f"SYN flood: the container ports on {', '.join(nft.flooded)} answer with SYN cookies now")
    for c in containers:
        if not c.hardening or c.restricted:
            continue
        b = c.limiter
        for p in c.ports:
            name, n = c.hashlimit_name(p), None
            if nft is not None and nft.limiters:
                # the native backend: the rate limiter's dynamic set (the same bound, size = htable_max)
                name = nft_limiter_set(c, "rl", p)
                n = nft.limiters.get(name)
            else:
                n = hashlimit_entries(proc, c.family, name)
            report["limiters"].append({"container": c.name, "port": p, "name": name, "entries": n,
                                       "max": b.htable_max})
            if n is not None and n >= b.htable_max:
                report["bound_reached"] = True
                warnings.append(f"container {c.name} port {p}: its rate limiter is full ({n:,} of "
                                f"{b.htable_max:,} sources): new sources are dropped until entries expire")
    if nft is not None:
        report["ingress"] = {"device": nft.device, "dropped_or_counted": ingress_reasons(nft.counters)}
    return report, warnings
