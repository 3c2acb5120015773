"""A load the kernel does not hold (the read-back differs) is undone, not left half-applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostprep import ops, render
from hostprep.errors import CommandFailed
from hostprep.model import Policy
from hostprep.paths import Paths
from hostprep.state import Store
from tests.helpers import FakeKernel


def test_verify_failure_is_undone_and_nothing_recorded(tmp_path: Path):
    backend = FakeKernel()   # accepts every load, reads back none of it
    store = Store(Paths(tmp_path))
    desired = render.desired(Policy("eth1"))
    with pytest.raises(CommandFailed) as err:
        ops.apply(store, "hostprep apply -i eth1", backend=backend, desired=desired, kernel=False)
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
    backend = FakeKernel()   # accepts every load, reads back none of it
    store = Store(Paths(tmp_path))
    with pytest.raises(CommandFailed):
        ops.apply(store, "hostprep apply -i eth1", backend=backend, desired=render.desired(Policy("eth1")),
                  kernel=False)
    fields = (tmp_path / "var/log/hostprep/journal.log").read_text().splitlines()[0].split("\t")
    assert fields[3] == ("IPv4: added 13 chains (47 rules); IPv4: added the jumps from INPUT, FORWARD, OUTPUT; "
                         "IPv6: added 13 chains (51 rules); IPv6: added the jumps from INPUT, FORWARD, OUTPUT; "
                         "loaded the nft ingress table on eth1")
