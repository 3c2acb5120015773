"""backend: variant detection, tool names, reads that create nothing, nft listing parse; the
written contract (FirewallBackend) and for_host."""

from __future__ import annotations

import pytest

from hostprep.backend import (PROBE_SCRIPT, FirewallBackend, IptablesBackend, NftBackend, choose, detect_variant,
                              for_host)
from hostprep.errors import CommandFailed, InputError, NoBackend
from hostprep.observed import Counter, LiveRule, NftObserved, Observed, normalise_nft, parse_nft_listing
from tests.helpers import FakeKernel

SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
[4:240] -A INPUT -i eth1 -j ACCEPT
COMMIT
"""

NFT_LISTING = """table netdev hostprep {
	chain ingress {
		type filter hook ingress device "eth1" priority -500; policy accept;
		ip frag-off & 0x3fff != 0 counter packets 3 bytes 4200 drop comment "hostprep ddos: ipv4 fragment"
		meta protocol ip6 exthdr frag exists counter packets 0 bytes 0 drop comment "hostprep ddos: ipv6 fragment"
	}
}
"""


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)


@pytest.mark.parametrize("version, variant", [
    ("iptables v1.8.9 (nf_tables)\n", "nft"),
    ("iptables v1.8.7 (legacy)\n", "legacy"),
])
def test_detect_variant_from_version(fake_runner, version, variant):
    runner = fake_runner({("iptables", "-V"): (0, version, "")})
    assert (detect_variant(runner), [c[0] for c in runner.calls]) == (variant, [["iptables", "-V"]])


def test_detect_variant_unknown_output(fake_runner):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.4.21\n", "")})
    with pytest.raises(CommandFailed):
        detect_variant(runner)


def test_detect_variant_override_runs_nothing(fake_runner):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    assert (detect_variant(runner, "legacy"), runner.calls) == ("legacy", [])


@pytest.mark.parametrize("value", ["legacy", "iptables-legacy"])
def test_env_override_of_the_variant(fake_runner, monkeypatch, value):
    monkeypatch.setenv("HOSTPREP_BACKEND", value)
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    assert (for_host(runner).variant, runner.calls) == ("legacy", [])


def test_detect_variant_bad_override(fake_runner):
    with pytest.raises(InputError) as err:
        detect_variant(fake_runner(), "xtables")
    assert err.value.field == "--backend"


@pytest.mark.parametrize("installed, family, expected", [
    ({"iptables-nft-save", "iptables-save"}, 4, "iptables-nft-save"),
    ({"iptables-save"}, 4, "iptables-save"),
    ({"ip6tables-save"}, 6, "ip6tables-save"),
    (set(), 6, "ip6tables-nft-save"),
])
def test_tool_prefers_the_variant_specific_name(fake_runner, installed, family, expected):
    assert IptablesBackend(fake_runner(installed=installed), "nft").tool(family, "save") == expected


def test_legacy_observe_without_filter_table_runs_nothing(fake_runner, tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ip_tables_names").write_text("nat\nmangle\n")
    runner = fake_runner()
    backend = IptablesBackend(runner, "legacy", proc=tmp_path)
    assert (backend.observe_family(4), runner.calls) == (Observed(4), [])


def test_legacy_observe_without_proc_file_runs_nothing(fake_runner, tmp_path):
    runner = fake_runner()
    assert (IptablesBackend(runner, "legacy", proc=tmp_path).observe_family(6), runner.calls) == (Observed(6), [])


def test_legacy_observe_with_filter_table_runs_save(fake_runner, tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ip_tables_names").write_text("filter\nnat\n")
    runner = fake_runner({("iptables-legacy-save", "-c", "-t", "filter"): (0, SAVE, "")})
    obs = IptablesBackend(runner, "legacy", proc=tmp_path).observe_family(4)
    assert (obs.rules, runner.calls) == (
        (LiveRule("INPUT", "-i eth1 -j ACCEPT", Counter(4, 240)),),
        [(["iptables-legacy-save", "-c", "-t", "filter"], None, False)])


def test_nft_observe_runs_save_without_reading_proc(fake_runner, tmp_path):
    runner = fake_runner({("ip6tables-nft-save", "-c", "-t", "filter"): (0, SAVE, "")})
    obs = IptablesBackend(runner, "nft", proc=tmp_path).observe_family(6)
    assert (obs.family, len(obs.rules), runner.calls[0][0]) == (
        6, 1, ["ip6tables-nft-save", "-c", "-t", "filter"])


def test_test_is_read_only_and_load_mutates(fake_runner):
    runner = fake_runner()
    backend = IptablesBackend(runner, "nft")
    backend.restore_test(4, "*filter\nCOMMIT\n")
    backend.restore(6, "*filter\nCOMMIT\n")
    assert runner.calls == [
        (["iptables-nft-restore", "--noflush", "--test"], "*filter\nCOMMIT\n", False),
        (["ip6tables-nft-restore", "--noflush"], "*filter\nCOMMIT\n", True),
    ]


def test_nft_load_and_delete_mutate(fake_runner):
    runner = fake_runner()
    backend = IptablesBackend(runner, "nft")
    backend.nft_check("S")
    backend.nft_load("S")
    backend.nft_delete()
    assert runner.calls == [
        (["nft", "-c", "-f", "-"], "S", False),
        (["nft", "-f", "-"], "S", True),
        (["nft", "delete", "table", "netdev", "hostprep"], None, True),
    ]


def test_families_without_ipv6(fake_runner, tmp_path):
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    backend = IptablesBackend(fake_runner(), "nft", proc=tmp_path)
    before = backend.families()
    (tmp_path / "sys/net/ipv6").mkdir()
    assert (before, backend.families()) == ((4,), (4, 6))


def test_nft_observe_missing_table_is_none(fake_runner):
    runner = fake_runner({("nft", "list", "table", "netdev", "hostprep"): (
        1, "", "Error: No such file or directory\nlist table netdev hostprep\n")})
    assert IptablesBackend(runner, "nft").nft_observe() is None


def test_nft_observe_other_error_raises(fake_runner):
    runner = fake_runner({("nft", "list", "table", "netdev", "hostprep"): (
        1, "", "Error: Operation not permitted\n")})
    with pytest.raises(CommandFailed):
        IptablesBackend(runner, "nft").nft_observe()


def test_parse_nft_listing():
    obs = parse_nft_listing(NFT_LISTING)
    assert (obs.device, obs.counters) == ("eth1", {
        "hostprep ddos: ipv4 fragment": Counter(3, 4200),
        "hostprep ddos: ipv6 fragment": Counter(0, 0),
    })


def test_normalise_nft_strips_counters():
    assert normalise_nft(NFT_LISTING) == NFT_LISTING.replace(
        "counter packets 3 bytes 4200", "counter").replace("counter packets 0 bytes 0", "counter")


def test_normalise_nft_equal_for_different_counters():
    later = NFT_LISTING.replace("packets 3 bytes 4200", "packets 90 bytes 126000")
    assert normalise_nft(later) == normalise_nft(NFT_LISTING)


def test_nft_observe_parses_listing(fake_runner):
    runner = fake_runner({("nft", "list", "table", "netdev", "hostprep"): (0, NFT_LISTING, "")})
    obs = IptablesBackend(runner, "nft").nft_observe()
    assert obs == NftObserved("eth1", normalise_nft(NFT_LISTING), parse_nft_listing(NFT_LISTING).counters)


def test_other_variant_present_nft_reads_legacy_names(fake_runner, tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ip_tables_names").write_text("nat\nfilter\n")
    runner = fake_runner()
    warnings = IptablesBackend(runner, "nft", proc=tmp_path).other_firewalls()
    assert (len(warnings), "filter, nat" in warnings[0], runner.calls) == (1, True, [])


# -- the contract (FirewallBackend) and for_host ------------------------------------------

CONTRACT = [name for name, value in vars(FirewallBackend).items()
            if callable(value) and not name.startswith("_")]


def test_the_contract_is_written_one_line_each():
    assert CONTRACT == ["describe", "target", "is_supported", "families", "observe", "test", "load", "undo",
                        "finish", "other_firewalls", "part", "release", "others"]
    for name in CONTRACT:
        doc = getattr(FirewallBackend, name).__doc__
        assert doc is not None and "\n" not in doc.strip(), name


@pytest.mark.parametrize("cls", [IptablesBackend, NftBackend, FakeKernel])
def test_each_backend_implements_the_whole_contract(cls):
    missing = [n for n in CONTRACT if getattr(cls, n, None) is getattr(FirewallBackend, n, None)
               or not callable(getattr(cls, n, None))]
    assert missing == []


def test_for_host_names_every_backend_it_tried(fake_runner, monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)
    runner = fake_runner(installed={"iptables-legacy-restore"})       # no iptables, no save tool, no nft
    with pytest.raises(NoBackend) as err:
        for_host(runner)
    assert err.value.line() == (
        "firewall backend: no backend fits this host: tried iptables (nft variant), iptables (legacy variant) "
        "(the restore/save tools or nft are not installed) (install them: dnf install iptables-nft nftables  or  "
        "apt-get install iptables nftables)")
    assert runner.calls == []                   # trying changes nothing, runs nothing


NFT_REFUSES = (1, "", "/dev/stdin:20:37-44: Error: Could not process rule: No such file or directory\n")
PROBE = ("nft", "-c", "-f", "-")


def test_for_host_takes_the_variant_iptables_names(fake_runner, monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (legacy)\n", ""), PROBE: NFT_REFUSES})
    backend = for_host(runner)
    assert (type(backend), backend.variant, backend.describe()) == (IptablesBackend, "legacy",
                                                                    "iptables (legacy variant)")


def test_for_host_without_iptables_takes_the_first_variant_installed(fake_runner, monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)
    runner = fake_runner({PROBE: NFT_REFUSES}, installed={"iptables-legacy-restore", "iptables-legacy-save", "nft"})
    assert for_host(runner).variant == "legacy"


# -- the choice: asked > remembered > auto (nft -c of the probe, else iptables) ------------------

def test_auto_takes_nft_when_nft_c_accepts_the_probe(fake_runner):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    chosen = choose(runner)
    assert (type(chosen.backend), chosen.why, chosen.detail) == (
        NftBackend, "auto", "nft and the kernel have every feature hostprep uses")
    # one check, read-only, of the probe (no table of hostprep's name, nothing loaded)
    assert runner.calls == [(list(PROBE), PROBE_SCRIPT, False)]


def test_the_probe_uses_every_feature_the_nft_script_needs():
    for feature in ("table inet", "hook ingress", "flags dynamic\n", "flags dynamic,timeout", "ct count over",
                    "synproxy", "notrack", "limit rate", "tcp option maxseg size !=", "tcp option maxseg missing",
                    "ct original ip daddr", "ct original proto-dst", "log prefix", "ip6 hoplimit 255"):
        assert feature in PROBE_SCRIPT, feature
    assert "table inet hostprep " not in PROBE_SCRIPT and "table netdev hostprep " not in PROBE_SCRIPT


def test_auto_takes_iptables_when_the_kernel_refuses_the_probe(fake_runner):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", ""), PROBE: NFT_REFUSES})
    chosen = choose(runner)
    assert (type(chosen.backend), chosen.backend.variant, chosen.why, chosen.detail) == (
        IptablesBackend, "nft", "auto",
        "nft -c refused the probe: /dev/stdin:20:37-44: Error: Could not process rule: No such file or directory")
    assert [c[0] for c in runner.calls] == [list(PROBE), ["iptables", "-V"]]


def test_auto_takes_iptables_without_nft(fake_runner):
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.7 (legacy)\n", "")},
                         installed={"iptables", "iptables-legacy-save", "iptables-legacy-restore"})
    # auto falls to iptables, which needs nft too (its ingress table): the error names it
    with pytest.raises(NoBackend) as err:
        choose(runner)
    assert "tried iptables (legacy variant) (" in err.value.problem
    assert [c[0] for c in runner.calls] == [["iptables", "-V"]]     # no nft -c without nft


@pytest.mark.parametrize("remembered, kind, variant", [
    ("nftables", NftBackend, "nftables"), ("legacy", IptablesBackend, "legacy"), ("nft", IptablesBackend, "nft")])
def test_the_remembered_backend_wins_over_auto(fake_runner, remembered, kind, variant):
    # iptables -V would say nf_tables and nft -c would accept: neither is asked
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    chosen = choose(runner, remembered=remembered)
    assert (type(chosen.backend), chosen.backend.variant, chosen.why, runner.calls) == (
        kind, variant, "remembered", [])


@pytest.mark.parametrize("asked, kind", [("nft", NftBackend), ("iptables", IptablesBackend),
                                         ("iptables-legacy", IptablesBackend)])
def test_backend_flag_wins_over_remembered_and_env(fake_runner, monkeypatch, asked, kind):
    monkeypatch.setenv("HOSTPREP_BACKEND", "iptables-nft" if asked == "nft" else "nft")
    runner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.7 (legacy)\n", "")})
    chosen = choose(runner, asked, remembered="nftables" if asked != "nft" else "nft")
    assert (type(chosen.backend), chosen.why, chosen.detail) == (kind, "asked", f"--backend {asked}")
    assert list(PROBE) not in [c[0] for c in runner.calls]


@pytest.mark.parametrize("env, kind", [("nft", NftBackend), ("iptables-legacy", IptablesBackend)])
def test_env_wins_over_remembered(fake_runner, monkeypatch, env, kind):
    monkeypatch.setenv("HOSTPREP_BACKEND", env)
    runner = fake_runner()
    chosen = choose(runner, remembered="legacy" if env == "nft" else "nftables")
    assert (type(chosen.backend), chosen.why, chosen.detail, runner.calls) == (
        kind, "asked", f"HOSTPREP_BACKEND {env}", [])


def test_for_host_with_a_variant_asked_for_tries_it_alone(fake_runner, monkeypatch):
    monkeypatch.delenv("HOSTPREP_BACKEND", raising=False)
    runner = fake_runner(installed={"iptables", "iptables-legacy-restore", "iptables-legacy-save", "nft"})
    with pytest.raises(NoBackend) as err:
        for_host(runner, "iptables-nft")
    assert "tried iptables (nft variant) (" in err.value.problem
    assert for_host(runner, "legacy").variant == "legacy"


def test_a_boot_unit_loads_the_remembered_backend_whatever_its_env_says(fake_runner, monkeypatch):
    """hostprep boot (env=False): the unit's HOSTPREP_BACKEND is a copy of an older apply's
    environment; the record of the last apply says which backend holds hostprep."""
    monkeypatch.setenv("HOSTPREP_BACKEND", "nft")
    runner = fake_runner()
    chosen = choose(runner, remembered="legacy", env=False)
    assert (type(chosen.backend), chosen.backend.variant, chosen.why, runner.calls) == (
        IptablesBackend, "legacy", "remembered", [])
    # --backend on the command line still wins
    assert type(choose(runner, "nft", remembered="legacy", env=False).backend) is NftBackend


def test_apply_says_what_a_switch_really_does():
    """Review finding 8: between the iptables variants nothing of the old one is removed (others()
    has only the native backend); between iptables and nft the old part goes after the read-back."""
    from hostprep.cli.apply import switch_message
    runner = object()
    legacy_to_nft = switch_message("legacy", IptablesBackend(runner, "nft"))
    assert "iptables-legacy's chains are NOT removed" in legacy_to_nft and "moves from" not in legacy_to_nft
    assert "iptables-nft's chains are NOT removed" in switch_message("nft", IptablesBackend(runner, "legacy"))
    class Everything:           # every tool installed: still, the only other backend is the native one
        def which(self, binary):
            return f"/usr/sbin/{binary}"
    assert [type(o) for o in IptablesBackend(Everything(), "nft").others()] == [NftBackend]
    to_native = switch_message("nft", NftBackend(runner))
    assert to_native == ("the hardening moves from iptables-nft to nft in one change: nft's rules are loaded and "
                         "read back first, then iptables-nft's are removed; 'hostprep rollback' (or --confirm) "
                         "brings iptables-nft back")
    assert switch_message("nftables", IptablesBackend(runner, "legacy")).startswith(
        "the hardening moves from nft to iptables-legacy in one change")
