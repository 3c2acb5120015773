"""What the CLI prints around its work (issue 10, items 10 and 15).

* Values from flags, files and subprocesses are printed as given, never read as
  Rich markup: '[/]' was a MarkupError traceback, '[bold red]x' hid text, and
  "pip install 'hostprep[probe]'" lost '[probe]'.
* A reader that goes away ends hostprep with 141 and nothing on stderr; a Ctrl-C
  while Python is still importing the CLI prints no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostprep import cli
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
    monkeypatch.setattr(cli, "need_root", boom)
    code, text = run("status")
    assert code == 2
    assert text == ("error: hostprep.probe: exit 1: [/] no module named scapy (is scapy installed? "
                    "pip install 'hostprep[probe]')\n")


def test_labels_keep_their_style_and_the_text_stays_literal():
    from rich.console import Console
    console = Console(record=True, width=200, markup=False, force_terminal=True, file=open(os.devnull, "w"))
    cli.say(console, "bold red", "error:", "[bold]x[/] and [probe]")
    assert console.export_text(clear=False) == "error: [bold]x[/] and [probe]\n"
    spans = console.export_text(styles=True)
    assert "\x1b[1;31merror:\x1b[0m" in spans


def hostprep_proc(*args: str, root: Path) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "HOSTPREP_ROOT": str(root)}
    return subprocess.Popen([sys.executable, "-P", "-m", "hostprep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", env=env)


def test_a_reader_that_goes_away_ends_hostprep_quietly_with_141(tmp_path):
    # the kernel profile's dry run prints about a hundred lines and needs no firewall
    p = hostprep_proc("apply", "-k", "--dry-run", root=tmp_path)
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(timeout=60), err) == (141, b"")


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.08, 0.12, 0.2, 0.3])
def test_ctrl_c_while_starting_prints_no_traceback(tmp_path, delay):
    p = hostprep_proc("--version", root=tmp_path)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert b"Traceback" not in err
    # ended by the signal (as any tool), exit 130 from hostprep, or done before it came
    assert p.returncode in (-signal.SIGINT, 130, 0)
