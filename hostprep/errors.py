"""One error hierarchy. The CLI turns each into one red line and an exit code.

Every error names what was wrong (``field``: a flag, a file, an interface, a
binary) and how to fix it (``fix``).  Nothing raises bare strings at the user.
"""

from __future__ import annotations


class HostprepError(Exception):
    """Base class: ``str(err)`` is the one line the user sees."""

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.field}: {self.problem}"
        if self.fix:
            text += f" ({self.fix})"
        return text


class InputError(HostprepError):
    """A flag, value or file given by the user is wrong. Nothing was changed."""


class RefusedError(HostprepError):
    """The input is valid but applying it now would be unsafe (lockout, no tty)."""


class PermissionNeeded(HostprepError):
    """Root (CAP_NET_ADMIN) is needed."""


class MissingBinary(HostprepError):
    """A required program is not installed."""

    # (dnf package, apt package) for the programs hostprep runs.
    PACKAGES = {
        "iptables": ("iptables-nft", "iptables"),
        "iptables-restore": ("iptables-nft", "iptables"),
        "iptables-save": ("iptables-nft", "iptables"),
        "ip6tables-restore": ("iptables-nft", "iptables"),
        "ip6tables-save": ("iptables-nft", "iptables"),
        "iptables-nft-restore": ("iptables-nft", "iptables"),
        "iptables-nft-save": ("iptables-nft", "iptables"),
        "ip6tables-nft-restore": ("iptables-nft", "iptables"),
        "ip6tables-nft-save": ("iptables-nft", "iptables"),
        "iptables-legacy-restore": ("iptables-legacy", "iptables"),
        "iptables-legacy-save": ("iptables-legacy", "iptables"),
        "ip6tables-legacy-restore": ("iptables-legacy", "iptables"),
        "ip6tables-legacy-save": ("iptables-legacy", "iptables"),
        "nft": ("nftables", "nftables"),
        "ip": ("iproute", "iproute2"),
        "ipset": ("ipset", "ipset"),
        "semodule": ("policycoreutils", "policycoreutils"),
        "restorecon": ("policycoreutils", "policycoreutils"),
        "semanage": ("policycoreutils-python-utils", "policycoreutils-python-utils"),
        "make": ("selinux-policy-devel", "selinux-policy-dev"),
        "Makefile": ("selinux-policy-devel", "selinux-policy-dev"),   # the refpolicy devel Makefile
    }

    def __init__(self, binary: str, problem: str = "program not found") -> None:
        # A path (the devel Makefile) is looked up by its file name too.
        dnf, apt = self.PACKAGES.get(binary, self.PACKAGES.get(binary.rsplit("/", 1)[-1], (binary, binary)))
        super().__init__(binary, problem, f"install it: dnf install {dnf}  or  apt-get install {apt}")


class NoBackend(HostprepError):
    """No firewall backend fits this host (backend.for_host names each one it tried)."""


class CommandFailed(HostprepError):
    """A command hostprep ran failed; the kernel state is reported by the caller."""


class StateError(HostprepError):
    """The state directory or a state file cannot be read or written."""
