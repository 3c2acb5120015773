"""Read the reverse-proxy installer's env files into a validated ``Container``.

Files (python-dotenv): the component ``.env`` (``TEMPLATE_TYPE`` decides which port
properties count, and which ``IPTABLES_*`` defaults apply), ``core.env``
(``NGX_IPTABLES_HARDENING``, ``NGX_LOAD_BALANCER_IPS``, ``NGX_RATELIMIT_DISABLE_IPS``,
``NGX_TRAFFIC_RESTRICTED``) and ``installer.env`` (``PROXY_BINDING_IP``).  Defaults
are the ones the installer documents (shared/reference/cisco-rp-installer.md §3).
Reading changes nothing; every error names the key, the file, the value and the
expected format, as the original launcher does.  Values are read as written (no
``${VAR}`` interpolation); IP lists are never widened silently (host bits, prefixes
shorter than /8 or /32 without --allow-wide-exempt, more than MAX_LIST_ENTRIES).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from hostprep.errors import InputError
from hostprep.model import (IPV6_SOURCE_PREFIX_DEFAULT, IPV6_SOURCE_PREFIX_MIN, MAX_LIST_ENTRIES, Container, EnvFile,
                            Limits, Network, container_name)

# TEMPLATE_TYPE -> [(port property, default port)], reference §3.4.
PORTS: dict[str, list[tuple[str, int]]] = {
    "finesse": [("NGX_PRXY_FIN_PORT", 8445)],
    "ids": [("NGX_PRXY_IDS_PORT", 8553)],
    "cuic": [("NGX_PRXY_CUIC_PORT", 443)],
    "cuic_12.6(1)": [("NGX_PRXY_CUIC_PORT", 8444), ("NGX_PRXY_CUIC_DOC_PORT", 8447)],
    "livedata": [("NGX_PRXY_LD_PORT", 443)],
    "livedata_12.6(1)": [("NGX_PRXY_LD_PORT", 12005), ("NGX_PRXY_LD_SCKT_IO_PORT", 12008)],
    "chat": [("NGX_PRXY_CHAT_PORT", 5280)],
    "cloudconnect": [("NGX_PRXY_CLOUDCONNECT_PORT", 443)],
    "idp-adfs3": [("NGX_PRXY_IDP_PORT", 443)],
}

# TEMPLATE_TYPE -> (CONNECTION_LIMIT_ABOVE, HASH_LIMIT_UPTO, HASH_LIMIT_BURST), reference §3.2.
LIMIT_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "finesse": (10, 6, 8),
    "chat": (30, 20, 25),
    "cloudconnect": (8, 4, 6),
    "cuic": (6, 2, 4),
    "cuic_12.6(1)": (6, 2, 4),
    "idp-adfs3": (8, 4, 6),
    "ids": (6, 2, 4),
    "livedata": (10, 6, 8),
    "livedata_12.6(1)": (10, 6, 8),
}
LOG_LIMIT_DEFAULT = 1        # per minute; not published for 15.0, ES04 used 1/min
LOG_LIMIT_BURST_DEFAULT = 1  # documented for all components

# core.env / cloudconnect.env defaults as the installer ships them (reference §3.5).
RATELIMIT_DISABLE_DEFAULT = "192.168.1.69|192.168.1.169|127.0.0.1"
CLOUDCONNECT_CLIENTS_DEFAULT = ("35.161.238.252|35.166.68.236|34.240.73.178|3.9.155.97|54.206.189.15|"
                                "52.62.185.51|13.210.45.137|52.40.46.90|52.214.81.91|3.9.151.19|"
                                "3.105.22.233|52.17.23.194")

_INT = re.compile(r"[0-9]{1,9}")
_CHAT_PROXY = re.compile(r"NGX_CHAT_HOST[1-8]_PROXY")
_PORT_AT_END = re.compile(r":([0-9]+)$")
_ADDRESS = re.compile(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?")

# Shorter prefixes than these in an exempt or load-balancer list are refused unless
# the admin says --allow-wide-exempt: 0.0.0.0/1|128.0.0.0/1 would exempt everyone.
WIDEST_PREFIX = {4: 8, 6: 32}


@dataclass(frozen=True)
class EnvData:
    path: Path
    values: dict[str, str]
    size: int = 0
    mtime: float = 0.0
    digest: str = ""       # HMAC-SHA256 with the host's key ("" without a key); never a plain hash

    def get(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is None:
            return None
        value = value.strip()
        return value if value != "" else None


def read_env(path: Path, field: str, key: bytes | None = None) -> EnvData:
    """The file's keys as written: ``${VAR}`` is not expanded (root's environment must
    not reach the firewall).  ``key``: the host's file key (state.Store.file_key), so the
    record can tell a changed file without keeping a plain hash of its secrets."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
    except OSError as err:
        raise InputError(field, f"cannot read {path} ({err.strerror})", "give the path of the .env file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(field, f"{path} is not a UTF-8 text file", "give the installer's .env file") from None
    values = {k: (v if v is not None else "")
              for k, v in dotenv_values(stream=io.StringIO(text), interpolate=False).items()}
    digest = hmac.new(key, raw, hashlib.sha256).hexdigest() if key else ""
    return EnvData(path, values, st.st_size, st.st_mtime, digest)


def permission_warnings(paths: list[Path]) -> list[str]:
    """Env files that someone other than their owner and root can change.

    An env file owned by the proxy user is normal (the installer writes them in its
    home); a group- or world-writable file, or one in a group- or world-writable
    directory without the sticky bit, lets another user change what root loads
    into the firewall.
    """
    out: list[str] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = "anyone" if st.st_mode & stat.S_IWOTH else f"group {st.st_gid}"
            out.append(f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): another user can "
                       f"change what is loaded into the firewall (chmod go-w {path})")
        try:
            dst = path.resolve().parent.stat()
        except OSError:
            continue
        if dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not dst.st_mode & stat.S_ISVTX:
            parent = path.resolve().parent
            out.append(f"{path} is in {parent}, writable by others (mode {stat.S_IMODE(dst.st_mode):04o}): "
                       f"another user can replace the file (chmod go-w {parent})")
    return out


def integer(env: EnvData, key: str, default: int, top: int) -> int:
    value = env.get(key)
    if value is None:
        return default
    if not _INT.fullmatch(value) or not 1 <= int(value) <= top:
        raise InputError(f"{key} in {env.path}", f"is not in expected format. Input Provided= {value!r}",
                         f"Expected Format <Integer> from 1 to {top}. Eg. 10")
    return int(value)


def ip_list(env: EnvData, key: str, default: str = "", *, allow_wide: bool = False) -> tuple[Network, ...]:
    """A ``|``-separated list of IPs or CIDRs, IPv4 or IPv6; hostnames refused.

    An absent key takes the installer's default; a key set to nothing means an
    empty list.  A CIDR with host bits is refused (naming the network it would
    be), so is a prefix shorter than /8 (IPv4) or /32 (IPv6) unless
    ``allow_wide``, and /0 always.  At most MAX_LIST_ENTRIES entries, counted
    before any is parsed.
    """
    value = env.values.get(key)
    if value is None:
        value = default
    items = [i for i in (item.strip() for item in value.split("|")) if i]
    if len(items) > MAX_LIST_ENTRIES:
        raise InputError(f"{key} in {env.path}", f"has {len(items):,} entries; at most {MAX_LIST_ENTRIES:,} are "
                         "accepted (the size hostprep's ipsets are made for; parsing, loading and checking "
                         "a larger list costs seconds and hundreds of MB at every up, status and boot)",
                         "merge addresses into CIDRs, e.g. 198.51.100.0/24")
    out: dict[Network, None] = {}   # ordered, and O(1) de-duplication
    for item in items:
        try:
            # Only address characters: ipaddress would also take an IPv6 scope
            # ("%...", any text) that must never reach the ipset script.
            if not _ADDRESS.fullmatch(item):
                raise ValueError(item)
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise InputError(f"{key} in {env.path}", f"should contain only IP addresses: {item!r} is not an IP "
                             "address or CIDR", "write e.g. 203.0.113.7|198.51.100.0/24|2001:db8::/64") from None
        if "/" in item and net.network_address != ipaddress.ip_address(item.split("/")[0]):
            raise InputError(f"{key} in {env.path}", f"{item!r} has host bits set: it would stand for {net}",
                             f"write {net} if the whole network is meant, or "
                             f"{item.split('/')[0]}/{net.max_prefixlen} for the one address")
        if net.prefixlen == 0:
            raise InputError(f"{key} in {env.path}", f"{item!r} covers every address",
                             "list the real addresses; exempting everyone would switch the limits off")
        if net.prefixlen < WIDEST_PREFIX[net.version] and not allow_wide:
            raise InputError(f"{key} in {env.path}", f"{item!r} covers {net.num_addresses:,} addresses "
                             f"(shorter than /{WIDEST_PREFIX[net.version]})",
                             "list narrower networks, or pass --allow-wide-exempt if this is really meant")
        out.setdefault(net, None)
    return tuple(out)


def boolean(env: EnvData, key: str, default: bool, words: tuple[str, str] = ("true", "false")) -> bool:
    value = env.get(key)
    if value is None:
        return default
    low = value.lower()
    if low in (words[0], "1", "true", "yes"):
        return True
    if low in (words[1], "0", "false", "no"):
        return False
    raise InputError(f"{key} in {env.path}", f"is not in expected format. Input Provided= {value!r}",
                     f"Expected {words[0]} or {words[1]}")


def port(env: EnvData, key: str, default: int) -> int:
    value = env.get(key)
    if value is None:
        return default
    if not _INT.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise InputError(f"{key} in {env.path}", f"is not a port: Input Provided= {value!r}",
                         "Expected Format <Integer> from 1 to 65535. Eg. 8445")
    return int(value)


def component_ports(env: EnvData, template: str) -> tuple[int, ...]:
    ports = [port(env, key, default) for key, default in PORTS[template]]
    if template == "chat":
        # NGX_CHAT_HOST[1-8]_PROXY hold the proxy side host:port pairs
        # ("host:5280/host-sub:15280"); ES04 opened 5280, 15280 and 25280.
        for key in sorted(k for k in env.values if _CHAT_PROXY.fullmatch(k)):
            for pair in (env.get(key) or "").split("/"):
                m = _PORT_AT_END.search(pair.strip())
                if m is None:
                    continue
                p = int(m.group(1))
                if not 1 <= p <= 65535:
                    raise InputError(f"{key} in {env.path}", f"port {m.group(1)} in {pair.strip()!r} is outside "
                                     "1..65535", "write host:port pairs separated by '/'")
                ports.append(p)
    seen: list[int] = []
    for p in ports:
        if p not in seen:
            seen.append(p)
    return tuple(seen)


def binding_ip(installer: EnvData | None, nic_name: str, nic_addrs: list[str]):
    """PROXY_BINDING_IP, or the external NIC's only IPv4 address."""
    on_nic = [ipaddress.ip_interface(a).ip for a in nic_addrs]
    value = installer.get("PROXY_BINDING_IP") if installer else None
    if value is None:
        v4 = [a for a in on_nic if a.version == 4]
        if len(v4) == 1:
            return v4[0]
        if not v4:
            raise InputError("PROXY_BINDING_IP", f"{nic_name} has no IPv4 address to bind to",
                             "set PROXY_BINDING_IP in installer.env (pass it with --installer)")
        raise InputError("PROXY_BINDING_IP", f"External NIC configured has multiple IPs "
                         f"({', '.join(map(str, v4))})", "Please provide a valid IP to bind from this list as "
                         "the value for PROXY_BINDING_IP in installer.env configuration file")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InputError(f"PROXY_BINDING_IP in {installer.path}", f"{value!r} is not an IP address",
                         "give one address of the external NIC") from None
    if addr not in on_nic:
        raise InputError(f"PROXY_BINDING_IP in {installer.path}", f"{addr} is not an address of {nic_name}",
                         f"its addresses: {', '.join(map(str, on_nic)) or 'none'}")
    return addr


def load_container(name: str, env_path: Path, core_path: Path | None, installer_path: Path | None,
                   nic_name: str, nic_addrs: list[str], *, key: bytes | None = None,
                   allow_wide: bool = False) -> Container:
    """``key``: the host's file key for the files' fingerprints; ``allow_wide``: --allow-wide-exempt."""
    container_name(name)
    env = read_env(env_path, "--env", key)
    core = read_env(core_path, "--core", key) if core_path else None
    installer = read_env(installer_path, "--installer", key) if installer_path else None
    template = env.get("TEMPLATE_TYPE")
    if template is None:
        raise InputError(f"TEMPLATE_TYPE in {env.path}", "TEMPLATE_TYPE is missing",
                         "add TEMPLATE_TYPE=<component>, one of: " + ", ".join(PORTS))
    if template not in PORTS:
        raise InputError(f"TEMPLATE_TYPE in {env.path}", f"{template!r} is not a known component",
                         "one of: " + ", ".join(PORTS))
    conn, upto, burst = LIMIT_DEFAULTS[template]
    limits = Limits(
        integer(env, "IPTABLES_CONNECTION_LIMIT_ABOVE", conn, 65535),
        # Up to 1000/s: above that the kernel's rate resolution changes the value
        # (1500/sec reads back as 1501/sec), and no client opens 1000 connections a second.
        integer(env, "IPTABLES_HASH_LIMIT_UPTO", upto, 1000),
        integer(env, "IPTABLES_HASH_LIMIT_BURST", burst, 10000),
        integer(env, "IPTABLES_LOG_LIMIT", LOG_LIMIT_DEFAULT, 10000),
        integer(env, "IPTABLES_LOG_LIMIT_BURST", LOG_LIMIT_BURST_DEFAULT, 10000),
    )
    ports = component_ports(env, template)
    empty_core = EnvData(Path("core.env (defaults)"), {})
    c = core or empty_core
    hardening = boolean(c, "NGX_IPTABLES_HARDENING", True, ("1", "0"))
    lbs = ip_list(c, "NGX_LOAD_BALANCER_IPS", allow_wide=allow_wide)
    exempt = dict.fromkeys(ip_list(c, "NGX_RATELIMIT_DISABLE_IPS", RATELIMIT_DISABLE_DEFAULT, allow_wide=allow_wide))
    if template == "cloudconnect":
        exempt.update(dict.fromkeys(ip_list(env, "NGX_CLOUDCONNECT_CLIENT_IPS", CLOUDCONNECT_CLIENTS_DEFAULT,
                                            allow_wide=allow_wide)))
        if len(exempt) > MAX_LIST_ENTRIES:
            raise InputError(f"NGX_RATELIMIT_DISABLE_IPS in {c.path} and NGX_CLOUDCONNECT_CLIENT_IPS in {env.path}",
                             f"together list {len(exempt):,} exempt entries; at most {MAX_LIST_ENTRIES:,} are "
                             "accepted (one ipset holds both)", "merge addresses into CIDRs")
    restricted = boolean(c, "NGX_TRAFFIC_RESTRICTED", False)
    dest = binding_ip(installer, nic_name, nic_addrs)
    files = tuple(EnvFile(str(e.path.resolve()), e.digest, role, e.size, e.mtime)
                  for e, role in ((env, "env"), (core, "core"), (installer, "installer")) if e is not None)
    return Container(name, template, ports, dest, limits, hardening, restricted, lbs, tuple(exempt), files,
                     ipv6_source_prefix(env))


def ipv6_source_prefix(env: EnvData) -> int:
    """HOSTPREP_IPV6_SOURCE_PREFIX of the component .env: the prefix length one IPv6 "source" of the
    limits stands for (48..128, default 64; hostprep/model.py says why).  Not the installer's key: only
    hostprep reads it."""
    key, value = "HOSTPREP_IPV6_SOURCE_PREFIX", env.get("HOSTPREP_IPV6_SOURCE_PREFIX")
    if value is None:
        return IPV6_SOURCE_PREFIX_DEFAULT
    if not _INT.fullmatch(value) or not IPV6_SOURCE_PREFIX_MIN <= int(value) <= 128:
        raise InputError(f"{key} in {env.path}", f"is not in expected format. Input Provided= {value!r}",
                         f"Expected Format <Integer> from {IPV6_SOURCE_PREFIX_MIN} to 128 (a prefix length). Eg. 64")
    return int(value)


@dataclass(frozen=True)
class ChosenFiles:
    """The env files one ``container up`` reads, and where each choice came from."""

    env: Path
    core: Path | None
    installer: Path | None
    sources: dict[str, str]      # role -> "given", "remembered", "dropped (--no-core)" or "none"

    def describe(self) -> str:
        parts = []
        for role in ("env", "core", "installer"):
            path = getattr(self, role)
            parts.append(f"{role} {path} ({self.sources[role]})" if path is not None
                         else f"{role}: {self.sources[role]}")
        return "; ".join(parts)


def choose_files(name: str, previous: Container | None, *, env: Path | None, core: Path | None,
                 installer: Path | None, no_core: bool = False, no_installer: bool = False) -> ChosenFiles:
    """The files of a ``container up``: each given one; else the one recorded at NAME's last up.

    ``--no-core``/``--no-installer`` drop a remembered file (its defaults apply).  A
    remembered file that is gone is refused (the admin says which file, or drops it).
    """
    for role, given, dropped in (("core", core, no_core), ("installer", installer, no_installer)):
        if given is not None and dropped:
            raise InputError(f"--no-{role}", f"given together with --{role}", "give one of them")
    chosen: dict[str, Path | None] = {}
    sources: dict[str, str] = {}
    for role, given, dropped in (("env", env, False), ("core", core, no_core),
                                 ("installer", installer, no_installer)):
        remembered = previous.file(role) if previous is not None else None
        if given is not None:
            chosen[role], sources[role] = given, "given"
        elif dropped:
            chosen[role], sources[role] = None, f"dropped (--no-{role})" if remembered else "none"
        elif remembered is not None:
            path = Path(remembered.path)
            if not path.exists():
                raise InputError(f"--{role}", f"the {role} file remembered from {name}'s last up, {path}, is gone",
                                 f"give --{role} PATH" + (f", or --no-{role} to go on without it"
                                                          if role != "env" else ""))
            chosen[role], sources[role] = path, "remembered"
        else:
            chosen[role], sources[role] = None, "none"
    if chosen["env"] is None:
        raise InputError("--env", f"no env file is remembered for {name} (it is not up)",
                         "give the component .env with --env, e.g. --env finesse.env")
    return ChosenFiles(chosen["env"], chosen["core"], chosen["installer"], sources)
