"""Fakes shared by the unit tests: a Runner that records argv and runs nothing."""

from __future__ import annotations

import pytest

from hostprep.runner import Result, Runner


class FakeRunner(Runner):
    """Records every call; answers from ``replies`` (argv tuple -> (rc, stdout, stderr)).

    ``installed``: the binaries ``which`` finds (None: every binary).
    """

    def __init__(self, replies: dict[tuple[str, ...], tuple[int, str, str]] | None = None,
                 installed: set[str] | None = None) -> None:
        super().__init__()
        self.replies = replies or {}
        self.installed = installed
        self.calls: list[tuple[list[str], str | None, bool]] = []

    def which(self, binary: str) -> str | None:  # type: ignore[override]
        if self.installed is None or binary in self.installed:
            return f"/usr/sbin/{binary}"
        return None

    def run(self, argv, *, input=None, check=True, mutates=False, cwd=None):
        self.calls.append((list(argv), input, mutates))
        rc, out, err = self.replies.get(tuple(argv), (0, "", ""))
        return Result(tuple(argv), rc, out, err)


@pytest.fixture
def fake_runner():
    return FakeRunner
