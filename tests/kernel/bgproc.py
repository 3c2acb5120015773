"""A background python process inside a network namespace, driven line by line (kernel tests)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path


class Bg:
    """A background python process in a namespace, driven line by line through pipes."""

    def __init__(self, ns: str, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-u", "-c", script, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<EOF>")

    def readline(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "<TIMEOUT>"

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        """Only after kill(): what the process wrote to stderr (for assertion messages)."""
        try:
            return self.proc.stderr.read()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


def watcher_alive(pid: int | None, cid: str | None = None) -> bool:
    """The --confirm rollback watcher (of change ``cid``, if given) runs; a zombie or a reused PID has
    another command line."""
    if not pid:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"rollback" in argv and b"--due" in argv and (cid is None or cid.encode() in argv)


def default_signals(*sigs: signal.Signals):
    """A ``preexec_fn`` giving the child the default disposition of ``sigs``.

    An ignored signal survives fork and exec: a test that sends one to its child must
    not depend on what the test runner inherited (a CI under ``nohup`` ignores SIGHUP,
    a shell's background job SIGINT and SIGQUIT)."""
    def reset() -> None:
        for sig in sigs:
            signal.signal(sig, signal.SIG_DFL)
    return reset
