"""settings.json as a typed record, and settings.resolve: where apply, selftest and boot get their settings."""

from __future__ import annotations

import ipaddress

import pytest

from hostprep.errors import InputError, StateError
from hostprep.model import PingSource, Policy
from hostprep.settings import (SOURCE_DEFAULTS, SOURCE_FLAGS, SOURCE_REMEMBERED, FirewallSettings, Flags, Resolved,
                               Settings, resolve)

FW = {"interface": "eth1", "skip_ddos": True, "allow_private": False, "ping_from": ["monitor.example"]}


class Remembered:
    def __init__(self, d: dict | None) -> None:
        self.d = d

    def settings(self):
        return None if self.d is None else Settings.from_dict(self.d)


@pytest.mark.parametrize("d", [{}, {"kernel": True}, FW, dict(FW, kernel=False)])
def test_settings_round_trip(d):
    assert Settings.from_dict(d).to_dict() == d


@pytest.mark.parametrize("d,what", [({"interface": 5}, "interface is not a name"),
                                    (dict(FW, skip_ddos="yes"), "skip_ddos is not true or false"),
                                    (dict(FW, ping_from="a.example"), "ping_from is not a list of hosts"),
                                    ({"kernel": "1"}, "kernel is not true or false")])
def test_malformed_settings_are_one_clear_line(d, what):
    with pytest.raises(StateError) as err:
        Settings.from_dict(d, "/etc/hostprep/settings.json")
    assert err.value.problem == f"malformed settings ({what})"


def test_saving_one_part_keeps_the_other():
    s = Settings.from_dict({"kernel": True}).updated(Settings(FirewallSettings("eth2")))
    assert s.to_dict() == {"interface": "eth2", "skip_ddos": False, "allow_private": False, "ping_from": [],
                           "kernel": True}
    assert s.updated(Settings(kernel=False)).to_dict()["kernel"] is False


def test_apply_takes_the_flags_else_the_remembered_settings():
    assert resolve("apply", Flags("eth1", ping_from=("203.0.113.7",), kernel=True), Remembered(None)) == Resolved(
        FirewallSettings("eth1", ping_from=("203.0.113.7",)), True, SOURCE_FLAGS)
    assert resolve("apply", Flags(kernel=True), Remembered(FW)) == Resolved(None, True, SOURCE_FLAGS)
    assert resolve("apply", Flags(), Remembered(dict(FW, kernel=True))) == Resolved(
        FirewallSettings("eth1", True, False, ("monitor.example",)), True, SOURCE_REMEMBERED)
    with pytest.raises(InputError) as err:
        resolve("apply", Flags(skip_ddos=True), Remembered(FW))
    assert (err.value.field, err.value.problem) == ("-e/-a/-p", "these need -i")
    with pytest.raises(InputError) as err:
        resolve("apply", Flags(), Remembered({"kernel": False}))
    assert err.value.problem == "no external NIC given and none remembered"


def test_selftest_takes_any_flag_else_the_remembered_firewall_else_the_defaults():
    assert resolve("selftest", Flags(skip_ddos=True), Remembered(FW)) == Resolved(
        FirewallSettings(None, True), False, SOURCE_FLAGS)
    assert resolve("selftest", Flags(), Remembered(FW)).firewall == FirewallSettings("eth1", True, False,
                                                                                     ("monitor.example",))
    assert resolve("selftest", Flags(), Remembered(None)) == Resolved(FirewallSettings(None), False, SOURCE_DEFAULTS)


def test_boot_falls_back_to_the_remembered_nic_without_ping_sources():
    assert resolve("boot", Flags(), Remembered(FW)).firewall == FirewallSettings("eth1", True, False, ())
    assert resolve("boot", Flags(), Remembered({"kernel": True})).firewall is None


def test_policy_settings_keep_values_as_given():
    policy = Policy("eth1", skip_ddos=True, ping=(
        PingSource("monitor.example.com", (ipaddress.ip_network("203.0.113.7/32"),)),))
    assert FirewallSettings.of(policy).to_dict() == {"interface": "eth1", "skip_ddos": True, "allow_private": False,
                                                 "ping_from": ["monitor.example.com"]}
