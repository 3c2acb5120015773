"""The words an admin meets around input errors (issue 15, item 8): each names the field and
the fix in one line, before anything is shown or asked."""

from __future__ import annotations

import io
import sys

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from hostprep import cli, envfiles, nic, selinux
from hostprep.cli import common
from hostprep.cli.sandbox import try_it
from hostprep.errors import InputError


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli.app, list(args), prog_name="hostprep")
    return res.exit_code, res.output


def problem(fn, *args) -> tuple[str, str, str]:
    with pytest.raises(InputError) as err:
        fn(*args)
    return err.value.field, err.value.problem, err.value.fix


def ping(values: list[str]):
    """-p parsing alone (-a given: these sources would also be refused as spoofed without it)."""
    return nic.resolve_ping_sources(values, allow_private=True)


def test_host_bits_set_suggests_the_network():
    assert problem(ping, ["10.0.0.1/24"]) == (
        "-p/--ping-from", "'10.0.0.1/24' has host bits set", "write the network 10.0.0.0/24 (or the one host 10.0.0.1)")


def test_prefix_too_long_is_one_plain_sentence():
    assert problem(ping, ["10.0.0.0/33"]) == (
        "-p/--ping-from", "'10.0.0.0/33': the prefix length /33 is not a number from 0 to 32 (IPv4)",
        "write e.g. 203.0.113.7, 198.51.100.0/24 or 2001:db8::7")


def test_loopback_sources_are_refused():
    assert problem(ping, ["127.0.0.1"])[1] == \
        "'127.0.0.1' is a loopback address: no ping from it ever arrives on the external NIC"
    assert problem(ping, ["::1"])[1] == \
        "'::1' is a loopback address: no ping from it ever arrives on the external NIC"
    field, text, fix = problem(ping, ["localhost"])
    assert (field, text.startswith("'localhost' resolves to a loopback address ("),
            text.endswith("): no ping from it ever arrives on the external NIC")) == ("-p/--ping-from", True, True)


def test_missing_template_type_says_so_and_lists_the_components(tmp_path):
    env = tmp_path / "x.env"
    env.write_text("NGX_PRXY_FIN_PORT=8445\n")
    field, text, fix = problem(envfiles.load_container, "x", env, None, None, "eth1", ["198.51.100.10/24"])
    assert (field, text, fix) == (f"TEMPLATE_TYPE in {env}", "TEMPLATE_TYPE is missing",
                                  "add TEMPLATE_TYPE=<component>, one of: " + ", ".join(envfiles.PORTS))


def test_an_extra_argument_suggests_dash_i():
    assert run("apply", "eth1") == (2, "error: apply: unexpected argument 'eth1' (the external NIC is given with "
                                       "-i: hostprep apply -i eth1)\n")


def test_a_wrong_backend_is_refused_before_the_nic_is_shown():
    assert run("apply", "--dry-run", "-i", "lo", "--backend", "nftables") == (
        2, "error: --backend: 'nftables' is not a backend (use nft, iptables, iptables-nft or iptables-legacy)\n")


def test_help_shows_metavars_not_types():
    code, text = run("container", "up", "--help")
    assert (code, text.splitlines()[0], "<str>" in text, "<path>" in text, "{" in text) == \
        (0, "Usage: hostprep container up [OPTIONS] NAME", False, False, False)
    for cmd in (["apply"], ["status"], ["flush"], ["container", "down"], ["selinux", "install"], ["sandbox", "up"]):
        code, text = run(*cmd, "--help")
        assert (code, "<str>" in text, "<path>" in text, "{" in text) == (0, False, False, False), cmd


def test_declining_the_prompt_says_nothing_changed_not_in_red(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(common, "err", Console(file=buf, force_terminal=True, markup=False, highlight=False))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(typer, "prompt", lambda *a, **kw: "n")
    with pytest.raises(typer.Exit) as ex:
        common.confirm("Apply the hardening on eth1 (backend nft)?", yes=False)
    assert (ex.value.exit_code, buf.getvalue()) == (1, "not confirmed: nothing changed\n")


def test_selinux_install_dry_run_previews_where_selinux_is_absent(tmp_path):
    wd = tmp_path / "finesse"
    wd.mkdir()
    cmds = selinux.preview_install(wd)
    assert cmds[:2] == [["make", "-C", "<build dir>", "-f", "/usr/share/selinux/devel/Makefile", "hostprep_proxy.pp"],
                        ["semodule", "-i", "<build dir>/hostprep_proxy.pp"]]
    assert cmds[2] == ["semanage", "fcontext", "-a", "-t", "hostprep_proxy_log_t", f"{wd}/logs(/.*)?"]
    assert cmds[-1] == ["restorecon", "-R", "-F", "-v", str(wd)]


@pytest.mark.parametrize("cmd", [["apply"], ["status"], ["container", "up"], ["selftest"]])
def test_help_ends_with_examples_within_80_columns(cmd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, text = run(*cmd, "--help")
    lines = text.rstrip("\n").splitlines()
    examples = lines[lines.index("  Examples:") + 2:]
    assert (code, len(examples) in (2, 3), all(ln.startswith(f"    hostprep {cmd[0]}") or
                                               ln.startswith("    hostprep container") for ln in examples),
            max(len(ln) for ln in lines) <= 80) == (0, True, True, True), text


def test_sandbox_hint_needs_no_ping():
    text = try_it("hps-inet", "hps-admin")
    assert ("ping" in text, text.splitlines()[1:4:2]) == (False, [
        "Try it: ip netns exec hps-inet timeout 3 bash -c 'echo > /dev/tcp/198.51.100.10/22'",
        "        ip netns exec hps-admin bash -c 'echo > /dev/tcp/192.0.2.10/22'"])
