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
        (socket.AF_INET, 1, 6, "", ("192.0.2.7", 0)), (socket.AF_INET6, 1, 6, "", ("2001:db8::7", 0, 0, 0)),
        (socket.AF_INET, 1, 6, "", ("192.0.2.7", 0))])
    (src,) = resolve_ping_sources(["monitor.example.com"])
    assert (src.given, src.networks) == ("monitor.example.com", (ipaddress.ip_network("192.0.2.7/32"),
                                                                 ipaddress.ip_network("2001:db8::7/128")))


def test_resolve_numeric_values_without_lookup(monkeypatch):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    got = resolve_ping_sources(["203.0.113.7", "198.51.100.0/24", "2001:db8::7"])
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
    assert resolve_ping_sources(["monitor.example.com"]) == (PingSource(
        "monitor.example.com", (ipaddress.ip_network("203.0.113.7/32"), ipaddress.ip_network("2001:db8::7/128"))),)


@pytest.mark.parametrize("bad", ["a b", "300.1.2.3", "198.51.100.1/24", "-x", ""])
def test_malformed_value_refused_before_any_resolution(monkeypatch, bad):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or [])
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["localhost", "monitor.example.com", bad])
    assert (err.value.field, calls) == ("-p/--ping-from", [])


def test_unresolvable_name_is_an_input_error(monkeypatch):
    def fail(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(InputError) as err:
        resolve_ping_sources(["monitor.example.com"])
    assert err.value.field == "-p/--ping-from"


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
