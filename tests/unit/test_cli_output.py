"""What the CLI prints around its work (issue 10, items 10 and 15).

* Values from flags, files and subprocesses are printed as given, never read as
  Rich markup: '[/]' was a MarkupError traceback, '[bold red]x' hid text, and
  "pip install 'hostprep[probe]'" lost '[probe]'.
* A reader that goes away ends hostprep with 141 and nothing on stderr; a Ctrl-C
  while Python is still importing the CLI prints no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostprep import cli
from hostprep.cli import common, output
from hostprep.cli import status as status_cli
from hostprep.errors import CommandFailed

REPO = str(Path(__file__).resolve().parents[2])


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli.app, list(args))
    return res.exit_code, res.output


def test_markup_in_a_flag_is_printed_as_given():
    code, text = run("apply", "--dry-run", "-i", "[/]")
    assert code == 2
    assert text == ("error: -i/--interface: '[/]' is not a valid interface name (use letters, digits, '.', "
                    "'_' or '-' as 'ip -br link' shows them)\n")
    code, text = run("apply", "--dry-run", "-i", "eth1", "-p", "[bold red]x")
    assert code == 2
    assert text.startswith("error: -p/--ping-from: '[bold red]x' is neither")


def test_markup_in_an_error_text_is_printed_as_given(monkeypatch):
    def boom(*a, **kw):
        raise CommandFailed("hostprep.probe", "exit 1: [/] no module named scapy",
                            "is scapy installed? pip install 'hostprep[probe]'")
    monkeypatch.setattr(status_cli, "need_root", boom)
    code, text = run("status")
    assert code == 2
    assert text == ("error: hostprep.probe: exit 1: [/] no module named scapy (is scapy installed? "
                    "pip install 'hostprep[probe]')\n")


def test_emoji_codes_in_values_are_printed_as_given(capsys):
    # a MAC such as 62:ab:9d:... holds ":ab:", which Rich turns into an emoji by default
    output.say(output.err, "red", "error:", "MAC 62:ab:9d:94:78:46, :smile:")
    output.out.print("MAC 62:ab:9d:94:78:46")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("MAC 62:ab:9d:94:78:46\n", "error: MAC 62:ab:9d:94:78:46, :smile:\n")


def test_labels_keep_their_style_and_the_text_stays_literal():
    from rich.console import Console
    console = Console(record=True, width=200, markup=False, force_terminal=True, file=open(os.devnull, "w"))
    output.say(console, "bold red", "error:", "[bold]x[/] and [probe]")
    assert console.export_text(clear=False) == "error: [bold]x[/] and [probe]\n"
    spans = console.export_text(styles=True)
    assert "\x1b[1;31merror:\x1b[0m" in spans


def hostprep_proc(*args: str, root: Path) -> subprocess.Popen:
    """hostprep with a state root and a stand-in selinuxfs saying "enforcing" (a RHEL 9 host)."""
    fs = root / "selinuxfs"
    fs.mkdir(exist_ok=True)
    (fs / "enforce").write_text("1")
    (root / "etc/selinux").mkdir(parents=True, exist_ok=True)
    (root / "etc/selinux/config").write_text("SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "HOSTPREP_ROOT": str(root),
           "HOSTPREP_SELINUXFS": str(fs)}
    return subprocess.Popen([sys.executable, "-P", "-m", "hostprep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", env=env)


def test_a_reader_that_goes_away_ends_hostprep_quietly_with_141(tmp_path):
    # the kernel profile's dry run prints about a hundred lines and needs no firewall
    p = hostprep_proc("apply", "-k", "--dry-run", root=tmp_path)
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(timeout=60), err) == (141, b"")


# Sends SIGINT to itself at the moment the CLI's import starts (Typer, Rich: the slow part).
CTRL_C_DURING_IMPORT = """
import builtins, os, signal, sys
real = builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if name == "hostprep.cli" or (name == "hostprep" and fromlist and "cli" in fromlist):
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = spy
sys.argv = ["hostprep", "--version"]
from hostprep.entry import main
main()
"""


def test_ctrl_c_while_the_cli_is_loading_prints_no_traceback():
    res = subprocess.run([sys.executable, "-P", "-c", CTRL_C_DURING_IMPORT], capture_output=True, cwd="/",
                         env={"PATH": os.environ["PATH"], "PYTHONPATH": REPO}, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (-signal.SIGINT, b"", b"")


# -- a dry run refuses where the real run would (issue 10, item 8) -----------------------


@pytest.fixture
def rhel_root(tmp_path, monkeypatch):
    """A state root and a stand-in selinuxfs; the test sets what SELinux says."""
    root = tmp_path / "root"
    (root / "etc/selinux").mkdir(parents=True)
    fs = tmp_path / "selinuxfs"
    fs.mkdir()
    monkeypatch.setenv("HOSTPREP_ROOT", str(root))
    monkeypatch.setenv("HOSTPREP_SELINUXFS", str(fs))

    def selinux(mode: str) -> None:
        (fs / "enforce").write_text("1" if mode == "enforcing" else "0")
        (root / "etc/selinux/config").write_text(f"SELINUX={mode}\nSELINUXTYPE=targeted\n")
    selinux("enforcing")
    return root, selinux


def test_a_dry_run_refuses_when_selinux_is_not_enforcing(rhel_root):
    root, selinux = rhel_root
    selinux("permissive")
    for args in (["apply", "-i", "eth1", "--dry-run"], ["apply", "-k", "--dry-run"]):
        code, text = run(*args)
        assert code == 2
        assert text.startswith("error: SELinux: not enforcing (runtime: permissive, ")
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["config"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the pending change is root's")
def test_a_dry_run_refuses_while_a_change_waits_for_confirmation(rhel_root):
    from hostprep import timers
    from hostprep.paths import Paths
    from hostprep.state import Store
    root, _ = rhel_root
    store = Store(Paths(root))
    pending = {"id": "20261205T120000-1-abc", "command": "hostprep apply -i eth1 --confirm 120",
               "deadline": time.time() + 100, "deadline_text": "2026-12-05 12:02:00 UTC", "mechanism": "process",
               "watcher_pid": None, "unit": None, "boot_id": "", "seconds": 120, "armed": "t"}
    timers.pending_file(store).parent.mkdir(parents=True)
    timers.pending_file(store).write_text(json.dumps(pending))
    line = ("error: confirmation: change 20261205T120000-1-abc (hostprep apply -i eth1 --confirm 120) waits for "
            "'hostprep confirm' until 2026-12-05 12:02:00 UTC (run 'hostprep confirm' to keep it or 'hostprep "
            "rollback' to undo it first)\n")
    for args in (["apply", "-i", "eth1", "--dry-run"], ["apply", "-k", "--dry-run"], ["flush", "--dry-run"],
                 ["flush", "--kernel", "--dry-run"]):
        assert run(*args) == (2, line)


def test_a_slow_step_shows_a_spinner_on_a_terminal_only(monkeypatch):
    """container up with large lists and selinux install say what they are doing (issue 15, item 6)."""
    import io
    from rich.console import Console
    for terminal in (True, False):
        buf = io.StringIO()
        monkeypatch.setattr(common, "err", Console(file=buf, force_terminal=terminal, markup=False, emoji=False))
        with common.working("container finesse: reading and checking the env files [1/2]"):
            time.sleep(0.3)
        assert ("container finesse: reading and checking the env files [1/2]" in buf.getvalue()) == terminal


def selftest_report(*, ok: bool) -> dict:
    return {"backend": "nft", "containers": [], "notes": [], "probes": [], "ok": ok, "seconds": 12.5,
            "mismatches": 0 if ok else 3,
            "settings": {"source": "flags", "skip_ddos": False, "allow_private": False, "ping_from_in_sandbox": []},
            "sandbox": {"name": "hp[sb]", "namespaces": ["hp[sb]"], "external_nic": "eth1", "kept": True,
                        "root": "/tmp/[root]"}}


def test_both_selftest_views_end_with_the_kept_line_and_the_summary(capsys):
    kept = "kept (--keep): remove with: hostprep sandbox down --name hp[sb] --root /tmp/[root]"
    for view, hint in ((output.print_selftest, ""), (output.print_selftest_compact,
                                                      "; --json or a pipe shows each probe")):
        view(selftest_report(ok=True))
        captured = capsys.readouterr()
        assert (captured.out.splitlines()[-2:], captured.err) == \
            ([kept, f"selftest: all 0 probes as expected (12.5 s){hint}"], "")
        view(selftest_report(ok=False))
        captured = capsys.readouterr()
        assert (captured.out.splitlines()[-1], captured.err) == \
            (kept, "selftest: 3 of 0 probes not as expected (12.5 s)\n")
