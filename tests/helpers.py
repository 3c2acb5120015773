"""Helpers shared by the test directories (import as ``from tests.helpers import ...``).

Kernel tests: ``env_file`` (a .env file of KEY=value lines), ``QUIET``/``ANSWER`` (the
timeouts of a probe that must get no answer / must be answered: a veth round trip is
under 1 ms) and ``tcp`` (one TCP probe for hostprep.probe).

``FakeKernel``: the firewall backend over an in-memory kernel for the unit tests.
It is an ``IptablesBackend`` whose primitives (one command each: save, restore,
ipset, nft) answer from fields the test sets, so the contract's methods
(observe/test/load/undo/finish) are the real ones.  Loads are recorded and not
applied: what the kernel reads back is what the test put there (a kernel that
holds what was loaded is the subject of tests/kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hostprep import plan as planmod
from hostprep.backend import IptablesBackend
from hostprep.model import BUILTIN_CHAINS, Desired
from hostprep.observed import NftObserved, Observed, parse_save

QUIET = 0.5     # timeout of a probe that must get no answer (veth round trip is < 1 ms)
ANSWER = 1.0    # timeout of a probe that must be answered


def env_file(tmp_path: Path, fname: str, **values) -> Path:
    """``tmp_path/fname`` holding one KEY=value line per keyword."""
    path = tmp_path / fname
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def tcp(dst: str, dport: int, timeout: float = QUIET, **kw) -> dict:
    """One TCP probe (hostprep.probe): a SYN to dst:dport, answered within ``timeout`` or not."""
    return {"kind": "tcp", "dst": dst, "dport": dport, "timeout": timeout, **kw}


@dataclass
class FakeKernel(IptablesBackend):
    """An in-memory kernel behind the IptablesBackend contract (see the module docstring)."""

    observed: dict[int, Observed] = field(default_factory=lambda: {
        fam: Observed(fam, tuple(BUILTIN_CHAINS)) for fam in (4, 6)})
    nft: NftObserved | None = None
    sets: dict[str, frozenset[str]] = field(default_factory=dict)
    variant: str = "nft"
    runner: object = None
    proc: Path = Path("/nonexistent/proc")      # no kernel counters to read
    loads: list[tuple[int, str]] = field(default_factory=list)      # (family, restore text) loaded
    tests: list[tuple[int, str]] = field(default_factory=list)      # (family, restore text) tested
    nft_loads: int = 0
    nft_deleted: int = 0
    ipset_scripts: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)

    @classmethod
    def holding(cls, desired: Desired, **kw) -> "FakeKernel":
        """A kernel whose filter tables hold exactly what ``desired`` loads (as iptables-save prints it)."""
        return cls(observed={fam: saved(desired, fam) for fam in (4, 6)}, **kw)

    def is_supported(self) -> bool:
        return True

    def families(self) -> tuple[int, ...]:
        return tuple(self.observed)

    def observe_family(self, family: int) -> Observed:
        return self.observed[family]

    def restore_test(self, family: int, text: str) -> None:
        self.tests.append((family, text))

    def restore(self, family: int, text: str) -> None:
        self.loads.append((family, text))

    def nft_observe(self) -> NftObserved | None:
        return self.nft

    def nft_check(self, script: str) -> None:
        pass

    def nft_load(self, script: str) -> None:
        self.nft_loads += 1

    def nft_delete(self) -> None:
        self.nft_deleted += 1

    def ipset_observe(self) -> dict[str, frozenset[str]]:
        return self.sets

    def ipset_restore(self, script: str) -> None:
        self.ipset_scripts.append(script)

    def ipset_destroy(self, name: str) -> bool:
        self.destroyed.append(name)
        return True

    def other_firewalls(self) -> list[str]:
        return []


def saved(desired: Desired, family: int) -> Observed:
    """What iptables-save prints once ``desired``'s rules of ``family`` are loaded into an empty table."""
    fplan = planmod.plan_family(desired.ruleset(family), Observed(family, ("INPUT", "FORWARD", "OUTPUT")))
    text = planmod.restore_text(fplan, desired.ruleset(family))
    # A restore text of a fresh table is an iptables-save text without counters.
    lines = [ln for ln in text.splitlines() if not ln.startswith(("-F", "-X"))]
    save = "\n".join(ln.replace("-I INPUT 1 ", "-A INPUT ").replace("-I FORWARD 1 ", "-A FORWARD ")
                     .replace("-I OUTPUT 1 ", "-A OUTPUT ") for ln in lines) + "\n"
    return parse_save(save.replace("*filter\n", "*filter\n:INPUT ACCEPT [0:0]\n"
                                   ":FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n", 1), family)
