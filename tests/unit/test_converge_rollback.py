"""A load the kernel does not hold (the read-back differs) is undone, not left half-applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostprep import apply as applymod
from hostprep import render
from hostprep.errors import CommandFailed
from hostprep.model import Policy
from hostprep.paths import Paths
from hostprep.plan import Observed
from hostprep.state import Store


class LyingKernelBackend:
    """Accepts every load but reads back nothing of it until the rollback restores the start."""

    variant = "nft"

    def __init__(self) -> None:
        self.loads: list[tuple[int, str]] = []
        self.nft_loads = 0
        self.nft_deleted = 0

    def families(self):
        return (4, 6)

    def observe(self, family: int) -> Observed:
        return Observed(family, ("INPUT", "FORWARD", "OUTPUT"))

    def test(self, family: int, text: str) -> None:
        pass

    def load(self, family: int, text: str) -> None:
        self.loads.append((family, text))

    def nft_observe(self):
        return None

    def nft_check(self, script: str) -> None:
        pass

    def nft_load(self, script: str) -> None:
        self.nft_loads += 1

    def nft_delete(self) -> None:
        self.nft_deleted += 1

    def ipset_observe(self):
        return {}

    def ipset_restore(self, script: str) -> None:
        pass

    def ipset_destroy(self, name: str) -> bool:
        return True


def test_verify_failure_is_undone_and_nothing_recorded(tmp_path: Path):
    backend = LyingKernelBackend()
    store = Store(Paths(tmp_path))
    desired = render.desired(Policy("eth1"))
    with pytest.raises(CommandFailed) as err:
        applymod.apply(backend, store, desired, "hostprep apply -i eth1")
    assert err.value.field == "verify"
    assert "the previous rules are back" in err.value.problem
    # Both families were loaded once each; the rollback found nothing of hostprep
    # live (the kernel "held" nothing), so no second load was needed.
    assert [fam for fam, _ in backend.loads] == [4, 6]
    assert backend.nft_loads == 1
    assert store.applied() is None
    assert store.settings() is None
    journal = (tmp_path / "var/log/hostprep/journal.log").read_text().splitlines()
    assert len(journal) == 1 and "verify failed" in journal[0] and "the previous rules are back" in journal[0]


def test_the_journal_says_what_the_load_did(tmp_path: Path):
    """issue 15, item 4: the journal has apply's action wording, not the differences."""
    backend = LyingKernelBackend()
    store = Store(Paths(tmp_path))
    with pytest.raises(CommandFailed):
        applymod.apply(backend, store, render.desired(Policy("eth1")), "hostprep apply -i eth1")
    fields = (tmp_path / "var/log/hostprep/journal.log").read_text().splitlines()[0].split("\t")
    assert fields[3] == ("IPv4: added 13 chains (47 rules); IPv4: added the jumps from INPUT, FORWARD, OUTPUT; "
                         "IPv6: added 13 chains (51 rules); IPv6: added the jumps from INPUT, FORWARD, OUTPUT; "
                         "loaded the nft ingress table on eth1")
