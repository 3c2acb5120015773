"""What every command shares: the Typer app and its groups, the common options, error
handling (one red line and an exit code, never a traceback), and the guards every
change passes before anything is shown or asked."""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Optional

import typer
import typer.core
from rich.text import Text

from hostprep import __version__
from hostprep.exits import EXIT_SIGINT, broken_pipe
from hostprep import ops, timers
from hostprep.backend import CHOICES, Chosen, FirewallBackend, choose, resolve_choice
from hostprep.errors import HostprepError, InputError, PermissionNeeded, RefusedError, StateError
from hostprep.state import Store
from hostprep.cli.output import err, out, say


# The end of --help: two or three examples (\\b keeps click from re-wrapping them).
EXAMPLES = {
    "apply": "Examples:\n\n\b\n  hostprep apply -i eth1                     show eth1, ask y/N, apply\n  hostprep apply -i eth1 -y -p 203.0.113.7   ping allowed from one host\n  hostprep apply --dry-run -i eth1           plan and rules, no change",
    "status": "Examples:\n\n\b\n  hostprep status             am I protected? what is open to whom\n  hostprep status -v          with every kernel key\n  hostprep status --json      one JSON document (schema in the README)",
    "container up": "Examples:\n\n\b\n  hostprep container up finesse --env finesse.env --core core.env\n  hostprep container up ids --env ids.env --installer installer.env\n  hostprep container list",
    "selftest": "Examples:\n\n\b\n  hostprep selftest                      remembered settings, containers\n  hostprep selftest -i eth1 -p 203.0.113.7\n  hostprep selftest --env finesse.env --core core.env --json",
}


class PlainCommand(typer.core.TyperCommand):
    """Help that reads like a man page: arguments as NAME (not {name} or 'name <str>')."""

    def collect_usage_pieces(self, ctx):
        return [self.options_metavar] + [p.metavar or p.name.upper() for p in self.get_params(ctx)
                                         if isinstance(p, typer.core.TyperArgument) and not p.hidden]

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, typer.core.TyperArgument):
                p.display_type_rich = lambda ctx: ""
        return params


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Harden the host of an internet-facing reverse proxy "
                       "(replaces install_os_settings.sh of Cisco's Reverse Proxy Installer).")
sandbox_app = typer.Typer(no_args_is_help=True, help="The embedded default: a throwaway two-NIC host "
                                                    "in network namespaces, for trying hostprep safely.")
app.add_typer(sandbox_app, name="sandbox")
container_app = typer.Typer(no_args_is_help=True, help="Per-container port rules: open a proxy container's "
                                                      "ports on the external NIC with the limits of its .env files.")
app.add_typer(container_app, name="container")
selinux_app = typer.Typer(no_args_is_help=True, help="The SELinux policy module for the proxy container's "
                                                    "working directory (HOST_WORKING_DIR).")
app.add_typer(selinux_app, name="selinux")


def fail(message: str, code: int) -> None:
    say(err, "bold red", "error:", f"{message}")
    raise typer.Exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HostprepError as exc:
            fail(exc.line(), exc.exit_code)
        except BrokenPipeError:
            broken_pipe()
        except KeyboardInterrupt:
            fail("interrupted", EXIT_SIGINT)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the promise is: never a traceback
            fail(f"internal error: {type(exc).__name__}: {exc} (please report it)", 3)
    return wrapper


def version_cb(value: bool) -> None:
    if value:
        out.print(f"hostprep {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_cb(version: bool = typer.Option(False, "--version", callback=version_cb, is_eager=True,
                                         help="Print the version and exit.")) -> None:
    pass


def backend_cb(value: Optional[str]) -> Optional[str]:
    """--backend is checked before anything is shown or asked."""
    try:
        return resolve_choice(value)
    except InputError as err:
        fail(err.line(), 2)
    return value


BackendOpt = typer.Option(None, "--backend", metavar="|".join(CHOICES), callback=backend_cb,
                          help="Firewall backend: nft (native nftables, one inet table), iptables (the "
                               "variant 'iptables -V' says), iptables-nft or iptables-legacy; 'legacy' is "
                               "iptables-legacy. Default: the backend the last apply used, else nft where "
                               "nft and the kernel support it (nft -c), else iptables; env HOSTPREP_BACKEND. "
                               "Before the native backend, 'nft' meant iptables-nft.")


ConfirmOpt = typer.Option(None, "--confirm", metavar="SECONDS", min=1, max=86400,
                          help="Commit-confirmed: arm an automatic rollback before changing anything; unless "
                               "'hostprep confirm' runs within SECONDS, the state before is restored (also "
                               "when your SSH session is gone). A systemd timer, or a detached watcher "
                               "process where systemd is not running.")


def need_root(what: str) -> None:
    if not ops.is_root():
        raise PermissionNeeded(what, "needs root (CAP_NET_ADMIN) to change or read the firewall",
                               f"run it with sudo: sudo hostprep {what}")


def confirm(prompt: str, *, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise RefusedError("-y/--yes", "no terminal to ask for confirmation",
                           "pass -y to confirm the external NIC non-interactively")
    answer = typer.prompt(f"{prompt} [y/N]", default="N", show_default=False)
    if answer.strip().lower() not in ("y", "yes"):
        err.print("not confirmed: nothing changed")
        raise typer.Exit(1)


@contextlib.contextmanager
def unreadable_in_dry_run(what: str, *, dry_run: bool):
    """A state file root alone can read: an error for a real run (or as root), a note for a
    dry run without root (which changes nothing and shows what it can)."""
    try:
        yield
    except StateError:
        if not dry_run or ops.is_root():
            raise
        out.print(f"(not root: {what})")


def pending_guard(store: Store, *, dry_run: bool) -> None:
    """A change waiting for 'hostprep confirm' blocks the next one (a dry run says so the same way)."""
    with unreadable_in_dry_run("whether a change waits for confirmation cannot be read", dry_run=dry_run):
        timers.refuse_if_pending(store)


@contextlib.contextmanager
def working(what: str):
    """A spinner with ``what`` on stderr while a step that may take seconds runs (a terminal only;
    never inside a change: a terminal gone with the SSH session must not fail a load)."""
    if not err.is_terminal:
        yield
        return
    with err.status(Text(what), spinner="dots"):
        yield


def pick_backend(runner, choice: Optional[str], *, unit: bool = False) -> FirewallBackend:
    """The backend of this command (choose_backend)."""
    return choose_backend(runner, choice, unit=unit).backend


def choose_backend(runner, choice: Optional[str], *, unit: bool = False) -> Chosen:
    """The backend of this command and why (backend.choose): --backend/HOSTPREP_BACKEND, else the
    backend the last apply used (applied.json), else nft where nft and the kernel have what
    hostprep needs (``nft -c`` of a probe), else iptables as 'iptables -V' says.

    ``unit``: run by a boot unit: the recorded backend wins over the unit's HOSTPREP_BACKEND
    (units written before the native backend carry HOSTPREP_BACKEND=nft meaning iptables-nft)."""
    from hostprep.paths import Paths
    from hostprep.state import Store
    try:
        d = Store(Paths.from_env()).applied() or {}
    except HostprepError:
        d = {}
    remembered = d.get("backend") if isinstance(d, dict) else None
    remembered = remembered if isinstance(remembered, str) else None
    if unit and choice is None and remembered is not None:
        # A boot unit loads what the last apply recorded: the HOSTPREP_BACKEND it carries is a
        # copy of an apply's environment (and "nft" meant iptables-nft in units written before
        # the native backend); an apply --backend since has recorded its backend.
        return choose(runner, None, remembered=remembered, env=False)
    return choose(runner, choice, remembered=remembered)
