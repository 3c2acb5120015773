"""Fault injection for the tests of issue 5 (kill -9 and full disk at chosen points).

``HOSTPREP_FAULT=POINT:ACTION[,POINT:ACTION...]`` (test use only; unset on a real
host, where every call here is a no-op).  Points, in the order a change passes them:

  locked            the lock is held, nothing done yet
  before-load       snapshot saved, transactions tested, nothing loaded
  between-families  IPv4 loaded, IPv6 not yet
  before-release    a switch of backends: the new backend's rules loaded (and, on
                    iptables, read back), the old backend's part not yet removed
                    (the native backend passes it after every nft -f: its load
                    removes hostprep's iptables chains itself)
  read-back         the read-back after a load (engine.verify); action "differ" makes it
                    report a difference, so that the load is undone (the boot ladder's path)
  before-record     every family loaded and read back, nothing recorded yet
  record            the write of the record itself (actions enospc / erofs)
  after-record      recorded, the change not yet closed

Actions:
  pause   write <HOSTPREP_FAULT_DIR>/<point>.reached and wait until the test
          removes it (the test may kill -9 the process meanwhile)
  kill    SIGKILL this process, right here
  enospc  / erofs   raise the OSError a full disk / a read-only mount gives
  fail    raise a plain error
  differ  (read-back only) the read-back reports a difference (see differs())
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

POINTS = ("locked", "before-load", "between-families", "before-release", "read-back", "before-record", "record",
          "after-record")


def _wanted(point: str) -> str | None:
    spec = os.environ.get("HOSTPREP_FAULT", "")
    for item in spec.split(","):
        if ":" in item:
            p, action = item.split(":", 1)
            if p.strip() == point:
                return action.strip()
    return None


def differs(point: str) -> bool:
    """Whether HOSTPREP_FAULT asks ``point`` (a read-back) to report a difference."""
    return _wanted(point) == "differ"


def hit(point: str) -> None:
    """Called by the change code at ``point``; does what HOSTPREP_FAULT asks there."""
    action = _wanted(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        marker = Path(os.environ.get("HOSTPREP_FAULT_DIR", "/tmp")) / f"{point}.reached"
        marker.write_text(f"{os.getpid()}\n")
        while marker.exists():
            time.sleep(0.05)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "erofs":
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    elif action == "fail":
        raise RuntimeError(f"injected failure at {point}")
