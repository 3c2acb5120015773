"""apply -k / status / flush --kernel for real, as root, in the sandbox host namespace.

Where each key goes (the sandbox rule: never write the machine's kernel.*, vm.*,
fs.* sysctls):

* net.* keys: the sandbox host namespace's own /proc/sys (hostprep runs inside
  it through ``ip netns exec``).  Keys that are not per-namespace (e.g.
  net.core.netdev_max_backlog) do not exist there: they belong to the whole
  machine, and hostprep must report them "machine-wide" and leave them alone.
* kernel.*, vm.*, fs.*, dev.* keys: a temporary stand-in directory
  (HOSTPREP_PROC_SYS_NONNET), filled with a copy of the machine's current values
  (read only).  Every test checks, before hostprep runs, that hostprep resolves
  these keys into the stand-in, and after the test that the machine's own values
  of every profile key are unchanged.

rp_filter is proven on real packets (hostprep.probe) without the firewall (-k
only): both NICs keep working, and a source routed back through the other NIC
is dropped by the kernel (IPReversePathFilter counter of the sandbox host).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hostprep import sysctl
from hostprep.sandbox import ADMIN4, HOST_EXT4, HOST_INT4, INET4

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[2])
MACHINE_PROC_SYS = Path("/proc/sys")
PROFILE = {s.key: s.value for s in sysctl.profile()}
NET = [k for k in PROFILE if k.startswith("net.")]
OTHER = [k for k in PROFILE if not k.startswith("net.")]
DROPIN = f"etc/sysctl.d/{sysctl.DROPIN_NAME}"
ASYM_SRC = "203.0.113.50"          # an admin-side source the sandbox host routes back via eth1
ASYM_SESSION = f"{ASYM_SRC} 50000 {HOST_INT4} 22"
SYM_SESSION = f"{ADMIN4} 50000 {HOST_INT4} 22"

# Reads keys in the namespace it runs in (net.* of that namespace), one process for all keys.
NS_READER = """
import json, sys
out = {}
for key in sys.argv[1:]:
    try:
        with open('/proc/sys/' + key.replace('.', '/')) as fh:
            out[key] = ' '.join(fh.read().split())
    except OSError:
        out[key] = None
print(json.dumps(out))
"""

WHERE = """
import json
from hostprep.sysctl import Kernel
k = Kernel()
print(json.dumps({"vm": str(k.path("vm.swappiness")), "net": str(k.path("net.ipv4.ip_forward"))}))
"""


def key_path(root: Path, key: str) -> Path:
    return root.joinpath(*key.split("."))


def read_machine(keys) -> dict[str, str | None]:
    """The machine's own values (this test process runs in the machine's namespace). Read only."""
    out = {}
    for key in keys:
        try:
            out[key] = key_path(MACHINE_PROC_SYS, key).read_text()
        except OSError:
            out[key] = None
    return out


@pytest.fixture(autouse=True)
def machine_untouched():
    """Safety net: every profile key of the machine itself is unchanged after each test."""
    before = read_machine(PROFILE)
    yield
    assert read_machine(PROFILE) == before


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    """A stand-in for /proc/sys holding the machine's current kernel/vm/fs/dev profile keys."""
    d = tmp_path / "proc-sys-standin"
    d.mkdir()
    for key, text in read_machine(OTHER).items():
        if text is not None:               # a key this kernel lacks stays missing in the stand-in
            p = key_path(d, key)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    assert key_path(d, "kernel.randomize_va_space").is_file()
    return d


# net.* keys absent or read-only (no owner write bit) in the namespace it runs in.
RO_READER = r"""
import json, os, sys
out = []
for key in sys.argv[1:]:
    path = "/proc/sys/" + key.replace(".", "/")
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o200:
        out.append(key)
print(json.dumps(out))
"""


class K:
    """The sandbox host, its stand-in, and the env every hostprep call gets."""

    def __init__(self, host, standin: Path) -> None:
        self.host = host
        self.standin = standin
        self.env = {"HOSTPREP_PROC_SYS_NONNET": str(standin), "SSH_CONNECTION": ""}
        self.dropin = host.root / DROPIN

    def hostprep(self, *args: str, check: bool = True, env: dict | None = None):
        return self.host.hostprep(*args, check=check, env={**self.env, **(env or {})})

    def ns_values(self, keys=NET) -> dict[str, str | None]:
        res = self.host.run(self.host.box.host, [PY, "-c", NS_READER, *keys])
        return json.loads(res.stdout)

    def ns_write(self, key: str, value: str) -> None:
        """By hand, inside the sandbox host namespace only."""
        self.host.run(self.host.box.host, ["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"])

    def standin_values(self) -> dict[str, str | None]:
        out = {}
        for key in OTHER:
            p = key_path(self.standin, key)
            out[key] = " ".join(p.read_text().split()) if p.is_file() else None
        return out

    def standin_texts(self) -> dict[str, str]:
        return {str(p): p.read_text() for p in sorted(self.standin.rglob("*")) if p.is_file()}

    def status(self) -> tuple[int, dict]:
        res = self.hostprep("status", "--json", check=False)
        assert res.returncode in (0, 1), res.stderr
        return res.returncode, json.loads(res.stdout)

    def missing(self) -> set[str]:
        """Keys this kernel lacks (absent from the stand-in of the machine's values)."""
        return {k for k, v in self.standin_values().items() if v is None}

    def machine_wide(self) -> set[str]:
        """net.* keys the namespace does not show, or shows read-only (net.netfilter.nf_conntrack_max
        and _buckets): the machine's, not set from a namespace."""
        res = self.host.run(self.host.box.host, [PY, "-c", RO_READER, *NET])
        return set(json.loads(res.stdout))


@pytest.fixture
def k(host, standin) -> K:
    kk = K(host, standin)
    # Before anything is applied: hostprep must resolve the non-net keys into the
    # stand-in and the net keys into the namespace's /proc/sys, or this test stops here.
    res = host.run(host.box.host, [PY, "-c", WHERE], env={**kk.env, "PYTHONPATH": REPO})
    assert json.loads(res.stdout) == {"vm": str(standin / "vm/swappiness"),
                                      "net": "/proc/sys/net/ipv4/ip_forward"}
    return kk


def kernel_problems(report: dict) -> list[str]:
    return [p for p in report["problems"] if p.startswith("kernel:")]


# -- apply -k, read back, status ------------------------------------------------------


def test_apply_k_loads_every_key_and_reads_it_back(k):
    machine_before = read_machine(OTHER + ["net.ipv4.ip_forward"])
    missing, machine = k.missing(), k.machine_wide()
    # Not per-namespace (init_net only): not shown in the sandbox; per-namespace ones are there.
    assert "net.core.netdev_max_backlog" in machine
    assert {"net.core.somaxconn", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter",
            "kernel.randomize_va_space"} & (missing | machine) == set()
    assert k.ns_values(["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"]) == {
        "net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "0"}

    # machine-wide keys a namespace shows read-only (nf_conntrack_max, _buckets): the machine's values
    shown = {key: v for key, v in k.ns_values(sorted(machine & set(NET))).items() if v is not None}

    res = k.hostprep("apply", "-k")

    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note:")]
    assert notes == [f"note: {key} is not in this kernel: skipped (written as '-{key}')"
                     for key in sorted(missing)] + [
        f"note: {len(machine)} machine-wide keys left alone (this is not the machine's own network namespace; "
        f"they are commented out in the drop-in): {', '.join(sorted(machine))}"]
    # -k alone installs the boot unit too (it rolls back an unconfirmed -k at the next boot and
    # re-checks the profile); no NIC unit: no external NIC is known.
    assert res.stdout.strip().splitlines() == [
        f"kernel: {len(PROFILE) - len(missing) - len(machine)} of {len(PROFILE)} keys live and verified; "
        f"drop-in {k.dropin}",
        f"boot persistence: hostprep.service enabled (6 files written under {k.host.root / 'etc'})"]
    want = {key: (shown.get(key) if key in missing | machine else v) for key, v in PROFILE.items()}
    assert k.ns_values() == {key: want[key] for key in NET}
    assert k.standin_values() == {key: want[key] for key in OTHER}
    assert k.dropin.read_text() == sysctl.render(frozenset(missing), frozenset(machine))
    assert [ln for ln in k.dropin.read_text().splitlines() if ln.startswith("-")] == [
        f"-{key} = {v}" for key, v in PROFILE.items() if key in missing]
    assert [ln for ln in k.dropin.read_text().splitlines() if ln.startswith("# (machine-wide")] == [
        f"# (machine-wide, not set from a network namespace) {key} = {v}" for key, v in PROFILE.items()
        if key in machine]
    # The machine's own kernel/vm/fs/dev keys and its ip_forward did not move.
    assert read_machine(OTHER + ["net.ipv4.ip_forward"]) == machine_before

    rc, report = k.status()
    assert rc == 0
    assert report["problems"] == []
    assert report["kernel"]["applied"] is True
    assert report["kernel"]["dropin"] == str(k.dropin)
    assert report["kernel"]["keys"] == [
        {"key": key, "desired": v, "live": want[key], "source": None if key in machine else str(k.dropin),
         "state": "missing" if key in missing else "machine-wide" if key in machine else "ok",
         "detail": "the running kernel has no such key" if key in missing else
         sysctl.MACHINE_WIDE_DETAIL if key in machine else ""}
        for key, v in PROFILE.items()]


def test_without_a_stand_in_the_machine_wide_keys_are_left_alone(host):
    """apply -k in a namespace, no HOSTPREP_PROC_SYS_NONNET: only that namespace's net.* keys.

    (Issue 10, item 3: the dry run listed kernel.kptr_restrict 0 -> 2, vm.swappiness
    60 -> 1 ... and apply wrote them to the machine.)  The dry run is checked first
    and the real apply runs only when it promises to leave every non-net key alone;
    the autouse fixture checks the machine's values after.
    """
    env = {"SSH_CONNECTION": ""}
    dry = host.hostprep("apply", "-k", "--dry-run", env=env)
    changes = dry.stdout.split("kernel keys that would change")[1].splitlines()[1:]
    would_change = [ln.split(":")[0].strip() for ln in changes if " -> " in ln]
    assert "net.ipv4.tcp_rfc1337" in would_change
    assert [key for key in would_change if not key.startswith("net.")] == []
    machine = OTHER + json.loads(host.run(host.box.host, [PY, "-c", RO_READER, *NET]).stdout)
    assert "net.core.netdev_max_backlog" in machine
    listed = [ln.strip().split(":")[0] for ln in dry.stdout.splitlines()
              if ln.endswith(sysctl.MACHINE_WIDE_DETAIL)]
    assert sorted(listed) == sorted(machine)

    res = host.hostprep("apply", "-k", env=env)
    assert f"note: {len(machine)} machine-wide keys left alone" in res.stderr
    report = json.loads(host.hostprep("status", "--json", env=env, check=False).stdout)
    states = {e["key"]: e["state"] for e in report["kernel"]["keys"]}
    assert sorted(key for key, state in states.items() if state == "machine-wide") == sorted(machine)
    assert [p for p in report["problems"] if p.startswith("kernel:")] == []
    record = json.loads((host.root / "var/lib/hostprep/kernel.json").read_text())
    assert sorted(key for key in record["previous"] if not key.startswith("net.")) == []


def test_apply_k_twice_changes_nothing_the_second_time(k):
    k.hostprep("apply", "-k")
    net, other, dropin = k.ns_values(), k.standin_texts(), k.dropin.read_text()
    record = json.loads((k.host.root / "var/lib/hostprep/kernel.json").read_text())
    k.hostprep("apply", "-k")
    assert (k.ns_values(), k.standin_texts(), k.dropin.read_text()) == (net, other, dropin)
    assert json.loads((k.host.root / "var/lib/hostprep/kernel.json").read_text()) == record


# -- drift --------------------------------------------------------------------------


def test_a_later_file_overriding_a_key_is_named(k):
    k.hostprep("apply", "-k")
    later = k.host.root / "etc/sysctl.d/99-local.conf"
    later.write_text("# a local admin's file\nnet.ipv4.tcp_syncookies = 0\n")
    line = f"kernel: net.ipv4.tcp_syncookies overridden: wanted 1, {later} sets 0 after 90-hostprep.conf"

    rc, report = k.status()
    assert rc == 1
    assert kernel_problems(report) == [line]
    entry = next(e for e in report["kernel"]["keys"] if e["key"] == "net.ipv4.tcp_syncookies")
    assert (entry["state"], entry["source"], entry["live"], entry["desired"]) == (
        "overridden", str(later), "1", "1")

    text = k.hostprep("status", check=False)
    assert text.returncode == 1
    assert f"difference: {line}" in text.stderr.splitlines()

    # apply -k says so too, and exits 1
    again = k.hostprep("apply", "-k", check=False)
    assert again.returncode == 1
    assert (f"kernel drift: net.ipv4.tcp_syncookies: wanted 1, {later} sets 0 after 90-hostprep.conf"
            in again.stderr.splitlines())

    later.unlink()
    assert k.status()[0] == 0


def test_a_live_value_changed_by_hand_is_drift(k):
    k.hostprep("apply", "-k")
    assert k.status()[0] == 0
    k.ns_write("net.ipv4.tcp_rfc1337", "0")
    key_path(k.standin, "vm.swappiness").write_text("30\n")

    rc, report = k.status()
    assert rc == 1
    assert kernel_problems(report) == ["kernel: net.ipv4.tcp_rfc1337 drift: wanted 1, live value 0",
                                       "kernel: vm.swappiness drift: wanted 1, live value 30"]
    states = {e["key"]: e["state"] for e in report["kernel"]["keys"]}
    assert (states["net.ipv4.tcp_rfc1337"], states["vm.swappiness"]) == ("drift", "drift")
    text = k.hostprep("status", check=False)
    assert text.returncode == 1
    assert "difference: kernel: net.ipv4.tcp_rfc1337 drift: wanted 1, live value 0" in text.stderr.splitlines()

    # apply -k heals it
    k.hostprep("apply", "-k")
    assert k.ns_values(["net.ipv4.tcp_rfc1337"]) == {"net.ipv4.tcp_rfc1337": "1"}
    assert k.standin_values()["vm.swappiness"] == "1"
    assert k.status()[0] == 0


def test_boot_loads_the_profile_again(k):
    """What a reboot runs (hostprep.service: ``hostprep boot``) puts the recorded profile back."""
    k.hostprep("apply", "-k")
    live = len(PROFILE) - len(k.missing()) - len(k.machine_wide())
    k.ns_write("net.ipv4.tcp_rfc1337", "0")
    key_path(k.standin, "vm.swappiness").write_text("30\n")
    res = k.hostprep("boot")
    assert f"kernel profile: {live} keys live" in res.stdout + res.stderr, res.stdout + res.stderr
    assert (k.ns_values(["net.ipv4.tcp_rfc1337"]), k.standin_values()["vm.swappiness"]) == (
        {"net.ipv4.tcp_rfc1337": "1"}, "1")
    assert k.status()[0] == 0


# -- flush --kernel -------------------------------------------------------------------


def test_flush_kernel_restores_every_value_exactly(k):
    net_before, other_before = k.ns_values(), k.standin_texts()
    before = {**net_before, **k.standin_values()}
    machine_before = read_machine(OTHER + ["net.ipv4.ip_forward"])
    k.hostprep("apply", "-k")
    assert k.ns_values() != net_before
    # a hand change and a second apply in between: the values from before the FIRST apply count
    k.ns_write("net.ipv4.tcp_fin_timeout", "33")
    k.hostprep("apply", "-k")

    res = k.hostprep("flush", "--kernel")

    assert k.ns_values() == net_before
    assert k.standin_texts() == other_before                 # byte for byte
    lines = res.stdout.splitlines()
    restored = [ln.strip() for ln in lines[1:]]
    assert lines[0] == f"kernel: {len(restored)} keys restored to their values before hostprep; drop-in removed"
    assert len(restored) >= 1
    parsed = [tuple(r.split(" = ", 1)) for r in restored]
    assert [(key, value) for key, value in parsed if before[key] != value] == []
    assert not k.dropin.exists()
    assert not (k.host.root / "var/lib/hostprep/kernel.json").exists()
    assert read_machine(OTHER + ["net.ipv4.ip_forward"]) == machine_before

    rc, report = k.status()
    assert report["kernel"] == {"applied": False}
    assert kernel_problems(report) == []
    text = k.hostprep("status", check=False)
    assert "kernel profile (apply -k)" not in text.stdout

    again = k.hostprep("flush", "--kernel", check=False)
    assert again.returncode == 2
    assert "no kernel settings were applied by hostprep" in again.stderr


# -- rp_filter on the two-NIC host -------------------------------------------------------


def host_counters(k: K) -> tuple[int, int, int]:
    """(Icmp InEchos, Icmp OutEchoReps, TcpExt IPReversePathFilter) of the sandbox host."""
    def table(text: str, prefix: str) -> dict[str, int]:
        rows = [ln.split() for ln in text.splitlines() if ln.startswith(prefix + ":")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:])))

    snmp = table(k.host.run(k.host.box.host, ["cat", "/proc/net/snmp"]).stdout, "Icmp")
    ext = table(k.host.run(k.host.box.host, ["cat", "/proc/net/netstat"]).stdout, "TcpExt")
    return snmp["InEchos"], snmp["OutEchoReps"], ext["IPReversePathFilter"]


def delta(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(y - x for x, y in zip(a, b))


def test_rp_filter_keeps_both_nics_working(k):
    k.hostprep("apply", "-k")
    assert k.ns_values(["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"]) == {
        "net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1"}
    # No firewall here (-k only): what drops or passes is the kernel's reverse-path filter.
    assert k.host.probe1(k.host.box.inet, kind="icmp", dst=HOST_EXT4, src=INET4) == {
        "answered": True, "reply": "icmp 0/0"}
    assert k.host.probe1(k.host.box.admin, kind="icmp", dst=HOST_INT4, src=ADMIN4) == {
        "answered": True, "reply": "icmp 0/0"}
    assert k.host.probe1(k.host.box.inet, kind="connect", dst=HOST_EXT4, port=9) == {
        "answered": True, "reply": "refused"}
    assert k.host.probe1(k.host.box.admin, kind="connect", dst=HOST_INT4, port=9) == {
        "answered": True, "reply": "refused"}


def test_rp_filter_drops_a_source_routed_back_through_the_other_nic(k):
    host, admin = k.host.box.host, k.host.box.admin
    k.host.run(admin, ["ip", "addr", "add", f"{ASYM_SRC}/32", "dev", "eth0"])
    route = json.loads(k.host.run(host, ["ip", "-j", "route", "get", ASYM_SRC]).stdout)
    assert route[0]["dev"] == "eth1"                    # back through the external NIC
    # warm the admin's neighbour entry with a symmetric control
    assert k.host.probe1(admin, kind="icmp", dst=HOST_INT4, src=ADMIN4)["answered"] is True

    # Before -k (rp_filter 0): the host accepts the echo and answers it, out of eth1
    # (so the reply never reaches the admin namespace: the routing is asymmetric).
    c0 = host_counters(k)
    before = k.host.probe1(admin, kind="icmp", dst=HOST_INT4, src=ASYM_SRC)
    assert delta(c0, host_counters(k)) == (1, 1, 0)
    assert before == {"answered": False, "reply": None}

    k.hostprep("apply", "-k")
    assert k.host.probe1(admin, kind="icmp", dst=HOST_INT4, src=ADMIN4)["answered"] is True

    # After -k (rp_filter 1): the kernel drops it before ICMP sees it.
    c1 = host_counters(k)
    after = k.host.probe1(admin, kind="icmp", dst=HOST_INT4, src=ASYM_SRC)
    assert delta(c1, host_counters(k)) == (0, 0, 1)
    assert after == {"answered": False, "reply": None}

    # flush --kernel brings rp_filter 0 back: answered again
    k.hostprep("flush", "--kernel")
    c2 = host_counters(k)
    k.host.probe1(admin, kind="icmp", dst=HOST_INT4, src=ASYM_SRC)
    assert delta(c2, host_counters(k)) == (1, 1, 0)


def test_rp_filter_guard_refuses_a_session_it_would_cut(k):
    net_before = k.ns_values()
    res = k.hostprep("apply", "-k", check=False, env={"SSH_CONNECTION": ASYM_SESSION})
    assert res.returncode == 2
    msg = (f"your SSH session arrives on eth0 but the route back to {ASYM_SRC} leaves by eth1: strict "
           "reverse-path filtering (rp_filter=1) would drop it")
    assert f"error: -k/--kernel: {msg} (route {ASYM_SRC}'s network through eth0 first, or pass --force)" \
        in res.stderr.splitlines()
    assert k.ns_values() == net_before                   # nothing changed
    assert not k.dropin.exists()
    assert not (k.host.root / "var/lib/hostprep/kernel.json").exists()

    # control: a session arriving on the internal NIC and routed back through it passes
    ok = k.hostprep("apply", "-k", env={"SSH_CONNECTION": SYM_SESSION})
    assert "rp_filter" not in ok.stderr
    k.hostprep("flush", "--kernel")
    assert k.ns_values() == net_before

    # --force: applied, with the warning
    forced = k.hostprep("apply", "-k", "--force", env={"SSH_CONNECTION": ASYM_SESSION})
    assert f"WARNING: {msg}; --force given" in forced.stderr.splitlines()
    assert k.ns_values(["net.ipv4.conf.all.rp_filter"]) == {"net.ipv4.conf.all.rp_filter": "1"}
    assert k.dropin.is_file()
