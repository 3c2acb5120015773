"""The records hostprep keeps of what it applied (applied.json), read and written in one place."""

from __future__ import annotations

import ipaddress

from hostprep.errors import InputError, StateError
from hostprep.model import Desired, PingSource, Policy
from hostprep.observed import LiveState
from hostprep.state import Store, now


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
