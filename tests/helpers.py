"""Helpers shared by the test directories (import as ``from tests.helpers import ...``).

Kernel tests: ``env_file`` (a .env file of KEY=value lines), ``finesse_env`` (a Finesse
component's .env), ``QUIET``/``ANSWER`` (the timeouts of a probe that must get no answer /
must be answered: a veth round trip is under 1 ms) and ``tcp`` (one TCP probe for
hostprep.probe).

Unit tests: ``waiting_change`` (a change left waiting for 'hostprep confirm').

``FakeKernel``: the firewall backend over an in-memory kernel for the unit tests.
It is an ``IptablesBackend`` whose primitives (one command each: save, restore,
ipset, nft) answer from fields the test sets, so the contract's methods
(observe/test/load/undo/finish) are the real ones.  Loads are recorded and not
applied: what the kernel reads back is what the test put there (a kernel that
holds what was loaded is the subject of tests/kernel).
"""

from __future__ import annotations

import json
import time
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


def finesse_env(tmp_path: Path, fname: str = "finesse.env", **values) -> Path:
    """A Finesse component's .env (TEMPLATE_TYPE=finesse) with one KEY=value line per keyword."""
    return env_file(tmp_path, fname, TEMPLATE_TYPE="finesse", **values)


def waiting_change(store, command: str, *, seconds: float, deadline_text: str) -> str:
    """A change (``command``, rewriting settings.json) left waiting for 'hostprep confirm' for
    ``seconds`` (negative: its deadline has passed), as ``apply --confirm`` leaves it with the
    process mechanism; returns the change id."""
    from hostprep import timers, txn

    with txn.change(None, store, command, firewall=False) as ch:
        store.paths.settings_file.parent.mkdir(parents=True, exist_ok=True)
        store.paths.settings_file.write_text('{"interface": "eth2"}\n')
    timers.pending_file(store).parent.mkdir(parents=True, exist_ok=True)
    timers.pending_file(store).write_text(json.dumps({
        "id": ch.id, "command": command, "deadline": time.time() + seconds, "deadline_text": deadline_text,
        "mechanism": "process", "watcher_pid": None}))
    return ch.id


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
    other_backends: list = field(default_factory=list)

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

    def others(self) -> list:
        """The other backends of this fake host (a test of a switch sets them)."""
        return self.other_backends


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


# -- a fake nft binary for the native backend's unit tests --------------------------------

BAN_TABLE = "inet hostprep_ban"


class FakeNft:
    """A Runner that plays the ``nft`` binary over an in-memory ruleset: ``nft -f -`` takes the
    script hostprep renders (both tables declared, deleted, re-created: the last table blocks
    win, as in the kernel's transaction) or the removal script; ``nft -j list table inet
    hostprep`` answers JSON built from it (comments, verdicts, jumps, synproxy, the interfaces of
    the base chains, the interval sets' members); ``nft -c`` checks nothing but is counted.  ``refuse``:
    every ``nft -f`` fails as the kernel refusing the transaction (nothing changes)."""

    def __init__(self, refuse: bool = False) -> None:
        self.tables: dict[str, str] = {}            # "inet hostprep" -> the table block text
        self.calls: list[tuple[list[str], str | None, bool]] = []
        self.refuse = refuse

    def which(self, binary: str) -> str | None:
        return f"/usr/sbin/{binary}"

    def run(self, argv, *, input=None, check=True, mutates=False, cwd=None):
        from hostprep.errors import CommandFailed
        from hostprep.runner import Result
        argv = list(argv)
        self.calls.append((argv, input, mutates))
        if argv[:3] == ["nft", "-f", "-"]:
            if self.refuse:
                raise CommandFailed("nft -f", "Error: Could not process rule: Operation not supported")
            self.tables = self.apply(input or "", dict(self.tables))
            return Result(tuple(argv), 0, "", "")
        if argv[:3] == ["nft", "-c", "-f"]:
            return Result(tuple(argv), 0, "", "")
        if len(argv) >= 4 and argv[-3] == "table" and argv[-2] in ("inet", "netdev"):
            key = f"{argv[-2]} {argv[-1]}"
            if key not in self.tables:
                return Result(tuple(argv), 1, "", "Error: No such file or directory")
            if "-j" in argv:
                return Result(tuple(argv), 0, self.json(key), "")
            return Result(tuple(argv), 0, self.tables[key], "")
        if argv[:3] == ["nft", "list", "tables"]:
            return Result(tuple(argv), 0, "".join(f"table {k}\n" for k in self.tables), "")
        return Result(tuple(argv), 0, "", "")

    @staticmethod
    def apply(script: str, tables: dict[str, str]) -> dict[str, str]:
        block: list[str] = []
        name = None
        for line in script.splitlines():
            if name is None:
                if line.startswith("delete table "):
                    tables.pop(line[len("delete table "):].strip(), None)
                elif line.startswith(("add ", "flush ", "delete ")):
                    FakeNft.command(line, tables)
                elif line.startswith("table ") and line.rstrip().endswith("{"):
                    name, block = line[len("table "):-1].strip(), [line]
            else:
                block.append(line)
                if line == "}":
                    if name == BAN_TABLE and name in tables:
                        tables[name] = FakeNft.append_rules(tables[name], block)
                    else:
                        tables[name] = "\n".join(block) + "\n"
                    name = None
        return tables

    # The ban table (rules/ban.nft.j2) is changed by commands, not replaced: `add table/set/chain`
    # (created when missing, else left as it is), `flush chain`, `delete set/chain`, and a table
    # block that appends rules to its chains.  Its text keeps the listing's layout (json() reads it).
    @staticmethod
    def command(line: str, tables: dict[str, str]) -> None:
        import re
        words = line.split()
        verb, kind, table = words[0], words[1], " ".join(words[2:4])
        if kind == "table":
            tables.setdefault(table, f"table {table} {{\n}}\n")
            return
        text = tables[table]          # KeyError: the kernel's "No such file or directory"
        obj = words[4]
        block = re.compile(rf"\t{kind} {re.escape(obj)} \{{\n(?:[^\n]*\n)*?\t\}}\n")
        if verb == "add" and not block.search(text):
            body = line.split("{", 1)[1].rsplit("}", 1)[0] if "{" in line else ""
            inner = "".join(f"\t\t{p.strip()}\n" for p in body.split(";") if p.strip() and kind == "set")
            if kind == "chain" and body.strip():
                inner = f"\t\t{body.strip()}\n"
            text = text[:-2] + f"\t{kind} {obj} {{\n{inner}\t}}\n}}\n"
        elif verb == "delete":
            assert block.search(text), f"{line}: no such {kind}"
            text = block.sub("", text)
        elif verb == "flush" and kind == "chain":
            m = block.search(text)
            assert m, f"{line}: no such chain"
            kept = [ln for ln in m.group(0).splitlines(keepends=True) if not ln.startswith("\t\t")
                    or ln.strip().startswith("type ")]
            text = text[:m.start()] + "".join(kept) + text[m.end():]
        tables[table] = text

    @staticmethod
    def append_rules(text: str, block: list[str]) -> str:
        chain = None
        for line in block[1:-1]:
            if line.startswith("\tchain "):
                chain = line.split()[1]
            elif line == "\t}":
                chain = None
            elif chain and line.strip() and not line.strip().startswith("#"):
                head = f"\tchain {chain} {{\n"
                start = text.index(head)
                end = text.index("\t}\n", start)
                text = text[:end] + f"\t\t{line.strip()}\n" + text[end:]
        return text

    def ban(self, set_name: str, addr: str) -> None:
        """What fail2ban's nft action does: an element added to a ban set."""
        import re
        text = self.tables[BAN_TABLE]
        m = re.search(rf"(\tset {re.escape(set_name)} \{{\n.*?)(\n\t\}})", text, re.S)
        body = m.group(1)
        if "elements = { " in body:
            body = re.sub(r"elements = \{ (.*?) \}", lambda e: f"elements = {{ {e.group(1)}, {addr} }}", body)
        else:
            body += f"\n\t\telements = {{ {addr} }}"
        self.tables[BAN_TABLE] = text[:m.start()] + body + m.group(2) + text[m.end():]

    def json(self, key: str) -> str:
        import json
        import re
        fam, tname = key.split()
        out: list[dict] = [{"table": {"family": fam, "name": tname}}]
        chain = None
        text = self.tables[key]
        for m in re.finditer(r"\tset (\S+) \{(.*?)\n\t\}", text, re.S):
            elems = re.search(r"elements = \{ (.*?) \}", m.group(2))
            s = {"family": fam, "name": m.group(1), "table": tname}
            if elems:
                s["elem"] = [e if "/" not in e else {"prefix": {"addr": e.split("/")[0], "len": int(e.split("/")[1])}}
                             for e in elems.group(1).split(", ")]
            out.append({"set": s})
        for line in text.splitlines():
            m = re.match(r"^\tchain (\S+) \{", line)
            if m:
                chain = m.group(1)
                out.append({"chain": {"family": fam, "table": tname, "name": chain}})
                continue
            if line == "\t}":
                chain = None
            s = line.strip()
            if chain is None or not s or s.startswith(("#", "type ")):
                continue
            rule: dict = {"family": fam, "table": tname, "chain": chain, "expr": []}
            c = re.search(r'comment "([^"]*)"\s*$', s)
            if c:
                rule["comment"] = c.group(1)
            dev = re.search(r'([io])ifname "([^"]+)"', s)
            if dev:
                rule["expr"].append({"match": {"op": "==", "left": {"meta": {"key": f"{dev.group(1)}ifname"}},
                                               "right": dev.group(2)}})
            lookup = re.search(r"\b(ip6?) saddr (@\S+)", s)
            if lookup:
                rule["expr"].append({"match": {"op": "==", "left": {"payload": {"protocol": lookup.group(1),
                                                                               "field": "saddr"}},
                                               "right": lookup.group(2)}})
            rule["expr"].append({"counter": {"packets": 0, "bytes": 0}})
            j = re.search(r"\bjump (\S+)", s)
            if j:
                rule["expr"].append({"jump": {"target": j.group(1)}})
            v = re.search(r"\b(accept|drop|return)\s+comment", s)
            if v:
                rule["expr"].append({v.group(1): None})
            elif re.search(r"\blog prefix", s):
                rule["expr"].append({"log": {}})
            elif re.search(r"\bsynproxy\b", s):
                rule["expr"].append({"synproxy": {}})
            out.append({"rule": rule})
        return json.dumps({"nftables": out})

    def mutating(self) -> list[list[str]]:
        return [argv for argv, _, mut in self.calls if mut]
