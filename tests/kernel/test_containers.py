"""Per-container port rules (``hostprep container up|down|list``) proven with real packets.

Each test writes the installer's env files into ``tmp_path`` (documentation
addresses only), applies the base hardening in the sandbox host, opens
containers, and judges every claim twice: by what the client sees (a SYN
answered, a connection completed, or silence) and by hostprep's own counters
in the container chain (``iptables-save -c``, comments "hostprep containers:
NAME within rate|connlimit drop|rate drop|exempt|load balancer|restricted to
load balancers") or in the default deny.

Answers without a listener: a SYN the container rules accept to a port nobody
listens on is answered by the host kernel with RST (``refused``); a dropped
SYN gets nothing (``timeout``).  Bursts are real non-blocking ``connect()``
calls from the inet namespace: one SYN each, all issued within a few
milliseconds; the script waits 0.5 s for the answers, less than the 1 s initial
SYN retransmission timeout, so every socket sends exactly one SYN and the
counters can be compared with ``==``.

The connection limit of a burst: the kernel's conncount (connlimit) does no
garbage collection within one jiffy, so every SYN of a burst counts as a
connection of that source, even the refused ones.  Tests that measure the rate
therefore set IPTABLES_CONNECTION_LIMIT_ABOVE far above the burst size (and
check that the connlimit drop counter stays 0); the connection-limit tests use
real connections held open to a real listener.

Every test runs on both firewall variants (nft and legacy) through ``host``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hostprep.observed import parse_nft_json, target_of
from hostprep.render import nft_loadable
from hostprep.sandbox import HOST_EXT4, HOST_EXT6, INET_EXTRA4, INET_EXTRA6

from bgproc import Bg
from tests.helpers import ANSWER, QUIET, env_file, finesse_env, tcp

WAIT = 0.5      # how long a burst waits for answers: below the 1 s SYN retransmission timeout
SRC_A, SRC_B = INET_EXTRA4          # 203.0.113.7, 203.0.113.8: two distinct internet clients
SRC6_A, SRC6_B = INET_EXTRA6        # 2001:db8:f::7, 2001:db8:f::8
DISPATCH = "HOSTPREP-CONTAINERS"
DENY = "HOSTPREP-DENY"
DENY_RULE = "hostprep deny: default deny"
BIG = 1000      # a connection limit no burst of these tests reaches


# --------------------------------------------------------------------------- helpers

NATIVE = True      # runs on the native nft backend too (conftest.variant)


def chain(name: str) -> str:
    """The container's chain (names up to 17 characters are used as they are)."""
    return f"HOSTPREP-C-{name}"


def comment(name: str, what: str) -> str:
    """The quoted comment of one container rule, closing quote included: "load balancer"
    must not also match "restricted to load balancers"."""
    return f'"hostprep containers: {name} {what}"'


def ccount(host, name: str, what: str, family: int = 4) -> int:
    return host.counter(family, chain(name), comment(name, what))


def deny_count(host, family: int = 4) -> int:
    return host.counter(family, DENY, DENY_RULE)


def up(host, name: str, env: Path | None, core: Path | None = None, installer: Path | None = None,
       *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["container", "up", name, *extra] + (["--env", str(env)] if env is not None else [])
    if core is not None:
        args += ["--core", str(core)]
    if installer is not None:
        args += ["--installer", str(installer)]
    return host.hostprep(*args, check=check)


def down(host, name: str, check: bool = True) -> subprocess.CompletedProcess:
    return host.hostprep("container", "down", name, check=check)


def save_lines(host, family: int = 4) -> list[str]:
    """The ``-A`` lines of the filter table, without counters."""
    return [ln for ln in host.save(family, counters=False).splitlines() if ln.startswith("-A ")]


def container_save_lines(host, name: str, family: int = 4) -> list[str]:
    """The container's lines as iptables-save prints them: its dispatch rule, then its chain.  On the
    native backend: as the backend shows them (each rule's comment and verdict, observed.parse_nft_json),
    which is what its container log lists."""
    if host.native:
        obs = host.observed(family)
        return [f"-A {DISPATCH} {r.spec}" for r in obs.chain_rules(DISPATCH) if target_of(r.spec) == chain(name)] + \
            [f"-A {chain(name)} {r.spec}" for r in obs.chain_rules(chain(name))]
    lines = save_lines(host, family)
    dispatch = [ln for ln in lines if ln.startswith(f"-A {DISPATCH} ")
                and target_of(ln.split(" ", 2)[2]) == chain(name)]
    own = [ln for ln in lines if ln.startswith(f"-A {chain(name)} ")]
    return dispatch + own


def dispatch_rules(host, name: str, family: int = 4) -> list[str]:
    return [r.spec for r in host.observed(family).chain_rules(DISPATCH) if target_of(r.spec) == chain(name)]


def ipsets(host) -> dict[str, list[str]]:
    """``ipset save`` of the sandbox host: set name -> its lines (create and add), sorted."""
    out: dict[str, list[str]] = {}
    for ln in host.run(host.box.host, ["ipset", "save"]).stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 2:
            out.setdefault(parts[1], []).append(ln)
    return {k: sorted(v) for k, v in out.items()}


def zero_policy_counters(text: str) -> str:
    """iptables-legacy-save prints the built-in chains' policy counters even without -c."""
    return re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", text, flags=re.M)


def kernel_state(host) -> dict:
    """Everything a container command may change in the kernel (no counters)."""
    return {"v4": zero_policy_counters(host.ruleset_text(4)), "v6": zero_policy_counters(host.ruleset_text(6)),
            "ipset": host.run(host.box.host, ["ipset", "save"]).stdout,
            "nft": re.sub(r"counter packets \d+ bytes \d+", "counter", host.nft_listing())}


def logged(text: str, kind: str) -> list[str]:
    """The rules a container log lists as ``kind`` ("added", "removed", "kept"), sorted."""
    return sorted(ln[len(kind) + 2:] for ln in text.splitlines() if ln.startswith(f"{kind}: "))


# A burst of real connection attempts from the inet namespace, interleaved over
# the given sources: round i sends one SYN from each source.  Each attempt is
# one SYN; outcomes per source, in sending order: "connected" (SYN-ACK),
# "refused" (RST), "timeout" (nothing within "wait").  "elapsed": seconds
# between the first and the last SYN.
BURST = r"""
import errno, json, select, socket, sys, time
p = json.load(sys.stdin)
fam = socket.AF_INET6 if ":" in p["dst"] else socket.AF_INET
socks = []
start = time.monotonic()
for _ in range(p["count"]):
    for src in p["srcs"]:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src, 0))
        s.connect_ex((p["dst"], p["port"]))
        socks.append((src, s))
elapsed = time.monotonic() - start
done = {}
pending = [s for _, s in socks]
deadline = time.monotonic() + p["wait"]
while pending and time.monotonic() < deadline:
    _, ready, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
    for s in ready:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        done[s.fileno()] = ("connected" if err == 0 else
                            "refused" if err == errno.ECONNREFUSED else f"error {errno.errorcode[err]}")
        pending.remove(s)
out = {src: [] for src in p["srcs"]}
for src, s in socks:
    out[src].append(done.get(s.fileno(), "timeout"))
for _, s in socks:
    s.close()      # a socket still in SYN_SENT goes away without sending anything
print(json.dumps({"outcomes": out, "elapsed": elapsed}))
"""


def burst(host, dst: str, port: int, srcs: list[str], count: int) -> dict:
    res = host.run(host.box.inet, [sys.executable, "-c", BURST],
                   input=json.dumps({"dst": dst, "port": port, "srcs": srcs, "count": count, "wait": WAIT}))
    return json.loads(res.stdout)


def accepted_bounds(burst_size: int, rate: int, elapsed: float, used: int = 0) -> tuple[int, int]:
    """Tolerance of the SYNs a burst gets accepted from one source.

    The hashlimit bucket holds at most ``burst_size`` tokens (full for a source
    never seen); ``used`` tokens were spent by earlier SYNs of that source and may
    have come back since.  During the burst the bucket refills at ``rate``/s, so
    at most ceil(rate * elapsed) more get through (with a burst lasting a few ms:
    0 or 1).  Hence burst_size - used <= accepted <= burst_size + ceil(rate * elapsed).
    """
    return burst_size - used, burst_size + math.ceil(rate * elapsed)


# A listener in the sandbox host: accepts and keeps every connection open until
# a line arrives on stdin; then prints how many it accepted.
LISTENER = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(128)
held = []
def loop():
    while True:
        conn, _ = ls.accept()
        held.append(conn)
threading.Thread(target=loop, daemon=True).start()
print("listening", flush=True)
sys.stdin.readline()
print(len(held), flush=True)
"""

# A client in the inet namespace: opens ``n`` connections one after the other
# from ``src`` (each connect() waits 0.8 s at most: below the 1 s SYN
# retransmission timeout, so a dropped attempt is exactly one SYN), reports the
# outcome of each, and keeps the completed ones open until a line arrives.
HOLDER = r"""
import json, socket, sys
dst, port, src, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
held, outcomes = [], []
for _ in range(n):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(0.8)
    s.bind((src, 0))
    try:
        s.connect((dst, port))
        held.append(s)
        outcomes.append("connected")
    except (TimeoutError, socket.timeout):
        outcomes.append("timeout")
        s.close()
    except OSError as err:
        outcomes.append(f"error {err.errno}")
        s.close()
print(json.dumps(outcomes), flush=True)
sys.stdin.readline()
"""


def kill_all(*procs: Bg | None) -> None:
    for p in procs:
        if p is not None:
            p.kill()


# --------------------------------------------------------------------------- 1. rate limit

def test_rate_limit_per_source_burst_then_drop(host, tmp_path):
    """Burst 4, 2/s per source+port: beyond the burst a source is dropped, another is not."""
    host.apply()
    burst_size, rate, sent = 4, 2, 12
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG,
                                IPTABLES_HASH_LIMIT_UPTO=rate, IPTABLES_HASH_LIMIT_BURST=burst_size))
    # within the limit: one new connection is answered (the host kernel's RST: no listener)
    first = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, ANSWER, src=SRC_A))
    assert first["reply"] == "RA"
    assert ccount(host, "fin", "within rate") == 1
    # both sources at the same time, interleaved (A spent one token on the probe above)
    res = burst(host, HOST_EXT4, 8445, [SRC_A, SRC_B], sent)
    a, b = res["outcomes"][SRC_A], res["outcomes"][SRC_B]
    lo_a, hi_a = accepted_bounds(burst_size, rate, res["elapsed"], used=1)
    lo_b, hi_b = accepted_bounds(burst_size, rate, res["elapsed"])
    assert set(a) | set(b) <= {"refused", "timeout"}, res
    assert lo_a <= a.count("refused") <= hi_a, res
    assert lo_b <= b.count("refused") <= hi_b, res
    answered = a.count("refused") + b.count("refused")
    assert ccount(host, "fin", "within rate") == 1 + answered
    assert ccount(host, "fin", "rate drop") == 2 * sent - answered
    assert ccount(host, "fin", "connlimit drop") == 0
    assert deny_count(host) == 0


# --------------------------------------------------------------------------- 2. connection limit

def test_connection_limit_per_source(host, tmp_path):
    """Connection limit 3: three concurrent connections complete, the fourth gets no answer."""
    host.apply()
    limit = 3
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=limit,
                                IPTABLES_HASH_LIMIT_UPTO=100, IPTABLES_HASH_LIMIT_BURST=100))
    listener = holder = None
    try:
        listener = Bg(host.box.host, LISTENER, HOST_EXT4, "8445")
        assert listener.readline() == "listening", listener.stderr()
        holder = Bg(host.box.inet, HOLDER, HOST_EXT4, "8445", SRC_A, str(limit + 1))
        outcomes = json.loads(holder.readline())
        assert outcomes == ["connected"] * limit + ["timeout"]
        assert ccount(host, "fin", "connlimit drop") == 1
        assert ccount(host, "fin", "connlimit log") == 1          # log limit 1/min, burst 1
        assert ccount(host, "fin", "within rate") == limit
        # another source is not affected by A's connections
        other = host.probe1(host.box.inet, kind="connect", dst=HOST_EXT4, port=8445, src=SRC_B, timeout=ANSWER)
        assert other == {"answered": True, "reply": "connected"}
        assert ccount(host, "fin", "within rate") == limit + 1
        assert ccount(host, "fin", "connlimit drop") == 1
        listener.send("stop")
        assert listener.readline() == str(limit + 1)               # the listener saw exactly those
    finally:
        kill_all(holder, listener)
    assert ccount(host, "fin", "rate drop") == 0
    assert deny_count(host) == 0


def test_a_full_connection_count_set_drops_a_new_source_on_native(host, tmp_path):
    """Native backend: a port's connection-count set has a bound (iptables' connlimit has none);
    when it is full, a new source's ``add @cl ... ct count over N`` fails and does not match, and
    the next rule drops that source ("connlimit full"): fail closed, not let through uncounted.
    The set's bound is made 1 here (the table reloaded with it) so one held connection fills it."""
    if not host.native:
        pytest.skip("the native backend's connection-count set; iptables' connlimit has no bound")
    host.apply()
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=3,
                                IPTABLES_HASH_LIMIT_UPTO=100, IPTABLES_HASH_LIMIT_BURST=100))
    listing = nft_loadable(host.run(host.box.host, ["nft", "-s", "list", "table", "inet", "hostprep"]).stdout)
    small, n = re.subn(r"(set cl4_\S+ \{[^}]*?size )\d+", r"\g<1>1", listing)
    assert n == 1, listing
    host.run(host.box.host, ["nft", "-f", "-"], input="table inet hostprep\ndelete table inet hostprep\n" + small)
    listener = holder = None
    try:
        listener = Bg(host.box.host, LISTENER, HOST_EXT4, "8445")
        assert listener.readline() == "listening", listener.stderr()
        holder = Bg(host.box.inet, HOLDER, HOST_EXT4, "8445", SRC_A, "1")
        assert json.loads(holder.readline()) == ["connected"]       # SRC_A holds the set's one entry
        other = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, QUIET, src=SRC_B))
        assert other["answered"] is False
        assert ccount(host, "fin", "connlimit full") >= 1
        assert ccount(host, "fin", "within rate") == 1                # SRC_A's one connection only
        assert ccount(host, "fin", "connlimit drop") == 0
    finally:
        kill_all(holder, listener)


# --------------------------------------------------------------------------- 3. exempt, restricted

def test_exempt_source_never_limited(host, tmp_path):
    host.apply()
    burst_size, rate, sent = 2, 1, 10
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS=SRC_A)
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                IPTABLES_HASH_LIMIT_BURST=burst_size), core)
    res = burst(host, HOST_EXT4, 8445, [SRC_A, SRC_B], sent)
    a, b = res["outcomes"][SRC_A], res["outcomes"][SRC_B]
    assert a == ["refused"] * sent, res                      # 5 times the burst: all answered
    assert ccount(host, "fin", "exempt") == sent
    # control: the same burst from a source that is not exempt is limited
    lo, hi = accepted_bounds(burst_size, rate, res["elapsed"])
    assert lo <= b.count("refused") <= hi, res
    assert set(b) == {"refused", "timeout"}, res
    assert ccount(host, "fin", "within rate") == b.count("refused")
    assert ccount(host, "fin", "rate drop") == b.count("timeout")


def test_exempt_address_and_exempt_network_both_never_limited(host, tmp_path):
    """One list with an address and a network: on the native backend the address is in the
    list's hash set (NAME.addr), the network in its interval set (NAME.net); both exempt, one
    exempt rule in the view with both lookups counted, the list read back as one."""
    host.apply()
    burst_size, rate, sent = 2, 1, 10
    net_b = f"{SRC_B}/31"                    # 203.0.113.8/31: SRC_B through the network
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS=f"{SRC_A}|{net_b}")
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                IPTABLES_HASH_LIMIT_BURST=burst_size), core)
    res = burst(host, HOST_EXT4, 8445, [SRC_A, SRC_B], sent)
    assert res["outcomes"] == {SRC_A: ["refused"] * sent, SRC_B: ["refused"] * sent}, res
    assert ccount(host, "fin", "exempt") == 2 * sent
    assert ccount(host, "fin", "within rate") == 0
    specs = host.observed(4).chain_specs(chain("fin"))
    assert sum(comment("fin", "exempt") in s for s in specs) == 1
    name = f"hostprep-{hashlib.sha256(b'fin').hexdigest()[:8]}-ex4"
    if host.native:
        out = host.run(host.box.host, ["nft", "-j", "list", "table", "inet", "hostprep"]).stdout
        decl = {o["set"]["name"]: (o["set"].get("flags", []), o["set"].get("elem"))
                for o in json.loads(out)["nftables"] if "set" in o and o["set"]["name"].startswith(name)}
        assert decl == {name + ".addr": ([], [SRC_A]),
                        name + ".net": (["interval"], [{"prefix": {"addr": SRC_B, "len": 31}}])}
        assert parse_nft_json(out, (4, 6), "hostprep-").sets[name] == frozenset({f"{SRC_A}/32", net_b})
    st = host.hostprep("status")
    assert "everything desired is live" in st.stdout, st.stdout


def test_restricted_only_load_balancers_get_in(host, tmp_path):
    host.apply()
    core = env_file(tmp_path, "core.env", NGX_TRAFFIC_RESTRICTED="true", NGX_LOAD_BALANCER_IPS=SRC_A,
                    NGX_LOAD_BALANCER_REAL_IP_HEADER="X-Real-IP")
    up(host, "fin", finesse_env(tmp_path), core)
    other = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, QUIET, src=SRC_B))
    assert (other["answered"], other["reply"]) == (False, None)
    assert ccount(host, "fin", "restricted to load balancers") == 1
    lb = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, ANSWER, src=SRC_A))
    assert lb["reply"] == "RA"
    assert ccount(host, "fin", "load balancer") == 1
    # the load balancer is exempt from every limit (finesse: burst 8), the others stay out
    sent = 20
    res = burst(host, HOST_EXT4, 8445, [SRC_A, SRC_B], sent)
    assert res["outcomes"] == {SRC_A: ["refused"] * sent, SRC_B: ["timeout"] * sent}, res
    assert ccount(host, "fin", "load balancer") == 1 + sent
    assert ccount(host, "fin", "restricted to load balancers") == 1 + sent
    # restricted: no limit rules at all in the chain
    specs = host.observed(4).chain_specs(chain("fin"))
    assert [s for s in specs if "hashlimit" in s or "connlimit" in s] == []
    assert deny_count(host) == 0


# --------------------------------------------------------------------------- 4. default deny, down

def test_port_not_up_denied_and_down_leaves_other_container(host, tmp_path):
    host.apply()
    # before any container: 8445 falls to the default deny
    r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445)])
    assert (r["answered"], deny_count(host)) == (False, 1)
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG))
    up(host, "ids", env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids", IPTABLES_CONNECTION_LIMIT_ABOVE=BIG))
    fin_open, ids_open, not_up = host.probe(host.box.inet, [
        tcp(HOST_EXT4, 8445, ANSWER), tcp(HOST_EXT4, 8553, ANSWER), tcp(HOST_EXT4, 12005)])
    assert (fin_open["reply"], ids_open["reply"]) == ("RA", "RA")
    # LiveData's port: nobody opened it.  On the native backend each change replaces the table in
    # one transaction, so the counters start again at each container up.
    assert (not_up["answered"], deny_count(host)) == (False, 1 if host.native else 2)
    assert (ccount(host, "fin", "within rate"), ccount(host, "ids", "within rate")) == (1, 1)

    if host.native:
        # The same, read from the native table; each change replaces it, so counters start again.
        def nft_sets() -> dict:
            out = host.run(host.box.host, ["nft", "-j", "list", "table", "inet", "hostprep"]).stdout
            return parse_nft_json(out, (4, 6), "hostprep-").sets
        ids_lines, sets_before = host.nft_chain_lines(4, chain("ids")), nft_sets()
        ids_sets = {k: v for k, v in sets_before.items() if any(k in ln for ln in ids_lines)}
        assert (len(sets_before), len(ids_sets)) == (2, 1)
        res = down(host, "fin")
        # native: the 7 of iptables and the drop of a source the full connection-count set refuses
        assert res.stdout.startswith("container fin: 8 rules removed"), res.stdout
        gone, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445)])
        assert (gone["answered"], deny_count(host)) == (False, 1)
        assert chain("fin") not in host.observed(4).chains
        assert host.nft_chain_lines(4, chain("ids")) == ids_lines
        assert nft_sets() == ids_sets
        still, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8553, ANSWER)])
        assert (still["reply"], ccount(host, "ids", "within rate")) == ("RA", 1)
        return

    ids_before = (container_save_lines(host, "ids"), host.observed(4).chain_specs(chain("ids")))
    sets_before = ipsets(host)
    ids_sets = {k: v for k, v in sets_before.items() if k.startswith("hostprep-")
                and any(k in ln for ln in ids_before[0])}
    fin_sets = {k for k in sets_before if k.startswith("hostprep-") and k not in ids_sets}
    assert len(ids_sets) == 1 and len(fin_sets) == 1       # each has its exempt set (installer defaults)

    res = down(host, "fin")
    assert res.stdout.startswith("container fin: 7 rules removed"), res.stdout
    gone, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445)])
    assert (gone["answered"], deny_count(host)) == (False, 3)
    assert chain("fin") not in host.observed(4).chains
    assert container_save_lines(host, "fin") == []
    # the other container: same rules, same counter (its chain was not reloaded), same set
    assert (container_save_lines(host, "ids"), host.observed(4).chain_specs(chain("ids"))) == ids_before
    assert ccount(host, "ids", "within rate") == 1
    sets_after = ipsets(host)
    assert {k: sets_after.get(k) for k in ids_sets} == ids_sets
    assert [k for k in fin_sets if k in sets_after] == []
    still, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8553, ANSWER)])
    assert still["reply"] == "RA"
    assert ccount(host, "ids", "within rate") == 2


# --------------------------------------------------------------------------- 5. published port (FORWARD)

CTR_HOST, CTR_IP, CTR_PORT = "203.0.113.129", "203.0.113.130", 8443   # the container link, /25


def test_published_port_forward_path(host, variant, tmp_path):
    """A container with a published port (DNAT 8445 -> CTR_IP:8443) is reached through FORWARD:
    dropped by the default deny until ``container up``, then open with the same limits."""
    host.apply()
    ctr = host.box.name + "-ctr"
    listener = None

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)

    def jump_count(builtin: str) -> int:
        return host.counter(4, builtin, "-j HOSTPREP-IN")

    try:
        sh("ip", "netns", "add", ctr)
        sh("ip", "link", "add", "pod0", "netns", host.box.host, "type", "veth", "peer", "name", "eth0",
           "netns", ctr)
        sh("ip", "-n", host.box.host, "addr", "add", f"{CTR_HOST}/25", "dev", "pod0")
        sh("ip", "-n", host.box.host, "link", "set", "pod0", "up")
        sh("ip", "-n", ctr, "addr", "add", f"{CTR_IP}/25", "dev", "eth0")
        sh("ip", "-n", ctr, "link", "set", "eth0", "up")
        sh("ip", "-n", ctr, "link", "set", "lo", "up")
        sh("ip", "-n", ctr, "route", "add", "default", "via", CTR_HOST)
        # per-namespace key, the sandbox host's only
        host.run(host.box.host, ["sysctl", "-w", "net.ipv4.ip_forward=1"])
        host.run(host.box.host, [f"iptables-{'nft' if host.native else variant}", "-t", "nat", "-A", "PREROUTING", "-i", "eth1", "-d",
                                 HOST_EXT4, "-p", "tcp", "--dport", "8445", "-j", "DNAT", "--to-destination",
                                 f"{CTR_IP}:{CTR_PORT}"])
        listener = Bg(ctr, LISTENER, CTR_IP, str(CTR_PORT))
        assert listener.readline() == "listening", listener.stderr()

        # without `container up`: the DNAT'd SYN goes FORWARD and meets the default deny
        fwd0, in0 = jump_count("FORWARD"), jump_count("INPUT")
        closed = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, QUIET, src=SRC_A))
        assert (closed["answered"], closed["reply"]) == (False, None)
        assert deny_count(host) == 1
        assert (jump_count("FORWARD") - fwd0, jump_count("INPUT") - in0) == (1, 0)

        burst_size, rate, sent = 3, 1, 10
        up(host, "pub", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                    IPTABLES_HASH_LIMIT_BURST=burst_size))
        # SYN-ACK: only the container listens (on 8443); the host itself has nothing on 8445
        in1 = jump_count("INPUT")
        opened = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, ANSWER, src=SRC_A))
        assert opened["reply"] == "SA"
        assert ccount(host, "pub", "within rate") == 1
        assert jump_count("INPUT") == in1         # never through INPUT
        # limited the same way: the source has burst_size - 1 tokens left
        res = burst(host, HOST_EXT4, 8445, [SRC_A], sent)
        a = res["outcomes"][SRC_A]
        lo, hi = accepted_bounds(burst_size, rate, res["elapsed"], used=1)
        assert set(a) == {"connected", "timeout"}, res
        assert lo <= a.count("connected") <= hi, res
        assert ccount(host, "pub", "within rate") == 1 + a.count("connected")
        assert ccount(host, "pub", "rate drop") == a.count("timeout")
        assert deny_count(host) == (0 if host.native else 1)   # native: the up replaced the table, counters too
        # the container accepted exactly the burst's connections (the scapy SYN above was no
        # socket: the inet kernel answered the SYN-ACK with RST, so it never completed)
        listener.send("stop")
        assert listener.readline() == str(a.count("connected"))
    finally:
        kill_all(listener)
        subprocess.run(["ip", "netns", "del", ctr], capture_output=True, timeout=30)


# --------------------------------------------------------------------------- 6. log file, journal

def test_container_log_lists_rules_and_files_and_journal(host, tmp_path):
    host.apply()
    logdir = host.root / "var/log/hostprep"
    log, journal = logdir / "iptables_logs" / "fin.log", logdir / "journal.log"
    env = finesse_env(tmp_path, IPTABLES_HASH_LIMIT_UPTO=6)
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="198.51.100.99")
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP=HOST_EXT4)
    j0 = journal.read_text().splitlines()

    up(host, "fin", env, core, installer)
    live = container_save_lines(host, "fin")
    # dispatch + exempt, connlimit log/drop, within rate, rate log/drop (native: and the drop of a
    # source its full connection-count set could not take)
    assert len(live) == 1 + (7 if host.native else 6)
    text = log.read_text()
    # the order of the lines in the log is not specified: compared as sorted lists (duplicates count)
    assert logged(text, "added") == sorted(live)
    assert logged(text, "removed") == []
    files = [ln for ln in text.splitlines() if ln.startswith("# file ")]
    # path, role and size (then mtime and the keyed HMAC); never a plain sha256 (issue 10 item 11)
    assert [ln.split(", modified ")[0] for ln in files] == [
        f"# file {p.resolve()} ({role}): {p.stat().st_size} bytes"
        for p, role in ((env, "env"), (core, "core"), (installer, "installer"))]
    assert [p for p in (env, core, installer) if hashlib.sha256(p.read_bytes()).hexdigest() in text] == []
    assert (oct(log.stat().st_mode & 0o777), oct((host.root / "var/lib/hostprep/filekey").stat().st_mode & 0o777)) \
        == ("0o640", "0o600")
    j1 = journal.read_text().splitlines()
    assert len(j1) == len(j0) + 1
    assert "\thostprep container up fin " in j1[-1] and j1[-1].endswith("\tok"), j1[-1]

    # up again with a changed limit: the log is recreated (one header) and names what changed
    env.write_text(env.read_text().replace("IPTABLES_HASH_LIMIT_UPTO=6", "IPTABLES_HASH_LIMIT_UPTO=9"))
    up(host, "fin", env, core, installer, "-y")       # a raised rate widens access: -y
    live2 = container_save_lines(host, "fin")
    text2 = log.read_text()
    assert text2.count("# hostprep container up: fin ") == 1 and "container down" not in text2
    assert logged(text2, "removed") == sorted(ln for ln in live if ln not in live2)
    assert logged(text2, "added") == sorted(ln for ln in live2 if ln not in live)
    assert logged(text2, "kept") == sorted(ln for ln in live2 if ln in live)
    changed = [ln for ln in live2 if ln not in live]
    if host.native:
        # The native view of a rule is its comment and verdict: a changed rate replaces the rule
        # in the table (nft_chain_lines shows it), the log lists it as kept.
        assert changed == [] and any("limit rate 9/second" in ln for ln in host.nft_chain_lines(4, chain("fin")))
    else:
        assert len(changed) == 1 and "--hashlimit-upto 9/sec" in changed[0]
    files2 = [ln for ln in text2.splitlines() if ln.startswith("# file ")]
    # the env file changed: its HMAC changed, the unchanged core's did not
    assert (files2[0] != files[0], files2[1:]) == (True, files[1:])
    assert len(journal.read_text().splitlines()) == len(j0) + 2

    # down: appended, exactly the rules that were live, as "removed"
    down(host, "fin")
    text3 = log.read_text()
    assert text3.startswith(text2)
    appended = text3[len(text2):]
    assert appended.startswith("# hostprep container down: fin ")
    assert logged(appended, "removed") == sorted(live2)
    assert logged(appended, "added") == []
    assert container_save_lines(host, "fin") == []
    j3 = journal.read_text().splitlines()
    assert len(j3) == len(j0) + 3
    assert "\thostprep container down fin\t" in j3[-1] and j3[-1].endswith("\tok"), j3[-1]


# --------------------------------------------------------------------------- 7. bad input

def test_bad_env_changes_nothing(host, tmp_path):
    host.apply()
    up(host, "fin", finesse_env(tmp_path))
    registry = host.root / "var/lib/hostprep/containers"
    logs = host.root / "var/log/hostprep/iptables_logs"
    cases = [
        ("non-integer limit", "fin2", finesse_env(tmp_path, "a.env", NGX_PRXY_FIN_PORT=9445,
                                                   IPTABLES_HASH_LIMIT_UPTO="6/sec"), None,
         "IPTABLES_HASH_LIMIT_UPTO"),
        ("hostname as load balancer", "fin2", finesse_env(tmp_path, "b.env", NGX_PRXY_FIN_PORT=9445),
         env_file(tmp_path, "core.env", NGX_LOAD_BALANCER_IPS="203.0.113.7|lb.example.com"),
         "should contain only IP addresses"),
        ("port 70000", "fin2", finesse_env(tmp_path, "c.env", NGX_PRXY_FIN_PORT=70000), None, "70000"),
        ("host+port of a running container", "fin2", finesse_env(tmp_path, "d.env"), None,
         "already opened for container fin"),
        ("unsafe name", "a;b", finesse_env(tmp_path, "e.env", NGX_PRXY_FIN_PORT=9445), None, "a;b"),
        ("unknown template", "fin2", env_file(tmp_path, "f.env", TEMPLATE_TYPE="webex"), None, "TEMPLATE_TYPE"),
        # issue 10 item 9: never widened silently
        ("host bits", "fin2", finesse_env(tmp_path, "g.env", NGX_PRXY_FIN_PORT=9445),
         env_file(tmp_path, "core-g.env", NGX_RATELIMIT_DISABLE_IPS="1.2.3.4/8"),
         "'1.2.3.4/8' has host bits set: it would stand for 1.0.0.0/8"),
        ("halves of everything", "fin2", finesse_env(tmp_path, "h.env", NGX_PRXY_FIN_PORT=9445),
         env_file(tmp_path, "core-h.env", NGX_RATELIMIT_DISABLE_IPS="0.0.0.0/1|128.0.0.0/1"), "--allow-wide-exempt"),
        ("interpolation", "fin2", finesse_env(tmp_path, "i.env", NGX_PRXY_FIN_PORT=9445),
         env_file(tmp_path, "core-i.env", NGX_RATELIMIT_DISABLE_IPS="${HOME}"), "'${HOME}' is not an IP address"),
    ]
    for what, name, env, core, words in cases:
        before = kernel_state(host)
        files_before = (sorted(p.name for p in registry.iterdir()), sorted(p.name for p in logs.iterdir()))
        res = up(host, name, env, core, check=False)
        assert res.returncode != 0, what
        errlines = res.stderr.splitlines()
        assert len(errlines) == 1 and errlines[0].startswith("error:"), (what, res.stderr)
        assert words in errlines[0], (what, errlines[0])
        assert "Traceback" not in res.stdout + res.stderr, what
        assert kernel_state(host) == before, what
        assert (sorted(p.name for p in registry.iterdir()), sorted(p.name for p in logs.iterdir())) == \
            files_before, what
    assert [c["name"] for c in json.loads(host.hostprep("container", "list", "--json").stdout)] == ["fin"]


# --------------------------------------------------------------------------- 8. up again replaces

def test_up_again_replaces_rules_other_untouched(host, tmp_path):
    host.apply()
    up(host, "fin", finesse_env(tmp_path, IPTABLES_HASH_LIMIT_UPTO=6, IPTABLES_HASH_LIMIT_BURST=8))
    up(host, "ids", env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids"))
    r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8553, ANSWER)])
    assert (r["reply"], ccount(host, "ids", "within rate")) == ("RA", 1)
    ids_before = container_save_lines(host, "ids")
    ids_native = host.nft_chain_lines(4, chain("ids")) if host.native else []
    res = up(host, "fin", finesse_env(tmp_path, "finesse2.env", IPTABLES_HASH_LIMIT_UPTO=3,
                                      IPTABLES_HASH_LIMIT_BURST=5, IPTABLES_CONNECTION_LIMIT_ABOVE=7))
    assert "rules added" in res.stdout
    if host.native:
        lines = host.nft_chain_lines(4, chain("fin"))
        assert len([ln for ln in lines if "limit rate 3/second" in ln and "update @" in ln]) == 1   # burst 5: nft omits the default
        assert len([ln for ln in lines if "ct count over 7 }" in ln]) == 1            # evaluated once
        assert [ln for ln in lines if "limit rate 6/second" in ln or "ct count over 10 " in ln] == []
        assert host.nft_chain_lines(4, chain("ids")) == [ln for ln in ids_native]
        assert ccount(host, "ids", "within rate") == 0   # the table was replaced: counters start again
        return
    specs = host.observed(4).chain_specs(chain("fin"))
    assert len([s for s in specs if "--hashlimit-upto 3/sec --hashlimit-burst 5 " in s]) == 1
    assert len([s for s in specs if "--connlimit-above 7 " in s]) == 2       # log and drop
    assert [s for s in specs if "--hashlimit-upto 6/sec" in s or "--connlimit-above 10 " in s] == []
    assert len(specs) == 6
    assert dispatch_rules(host, "fin") == [f"-m conntrack --ctorigdst {HOST_EXT4} -j {chain('fin')}"]
    assert container_save_lines(host, "ids") == ids_before
    assert ccount(host, "ids", "within rate") == 1           # its chain was not even reloaded
    listed = json.loads(host.hostprep("container", "list", "--json").stdout)
    fin = next(c for c in listed if c["name"] == "fin")
    assert fin["limits"] == {"connlimit_above": 7, "hash_upto": 3, "hash_burst": 5, "log_limit": 1,
                             "log_burst": 1}
    assert fin["present"] is True


def test_status_live_after_up_in_any_order(host, tmp_path):
    host.apply()
    up(host, "ids", env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids"))
    up(host, "fin", finesse_env(tmp_path))       # "fin" sorts before "ids"
    st = host.hostprep("status", "--json", check=False)
    assert (st.returncode, json.loads(st.stdout)["problems"]) == (0, [])
    # and re-applying the base hardening has nothing to change
    applied = host.apply().stdout
    assert "nothing changed: the hardening on eth1 is already live" in applied, applied


def test_up_again_new_burst_is_enforced(host, tmp_path):
    host.apply()
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=1,
                                IPTABLES_HASH_LIMIT_BURST=2))
    new_burst, sent = 8, 12
    # a raised burst widens access: -y says it is meant (issue 10 item 7)
    up(host, "fin", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=1,
                                IPTABLES_HASH_LIMIT_BURST=new_burst), None, None, "-y")
    if host.native:
        assert any(f"limit rate 1/second burst {new_burst} packets }}" in ln
                   for ln in host.nft_chain_lines(4, chain("fin")))
    else:
        assert any(f"--hashlimit-burst {new_burst} " in s for s in host.observed(4).chain_specs(chain("fin")))
    # a source never seen before: its bucket starts full with the burst the chain shows
    res = burst(host, HOST_EXT4, 8445, [SRC_B], sent)
    lo, hi = accepted_bounds(new_burst, 1, res["elapsed"])
    assert lo <= res["outcomes"][SRC_B].count("refused") <= hi, res


# --------------------------------------------------------------------------- 9. hardening off

def test_hardening_off_keeps_port_closed_with_warning(host, tmp_path):
    host.apply()
    before = kernel_state(host)
    res = up(host, "fin", finesse_env(tmp_path), env_file(tmp_path, "core.env", NGX_IPTABLES_HARDENING=0))
    assert res.returncode == 0
    assert "WARNING" in res.stderr and "NGX_IPTABLES_HARDENING=0" in res.stderr, res.stderr
    assert "8445" in res.stderr and "CLOSED" in res.stderr, res.stderr
    assert chain("fin") not in host.observed(4).chains and chain("fin") not in host.observed(6).chains
    assert kernel_state(host) == before           # no rule, no set
    r, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445)])
    assert (r["answered"], deny_count(host)) == (False, 1)
    listed = json.loads(host.hostprep("container", "list", "--json").stdout)
    assert [(c["name"], c["hardening"], c["present"]) for c in listed] == [("fin", False, None)]


# --------------------------------------------------------------------------- 10. status

def test_status_json_containers_section(host, tmp_path):
    host.apply()
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="198.51.100.99|203.0.113.200|2001:db8:f::99",
                    NGX_LOAD_BALANCER_IPS="198.51.100.98", NGX_LOAD_BALANCER_REAL_IP_HEADER="X-Real-IP")
    # "conn": connection limit 1 (measured with a held connection); "rate": burst 2 at 1/s
    up(host, "conn", finesse_env(tmp_path, "conn.env", IPTABLES_CONNECTION_LIMIT_ABOVE=1,
                                 IPTABLES_HASH_LIMIT_UPTO=100, IPTABLES_HASH_LIMIT_BURST=100), core)
    up(host, "rate", env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids", IPTABLES_CONNECTION_LIMIT_ABOVE=BIG,
                              IPTABLES_HASH_LIMIT_UPTO=1, IPTABLES_HASH_LIMIT_BURST=2), core)
    listener = holder = None
    try:
        listener = Bg(host.box.host, LISTENER, HOST_EXT4, "8445")
        assert listener.readline() == "listening", listener.stderr()
        holder = Bg(host.box.inet, HOLDER, HOST_EXT4, "8445", SRC_A, "2")
        assert json.loads(holder.readline()) == ["connected", "timeout"]
        res = burst(host, HOST_EXT4, 8553, [SRC_B], 6)
        b = res["outcomes"][SRC_B]
        lo, hi = accepted_bounds(2, 1, res["elapsed"])
        assert lo <= b.count("refused") <= hi and set(b) == {"refused", "timeout"}, res
        st = host.hostprep("status", "--json", check=False)
        listed = host.hostprep("container", "list", "--json")
    finally:
        kill_all(holder, listener)
    report = json.loads(st.stdout)
    assert (st.returncode, report["problems"]) == (0, [])
    rows = {c["name"]: c for c in report["containers"]}
    assert sorted(rows) == ["conn", "rate"]
    expect = {
        "conn": {"template": "finesse", "ports": [8445], "dest": HOST_EXT4, "hardening": True, "present": True,
                 "restricted": False, "limits": {"connlimit_above": 1, "hash_upto": 100, "hash_burst": 100,
                                                  "log_limit": 1, "log_burst": 1},
                 "load_balancers": 1, "exempt": 2},     # the IPv6 exempt address is not counted for IPv4
        "rate": {"template": "ids", "ports": [8553], "dest": HOST_EXT4, "hardening": True, "present": True,
                 "restricted": False, "limits": {"connlimit_above": BIG, "hash_upto": 1, "hash_burst": 2,
                                                  "log_limit": 1, "log_burst": 1},
                 "load_balancers": 1, "exempt": 2},
    }
    for name, want in expect.items():
        assert {k: rows[name][k] for k in want} == want, name
    # the counters are the kernel's, and they are what the traffic above did
    for name in rows:
        assert (rows[name]["accepted_within_rate"], rows[name]["dropped_connlimit"],
                rows[name]["dropped_rate"]) == (ccount(host, name, "within rate"),
                                                ccount(host, name, "connlimit drop"),
                                                ccount(host, name, "rate drop")), name
    assert (rows["conn"]["accepted_within_rate"], rows["conn"]["dropped_connlimit"],
            rows["conn"]["dropped_rate"]) == (1, 1, 0)
    assert (rows["rate"]["accepted_within_rate"], rows["rate"]["dropped_connlimit"],
            rows["rate"]["dropped_rate"]) == (b.count("refused"), 0, b.count("timeout"))
    # container list --json is the same section
    assert json.loads(listed.stdout) == report["containers"]
    plain = host.hostprep("status")
    assert "everything desired is live" in plain.stdout


# --------------------------------------------------------------------------- 11. IPv6

def test_ipv6_container_open_with_limits(host, tmp_path):
    host.apply()
    burst_size, rate, sent = 3, 1, 10
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP=HOST_EXT6)
    up(host, "fin6", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                 IPTABLES_HASH_LIMIT_BURST=burst_size), installer=installer)
    assert chain("fin6") in host.observed(6).chains and chain("fin6") not in host.observed(4).chains
    if host.native:
        assert [ln for ln in host.nft_chain_lines(6, "HOSTPREP-CONTAINERS")] == [
            f"ct original ip6 daddr {HOST_EXT6} counter jump {chain('fin6')}-v6"]
        lines = host.nft_chain_lines(6, chain("fin6"))
        assert len([ln for ln in lines if "ip6 saddr & ffff:ffff:ffff:ffff:: ct count over" in ln]) == 1  # a /64
        assert len([ln for ln in lines if "ip6 saddr & ffff:ffff:ffff:ffff:: limit rate" in ln]) == 1
    else:
        assert dispatch_rules(host, "fin6", 6) == [f"-m conntrack --ctorigdst {HOST_EXT6} -j {chain('fin6')}"]
        specs = host.observed(6).chain_specs(chain("fin6"))
        assert len([s for s in specs if "--connlimit-mask 64 " in s]) == 2     # one source: a /64
    # open on IPv6 ...
    first = host.probe1(host.box.inet, **tcp(HOST_EXT6, 8445, ANSWER, src=SRC6_A))
    assert first["reply"] == "RA"
    assert ccount(host, "fin6", "within rate", 6) == 1
    # ... but not on IPv4: the container binds the IPv6 address only
    v4, = host.probe(host.box.inet, [tcp(HOST_EXT4, 8445, src=SRC_A)])
    assert (v4["answered"], deny_count(host, 4)) == (False, 1)
    # burst from another address of the same /64: the limits are per /64, A spent one token already
    res = burst(host, HOST_EXT6, 8445, [SRC6_B], sent)
    b = res["outcomes"][SRC6_B]
    lo, hi = accepted_bounds(burst_size, rate, res["elapsed"], used=1)
    assert set(b) == {"refused", "timeout"} and lo <= b.count("refused") <= hi, res
    assert ccount(host, "fin6", "within rate", 6) == 1 + b.count("refused")
    assert ccount(host, "fin6", "rate drop", 6) == b.count("timeout")
    assert ccount(host, "fin6", "connlimit drop", 6) == 0
    assert deny_count(host, 6) == 0


# --------------------------------------------------------------------------- issue 12 item 4: IPv6 sources by /64

OTHER64 = "2001:db8:f:1::7"     # another /64 than SRC6_A and SRC6_B (2001:db8:f::/64)


def test_ipv6_sources_in_one_64_share_the_rate_limit_another_64_does_not(host, tmp_path):
    """Two addresses of 2001:db8:f::/64 draw on one bucket (burst 3); 2001:db8:f:1::7 has its own."""
    host.run(host.box.inet, ["ip", "addr", "add", f"{OTHER64}/128", "dev", "eth0", "nodad"])
    host.apply()
    burst_size, rate, sent = 3, 1, 5
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP=HOST_EXT6)
    up(host, "fin6", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                 IPTABLES_HASH_LIMIT_BURST=burst_size), installer=installer)
    res = burst(host, HOST_EXT6, 8445, [SRC6_A, SRC6_B], sent)
    a, b = res["outcomes"][SRC6_A], res["outcomes"][SRC6_B]
    lo, hi = accepted_bounds(burst_size, rate, res["elapsed"])
    shared = a.count("refused") + b.count("refused")
    assert set(a) | set(b) <= {"refused", "timeout"} and lo <= shared <= hi, res    # /128 keys: 6 of 10
    other = burst(host, HOST_EXT6, 8445, [OTHER64], sent)
    c = other["outcomes"][OTHER64]
    lo_c, hi_c = accepted_bounds(burst_size, rate, other["elapsed"])
    assert set(c) <= {"refused", "timeout"} and lo_c <= c.count("refused") <= hi_c, other
    assert ccount(host, "fin6", "within rate", 6) == shared + c.count("refused")
    assert ccount(host, "fin6", "rate drop", 6) == 3 * sent - shared - c.count("refused")
    # HOSTPREP_IPV6_SOURCE_PREFIX=128: every address its own source again (a new hashlimit table)
    up(host, "fin6", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=BIG, IPTABLES_HASH_LIMIT_UPTO=rate,
                                 IPTABLES_HASH_LIMIT_BURST=burst_size, HOSTPREP_IPV6_SOURCE_PREFIX=128),
       None, installer, "-y")
    res = burst(host, HOST_EXT6, 8445, [SRC6_A, SRC6_B], sent)
    lo, hi = accepted_bounds(burst_size, rate, res["elapsed"])
    assert [lo <= res["outcomes"][s].count("refused") <= hi for s in (SRC6_A, SRC6_B)] == [True, True], res
    assert host.hostprep("status", "--json", check=False).returncode == 0


def test_ipv6_sources_in_one_64_share_the_connection_limit(host, tmp_path):
    """Connection limit 2 per /64: A holds 2, B (same /64) gets no answer, 2001:db8:f:1::7 connects."""
    host.run(host.box.inet, ["ip", "addr", "add", f"{OTHER64}/128", "dev", "eth0", "nodad"])
    host.apply()
    limit = 2
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP=HOST_EXT6)
    up(host, "fin6", finesse_env(tmp_path, IPTABLES_CONNECTION_LIMIT_ABOVE=limit, IPTABLES_HASH_LIMIT_UPTO=100,
                                 IPTABLES_HASH_LIMIT_BURST=100), installer=installer)
    listener = holder = None
    try:
        listener = Bg(host.box.host, LISTENER, HOST_EXT6, "8445")
        assert listener.readline() == "listening", listener.stderr()
        holder = Bg(host.box.inet, HOLDER, HOST_EXT6, "8445", SRC6_A, str(limit))
        assert json.loads(holder.readline()) == ["connected"] * limit
        same64 = host.probe1(host.box.inet, kind="connect", dst=HOST_EXT6, port=8445, src=SRC6_B, timeout=QUIET)
        other = host.probe1(host.box.inet, kind="connect", dst=HOST_EXT6, port=8445, src=OTHER64, timeout=ANSWER)
        assert (same64["answered"], other) == (False, {"answered": True, "reply": "connected"})
        assert ccount(host, "fin6", "connlimit drop", 6) == 1
        listener.send("stop")
        assert listener.readline() == str(limit + 1)
    finally:
        kill_all(holder, listener)


def test_container_rules_with_limiter_bounds_read_back_exactly(host, tmp_path):
    """The hashlimit table options and the IPv6 source masks are written as iptables-save prints them:
    status finds the containers live, a second up changes nothing, and the kernel has the bounds."""
    host.apply()
    up(host, "fin", finesse_env(tmp_path))
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP=HOST_EXT6)
    up(host, "fin6", finesse_env(tmp_path, "fin6.env"), None, installer)
    report = json.loads(host.hostprep("status", "--json", check=False).stdout)
    assert [(c["name"], c["present"], c["source_prefix"], c["limiter"]) for c in report["containers"]] == [
        (n, True, p, {"htable_size": 16384, "htable_max": 131072, "htable_expire_ms": 2000})
        for n, p in (("fin", 32), ("fin6", 64))]
    assert report["problems"] == []
    again = up(host, "fin6", finesse_env(tmp_path, "fin6.env"), None, installer)
    assert "container fin6: rules unchanged;" in again.stdout
    if host.native:
        (rule6,) = [ln for ln in host.nft_chain_lines(6, chain("fin6")) if " limit rate " in ln and "update @" in ln]
        assert "{ ip6 saddr & ffff:ffff:ffff:ffff:: limit rate 6/second burst 8 packets }" in rule6, rule6
        sets = host.run(host.box.host, ["nft", "-t", "list", "sets", "inet"]).stdout
        assert sets.count("size 131072") == 4 and sets.count("timeout 2s") == 2, sets   # cl + rl, fin and fin6
        return
    (rule6,) = [s for s in host.observed(6).chain_specs(chain("fin6")) if "--hashlimit-name" in s]
    assert "--hashlimit-htable-size 16384 --hashlimit-htable-max 131072 --hashlimit-htable-expire 2000 " \
        "--hashlimit-srcmask 64 -m comment" in rule6


# --------------------------------------------------------------------------- issue 10 item 7: re-up

def restricted_core(tmp_path: Path) -> Path:
    return env_file(tmp_path, "core.env", NGX_TRAFFIC_RESTRICTED="true", NGX_LOAD_BALANCER_IPS=SRC_A,
                    NGX_RATELIMIT_DISABLE_IPS="198.51.100.99")


def record(host, name: str) -> dict:
    return json.loads((host.root / f"var/lib/hostprep/containers/{name}.json").read_text())


def test_reup_with_name_alone_reads_the_remembered_files(host, tmp_path):
    """The reported bug: an up without --core dropped the LBs and the restriction, reopening the port."""
    host.apply()
    env, core = finesse_env(tmp_path), restricted_core(tmp_path)
    up(host, "fin", env, core)
    live = kernel_state(host)
    res = up(host, "fin", None)
    assert res.stdout.splitlines()[0] == (f"container fin: files: env {env.resolve()} (remembered); "
                                          f"core {core.resolve()} (remembered); installer: none")
    assert "container fin: rules unchanged" in res.stdout
    assert "WIDENS" not in res.stderr
    assert kernel_state(host) == live
    other = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, QUIET, src=SRC_B))
    assert (other["answered"], ccount(host, "fin", "restricted to load balancers")) == (False, 1)
    assert [(f["role"], f["path"]) for f in record(host, "fin")["files"]] == [
        ("env", str(env.resolve())), ("core", str(core.resolve()))]
    # a container never up has nothing to remember
    res = up(host, "ids", None, check=False)
    assert (res.returncode, res.stderr.splitlines()) == (2, [
        "error: --env: no env file is remembered for ids (it is not up) (give the component .env with --env, "
        "e.g. --env finesse.env)"])


def test_widening_reup_listed_and_refused_without_yes_dry_run_exits_the_same(host, tmp_path):
    host.apply()
    up(host, "fin", finesse_env(tmp_path), restricted_core(tmp_path))
    before, rec = kernel_state(host), record(host, "fin")
    widen = ["WIDENS ACCESS: fin: NGX_TRAFFIC_RESTRICTED true -> false: every source may reach ports 8445, "
             "not only the load balancers",
             "WIDENS ACCESS: fin: exempt from the limits (NGX_RATELIMIT_DISABLE_IPS, NGX_CLOUDCONNECT_CLIENT_IPS) "
             "added (3): 192.168.1.69/32, 192.168.1.169/32, 127.0.0.1/32"]
    refusal = ("error: -y/--yes: this up of fin widens access (2 changes listed above) and there is no terminal "
               "to confirm; nothing was changed (check the files; pass -y to go ahead, --dry-run to see the rules)")
    for extra in (("--no-core",), ("--no-core", "--dry-run")):
        res = up(host, "fin", None, None, None, *extra, check=False)
        assert (res.returncode, res.stderr.splitlines()) == (2, widen + [refusal]), extra
        assert (kernel_state(host), record(host, "fin")) == (before, rec), extra
    # the dry run printed what would change before refusing as the real run does
    assert "container fin: " in res.stdout and "dry run: nothing was changed" in res.stdout, res.stdout
    assert "removed: -A HOSTPREP-C-fin" in res.stdout and "added: -A HOSTPREP-C-fin" in res.stdout, res.stdout
    # with -y: the dry run exits 0 and still changes nothing; the real run widens
    res = up(host, "fin", None, None, None, "--no-core", "--dry-run", "-y")
    assert (res.returncode, res.stderr.splitlines(), kernel_state(host)) == (0, widen, before)
    res = up(host, "fin", None, None, None, "--no-core", "-y")
    assert (res.returncode, res.stderr.splitlines()) == (0, widen)
    assert [f["role"] for f in record(host, "fin")["files"]] == ["env"]
    r = host.probe1(host.box.inet, **tcp(HOST_EXT4, 8445, ANSWER, src=SRC_B))
    assert (r["reply"], ccount(host, "fin", "within rate")) == ("RA", 1)


def test_dry_run_of_a_new_container_and_of_a_conflict(host, tmp_path):
    host.apply()
    before = kernel_state(host)
    env = finesse_env(tmp_path)
    env.chmod(0o664)                  # group-writable: warned about (issue 10 item 9)
    res = up(host, "fin", env, None, None, "--dry-run")
    assert (res.returncode, res.stderr.splitlines()) == (0, [
        f"warning: {env} is writable by group {env.stat().st_gid} (mode 0664): another user can change what is "
        f"loaded into the firewall (chmod go-w {env})"])
    lines = res.stdout.splitlines()
    n = 8 if host.native else 7          # native: and the drop of a source the full count set refuses
    assert f"container fin: {n} rules would be added, 0 removed" in lines
    assert len([ln for ln in lines if ln.startswith("  added: -A ")]) == n
    assert lines[-1] == "dry run: nothing was changed"
    assert kernel_state(host) == before
    for path in ("var/lib/hostprep/containers/fin.json", "var/log/hostprep/iptables_logs/fin.log",
                 "var/lib/hostprep/filekey"):
        assert (host.root / path).exists() is False, path
    up(host, "fin", finesse_env(tmp_path))
    after_up = kernel_state(host)
    res = up(host, "fin2", finesse_env(tmp_path, "b.env"), None, None, "--dry-run", check=False)
    real = up(host, "fin2", finesse_env(tmp_path, "b.env"), None, None, check=False)
    assert (res.returncode, res.stderr.splitlines()[-1:]) == (real.returncode, real.stderr.splitlines()[-1:])
    assert res.returncode == 2 and "already opened for container fin" in res.stderr
    assert kernel_state(host) == after_up


def test_wide_exempt_only_with_the_flag(host, tmp_path):
    """Issue 10 item 9: --allow-wide-exempt is the explicit way to exempt a /1."""
    host.apply()
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="0.0.0.0/1")
    res = up(host, "fin", finesse_env(tmp_path), core, None, check=False)
    assert (res.returncode, len(res.stderr.splitlines())) == (2, 1)
    assert kernel_state(host)["ipset"] == ""
    up(host, "fin", finesse_env(tmp_path), core, None, "--allow-wide-exempt")
    name = f"hostprep-{hashlib.sha256(b'fin').hexdigest()[:8]}-ex4"
    if host.native:
        # a network: the list's interval set (its addresses would be in NAME.addr, a hash set)
        listing = host.run(host.box.host, ["nft", "list", "set", "inet", "hostprep", name + ".net"]).stdout
        assert "elements = { 0.0.0.0/1 }" in listing
    else:
        assert f"add {name} 0.0.0.0/1" in ipsets(host)[name]
