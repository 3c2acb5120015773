"""The records hostprep keeps: what it applied (applied.json), and each container's log of the
rules a change added and removed (iptables_logs/NAME.log); read and written in one place."""

from __future__ import annotations

import datetime as dt
import ipaddress

from hostprep.errors import InputError, StateError
from hostprep.model import Desired, PingSource, Policy
from hostprep.observed import LiveState
from hostprep.state import Store, now, who


def record_dict(desired: Desired, live: LiveState, variant: str, nic: dict | None = None) -> dict:
    """``nic``: the identity of the external NIC at apply (nic.NicIdentity.as_dict(); None: unknown)."""
    pol = desired.policy
    return {
        "time": now(),
        "backend": variant,
        "settings": pol.to_settings(),
        "ping_resolved": [{"given": s.given, "networks": [str(n) for n in s.networks]} for s in pol.ping],
        "rules": {str(fam): [r.line() for c in desired.ruleset(fam).chains for r in c.rules]
                  + [j.line() for j in desired.ruleset(fam).jumps] for fam in (4, 6)},
        "nft": ({"script": desired.nft.script, "live": live.nft.text if live.nft else None}
                if desired.nft else None),
        "nic": nic,
    }


def policy_from_record(record: dict) -> Policy:
    try:
        s = record["settings"]
        ping = tuple(PingSource(p["given"], tuple(ipaddress.ip_network(n) for n in p["networks"]))
                     for p in record.get("ping_resolved", []))
        return Policy(s["interface"], bool(s.get("skip_ddos")), bool(s.get("allow_private")), ping)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StateError("applied.json", f"malformed record of the last apply ({type(err).__name__}: {err})",
                         "run 'hostprep apply -i <external NIC>' to write it again") from None


def applied_policy(store: Store) -> Policy:
    record = store.applied()
    if record is None:
        raise InputError("external NIC", "External Interface is empty: the base hardening is not applied",
                         "run 'hostprep apply -i <external NIC>' first")
    return policy_from_record(record)


def container_log_file_line(f) -> str:
    """One env file in the log: never a plain hash of it (core.env holds secrets)."""
    when = dt.datetime.fromtimestamp(f.mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return (f"# file {f.path} ({f.role or 'env file'}): {f.size} bytes, modified {when}"
            + (f", hmac-sha256 {f.digest} (host key)" if f.digest else ""))


def container_log_text(name: str, c, added: list[str], removed: list[str], event: str,
                       unchanged: list[str] = ()) -> str:
    """The iptables_logs/NAME.log text: when, which files (size, mtime, keyed HMAC), each rule added or removed."""
    lines = [f"# hostprep container {event}: {name} at {now()} by {who()}"]
    if c is not None:
        lines.append(f"# template {c.template}, destination {c.dest}, ports {','.join(map(str, c.ports))}, "
                     f"hardening {'on' if c.hardening else 'OFF'}")
        lines += [container_log_file_line(f) for f in c.files]
        lines += [f"# ipset {s.name}: {len(s.members)} members" for s in c.sets()]
    lines.append(f"# rules removed: {len(removed)}")
    lines += [f"removed: {ln}" for ln in removed]
    if event == "up":
        lines.append(f"# rules added: {len(added)}")
        lines += [f"added: {ln}" for ln in added]
        if unchanged:
            lines.append(f"# rules kept as they were: {len(unchanged)}")
            lines += [f"kept: {ln}" for ln in unchanged]
    return "\n".join(lines) + "\n"
