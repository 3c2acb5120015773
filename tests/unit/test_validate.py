"""validate: every value that can reach a rule template (interface names, -p values)."""

from __future__ import annotations

import pytest

from hostprep import validate
from hostprep.errors import InputError


@pytest.mark.parametrize("name", ["eth1", "ens192", "enp0s31f6", "bond0.100", "br-ext", "veth_x",
                                  "abcdefghijklmno"])  # 15 characters: the longest allowed
def test_interface_name_accepted(name):
    assert validate.interface_name(name) == name


@pytest.mark.parametrize("name", ["", "eth1;reboot", "eth 1", "+", "eth1+", "a:b", "../x", ".", "..",
                                  "-eth1", "eth1\t", "eth1\"", "eth1'", "eth1\x00"])
def test_interface_name_refused(name):
    with pytest.raises(InputError) as err:
        validate.interface_name(name)
    assert err.value.field == "-i/--interface"


def test_interface_name_refuses_trailing_newline():
    with pytest.raises(InputError) as err:
        validate.interface_name("eth1\n")
    assert err.value.field == "-i/--interface"


def test_interface_name_too_long_says_15():
    with pytest.raises(InputError) as err:
        validate.interface_name("a" * 16)
    assert (err.value.field, "at most 15" in err.value.problem) == ("-i/--interface", True)


def test_interface_name_field_can_be_renamed():
    with pytest.raises(InputError) as err:
        validate.interface_name("eth 1", field="settings.json: interface")
    assert err.value.field == "settings.json: interface"


@pytest.mark.parametrize("value, expected", [
    ("203.0.113.7", "203.0.113.7/32"),
    ("198.51.100.0/24", "198.51.100.0/24"),
    ("192.0.2.0/24", "192.0.2.0/24"),
    ("2001:db8::7", "2001:db8::7/128"),
    ("2001:DB8:0:0::7", "2001:db8::7/128"),
    ("2001:db8:0:0::/64", "2001:db8::/64"),
    ("monitor.example.com", "monitor.example.com"),
    ("monitor.example.com.", "monitor.example.com"),
    ("localhost", "localhost"),
])
def test_ping_source_accepted(value, expected):
    assert validate.ping_source(value) == expected


@pytest.mark.parametrize("value", ["300.1.2.3", "198.51.100.0/33", "198.51.100.1/24", "a b", "-x", "",
                                   " 1.2.3.4", "1.2.3.4 ", "1.2.3", "10.1", "010.0.0.1", "a:b",
                                   "2001:db8::7/129", "host-.example.com", "exa_mple.com",
                                   "monitor.example.com\n", "x" * 64 + ".example.com"])
def test_ping_source_refused(value):
    with pytest.raises(InputError) as err:
        validate.ping_source(value)
    assert err.value.field == "-p/--ping-from"


def test_ping_source_host_bits_named_in_problem():
    with pytest.raises(InputError) as err:
        validate.ping_source("198.51.100.1/24")
    assert "host bits" in err.value.problem


def test_hostname_accepted():
    assert validate.hostname("monitor.example.com", "-p/--ping-from") == "monitor.example.com"


@pytest.mark.parametrize("value, numeric", [
    ("203.0.113.7", True), ("198.51.100.0/24", True), ("2001:db8::7", True), ("1.2.3", True),
    ("monitor.example.com", False), ("cafe", False), ("localhost", False),
])
def test_looks_numeric(value, numeric):
    assert validate.looks_numeric(value) == numeric


@pytest.mark.parametrize("value", ["0.0.0.0/0", "::/0", "::ffff:198.51.100.7"])
def test_ping_source_refuses_everyone_and_mapped_addresses(value):
    # -s 0.0.0.0/0 is left out by iptables-save (the rule would never read back
    # as written), and a v4-mapped address never matches an IPv6 packet's source.
    with pytest.raises(InputError) as err:
        validate.ping_source(value)
    assert err.value.field == "-p/--ping-from"
