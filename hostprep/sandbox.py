"""Throwaway network namespaces that stand in for a two-NIC proxy host.

Used by the embedded default (``hostprep sandbox up``) and by the kernel tests.
Layout (documentation addresses only):

  <name>-inet  eth0 198.51.100.20/24 2001:db8:e::20/64  (+ 203.0.113.7, .8; 2001:db8:f::7, ::8)
        |  the "internet"
  <name>       eth1 198.51.100.10/24 2001:db8:e::10/64  external NIC, default routes via inet
               eth0 192.0.2.10/24    2001:db8:1::10/64  internal NIC
        |  the management LAN
  <name>-admin eth0 192.0.2.20/24    2001:db8:1::20/64

Only namespaces created here are touched, and ``destroy`` deletes them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostprep.errors import HostprepError, RefusedError
from hostprep.runner import Runner

EXT, INT = "eth1", "eth0"
# A state root made for a sandbox carries this file; `sandbox down` removes only such roots.
SANDBOX_MARKER = ".hostprep-sandbox"
HOST_EXT4, INET4 = "198.51.100.10", "198.51.100.20"
HOST_INT4, ADMIN4 = "192.0.2.10", "192.0.2.20"
HOST_EXT6, INET6 = "2001:db8:e::10", "2001:db8:e::20"
HOST_INT6, ADMIN6 = "2001:db8:1::10", "2001:db8:1::20"
INET_EXTRA4 = ("203.0.113.7", "203.0.113.8")
INET_EXTRA6 = ("2001:db8:f::7", "2001:db8:f::8")


@dataclass(frozen=True)
class Sandbox:
    name: str = "hostprep-sandbox"

    @property
    def host(self) -> str:
        return self.name

    @property
    def inet(self) -> str:
        return f"{self.name}-inet"

    @property
    def admin(self) -> str:
        return f"{self.name}-admin"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.host, self.inet, self.admin)

    def exists(self, runner: Runner) -> list[str]:
        listed = runner.run(["ip", "netns", "list"]).stdout.split()
        return [ns for ns in self.namespaces if ns in listed]

    def create(self, runner: Runner) -> None:
        if self.exists(runner):
            raise RefusedError(f"sandbox {self.name}", "its namespaces exist already",
                               f"remove them first: hostprep sandbox down --name {self.name}")
        try:
            self._create(runner)
        except HostprepError:
            self.destroy(runner)
            raise

    def _create(self, runner: Runner) -> None:
        def ip(*args: str, ns: str | None = None) -> None:
            argv = ["ip", "-n", ns, *args] if ns else ["ip", *args]
            runner.run(argv, mutates=True)

        for ns in self.namespaces:
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", EXT, "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", self.inet)
        ip("link", "add", INT, "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", self.admin)
        for ns, dev, v4, v6 in ((self.host, EXT, HOST_EXT4, HOST_EXT6), (self.host, INT, HOST_INT4, HOST_INT6),
                                (self.inet, "eth0", INET4, INET6), (self.admin, "eth0", ADMIN4, ADMIN6)):
            ip("addr", "add", f"{v4}/24", "dev", dev, ns=ns)
            ip("addr", "add", f"{v6}/64", "dev", dev, "nodad", ns=ns)
            ip("link", "set", dev, "up", ns=ns)
        for extra in INET_EXTRA4:
            ip("addr", "add", f"{extra}/32", "dev", "eth0", ns=self.inet)
        for extra in INET_EXTRA6:
            ip("addr", "add", f"{extra}/128", "dev", "eth0", "nodad", ns=self.inet)
        # The host's default routes point to the internet, as on a real proxy.
        ip("route", "add", "default", "via", INET4, ns=self.host)
        ip("-6", "route", "add", "default", "via", INET6, ns=self.host)
        ip("route", "add", "default", "via", HOST_EXT4, ns=self.inet)
        ip("-6", "route", "add", "default", "via", HOST_EXT6, ns=self.inet)
        ip("route", "add", "default", "via", HOST_INT4, ns=self.admin)
        ip("-6", "route", "add", "default", "via", HOST_INT6, ns=self.admin)

    def destroy(self, runner: Runner) -> list[str]:
        """Delete this sandbox's namespaces (by name); returns the ones deleted."""
        gone: list[str] = []
        for ns in self.exists(runner):
            runner.run(["ip", "netns", "del", ns], mutates=True)
            gone.append(ns)
        return gone
