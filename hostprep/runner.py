"""The one module that runs subprocesses.

argv lists only (never a shell), ``LANG=C``/``LC_ALL=C`` so output parses the
same everywhere, and a timeout on every call.  Tests swap ``Runner`` for a fake;
``--dry-run`` swaps it for ``DryRunner``, which performs read-only commands and
records the ones that would change the host instead of running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hostprep.errors import CommandFailed, MissingBinary

DEFAULT_TIMEOUT = 60.0
# Where hostprep itself was loaded from: a child interpreter finds the same code there.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def python_module(module: str) -> list[str]:
    """argv of a child interpreter running ``module``: ``-P`` keeps the caller's current
    directory off sys.path (a ``hostprep/`` planted there by another user never runs as
    root); run it with ``cwd="/"`` and ``PYTHONPATH=PACKAGE_PARENT``."""
    return [sys.executable, "-P", "-m", module]


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs commands for real."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    @staticmethod
    def which(binary: str) -> str | None:
        return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    def run(self, argv: list[str], *, input: str | None = None, check: bool = True,
            mutates: bool = False, cwd: str | None = None) -> Result:
        """Run ``argv``.  ``mutates`` marks a command that changes the host."""
        exe = self.which(argv[0])
        if exe is None:
            raise MissingBinary(argv[0])
        env = dict(os.environ, LANG="C", LC_ALL="C")
        try:
            # start_new_session: a Ctrl-C or a hang-up of the terminal goes to hostprep
            # (which finishes or undoes the change first), never straight to an
            # iptables-restore half-way through a load.
            proc = subprocess.run([exe, *argv[1:]], input=input, capture_output=True, text=True,
                                  timeout=self.timeout, env=env, check=False, start_new_session=True,
                                  cwd=cwd)
        except subprocess.TimeoutExpired:
            raise CommandFailed(argv[0], f"did not finish within {self.timeout:.0f} s",
                                "check that the kernel and the xtables lock are not stuck") from None
        res = Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise CommandFailed(" ".join(argv[:2]), f"exit {proc.returncode}: "
                                + (detail[-1] if detail else "no output"))
        return res

    def spawn(self, argv: list[str], *, env: dict[str, str]) -> int:
        """Start ``argv`` detached (its own session, no terminal, no inherited files, in /); its PID.

        What outlives hostprep on purpose (the --confirm watcher): a hang-up of the
        admin's session does not reach it.
        """
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, cwd="/")
        return proc.pid


@dataclass
class DryRunner(Runner):
    """Runs read-only commands, records the mutating ones (for ``--dry-run``)."""

    inner: Runner = field(default_factory=Runner)
    recorded: list[tuple[list[str], str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.inner.timeout)

    def run(self, argv: list[str], *, input: str | None = None, check: bool = True,
            mutates: bool = False, cwd: str | None = None) -> Result:
        if mutates:
            self.recorded.append((list(argv), input))
            return Result(tuple(argv), 0, "", "")
        return self.inner.run(argv, input=input, check=check, mutates=False, cwd=cwd)

    def spawn(self, argv: list[str], *, env: dict[str, str]) -> int:
        self.recorded.append((list(argv), None))
        return 0
