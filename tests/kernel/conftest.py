"""Fixtures for the kernel tests: a sandbox host in namespaces these tests create.

Each test gets a fresh ``Sandbox`` (three namespaces named ``hpt<pid>x<n>``,
``...-inet``, ``...-admin``; see hostprep/sandbox.py for the addresses), a
temporary HOSTPREP_ROOT, and a firewall backend: the ``variant`` fixture is
parametrised so every test runs on the three: "nft" and "legacy" (iptables,
HOSTPREP_BACKEND=iptables-nft / iptables-legacy) and "native" (the native nftables
backend, HOSTPREP_BACKEND=nft; the foreign rules are iptables-nft's there, as
Podman's would be next to it).  ``Host.observed`` reads hostprep's part the way
the backend does (iptables-save, or nft -j seen per family), so a test that counts
packets of a chain or a comment runs unchanged on each.

Before hostprep is applied, the sandbox host gets foreign rules as a real host
has them (a Podman-like chain in FORWARD and a foreign INPUT chain using
conntrack), which also makes conntrack active, as on a real host.

Only namespaces made here are touched; they are deleted by name at teardown,
even when the test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostprep import render
from hostprep.plan import plan_family, restore_text
from hostprep.model import SET_PREFIX
from hostprep.observed import Observed, parse_nft_json, parse_nft_listing, parse_save
from hostprep.runner import Runner
from hostprep.sandbox import Sandbox

PY = sys.executable
_counter = itertools.count()

if os.geteuid() != 0:
    pytest.skip("kernel tests need root (they create network namespaces)", allow_module_level=True)

# Foreign rules loaded before hostprep: they must survive apply and flush byte for byte.
FOREIGN_RULES = """*filter
:PODMAN-FWD - [0:0]
:FOREIGN-IN - [0:0]
-A INPUT -j FOREIGN-IN
-A FORWARD -j PODMAN-FWD
-A FOREIGN-IN -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "foreign: keep" -j ACCEPT
-A FOREIGN-IN -p tcp -m tcp --dport 9999 -j ACCEPT
-A PODMAN-FWD -o podman0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A PODMAN-FWD -i podman0 -j ACCEPT
COMMIT
"""


BACKEND_ENV = {"nft": "iptables-nft", "legacy": "iptables-legacy", "native": "nft"}


def tool(variant: str, family: int, kind: str) -> str:
    """The iptables tool of ``variant`` (the native backend's host has iptables-nft's)."""
    base = "iptables" if family == 4 else "ip6tables"
    return f"{base}-{'nft' if variant == 'native' else variant}-{kind}"


@dataclass
class Host:
    """One sandbox and the helpers to drive it."""

    box: Sandbox
    variant: str
    root: Path

    def run(self, ns: str, argv: list[str], *, input: str | None = None, check: bool = True,
            env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        full = ["ip", "netns", "exec", ns]
        if env:
            full += ["env", *[f"{k}={v}" for k, v in env.items()]]
        res = subprocess.run(full + argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} in {ns} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def hostprep(self, *args: str, check: bool = True, env: dict | None = None,
                 input: str | None = None) -> subprocess.CompletedProcess:
        """``python -m hostprep ARGS`` inside the sandbox host, with its own state root."""
        e = {"HOSTPREP_ROOT": str(self.root), "HOSTPREP_BACKEND": self.backend, "PYTHONPATH": str(
            Path(__file__).resolve().parents[2]), "HOSTPREP_SELINUXFS": str(self.selinuxfs)}
        e.update(env or {})
        return self.run(self.box.host, [PY, "-m", "hostprep", *args], check=check, env=e, input=input)

    @property
    def selinuxfs(self) -> Path:
        """A stand-in selinuxfs saying "enforcing" (with the matching config under the root),
        as on the RHEL 9 host hostprep is for; tests of the SELinux decisions change it."""
        fs = self.root.parent / "selinuxfs"
        if not fs.exists():
            fs.mkdir(parents=True)
            (fs / "enforce").write_text("1")
            cfg = self.root / "etc/selinux/config"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text("SELINUX=enforcing\nSELINUXTYPE=targeted\n")
        return fs

    def apply(self, *args: str) -> subprocess.CompletedProcess:
        return self.hostprep("apply", "-i", "eth1", "-y", *args)

    def save(self, family: int, counters: bool = True) -> str:
        argv = [tool(self.variant, family, "save"), "-t", "filter"] + (["-c"] if counters else [])
        return self.run(self.box.host, argv).stdout

    @property
    def backend(self) -> str:
        """The HOSTPREP_BACKEND value of this host's backend."""
        return BACKEND_ENV[self.variant]

    @property
    def native(self) -> bool:
        return self.variant == "native"

    def observed(self, family: int) -> Observed:
        """hostprep's part as the backend reads it (with the foreign chains on iptables)."""
        if self.native:
            res = self.run(self.box.host, ["nft", "-j", "list", "table", "inet", "hostprep"], check=False)
            if res.returncode != 0:
                return Observed(family, ("INPUT", "FORWARD", "OUTPUT"))
            return parse_nft_json(res.stdout, (4, 6), SET_PREFIX).observed[family]
        return parse_save(self.save(family), family)

    def ruleset_text(self, family: int) -> str:
        """iptables-save of the filter table without counters and comment lines (for equality)."""
        return "\n".join(ln for ln in self.save(family, counters=False).splitlines()
                         if not ln.startswith("#")) + "\n"

    def nft_listing(self) -> str:
        return self.run(self.box.host, ["nft", "list", "ruleset"]).stdout

    def counter(self, family: int, chain: str, contains: str = "") -> int:
        """Packets matched by the rules of ``chain`` whose spec contains ``contains``."""
        return sum(r.counter.packets for r in self.observed(family).chain_rules(chain)
                   if contains in r.spec)

    def xt_counter(self, family: int, chain: str, contains: str = "") -> int:
        """Packets of an iptables chain (the fail-safe is an iptables-restore file on every backend)."""
        return sum(r.counter.packets for r in parse_save(self.save(family), family).chain_rules(chain)
                   if contains in r.spec)

    def rule_counter(self, family: int, chain: str, ipt: str, nft: str) -> int:
        """Packets of the rules of ``chain`` whose text contains ``ipt`` (iptables-save) or ``nft``
        (the native backend's listing of CHAIN-v<family>): for rules one comment does not tell apart."""
        if not self.native:
            return self.counter(family, chain, ipt)
        res = self.run(self.box.host, ["nft", "list", "chain", "inet", "hostprep", f"{chain}-v{family}"], check=False)
        total = 0
        for line in res.stdout.splitlines() if res.returncode == 0 else []:
            m = re.search(r"counter packets (\d+) bytes", line)
            if m and nft in line:
                total += int(m.group(1))
        return total

    def nft_chain_lines(self, family: int, chain: str) -> list[str]:
        """The native backend's rules of ``chain`` (and its sub-chains) as nft lists them, no counters."""
        res = self.run(self.box.host, ["nft", "list", "table", "inet", "hostprep"], check=False)
        out, inside = [], False
        for line in res.stdout.splitlines() if res.returncode == 0 else []:
            m = re.match(r"^\tchain (\S+) \{", line)
            if m:
                inside = m.group(1) == f"{chain}-v{family}" or m.group(1).startswith(f"{chain}-v{family}.")
                continue
            if line == "\t}":
                inside = False
            elif inside and line.strip():
                out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", line.strip()))
        return out

    def nft_state(self, ns: str | None = None) -> str | None:
        """hostprep's nft tables in ``ns`` (the sandbox host), without counters: the netdev table,
        and on the native backend the inet table (terse: the limiter sets' changing elements left
        out) with the members of the exempt and load-balancer sets; None when there is neither."""
        ns = ns or self.box.host
        parts = []
        for family in ("netdev", "inet"):
            res = self.run(ns, ["nft", "-t", "list", "table", family, "hostprep"], check=False)
            if res.returncode == 0:
                parts.append(re.sub(r"counter packets \d+ bytes \d+", "counter", res.stdout))
                if family == "inet":
                    js = self.run(ns, ["nft", "-j", "list", "table", "inet", "hostprep"]).stdout
                    sets = parse_nft_json(js, (4, 6), SET_PREFIX).sets
                    parts += [f"set {k}: {' '.join(sorted(v))}" for k, v in sorted(sets.items())]
        return "\n".join(parts) if parts else None

    def nft_counter(self, comment: str) -> int:
        res = self.run(self.box.host, ["nft", "list", "table", "netdev", "hostprep"], check=False)
        if res.returncode != 0:
            return 0
        c = parse_nft_listing(res.stdout).counters.get(comment)
        return c.packets if c else 0

    def probe(self, ns: str, probes: list[dict]) -> list[dict]:
        """Send real packets from namespace ``ns`` (hostprep.probe); returns one result per probe."""
        res = self.run(ns, [PY, "-m", "hostprep.probe"], input=json.dumps(probes),
                       env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        return json.loads(res.stdout)

    def probe1(self, ns: str, **probe) -> dict:
        return self.probe(ns, [probe])[0]


def load_rendered(host, policy, family: int) -> None:
    """Load hostprep's rules for ``policy`` as rendered, the way apply's plan does, bypassing the
    CLI's checks: what ``boot`` loads from a record an older hostprep wrote."""
    if host.native:
        pytest.skip("an older hostprep's record is an iptables one")
    desired = render.desired(policy).ruleset(family)
    text = restore_text(plan_family(desired, host.observed(family)), desired)
    host.run(host.box.host, [tool(host.variant, family, "restore"), "--noflush"], input=text)


@pytest.fixture(params=["nft", "legacy", "native"])
def variant(request) -> str:
    """The backend of the test.  "native" runs only in the modules that say ``NATIVE = True`` (their
    checks read hostprep's part through Host.observed or the native table); the others stay on the
    two iptables variants until they are adapted.  "legacy" is skipped in the modules that say
    ``LEGACY = False`` (with ``LEGACY_WHY``): where the iptables variant changes only the name of
    the tool hostprep runs, iptables-nft stands for both, and CI stays within its time budget;
    the modules whose rules, reading or boot files differ by variant run both."""
    if request.param == "native" and not getattr(request.module, "NATIVE", False):
        pytest.skip("this module's checks are iptables-specific (not yet run on the native backend)")
    if request.param == "legacy" and not getattr(request.module, "LEGACY", True):
        pytest.skip(request.module.LEGACY_WHY)
    return request.param


@pytest.fixture
def host(variant: str, tmp_path: Path):
    box = Sandbox(f"hpt{os.getpid()}x{next(_counter)}")
    runner = Runner()
    box.create(runner)
    try:
        h = Host(box, variant, tmp_path / "root")
        for fam in (4, 6):
            h.run(box.host, [tool(variant, fam, "restore"), "--noflush"], input=FOREIGN_RULES)
        yield h
    finally:
        box.destroy(runner)
