"""The firewall backend: iptables-restore/-save of the host's variant, and nft.

RHEL 9's iptables is the nf_tables variant; older or Debian hosts may use the
legacy x_tables one.  ``iptables -V`` tells which (``(nf_tables)`` or
``(legacy)``); ``--backend``/``HOSTPREP_BACKEND`` overrides it (the kernel tests
run both).  Reading never creates tables: the legacy save tool creates an empty
filter table when asked for one, so /proc/net/ip*_tables_names is read first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hostprep.errors import CommandFailed, InputError
from hostprep.model import SET_PREFIX
from hostprep.plan import Counter, Observed, parse_ipset_save, parse_save
from hostprep.runner import Runner

VARIANTS = ("nft", "legacy")
NFT_TABLE = ("netdev", "hostprep")


def detect_variant(runner: Runner, override: str | None = None) -> str:
    choice = override or os.environ.get("HOSTPREP_BACKEND") or ""
    if choice:
        if choice not in VARIANTS:
            raise InputError("--backend", f"{choice!r} is not a backend", "use nft or legacy")
        return choice
    out = runner.run(["iptables", "-V"]).stdout
    if "nf_tables" in out:
        return "nft"
    if "legacy" in out:
        return "legacy"
    raise CommandFailed("iptables -V", f"cannot tell the variant from {out.strip()!r}",
                        "pass --backend nft or --backend legacy")


@dataclass(frozen=True)
class NftObserved:
    device: str
    text: str                       # normalised listing: no counters, no handles
    counters: dict[str, Counter]    # rule comment -> counter
    flooded: tuple[str, ...] = ()   # binding addresses whose container ports get SYN cookies now


_COUNTER = re.compile(r"counter packets (\d+) bytes (\d+)")
_COMMENT = re.compile(r'comment "([^"]*)"')
_DEVICE = re.compile(r'device "?([^";\s]+)"?')


_SET = re.compile(r"^\s*set (\S+) \{")
_FLOODED = re.compile(r"([0-9A-Fa-f:.]+) expires")


def _split_dynamic(text: str) -> tuple[list[str], tuple[str, ...]]:
    """The listing without the elements of the sets the kernel fills itself (flooded4/6: the
    addresses under SYN cookies now, with their expiry), and those addresses."""
    kept: list[str] = []
    flooded: list[str] = []
    current, skipping = "", False
    for ln in text.splitlines():
        m = _SET.match(ln)
        if m:
            current = m.group(1)
        if skipping or (current.startswith("flooded") and ln.strip().startswith("elements = {")):
            flooded += _FLOODED.findall(ln)
            skipping = not ln.rstrip().endswith("}")
            continue
        if ln.strip() == "}":
            current = ""
        kept.append(ln)
    return kept, tuple(flooded)


def normalise_nft(text: str) -> str:
    lines = [_COUNTER.sub("counter", ln.rstrip()) for ln in _split_dynamic(text)[0]]
    return "\n".join(ln for ln in lines if ln.strip()) + "\n"


def parse_nft_listing(text: str) -> NftObserved:
    counters: dict[str, Counter] = {}
    for line in text.splitlines():
        c, m = _COUNTER.search(line), _COMMENT.search(line)
        if c and m:
            counters[m.group(1)] = Counter(int(c.group(1)), int(c.group(2)))
    dev = _DEVICE.search(text)
    return NftObserved(dev.group(1) if dev else "", normalise_nft(text), counters, _split_dynamic(text)[1])


class Backend:
    def __init__(self, runner: Runner, variant: str, proc: Path = Path("/proc")) -> None:
        self.runner = runner
        self.variant = variant
        self.proc = proc

    # -- tool names ------------------------------------------------------
    def tool(self, family: int, kind: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        specific = f"{base}-{self.variant}-{kind}"
        if self.runner.which(specific):
            return specific
        generic = f"{base}-{kind}"
        if self.runner.which(generic):
            return generic
        return specific  # not installed: Runner raises MissingBinary naming it

    def legacy_tables(self, family: int) -> set[str]:
        name = "ip_tables_names" if family == 4 else "ip6_tables_names"
        try:
            return set((self.proc / "net" / name).read_text().split())
        except OSError:
            return set()

    def families(self) -> tuple[int, ...]:
        """(4, 6), or (4,) on a kernel booted with ipv6.disable=1 (no IPv6 to harden)."""
        return (4, 6) if (self.proc / "sys/net/ipv6").is_dir() else (4,)

    # -- iptables --------------------------------------------------------
    def observe(self, family: int) -> Observed:
        if self.variant == "legacy" and "filter" not in self.legacy_tables(family):
            return Observed(family)  # nothing loaded; asking the save tool would create it
        out = self.runner.run([self.tool(family, "save"), "-c", "-t", "filter"]).stdout
        return parse_save(out, family)

    def test(self, family: int, text: str) -> None:
        self.runner.run([self.tool(family, "restore"), "--noflush", "--test"], input=text)

    def load(self, family: int, text: str) -> None:
        self.runner.run([self.tool(family, "restore"), "--noflush"], input=text, mutates=True)

    def other_variant_present(self) -> list[str]:
        """Warnings when the other variant also holds tables (both judge every packet)."""
        warnings: list[str] = []
        if self.variant == "nft":
            for fam in (4, 6):
                tables = self.legacy_tables(fam)
                if tables:
                    warnings.append(f"legacy {'ip' if fam == 4 else 'ip6'}tables tables are loaded too "
                                    f"({', '.join(sorted(tables))}): they judge every packet as well")
        else:
            res = self.runner.run(["nft", "list", "tables"], check=False)
            names = [ln.strip() for ln in res.stdout.splitlines()
                     if ln.startswith("table ") and ln.strip() != "table netdev hostprep"]
            if names:
                warnings.append(f"nf_tables tables exist too ({'; '.join(names)}): "
                                "they judge every packet as well")
        return warnings

    # -- ipsets ----------------------------------------------------------
    def ipset_observe(self) -> dict[str, frozenset[str]]:
        """hostprep's sets and their members; {} where ipset is not installed (no set can be ours)."""
        if self.runner.which("ipset") is None:
            return {}
        res = self.runner.run(["ipset", "save"], check=False)
        if res.returncode != 0:
            return {}
        return parse_ipset_save(res.stdout, SET_PREFIX)

    def ipset_restore(self, script: str) -> None:
        if script.strip():
            self.runner.run(["ipset", "restore"], input=script, mutates=True)

    def ipset_destroy(self, name: str) -> bool:
        res = self.runner.run(["ipset", "destroy", name], check=False, mutates=True)
        return res.returncode == 0

    # -- nft ingress table -------------------------------------------------
    def nft_observe(self) -> NftObserved | None:
        res = self.runner.run(["nft", "list", "table", *NFT_TABLE], check=False)
        if res.returncode != 0:
            if "No such file" in res.stderr or "does not exist" in res.stderr:
                return None
            raise CommandFailed("nft list table", (res.stderr.strip().splitlines() or ["failed"])[-1])
        return parse_nft_listing(res.stdout)

    def nft_check(self, script: str) -> None:
        self.runner.run(["nft", "-c", "-f", "-"], input=script)

    def nft_load(self, script: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script, mutates=True)

    def nft_delete(self) -> None:
        self.runner.run(["nft", "delete", "table", *NFT_TABLE], mutates=True)
