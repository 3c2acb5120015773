"""The external NIC: what it is, whether it exists, and the admin's SSH path.

Reads the current network namespace only (psutil, /sys/class/net, ``ip route
get``); changes nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hostprep.errors import InputError
from hostprep.model import PingSource, spoof_range
from hostprep import validate
from hostprep.runner import Runner

SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class NicInfo:
    name: str
    up: bool
    operstate: str
    mac: str
    mtu: int
    speed_mbps: int | None       # None when the driver does not say (virtual NICs)
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    loopback: bool = False

    @property
    def slow(self) -> bool:
        return self.speed_mbps is not None and 0 < self.speed_mbps < 1000

    def as_dict(self) -> dict:
        return {"name": self.name, "up": self.up, "operstate": self.operstate, "mac": self.mac,
                "mtu": self.mtu, "speed_mbps": self.speed_mbps, "ipv4": list(self.ipv4),
                "ipv6": list(self.ipv6)}


def existing_nics() -> list[str]:
    return sorted(psutil.net_if_stats().keys())


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def nic_info(name: str, sys_net: Path = SYS_NET) -> NicInfo:
    """Facts about ``name``; InputError naming the NICs that exist when it does not."""
    validate.interface_name(name)
    stats = psutil.net_if_stats()
    if name not in stats:
        raise InputError("-i/--interface", f"interface {name!r} is not present on this host",
                         "existing interfaces: " + ", ".join(existing_nics()))
    st = stats[name]
    mac, v4, v6 = "", [], []
    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family == psutil.AF_LINK:
            mac = addr.address
        elif addr.family == socket.AF_INET:
            v4.append(f"{addr.address}/{_prefix(addr.netmask)}")
        elif addr.family == socket.AF_INET6:
            v6.append(f"{addr.address.split('%')[0]}/{_prefix(addr.netmask)}")
    speed = _read(sys_net / name / "speed")
    speed_mbps = int(speed) if speed and speed.lstrip("-").isdigit() and int(speed) > 0 else None
    flags = _read(sys_net / name / "flags")
    loopback = name == "lo" or (flags is not None and int(flags, 16) & 0x8 != 0)
    return NicInfo(name, st.isup, _read(sys_net / name / "operstate") or ("up" if st.isup else "down"),
                   mac, st.mtu, speed_mbps, tuple(v4), tuple(v6), loopback)


def _prefix(netmask: str | None) -> int:
    if not netmask:
        return 0
    try:
        mask = ipaddress.ip_address(netmask)
    except ValueError:
        return 0
    return bin(int(mask)).count("1")


# -- the NIC's identity: is the device called eth1 still the one hardened at apply? ----

ZERO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class NicIdentity:
    """What tells one device from another across renames (recorded in applied.json at apply).

    ``permanent``: ``mac`` is the burnt-in address (``/sys/class/net/X/addr_assign_type`` 0,
    or the permanent address the driver reports, as ``ethtool -P`` shows): it survives
    reboots, renames and an admin's ``ip link set address``.  Otherwise (veths, bridges,
    most virtual NICs) ``mac`` is the random address the device had at apply: it
    identifies the device only while it exists; a re-created one gets a new address.
    """

    mac: str
    permanent: bool

    def as_dict(self) -> dict:
        return {"mac": self.mac, "permanent": self.permanent}

    @classmethod
    def from_record(cls, data) -> "NicIdentity | None":
        """From applied.json's "nic" (None: an older record without it, or a malformed one)."""
        if not isinstance(data, dict) or not isinstance(data.get("mac"), str) or not data["mac"]:
            return None
        return cls(data["mac"].lower(), bool(data.get("permanent")))

    def matches(self, other: "NicIdentity") -> bool:
        if self.permanent:
            return other.permanent and other.mac == self.mac
        return other.mac == self.mac


def link_identities(runner: Runner, sys_net: Path = SYS_NET) -> dict[str, NicIdentity | None]:
    """name -> identity of every link of this network namespace (None: it has no MAC address:
    loopback, tun, ppp, wireguard)."""
    perm: dict[str, str] = {}
    res = runner.run(["ip", "-j", "link", "show"], check=False)
    if res.returncode == 0:
        try:
            for link in json.loads(res.stdout or "[]"):
                # iproute2 prints the driver's permanent address only where it differs from the current one
                if isinstance(link, dict) and link.get("permaddr") and link.get("ifname"):
                    perm[link["ifname"]] = str(link["permaddr"]).lower()
        except (json.JSONDecodeError, TypeError):
            pass
    out: dict[str, NicIdentity | None] = {}
    try:
        devices = sorted(sys_net.iterdir())
    except OSError:
        return out
    for dev in devices:
        addr = (_read(dev / "address") or "").lower()
        if not addr or addr == ZERO_MAC:
            out[dev.name] = None
            continue
        permanent = perm.get(dev.name) or (addr if _read(dev / "addr_assign_type") == "0" else None)
        out[dev.name] = NicIdentity(permanent or addr, permanent is not None)
    return out


def identity_of(name: str, runner: Runner, sys_net: Path = SYS_NET) -> NicIdentity | None:
    return link_identities(runner, sys_net).get(name)


@dataclass(frozen=True)
class NicCheck:
    """The external NIC against its recorded identity.

    state: "ok"; "unrecorded" (the record predates identities), "unverifiable" (another
    random MAC, and no device has the recorded one: a re-created virtual NIC cannot be
    told from another one) -- both warnings; "missing", "renamed", "swapped" -- failures.
    """

    name: str
    state: str
    detail: str = ""
    fix: str = ""
    now_named: str | None = None      # where the recorded device is now (renamed or swapped)
    recorded: NicIdentity | None = None

    @property
    def failed(self) -> bool:
        return self.state in ("missing", "renamed", "swapped")

    def line(self) -> str:
        return self.detail + (f"; {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return {"recorded": self.recorded.as_dict() if self.recorded else None, "state": self.state,
                "detail": self.detail, "now_named": self.now_named}


def check_identity(name: str, recorded: NicIdentity | None, links: dict[str, NicIdentity | None]) -> NicCheck:
    """Pure: is ``name`` in ``links`` (this namespace's devices) the device ``recorded`` at apply?"""
    return dataclasses.replace(_check_identity(name, recorded, links), recorded=recorded)


def _check_identity(name: str, recorded: NicIdentity | None, links: dict[str, NicIdentity | None]) -> NicCheck:
    holders = [n for n, ident in links.items() if recorded is not None and ident is not None
               and recorded.matches(ident)]
    others = [n for n in holders if n != name]
    mac_text = f"{'permanent ' if recorded.permanent else ''}MAC {recorded.mac}" if recorded else ""
    what = f"the device hardened at apply ({mac_text})"
    if name not in links:
        if others:
            return NicCheck(name, "renamed", f"external NIC {name} is gone: {what} is now named {others[0]}; "
                            f"hostprep's rules match {name} by name, so {others[0]} is NOT filtered",
                            f"rename it back (ip link set {others[0]} down; ip link set {others[0]} name {name}; "
                            f"ip link set {name} up), or run 'hostprep apply -i {others[0]}'", others[0])
        return NicCheck(name, "missing", f"external NIC {name} is not present"
                        + (f" (no device has its {mac_text})" if recorded else ""),
                        "bring the NIC back under its name (see 'ip -br link'), or run "
                        "'hostprep apply -i <external NIC>'")
    now = links[name]
    if now is None:
        return NicCheck(name, "unverifiable", f"external NIC {name} has no MAC address (a tun, ppp or wireguard "
                        "device): a renamed or swapped NIC cannot be detected")
    if recorded is None:
        return NicCheck(name, "unrecorded", f"the identity (MAC) of external NIC {name} is not recorded "
                        "(applied by an older hostprep): a renamed or swapped NIC cannot be detected",
                        "run 'hostprep apply' to record it")
    if recorded.matches(now):
        return NicCheck(name, "ok")
    if recorded.permanent or others:
        return NicCheck(name, "swapped", f"external NIC {name} is another device now: its MAC is {now.mac}, not "
                        f"{recorded.mac} as at apply" + (f"; {what} is now named {others[0]} and is NOT filtered"
                                                           if others else ""),
                        f"if {name} is the internet-facing NIC now, run 'hostprep apply -i {name}' to record it; "
                        "otherwise give the external NIC its name back", others[0] if others else None)
    return NicCheck(name, "unverifiable", f"external NIC {name} has MAC {now.mac}, not {recorded.mac} as at "
                    "apply; both are random addresses (a virtual NIC), so a re-created device cannot be told "
                    "from another one", f"run 'hostprep apply -i {name}' if {name} is the right NIC")


def settle_udev(runner: Runner, timeout: int = 30, control: Path = Path("/run/udev/control")) -> bool:
    """Wait until udev has handled its queue (renames included); False where udev is not running."""
    if not control.exists() or runner.which("udevadm") is None:
        return False
    runner.run(["udevadm", "settle", f"--timeout={timeout}"], check=False)
    return True


@dataclass(frozen=True)
class SshSession:
    peer: str
    local: str
    source: str                       # how it was found: "SSH_CONNECTION" or "sshd pid N"
    same_netns: bool = True
    route_dev: str | None = None
    notes: tuple[str, ...] = field(default=())


def _netns_id(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def find_ssh_session(env: dict[str, str] | None = None) -> SshSession | None:
    """The admin's own SSH connection: SSH_CONNECTION, else the sshd among our ancestors.

    sudo usually drops SSH_CONNECTION, so the parent walk is what finds it there.
    """
    env = os.environ if env is None else env
    conn = env.get("SSH_CONNECTION", "").split()
    if len(conn) == 4:
        return SshSession(peer=conn[0], local=conn[2], source="SSH_CONNECTION")
    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            if proc.name().startswith("sshd"):
                for c in proc.net_connections(kind="inet"):
                    if c.status == psutil.CONN_ESTABLISHED and c.raddr:
                        same = _netns_id(proc.pid) == _netns_id("self")
                        return SshSession(peer=c.raddr.ip, local=c.laddr.ip,
                                          source=f"sshd pid {proc.pid}", same_netns=same)
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def ssh_connections_on(nic: NicInfo) -> list[str]:
    """Established connections of sshd processes whose local address is on ``nic``.

    Catches the sessions the own-session lookup cannot see (the command runs
    under tmux, screen or nohup, or other admins are logged in that way).
    """
    addrs = {a.split("/")[0] for a in nic.ipv4 + nic.ipv6}
    found: list[str] = []
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return found
    for c in conns:
        if c.status != psutil.CONN_ESTABLISHED or not c.laddr or not c.raddr or c.laddr.ip not in addrs:
            continue
        try:
            name = psutil.Process(c.pid).name() if c.pid else ""
        except (psutil.Error, OSError):
            name = ""
        if name.startswith("sshd") or (not name and c.laddr.port == 22):
            found.append(f"{c.raddr.ip} -> {c.laddr.ip}:{c.laddr.port}")
    return found


def route_dev(runner: Runner, address: str) -> str | None:
    """The device the kernel would use to reach ``address`` (``ip -j route get``)."""
    res = runner.run(["ip", "-j", "route", "get", address], check=False)
    if res.returncode != 0:
        return None
    try:
        routes = json.loads(res.stdout)
    except json.JSONDecodeError:
        return None
    return routes[0].get("dev") if routes else None


def local_addresses() -> set[str]:
    out: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return out


def session_through(runner: Runner, session: SshSession, nic: NicInfo) -> bool:
    """True when the SSH session arrives through ``nic`` in this network namespace."""
    if not session.same_netns:
        return False
    local = session.local.split("%")[0]
    nic_addrs = {a.split("/")[0] for a in nic.ipv4 + nic.ipv6}
    if local in nic_addrs:
        return True
    if local not in local_addresses():
        return False  # the session ends in another namespace (e.g. the sandbox is not it)
    return route_dev(runner, session.peer) == nic.name


def _refuse_spoofed(given: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """A -p network the spoof group drops: its echo requests could never arrive."""
    rng = spoof_range(net)
    if rng is not None:
        what = given if given == str(net) or f"{given}/{net.prefixlen}" == str(net) else f"{given} ({net})"
        raise InputError("-p/--ping-from", f"{what} {'is in' if net.subnet_of(rng) else 'overlaps'} {rng}, a private/reserved range: on the external NIC "
                         "such a source is dropped as spoofed before the ping allow-list",
                         "add -a to leave the spoof group out, or remove this -p")


def resolve_ping_sources(values: list[str], *, allow_private: bool) -> tuple[PingSource, ...]:
    """Validate every -p value, then resolve the hostnames (shown to the admin).

    Without ``allow_private`` (-a) a source in the spoof group's ranges is refused,
    addresses before any lookup, names once resolved.
    """
    classified = [(v, validate.ping_source(v)) for v in values]
    if not allow_private:
        for given, norm in classified:
            if validate.looks_numeric(given):
                _refuse_spoofed(given, ipaddress.ip_network(norm))
    out: list[PingSource] = []
    for given, norm in classified:
        if validate.looks_numeric(given):
            out.append(PingSource(given, (ipaddress.ip_network(norm),)))
            continue
        try:
            infos = socket.getaddrinfo(norm, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise InputError("-p/--ping-from", f"cannot resolve {given!r} ({err})",
                             "give an IP address or a name this host can resolve") from None
        nets: list = []
        for info in infos:
            net = ipaddress.ip_network(info[4][0].split("%")[0])
            if not allow_private:
                _refuse_spoofed(given, net)
            if net not in nets:
                nets.append(net)
        if any(n.network_address.is_loopback for n in nets):
            raise InputError("-p/--ping-from", f"{given!r} resolves to a loopback address "
                             f"({', '.join(str(n) for n in nets)}): no ping from it ever arrives on the "
                             "external NIC", "give the monitoring host's name or address")
        out.append(PingSource(given, tuple(nets)))
    return tuple(out)


def check_recorded(runner: Runner, interface: str, record, sys_net: Path = Path("/sys/class/net"), *,
                   settle: bool = True) -> NicCheck:
    """The external NIC against the identity recorded at apply (``record``: records.AppliedRecord or None).

    Anything but a match is checked again once udev has settled (at boot the
    kernel's names may not be the final ones yet); status (``settle=False``) does not wait.
    """
    same = record is not None and record.interface == interface
    recorded = NicIdentity.from_record(record.nic) if same else None
    check = check_identity(interface, recorded, link_identities(runner, sys_net))
    if settle and check.state not in ("ok", "unrecorded") and settle_udev(runner):
        check = check_identity(interface, recorded, link_identities(runner, sys_net))
    return check


def untracked_connections(nic_addrs: list[str], proc: Path = Path("/proc")) -> int:
    """Established TCP connections to the NIC's addresses that conntrack is not tracking.

    A namespace where nothing used conntrack yet classifies the first packet of
    an old connection as NEW (mid-stream pickup), and "NEW without SYN" then cuts
    it.  Returns how many connections are at risk (0 when conntrack tracks).
    """
    try:
        count = int((proc / "sys/net/netfilter/nf_conntrack_count").read_text())
    except (OSError, ValueError):
        count = 0
    addrs = {a.split("/")[0] for a in nic_addrs}
    try:
        conns = [c for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.ip in addrs]
    except (psutil.Error, OSError):
        return 0
    return len(conns) if count == 0 else 0
