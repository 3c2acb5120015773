"""The firewall backend: iptables-restore/-save of the host's variant, and nft.

RHEL 9's iptables is the nf_tables variant; older or Debian hosts may use the
legacy x_tables one.  ``iptables -V`` tells which (``(nf_tables)`` or
``(legacy)``); ``--backend``/``HOSTPREP_BACKEND`` overrides it (the kernel tests
run both).  Reading never creates tables: the legacy save tool creates an empty
filter table when asked for one, so /proc/net/ip*_tables_names is read first.
"""

from __future__ import annotations

import os
from pathlib import Path

from hostprep.errors import CommandFailed, InputError
from hostprep.model import SET_PREFIX
from hostprep.observed import NftObserved, Observed, parse_ipset_save, parse_nft_listing, parse_save
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


def for_host(runner: Runner, variant: str | None = None) -> Backend:
    """The backend of this host: ``variant`` (--backend), else HOSTPREP_BACKEND, else ``iptables -V``."""
    return Backend(runner, detect_variant(runner, variant))
