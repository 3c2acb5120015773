"""runner: argv only, LANG=C, MissingBinary naming packages; DryRunner records mutations."""

from __future__ import annotations

import pytest

from hostprep.errors import CommandFailed, MissingBinary
from hostprep.runner import DryRunner, Result, Runner


class NothingInstalled(Runner):
    @staticmethod
    def which(binary):
        return None


def test_dry_runner_records_mutating_commands_and_does_not_run_them(fake_runner):
    inner = fake_runner()
    dry = DryRunner(inner=inner)
    res = dry.run(["iptables-nft-restore", "--noflush"], input="*filter\nCOMMIT\n", mutates=True)
    assert (res, dry.recorded, inner.calls) == (
        Result(("iptables-nft-restore", "--noflush"), 0, "", ""),
        [(["iptables-nft-restore", "--noflush"], "*filter\nCOMMIT\n")],
        [])


def test_dry_runner_runs_read_only_commands(fake_runner):
    inner = fake_runner({("iptables", "-V"): (0, "iptables v1.8.9 (nf_tables)\n", "")})
    dry = DryRunner(inner=inner)
    res = dry.run(["iptables", "-V"])
    assert (res.stdout, dry.recorded, inner.calls) == (
        "iptables v1.8.9 (nf_tables)\n", [], [(["iptables", "-V"], None, False)])


def test_dry_runner_keeps_the_inner_timeout():
    assert DryRunner(inner=Runner(timeout=7.0)).timeout == 7.0


def test_missing_binary_names_dnf_and_apt_packages():
    with pytest.raises(MissingBinary) as err:
        NothingInstalled().run(["iptables-legacy-restore", "--noflush"])
    assert (err.value.field, str(err.value)) == (
        "iptables-legacy-restore",
        "iptables-legacy-restore: program not found "
        "(install it: dnf install iptables-legacy  or  apt-get install iptables)")


def test_missing_nft_names_nftables():
    with pytest.raises(MissingBinary) as err:
        NothingInstalled().run(["nft", "list", "ruleset"])
    assert err.value.fix == "install it: dnf install nftables  or  apt-get install nftables"


def test_missing_unknown_binary_really_absent():
    name = "hostprep-unit-test-no-such-binary"
    with pytest.raises(MissingBinary) as err:
        Runner().run([name])
    assert (err.value.field, err.value.fix) == (
        name, f"install it: dnf install {name}  or  apt-get install {name}")


def test_lang_c_is_set(monkeypatch):
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    lines = Runner().run(["env"]).stdout.splitlines()
    assert sorted(ln for ln in lines if ln.startswith(("LANG=", "LC_ALL="))) == ["LANG=C", "LC_ALL=C"]


def test_argv_is_not_given_to_a_shell():
    assert Runner().run(["echo", "a;b", "$HOME", "`id`"]).stdout == "a;b $HOME `id`\n"


def test_nonzero_exit_raises_with_last_stderr_line():
    with pytest.raises(CommandFailed) as err:
        Runner().run(["sh", "-c", "echo first >&2; echo boom >&2; exit 3"])
    assert (err.value.field, err.value.problem) == ("sh -c", "exit 3: boom")


def test_nonzero_exit_without_check_returns_result():
    res = Runner().run(["sh", "-c", "exit 4"], check=False)
    assert (res.returncode, res.argv) == (4, ("sh", "-c", "exit 4"))


def test_input_is_passed_on_stdin():
    assert Runner().run(["cat"], input="*filter\nCOMMIT\n").stdout == "*filter\nCOMMIT\n"


def test_timeout_raises_command_failed():
    with pytest.raises(CommandFailed) as err:
        Runner(timeout=0.2).run(["sleep", "5"])
    assert err.value.field == "sleep"
