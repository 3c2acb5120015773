"""Which network namespace this process runs in, compared with the machine's (PID 1's)."""

from __future__ import annotations

import os


def same_netns_as_init() -> bool:
    """True in the machine's own network namespace; False in another one or when it cannot be told."""
    try:
        return os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net")
    except OSError:
        return False
