"""testinfra host specs: the state a hardened host must be in.

These are specs of a host that hostprep has already hardened; they change
nothing.  They run only when pytest is given ``--hosts`` (testinfra):

* here, inside the sandbox namespace after a sandbox apply (scripts/run-host-specs.sh):

      ip netns exec NS env HOSTPREP_ROOT=/var/tmp/NS ... \\
          .venv/bin/python -m pytest tests/host --hosts=local:// -q -p no:cacheprovider

* against the VM in vagrant/ (root "/", the system's iptables variant; the state
  files are root-only and iptables needs root, hence --sudo):

      cd vagrant && vagrant ssh-config > .vagrant/ssh-config
      ../.venv/bin/python -m pytest ../tests/host --hosts=ssh://proxy \\
          --ssh-config=.vagrant/ssh-config --sudo          (see vagrant/README.md)

Without ``--hosts`` (the normal ``pytest tests/`` run) every spec here is
skipped, with the reason: testinfra would otherwise run them against the
machine pytest runs on, which is not a hardened host.

Settings, read by the test process (so they also apply over ssh):

  HOSTPREP_ROOT             the host's state prefix (default "/")
  HOSTPREP_BACKEND          nft | legacy: use iptables-nft / iptables-legacy instead
                            of the system's iptables (the sandbox on a machine with both)
  HOSTPREP_PROC_SYS_NONNET  a stand-in for /proc/sys holding the kernel.*, vm.*, fs.*,
                            dev.* keys (the sandbox never writes the machine's own ones);
                            unset on the VM
  HOSTPREP_CMD              how to run hostprep on the host (default: "hostprep" when
                            it is on PATH, else "python3 -m hostprep")
  HOSTPREP_SELINUXFS        where selinuxfs is mounted (default /sys/fs/selinux)

Every expectation comes from the host itself where it can: the external NIC from
<root>/etc/hostprep/settings.json, the kernel keys from the installed drop-in,
the containers from <root>/var/lib/hostprep/containers/*.json.  Everything is
read through testinfra (host.run, host.file, host.sysctl) so it works over ssh.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

NOT_INVOKED = ("host specs run only with --hosts (testinfra): --hosts=local:// inside the sandbox "
               "namespace (scripts/run-host-specs.sh) or --hosts=ssh://... against the VM")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every spec of this directory when pytest was not given --hosts."""
    # "hosts" is testinfra's option; without the plugin there is no such option at all.
    if config.getoption("hosts", default=None):
        return
    skip = pytest.mark.skip(reason=NOT_INVOKED)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


# -- the host, seen through testinfra ---------------------------------------------------


class HardenedHost:
    """One testinfra host and hostprep's view of it (root prefix, iptables variant)."""

    def __init__(self, host) -> None:
        self.host = host
        self.root = os.environ.get("HOSTPREP_ROOT") or "/"
        if not self.root.startswith("/"):
            raise pytest.UsageError(f"HOSTPREP_ROOT must be an absolute path, not {self.root!r}")
        self.backend = os.environ.get("HOSTPREP_BACKEND") or None
        if self.backend not in (None, "nft", "legacy"):
            raise pytest.UsageError(f"HOSTPREP_BACKEND must be nft or legacy, not {self.backend!r}")
        self.nonnet = os.environ.get("HOSTPREP_PROC_SYS_NONNET") or None
        self.selinuxfs = os.environ.get("HOSTPREP_SELINUXFS") or "/sys/fs/selinux"
        self._rules: dict[int, dict[str, list[str]]] = {}

    # files under the prefix
    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel.lstrip("/"))

    def file(self, rel: str):
        return self.host.file(self.path(rel))

    def text(self, rel: str) -> str | None:
        f = self.file(rel)
        return f.content_string if f.is_file else None

    def json(self, rel: str) -> dict | None:
        text = self.text(rel)
        return None if text is None else json.loads(text)

    # commands
    def iptables(self, family: int) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.backend}" if self.backend else base

    def ipt(self, family: int, args: str):
        return self.host.run(f"{self.iptables(family)} {args}")

    def rules(self, family: int) -> dict[str, list[str]]:
        """`iptables -S` of the filter table: chain -> its '-A' lines (user chains and built-ins)."""
        if family not in self._rules:
            res = self.ipt(family, "-S")
            assert res.rc == 0, f"{self.iptables(family)} -S failed: {res.stderr}"
            chains: dict[str, list[str]] = {}
            for line in res.stdout.splitlines():
                tokens = line.split()
                if len(tokens) >= 2 and tokens[0] in ("-N", "-P"):
                    chains.setdefault(tokens[1], [])
                elif len(tokens) >= 2 and tokens[0] == "-A":
                    chains.setdefault(tokens[1], []).append(line)
            self._rules[family] = chains
        return self._rules[family]

    def hostprep_cmd(self) -> str:
        cmd = os.environ.get("HOSTPREP_CMD")
        if cmd:
            return cmd
        return "hostprep" if self.host.exists("hostprep") else "python3 -m hostprep"

    def hostprep(self, args: str):
        # (hostprep's own names: its "nft" is the native backend now)
        env = {"HOSTPREP_ROOT": self.root, "HOSTPREP_BACKEND": f"iptables-{self.backend}" if self.backend else None,
               "HOSTPREP_PROC_SYS_NONNET": self.nonnet, "HOSTPREP_SELINUXFS": os.environ.get("HOSTPREP_SELINUXFS")}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v)
        return self.host.run(f"env {prefix} {self.hostprep_cmd()} {args}")

    def has_ipv6(self) -> bool:
        return self.host.file("/proc/net/if_inet6").exists


@pytest.fixture(scope="module")
def hp(host) -> HardenedHost:
    return HardenedHost(host)


@pytest.fixture(scope="module")
def settings(hp: HardenedHost) -> dict:
    """The remembered settings: a hardened host has them (the external NIC above all)."""
    data = hp.json("etc/hostprep/settings.json")
    assert data is not None, f"{hp.path('etc/hostprep/settings.json')} is missing: the host is not hardened"
    return data


@pytest.fixture(scope="module")
def nic(settings: dict) -> str:
    return settings.get("interface") or ""


@pytest.fixture(scope="module")
def applied(hp: HardenedHost) -> dict:
    data = hp.json("var/lib/hostprep/applied.json")
    assert data is not None, f"{hp.path('var/lib/hostprep/applied.json')} is missing: nothing applied"
    return data


@pytest.fixture(scope="module")
def containers(hp: HardenedHost) -> list[dict]:
    """The container registry, <root>/var/lib/hostprep/containers/*.json, in name order."""
    d = hp.file("var/lib/hostprep/containers")
    if not d.is_directory:
        return []
    names = sorted(n for n in d.listdir() if n.endswith(".json"))
    return [hp.json(f"var/lib/hostprep/containers/{n}") for n in names]


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request, hp: HardenedHost) -> int:
    if request.param == 6 and not hp.has_ipv6():
        pytest.skip("IPv6 is disabled on this host (no /proc/net/if_inet6): hostprep loads IPv4 only")
    return request.param
