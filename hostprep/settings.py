"""The settings a command works with: settings.json as a typed record, and one ``resolve``.

``settings.json`` remembers what a plain ``hostprep apply`` re-applies: the
firewall part (-i, -e, -a and -p as given) and the kernel part (-k), saved
apart.  ``resolve`` is the one place where apply, selftest and boot get their
settings: the flags when given, else what is remembered, by each command's rule.
Pure: the store is asked for its record, nothing else is read here.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostprep.errors import InputError, StateError

SOURCE_FLAGS = "command line"
SOURCE_REMEMBERED = "remembered settings"
SOURCE_DEFAULTS = "defaults (nothing remembered)"


@dataclass(frozen=True)
class FirewallSettings:
    """The firewall part: the external NIC and the -e, -a, -p flags (-p values as given)."""

    interface: str | None           # None: selftest's flags without -i (the sandbox has its own NIC)
    skip_ddos: bool = False
    allow_private: bool = False
    ping_from: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "FirewallSettings":
        def bad(what: str) -> StateError:
            return StateError(where, f"malformed settings ({what})",
                              "run 'hostprep apply -i <external NIC>' to write them again")
        iface = d.get("interface")
        if not isinstance(iface, str) or not iface:
            raise bad("interface is not a name")
        for key in ("skip_ddos", "allow_private"):
            if not isinstance(d.get(key, False), bool):
                raise bad(f"{key} is not true or false")
        ping = d.get("ping_from", [])
        if not isinstance(ping, list) or not all(isinstance(p, str) for p in ping):
            raise bad("ping_from is not a list of hosts")
        return cls(iface, d.get("skip_ddos", False), d.get("allow_private", False), tuple(ping))

    @classmethod
    def of(cls, policy) -> "FirewallSettings":
        """What is remembered of a model.Policy (the -p values as given)."""
        return cls(policy.interface, policy.skip_ddos, policy.allow_private, tuple(s.given for s in policy.ping))

    def to_dict(self) -> dict:
        return {"interface": self.interface, "skip_ddos": self.skip_ddos, "allow_private": self.allow_private,
                "ping_from": list(self.ping_from)}


@dataclass(frozen=True)
class Settings:
    """settings.json: ``firewall`` None when never applied; ``kernel`` None when -k was never given."""

    firewall: FirewallSettings | None = None
    kernel: bool | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings.json") -> "Settings":
        firewall = FirewallSettings.from_dict(d, where) if d.get("interface") not in (None, "") else None
        kernel = d.get("kernel")
        if kernel is not None and not isinstance(kernel, bool):
            raise StateError(where, "malformed settings (kernel is not true or false)",
                             "run 'hostprep apply -k' to write them again")
        return cls(firewall, kernel)

    def to_dict(self) -> dict:
        return {**(self.firewall.to_dict() if self.firewall else {}),
                **({"kernel": self.kernel} if self.kernel is not None else {})}

    def updated(self, other: "Settings") -> "Settings":
        """These settings with the parts ``other`` has replaced (firewall and kernel are saved apart)."""
        return Settings(other.firewall or self.firewall, self.kernel if other.kernel is None else other.kernel)


@dataclass(frozen=True)
class Flags:
    """What the command line says (apply's -i -e -a -p -k; selftest's -i -e -a -p)."""

    interface: str | None = None
    skip_ddos: bool = False
    allow_private: bool = False
    ping_from: tuple[str, ...] = ()
    kernel: bool = False

    @property
    def firewall_given(self) -> bool:
        return self.interface is not None or self.skip_ddos or self.allow_private or bool(self.ping_from)


@dataclass(frozen=True)
class Resolved:
    """The settings a command works with, and where they came from."""

    firewall: FirewallSettings | None
    kernel: bool
    source: str


def resolve(command: str, flags: Flags, store) -> Resolved:
    """The settings of ``command`` ("apply", "selftest" or "boot"): its flags, else the remembered ones.

    apply: -i [-e -a -p] [-k] as given; -k alone, the kernel only (as the original's
    -k); nothing, every part remembered from the last successful apply (-e/-a/-p
    without -i are refused).  selftest: -i/-e/-a/-p when any is given, else the
    remembered firewall part, else the defaults.  boot: the remembered firewall part
    without -p (its fallback when applied.json is unusable: ping stays closed).
    """
    if command == "apply":
        if flags.interface is not None:
            return Resolved(FirewallSettings(flags.interface, flags.skip_ddos, flags.allow_private,
                                             flags.ping_from), flags.kernel, SOURCE_FLAGS)
        if flags.firewall_given:
            raise InputError("-e/-a/-p", "these need -i", "give the external NIC with -i, or "
                             "run plain 'hostprep apply' to re-apply the remembered settings")
        if flags.kernel:
            return Resolved(None, True, SOURCE_FLAGS)
        remembered = store.settings() or Settings()
        if remembered.firewall is None and not remembered.kernel:
            raise InputError("-i/--interface", "no external NIC given and none remembered",
                             "start with: hostprep apply -i <external NIC>")
        return Resolved(remembered.firewall, bool(remembered.kernel), SOURCE_REMEMBERED)
    if command == "selftest":
        if flags.firewall_given:
            return Resolved(FirewallSettings(flags.interface, flags.skip_ddos, flags.allow_private,
                                             flags.ping_from), False, SOURCE_FLAGS)
        remembered = store.settings() or Settings()
        if remembered.firewall is not None:
            return Resolved(remembered.firewall, False, SOURCE_REMEMBERED)
        return Resolved(FirewallSettings(None), False, SOURCE_DEFAULTS)
    if command == "boot":
        remembered = store.settings() or Settings()
        fw = remembered.firewall
        return Resolved(FirewallSettings(fw.interface, fw.skip_ddos, fw.allow_private) if fw else None,
                        bool(remembered.kernel), SOURCE_REMEMBERED)
    raise ValueError(f"no settings rule for {command!r}")
