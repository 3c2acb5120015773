"""nic: -p resolution (validation before any lookup) and the admin's SSH path."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from hostprep import nic
from hostprep.errors import InputError
from hostprep.model import PingSource
from hostprep.nic import NicInfo, SshSession, resolve_ping_sources, session_through

ETH1 = NicInfo("eth1", True, "up", "52:54:00:12:34:56", 1500, 1000,
               ipv4=("203.0.113.10/24",), ipv6=("2001:db8::10/64",))


def test_resolve_a_name(monkeypatch):
    # localhost is refused now (a loopback source never pings the external NIC: issue 15, item 8,
    # tests/unit/test_words.py); a name is resolved to each of its addresses once
    import socket
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: [
        (socket.AF_INET, 1, 6, "", ("203.0.113.7", 0)), (socket.AF_INET6, 1, 6, "", ("2001:db8::7", 0, 0, 0)),
        (socket.AF_INET, 1, 6, "", ("203.0.113.7", 0))])
    (src,) = resolve_ping_sources(["monitor.example.com"], allow_private=False)
    assert (src.given, src.networks) == ("monitor.example.com", (ipaddress.ip_network("203.0.113.7/32"),
                                                                 ipaddress.ip_network("2001:db8::7/128")))


def test_resolve_numeric_values_without_lookup(monkeypatch):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    got = resolve_ping_sources(["203.0.113.7", "198.51.100.0/24", "2001:db8::7"], allow_private=False)
    assert (got, calls) == ((
        PingSource("203.0.113.7", (ipaddress.ip_network("203.0.113.7/32"),)),
        PingSource("198.51.100.0/24", (ipaddress.ip_network("198.51.100.0/24"),)),
        PingSource("2001:db8::7", (ipaddress.ip_network("2001:db8::7/128"),)),
    ), [])


def test_resolve_dedups_addresses_of_a_name(monkeypatch):
    infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", 0)),
             (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::7", 0, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: infos)
    assert resolve_ping_sources(["monitor.example.com"], allow_private=False) == (PingSource(
        "monitor.example.com", (ipaddress.ip_network("203.0.113.7/32"), ipaddress.ip_network("2001:db8::7/128"))),)


@pytest.mark.parametrize("bad", ["a b", "300.1.2.3", "198.51.100.1/24", "-x", ""])
def test_malformed_value_refused_before_any_resolution(monkeypatch, bad):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["localhost", "monitor.example.com", bad], allow_private=True)
    assert (err.value.field, calls) == ("-p/--ping-from", [])


def test_unresolvable_name_is_an_input_error(monkeypatch):
    def fail(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["monitor.example.com"], allow_private=False)
    assert err.value.field == "-p/--ping-from"


# Issue 10 item 12: a -p source the spoof group drops is refused without -a, in one line.
FIX = "(add -a to leave the spoof group out, or remove this -p)"


@pytest.mark.parametrize("value, line", [
    ("10.9.9.9", "10.9.9.9 is in 10.0.0.0/8"),
    ("10.0.0.0/7", "10.0.0.0/7 overlaps 10.0.0.0/8"),
    ("192.0.2.7", "192.0.2.7 is in 192.0.2.0/24"),          # TEST-NET-1 is in X1's list
    ("fd00::9", "fd00::9 is in fc00::/7"),
], ids=["rfc1918", "overlap", "test-net-1", "ula"])
def test_private_source_refused_without_allow_private_before_any_lookup(monkeypatch, value, line):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["monitor.example.com", value], allow_private=False)
    assert (err.value.line(), calls) == (
        f"-p/--ping-from: {line}, a private/reserved range: on the external NIC such a source is dropped as "
        f"spoofed before the ping allow-list {FIX}", [])


def test_name_resolving_to_a_private_source_refused_without_allow_private(monkeypatch):
    infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: infos)
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["monitor.example.com"], allow_private=False)
    assert err.value.line() == (
        "-p/--ping-from: monitor.example.com (10.9.9.9/32) is in 10.0.0.0/8, a private/reserved range: on the "
        f"external NIC such a source is dropped as spoofed before the ping allow-list {FIX}")


def test_private_source_accepted_with_allow_private():
    assert resolve_ping_sources(["10.9.9.9", "fd00::9"], allow_private=True) == (
        PingSource("10.9.9.9", (ipaddress.ip_network("10.9.9.9/32"),)),
        PingSource("fd00::9", (ipaddress.ip_network("fd00::9/128"),)))


def test_session_through_local_address_on_the_nic(fake_runner):
    runner = fake_runner()
    session = SshSession(peer="198.51.100.20", local="203.0.113.10", source="SSH_CONNECTION")
    assert (session_through(runner, session, ETH1), runner.calls) == (True, [])


def test_session_through_v6_with_scope(fake_runner):
    session = SshSession(peer="2001:db8::20", local="2001:db8::10%eth1", source="SSH_CONNECTION")
    assert session_through(fake_runner(), session, ETH1) is True


def test_session_in_another_netns_is_not_through(fake_runner):
    runner = fake_runner()
    session = SshSession(peer="198.51.100.20", local="203.0.113.10", source="sshd pid 42", same_netns=False)
    assert (session_through(runner, session, ETH1), runner.calls) == (False, [])


def test_session_ending_outside_this_namespace_is_not_through(fake_runner, monkeypatch):
    monkeypatch.setattr(nic, "local_addresses", lambda: {"127.0.0.1", "192.0.2.1"})
    runner = fake_runner()
    session = SshSession(peer="198.51.100.20", local="192.0.2.99", source="SSH_CONNECTION")
    assert (session_through(runner, session, ETH1), runner.calls) == (False, [])


@pytest.mark.parametrize("dev, expected", [("eth1", True), ("eth0", False)])
def test_session_on_another_address_decided_by_route(fake_runner, monkeypatch, dev, expected):
    monkeypatch.setattr(nic, "local_addresses", lambda: {"192.0.2.1"})
    argv = ("ip", "-j", "route", "get", "198.51.100.20")
    runner = fake_runner({argv: (0, f'[{{"dst":"198.51.100.20","dev":"{dev}"}}]', "")})
    session = SshSession(peer="198.51.100.20", local="192.0.2.1", source="SSH_CONNECTION")
    assert (session_through(runner, session, ETH1), [c[0] for c in runner.calls]) == (expected, [list(argv)])


def test_route_dev_failure_is_none(fake_runner):
    runner = fake_runner({("ip", "-j", "route", "get", "198.51.100.20"): (2, "", "RTNETLINK answers: Network is unreachable")})
    assert nic.route_dev(runner, "198.51.100.20") is None


def test_find_ssh_session_from_environment():
    env = {"SSH_CONNECTION": "198.51.100.20 50022 203.0.113.10 22"}
    assert nic.find_ssh_session(env) == SshSession(peer="198.51.100.20", local="203.0.113.10",
                                                   source="SSH_CONNECTION")


def test_nic_info_refuses_bad_name_before_looking():
    with pytest.raises(InputError) as err:
        nic.nic_info("eth1;reboot")
    assert err.value.field == "-i/--interface"


def test_nic_info_missing_interface_names_existing_ones(monkeypatch):
    monkeypatch.setattr(nic.psutil, "net_if_stats", lambda: {"lo": None, "eth0": None})
    with pytest.raises(InputError) as err:
        nic.nic_info("eth9")
    assert (err.value.field, err.value.fix) == ("-i/--interface", "existing interfaces: eth0, lo")


# -- identity of the external NIC (issue 10, item 4) ------------------------------------

PERM = nic.NicIdentity("52:54:00:12:34:56", True)
RAND = nic.NicIdentity("2e:d6:28:f4:db:83", False)


def fake_sys_net(tmp_path, devices: dict[str, tuple[str, str]]):
    """/sys/class/net stand-in: name -> (address, addr_assign_type)."""
    root = tmp_path / "net"
    for name, (addr, kind) in devices.items():
        (root / name).mkdir(parents=True)
        (root / name / "address").write_text(addr + "\n")
        (root / name / "addr_assign_type").write_text(kind + "\n")
    return root


def test_link_identities_permanent_random_and_permaddr(tmp_path, fake_runner):
    sys_net = fake_sys_net(tmp_path, {"lo": ("00:00:00:00:00:00", "0"), "eth0": ("52:54:00:12:34:56", "0"),
                                      "eth1": ("2E:D6:28:F4:DB:83", "1"), "eth2": ("02:00:00:00:00:09", "3")})
    # eth2's address was set by an admin; the driver's permanent one is what identifies it
    runner = fake_runner({("ip", "-j", "link", "show"): (0, '[{"ifname": "eth2", "permaddr": "52:54:00:AA:BB:CC"}]',
                                                         "")})
    assert nic.link_identities(runner, sys_net) == {
        "eth0": PERM, "eth1": RAND, "eth2": nic.NicIdentity("52:54:00:aa:bb:cc", True), "lo": None}


def test_identity_from_record_tolerates_old_and_malformed_records():
    assert nic.NicIdentity.from_record({"mac": "2E:D6:28:F4:DB:83", "permanent": False}) == RAND
    assert [nic.NicIdentity.from_record(v) for v in (None, {}, {"mac": ""}, {"mac": 5}, [1])] == [None] * 5


@pytest.mark.parametrize("recorded,links,state,now_named", [
    (PERM, {"eth1": PERM}, "ok", None),
    (RAND, {"eth1": RAND}, "ok", None),
    (PERM, {"ext9": PERM}, "renamed", "ext9"),
    (RAND, {"ext9": RAND}, "renamed", "ext9"),
    (PERM, {}, "missing", None),
    (None, {}, "missing", None),
    (PERM, {"eth1": nic.NicIdentity("52:54:00:00:00:01", True)}, "swapped", None),
    (PERM, {"eth1": RAND}, "swapped", None),
    (RAND, {"eth1": PERM, "ext9": RAND}, "swapped", "ext9"),
    # a random MAC that nobody has any more: a re-created veth (a reboot) cannot be told from another one
    (RAND, {"eth1": nic.NicIdentity("02:11:22:33:44:55", False)}, "unverifiable", None),
    (None, {"eth1": RAND}, "unrecorded", None),
    # a device without a MAC (tun, wireguard) is present, only not verifiable
    (None, {"eth1": None}, "unverifiable", None),
    (RAND, {"eth1": None, "lo": None}, "unverifiable", None),
])
def test_check_identity(recorded, links, state, now_named):
    check = nic.check_identity("eth1", recorded, links)
    assert (check.state, check.now_named, check.failed) == (state, now_named,
                                                            state in ("missing", "renamed", "swapped"))
    assert check.as_dict()["recorded"] == (recorded.as_dict() if recorded else None)


def test_check_identity_lines_name_the_device_and_the_fix():
    assert nic.check_identity("eth1", PERM, {"ext9": PERM}).line() == (
        "external NIC eth1 is gone: the device hardened at apply (permanent MAC 52:54:00:12:34:56) is now named "
        "ext9; hostprep's rules match eth1 by name, so ext9 is NOT filtered; rename it back (ip link set ext9 "
        "down; ip link set ext9 name eth1; ip link set eth1 up), or run 'hostprep apply -i ext9'")
    assert nic.check_identity("eth1", PERM, {}).line() == (
        "external NIC eth1 is not present (no device has its permanent MAC 52:54:00:12:34:56); bring the NIC "
        "back under its name (see 'ip -br link'), or run 'hostprep apply -i <external NIC>'")
    assert nic.check_identity("eth1", PERM, {"eth1": RAND}).line() == (
        "external NIC eth1 is another device now: its MAC is 2e:d6:28:f4:db:83, not 52:54:00:12:34:56 as at "
        "apply; if eth1 is the internet-facing NIC now, run 'hostprep apply -i eth1' to record it; otherwise "
        "give the external NIC its name back")


def test_settle_udev_only_where_udev_runs(tmp_path, fake_runner):
    runner = fake_runner()
    assert nic.settle_udev(runner, control=tmp_path / "control") is False
    (tmp_path / "control").touch()
    assert nic.settle_udev(runner, 5, control=tmp_path / "control") is True
    assert runner.calls == [(["udevadm", "settle", "--timeout=5"], None, False)]
