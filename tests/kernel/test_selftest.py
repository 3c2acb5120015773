"""``hostprep selftest`` run for real, as a user runs it: ``python -m hostprep selftest``.

Each run builds its own namespaces (``hpself<pid>``...), so these tests do not use
the ``host`` fixture; they check what selftest promises about the machine it runs
on: every probe observed as expected (exit 0), no namespace left behind (also when
interrupted with SIGINT or SIGTERM), and the machine's own firewall unchanged.
HOSTPREP_ROOT points at a temporary directory, so the machine's remembered
settings and container registry are never read; where a test wants remembered
settings or recorded containers, it writes them there.

The run time of each selftest is printed (not asserted).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bgproc import default_signals

from hostprep.model import Container, Limits
from hostprep.runner import Runner

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def machine_firewall() -> dict[str, str]:
    """The machine's own rules (its network namespace), read-only: iptables (nft and, where
    loaded, legacy), nft, ipset.  Comment lines (timestamps) and packet counters are left out."""
    runner = Runner()
    out: dict[str, str] = {}

    def read(key: str, argv: list[str]) -> None:
        if runner.which(argv[0]):
            res = runner.run(argv, check=False)
            text = "\n".join(ln for ln in res.stdout.splitlines() if not ln.startswith("#"))
            text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
            out[key] = f"rc={res.returncode}\n" + re.sub(r"counter packets \d+ bytes \d+", "counter", text)

    for fam, base in ((4, "iptables"), (6, "ip6tables")):
        read(f"{base}-nft", [f"{base}-nft-save"])
        names = Path(f"/proc/net/{'ip' if fam == 4 else 'ip6'}_tables_names")
        tables = names.read_text() if names.exists() else ""
        out[f"{base}-legacy tables"] = tables
        if tables.strip():      # only then: the legacy save tool would create a table to list
            read(f"{base}-legacy", [f"{base}-legacy-save"])
    read("nft", ["nft", "list", "ruleset"])
    read("ipset", ["ipset", "list", "-n"])
    return out


def namespaces(prefix: str = "hpself") -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(ln.split()[0] for ln in listed.splitlines() if ln.startswith(prefix))


def env_for(root: Path) -> dict:
    env = dict(os.environ, HOSTPREP_ROOT=str(root), PYTHONPATH=str(REPO))
    env.pop("HOSTPREP_SELINUXFS", None)
    return env


def selftest(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    res = subprocess.run([PY, "-m", "hostprep", "selftest", *args], capture_output=True, text=True,
                         env=env_for(root), timeout=300)
    return res, time.monotonic() - start


def report_time(capsys, what: str, seconds: float, report: dict | None) -> None:
    with capsys.disabled():
        inner = f" (selftest says {report['seconds']} s: {report['timings']})" if report else ""
        print(f"\n[selftest timing] {what}: {seconds:.1f} s{inner}")


def mismatches(report: dict) -> list[dict]:
    return [p for p in report["probes"] if p["observed"] != p["expected"] or not p["ok"]]


@pytest.fixture
def leftovers_checked():
    """None of the namespaces of this test's selftest runs is left after it.  Only our own are
    checked (``hpself<pid of the run>``, and its -inet/-admin peers): selftests of other processes
    on the machine (another test session, an admin) have namespaces of their own meanwhile."""
    mine: list[str] = []
    yield mine
    assert [ns for name in mine for ns in own_namespaces(name)] == []


def own_namespaces(name: str) -> list[str]:
    """The namespaces of selftest run ``name`` (hpself<pid>): the host and its two peers, not
    another run's whose pid starts with the same digits (hpself12 vs hpself123)."""
    return [ns for ns in namespaces(name) if ns == name or ns.startswith(name + "-")]


def expected_backend(asked: str | None) -> str:
    """The backend selftest must name: the one asked for, else apply's automatic choice on this
    machine (nft where ``nft -c`` accepts the probe script: read from backend.choose, not assumed)."""
    from hostprep.backend import choose
    from hostprep.runner import Runner
    return choose(Runner(), asked, env=False).backend.name


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy", "nft"])
def test_selftest_passes_and_leaves_the_machine_as_it_was(tmp_path, capsys, backend, leftovers_checked):
    before = machine_firewall()
    res, seconds = selftest(tmp_path / "root", "--json", "--backend", backend)
    report = json.loads(res.stdout) if res.stdout.startswith("{") else None
    if report is not None:
        leftovers_checked.append(report["sandbox"]["name"])
    report_time(capsys, f"default settings, {backend}", seconds, report)
    assert report is not None, res.stdout + res.stderr
    assert (res.returncode, mismatches(report)) == (0, []), res.stderr
    assert report["ok"] is True
    assert report["backend"] == backend
    assert report["settings"]["source"] == "defaults (nothing remembered)"
    # the matrix the issue lists, both families (names as selftest prints them)
    names = [p["name"] for p in report["probes"]]
    for fam in ("v4", "v6"):
        for what in ("SYN to closed port", "SSH in (port 22)", "SSH out through the external NIC",
                     "echo request from", "UDP to port 5353", "spoofed private source", "XMAS flags",
                     "SYN with MSS", "bare ACK (NEW without SYN)", "fragmented echo request from"):
            assert len([n for n in names if n.startswith(f"{fam} {what}")]) >= 1, (fam, what)
    assert [n for n in names if "RST flood" in n] == ["v4 RST flood (50 in 1 s; 2/s burst 2 pass)"]
    assert [p["observed"] for p in report["probes"]] == [p["expected"] for p in report["probes"]]
    # the namespaces are gone, and so is the temporary state root
    assert own_namespaces(report["sandbox"]["name"]) == []
    assert list(Path("/tmp").glob(f"{report['sandbox']['name']}-*")) == []
    assert machine_firewall() == before


def env_file(path: Path, **values) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("backend", ["iptables", None], ids=["iptables", "default"])
def test_selftest_with_container_env_probes_its_limits(tmp_path, capsys, backend, leftovers_checked):
    before = machine_firewall()
    fin = env_file(tmp_path / "finesse.env", TEMPLATE_TYPE="finesse", IPTABLES_CONNECTION_LIMIT_ABOVE=5,
                   IPTABLES_HASH_LIMIT_UPTO=3, IPTABLES_HASH_LIMIT_BURST=4)
    core = env_file(tmp_path / "core.env", NGX_RATELIMIT_DISABLE_IPS="203.0.113.99|192.168.1.69",
                    NGX_LOAD_BALANCER_IPS="198.51.100.77")
    res, seconds = selftest(tmp_path / "root", "--json", "--env", str(fin), "--core", str(core),
                            *(["--backend", backend] if backend else []))
    report = json.loads(res.stdout) if res.stdout.startswith("{") else None
    report_time(capsys, f"with --env finesse.env --core core.env, {backend or 'default'}", seconds, report)
    assert report is not None, res.stdout + res.stderr
    leftovers_checked.append(report["sandbox"]["name"])
    assert report["backend"] == expected_backend(backend)
    assert (res.returncode, mismatches(report)) == (0, []), res.stderr
    assert [(c["name"], c["ports"], c["dest"], c["dest_in_sandbox"], c["limits"]) for c in report["containers"]] == [
        ("finesse", [8445], "198.51.100.10", "198.51.100.10",
         {"connlimit_above": 5, "hash_upto": 3, "hash_burst": 4, "log_limit": 1, "log_burst": 1})]
    rows = {p["name"]: p for p in report["probes"] if p["name"].startswith("finesse: ")}
    assert sorted(rows) == sorted([
        "finesse: port 8445 open",
        "finesse: port 8445 from load balancer 198.51.100.77",
        "finesse: 6 SYNs at once from exempt source 203.0.113.99",
        "finesse: rate 3/s burst 4: 5 SYNs at once, the last dropped",
        "finesse: connection limit 5: 6 held connections, the last dropped",
    ])
    rate = rows["finesse: rate 3/s burst 4: 5 SYNs at once, the last dropped"]
    assert (rate["expected"], rate["observed"], rate["counter"]) == (
        "dropped", "dropped", "v4 HOSTPREP-C-finesse: finesse rate drop")
    assert [(c["label"], c["delta"]) for c in rate["counters"]][0] == ("v4 HOSTPREP-C-finesse: finesse rate drop", 1)
    conn = rows["finesse: connection limit 5: 6 held connections, the last dropped"]
    assert [(c["label"], c["delta"]) for c in conn["counters"]][0] == (
        "v4 HOSTPREP-C-finesse: finesse connlimit drop", 1)
    assert rows["finesse: 6 SYNs at once from exempt source 203.0.113.99"]["counters"][0]["delta"] == 6
    assert machine_firewall() == before


@pytest.mark.parametrize("backend", ["iptables", None], ids=["iptables", "default"])
def test_selftest_remembered_settings_and_recorded_containers(tmp_path, capsys, backend, leftovers_checked):
    """No flag: the remembered settings (-a, a -p network) and the containers of the registry,
    their binding IPs mapped to the sandbox's eth1; --keep leaves the sandbox for 'sandbox down'."""
    root = tmp_path / "root"
    (root / "etc/hostprep").mkdir(parents=True)
    (root / "etc/hostprep/settings.json").write_text(json.dumps(
        {"interface": "ens192", "skip_ddos": False, "allow_private": True, "ping_from": ["198.51.100.0/28"]}))
    reg = root / "var/lib/hostprep/containers"
    reg.mkdir(parents=True)
    net = ipaddress.ip_network
    recorded = [
        Container("ids", "ids", (8553,), ipaddress.ip_address("10.20.0.5"), Limits(6, 2, 4, 1, 1), True, False,
                  (), (net("192.168.1.69/32"),)),
        Container("livedata", "livedata_12.6(1)", (12005, 12008), ipaddress.ip_address("10.20.0.6"),
                  Limits(10, 6, 8, 1, 1), True, True, (net("203.0.113.150/32"),), ()),
        Container("fin6", "finesse", (8445,), ipaddress.ip_address("2001:db8:77::5"), Limits(10, 6, 8, 1, 1)),
    ]
    for c in recorded:
        (reg / f"{c.name}.json").write_text(json.dumps(c.as_dict()))
    res, seconds = selftest(root, "--json", "--keep", *(["--backend", backend] if backend else []))
    report = json.loads(res.stdout) if res.stdout.startswith("{") else None
    report_time(capsys, f"remembered settings, 3 recorded containers, {backend or 'default'}", seconds, report)
    try:
        assert report is not None, res.stdout + res.stderr
        leftovers_checked.append(report["sandbox"]["name"])
        assert report["backend"] == expected_backend(backend)
        assert (res.returncode, mismatches(report)) == (0, []), res.stderr
        assert report["settings"]["source"] == "remembered settings"
        assert (report["settings"]["allow_private"], report["settings"]["ping_from_in_sandbox"]) == (
            True, ["198.51.100.0/28", "203.0.113.7", "2001:db8:f::7"])
        assert [(c["name"], c["dest"], c["dest_in_sandbox"], c["from"]) for c in report["containers"]] == [
            ("fin6", "2001:db8:77::5", "2001:db8:e::10", "registry"),
            ("ids", "10.20.0.5", "198.51.100.10", "registry"),
            ("livedata", "10.20.0.6", "198.51.100.11", "registry")]
        names = [p["name"] for p in report["probes"]]
        # -a: the private exempt source of ids is reachable and probed; livedata is restricted
        assert "ids: 6 SYNs at once from exempt source 192.168.1.69" in names
        assert [n for n in names if n.startswith("livedata: ")] == [
            "livedata: port 12005 from a source that is no load balancer (restricted)",
            "livedata: port 12005 from load balancer 203.0.113.150"]
        assert [n for n in names if n.startswith("fin6: ") and "connection limit" in n] == [
            "fin6: connection limit 10: 11 held connections, the last dropped"]
        # kept: the namespaces are there until 'sandbox down'
        box = report["sandbox"]
        assert (box["kept"], own_namespaces(box["name"])) == (True, sorted(box["namespaces"]))
    finally:
        if report is not None:
            down = subprocess.run([PY, "-m", "hostprep", "sandbox", "down", "--name", report["sandbox"]["name"],
                                   "--root", report["sandbox"]["root"]], capture_output=True, text=True,
                                  env=env_for(root), timeout=60)
            assert down.returncode == 0, down.stderr
    assert own_namespaces(report["sandbox"]["name"]) == []
    assert Path(report["sandbox"]["root"]).exists() is False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_selftest_leaves_no_namespace(tmp_path, capsys, sig, leftovers_checked):
    start = time.monotonic()
    # the signal's default disposition in the child, whatever the test runner inherited:
    # Python turns SIGINT into KeyboardInterrupt only when it starts with SIGINT not ignored
    proc = subprocess.Popen([PY, "-m", "hostprep", "selftest", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(tmp_path / "root"),
                            preexec_fn=default_signals(signal.SIGINT, signal.SIGTERM))
    name = f"hpself{proc.pid}"
    leftovers_checked.append(name)
    try:
        # mid-run: the sandbox exists and hostprep's rules are loaded in it (the probes are next)
        loaded = False
        for _ in range(300):
            if proc.poll() is not None:
                break
            if name in own_namespaces(name) and subprocess.run(
                    ["ip", "netns", "exec", name, "nft", "list", "table", "netdev", "hostprep"],
                    capture_output=True).returncode == 0:
                loaded = True
                break
            time.sleep(0.1)
        assert loaded is True, proc.communicate(timeout=60)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with capsys.disabled():
        print(f"\n[selftest timing] interrupted with {sig.name} after the apply: {time.monotonic() - start:.1f} s")
    assert (proc.returncode, out, err.strip()) == (130, "", "error: interrupted")
    assert own_namespaces(name) == []
    assert list(Path("/tmp").glob(f"{name}-*")) == []
