"""Validation of every value that can reach a rule template.

A value that passes here contains no whitespace, quote, newline or shell/iptables
metacharacter, so it can never inject a rule or an option into the restore text.
"""

from __future__ import annotations

import ipaddress
import re

from hostprep.errors import InputError

# Linux IFNAMSIZ is 16 including the NUL, so names are at most 15 bytes.  The
# kernel allows almost any byte; hostprep accepts the characters real NIC names
# use (eth1, ens192, enp0s31f6, bond0.100, br-ext, veth_x) and refuses everything
# else, '+' (an iptables wildcard) and ':' (alias syntax) included.
# fullmatch everywhere: '$' would also match before a trailing newline.
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def interface_name(value: str, field: str = "-i/--interface") -> str:
    if value is None or value == "":
        raise InputError(field, "no interface given", "name the external NIC, e.g. -i eth1")
    if len(value) > 15:
        raise InputError(
            field,
            f"{value!r} is {len(value)} characters; Linux interface names have at most 15",
            "give the name that 'ip -br link' shows",
        )
    if not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise InputError(
            field,
            f"{value!r} is not a valid interface name",
            "use letters, digits, '.', '_' or '-' as 'ip -br link' shows them",
        )
    return value


def ip_network(value: str, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP address or CIDR, normalised (host bits must be zero)."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    example = "write e.g. 203.0.113.7, 198.51.100.0/24 or 2001:db8::7"
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        address, _, prefix = value.partition("/")
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            raise InputError(field, f"{value!r} is not a valid IP address or CIDR", example) from None
        raise InputError(field, f"{value!r}: the prefix length /{prefix} is not a number from 0 to "
                         f"{addr.max_prefixlen} (IPv{addr.version})", example) from None
    raise InputError(field, f"{value!r} has host bits set", f"write the network {net} (or the one host "
                     f"{value.partition('/')[0]})")


def looks_numeric(value: str) -> bool:
    """True when the value can only have been meant as an address (digits, dots, colons, slash)."""
    return bool(re.fullmatch(r"[0-9.:/a-fA-F]+", value)) and (
        any(c in value for c in ":/") or bool(re.fullmatch(r"[0-9.]+", value))
    )


def hostname(value: str, field: str) -> str:
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_HOSTNAME_LABEL.fullmatch(p) for p in name.split(".")):
        raise InputError(field, f"{value!r} is neither an IP address, a CIDR nor a valid hostname",
                         "write e.g. 203.0.113.7, 198.51.100.0/24 or monitor.example.com")
    return name


def ping_source(value: str, field: str = "-p/--ping-from") -> str:
    """Classify one -p value: returns the normalised CIDR text or the hostname.

    Addresses and CIDRs are validated with ``ipaddress``; anything that is not
    numeric must be a syntactically valid hostname (resolved later, at apply time).
    """
    if value is None or value.strip() != value or value == "":
        raise InputError(field, f"{value!r} is empty or has surrounding spaces",
                         "give one address, CIDR or hostname per -p")
    if looks_numeric(value):
        net = ip_network(value, field)
        if net.prefixlen == 0:
            raise InputError(field, f"{value!r} would allow ping from every address",
                             "list the monitoring hosts or their networks")
        if net.network_address.is_loopback:
            raise InputError(field, f"{value!r} is a loopback address: no ping from it ever arrives on the "
                             "external NIC", "give the monitoring host's address")
        if net.version == 6 and net.network_address.ipv4_mapped is not None:
            raise InputError(field, f"{value!r} is an IPv4-mapped IPv6 address",
                             "give the IPv4 address itself")
        return str(net)
    return hostname(value, field)
