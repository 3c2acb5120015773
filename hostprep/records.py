"""The records hostprep keeps: what it applied (applied.json), and each container's log of the
rules a change added and removed (iptables_logs/NAME.log); read and written in one place."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from hostprep.errors import InputError, StateError
from hostprep.model import Desired, PingSource, Policy
from hostprep.observed import LiveState
from hostprep.plan import NftRecord
from hostprep.settings import FirewallSettings
from hostprep.state import Store, now, who


@dataclass(frozen=True)
class AppliedRecord:
    """applied.json: the last successful apply (what boot loads again and status compares with)."""

    time: str
    backend: str | None                 # the iptables variant it was loaded with
    settings: FirewallSettings
    ping_resolved: tuple[PingSource, ...]
    rules: dict[str, tuple[str, ...]]   # family -> iptables-save lines
    nft: NftRecord | None
    nic: dict | None                    # the external NIC's identity at apply (nic.NicIdentity), None: unknown

    @classmethod
    def of(cls, desired: Desired, live: LiveState, variant: str, nic: dict | None = None) -> "AppliedRecord":
        """``nic``: the identity of the external NIC at apply (nic.NicIdentity.as_dict(); None: unknown)."""
        pol = desired.policy
        return cls(now(), variant, FirewallSettings.of(pol), pol.ping, cls.rules_of(desired),
                   NftRecord(desired.nft.script, live.nft.text if live.nft else None) if desired.nft else None, nic)

    @staticmethod
    def rules_of(desired: Desired) -> dict[str, tuple[str, ...]]:
        return {str(fam): tuple([r.line() for c in desired.ruleset(fam).chains for r in c.rules]
                                + [j.line() for j in desired.ruleset(fam).jumps]) for fam in (4, 6)}

    @classmethod
    def from_dict(cls, d: dict) -> "AppliedRecord":
        try:
            nft = d.get("nft")
            nic = d.get("nic")
            rules = d.get("rules") or {}
            if not isinstance(rules, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                      for v in rules.values()):
                raise ValueError("rules is not a list of lines per family")
            if nft is not None and not (isinstance(nft.get("script"), str)
                                        and isinstance(nft.get("live"), (str, type(None)))):
                raise ValueError("nft is not a script and a listing")
            if nic is not None and not isinstance(nic, dict):
                raise ValueError("nic is not an identity")
            ping = tuple(PingSource(p["given"], tuple(ipaddress.ip_network(n) for n in p["networks"]))
                         for p in d.get("ping_resolved", []))
            settings = FirewallSettings.from_dict(d["settings"], "applied.json")
            if settings.interface is None:
                raise ValueError("no interface")
            return cls(str(d.get("time", "")), d.get("backend"), settings, ping,
                       {str(k): tuple(v) for k, v in rules.items()},
                       NftRecord(nft["script"], nft.get("live")) if nft is not None else None, nic)
        except (KeyError, TypeError, ValueError, AttributeError, StateError) as err:
            what = err.problem if isinstance(err, StateError) else f"{type(err).__name__}: {err}"
            raise StateError("applied.json", f"malformed record of the last apply ({what})",
                             "run 'hostprep apply -i <external NIC>' to write it again") from None

    def to_dict(self) -> dict:
        return {"time": self.time, "backend": self.backend, "settings": self.settings.to_dict(),
                "ping_resolved": [{"given": s.given, "networks": [str(n) for n in s.networks]}
                                  for s in self.ping_resolved],
                "rules": {k: list(v) for k, v in self.rules.items()},
                "nft": {"script": self.nft.script, "live": self.nft.live} if self.nft else None,
                "nic": self.nic}

    @property
    def interface(self) -> str:
        return self.settings.interface

    def policy(self) -> Policy:
        """The policy this record was applied with (the -p sources as resolved then)."""
        s = self.settings
        return Policy(s.interface, s.skip_ddos, s.allow_private, self.ping_resolved)


def load_applied(store: Store, *, tolerant: bool = False) -> AppliedRecord | None:
    """applied.json, validated once (None: nothing applied).  ``tolerant``: a malformed record reads as
    none, where the caller is about to write it again (apply, a snapshot, the boot units)."""
    d = store.applied()
    if d is None:
        return None
    try:
        return AppliedRecord.from_dict(d)
    except StateError:
        if tolerant:
            return None
        raise


def save_applied(store: Store, record: AppliedRecord) -> None:
    store.save_applied(record.to_dict())


def applied_policy(store: Store) -> Policy:
    """The policy of the last apply; refused when nothing is applied (container up/down need it)."""
    record = load_applied(store)
    if record is None:
        raise InputError("external NIC", "External Interface is empty: the base hardening is not applied",
                         "run 'hostprep apply -i <external NIC>' first")
    return record.policy()


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
        if c.ban_set() is not None:
            lines.append(f"# ipset {c.ban_set().name}: ban set (fail2ban's bans; kept across reloads)")
    lines.append(f"# rules removed: {len(removed)}")
    lines += [f"removed: {ln}" for ln in removed]
    if event == "up":
        lines.append(f"# rules added: {len(added)}")
        lines += [f"added: {ln}" for ln in added]
        if unchanged:
            lines.append(f"# rules kept as they were: {len(unchanged)}")
            lines += [f"kept: {ln}" for ln in unchanged]
    return "\n".join(lines) + "\n"
