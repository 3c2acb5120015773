"""envfiles: the installer's env files -> a validated Container (reference §3).

The sample files in tests/fixtures/env/ are written the way the installer ships
them (comments, hostname and port properties, IPTABLES_* present in some files
and absent in others).  Variants are written into tmp_path by ``variant``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from pathlib import Path

import pytest

from hostprep import envfiles
from hostprep.errors import InputError
from hostprep.model import EnvFile

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "env"
NIC = "eth1"
ADDRS = ["192.0.2.10/24", "2001:db8::10/64", "fe80::1/64"]

RATELIMIT_DEFAULT = ("192.168.1.69/32", "192.168.1.169/32", "127.0.0.1/32")
CLOUDCONNECT_DEFAULT = ("35.161.238.252", "35.166.68.236", "34.240.73.178", "3.9.155.97", "54.206.189.15",
                        "52.62.185.51", "13.210.45.137", "52.40.46.90", "52.214.81.91", "3.9.151.19",
                        "3.105.22.233", "52.17.23.194")
VALID_TEMPLATES = ("finesse, ids, cuic, cuic_12.6(1), livedata, livedata_12.6(1), chat, cloudconnect, "
                   "idp-adfs3")
_KEY_LINE = re.compile(r"(?:export\s+)?([A-Za-z0-9_]+)\s*=")


def nets(*values: str) -> tuple:
    return tuple(ipaddress.ip_network(v) for v in values)


def variant(tmp_path: Path, source: str, set: dict[str, str] | None = None, drop: tuple[str, ...] = (),
            name: str | None = None) -> Path:
    """A copy of fixture ``source``: ``set`` replaces (or appends) KEY=<text as written>, ``drop`` removes keys."""
    todo = dict(set or {})
    out = []
    for line in (FIX / source).read_text().splitlines():
        m = _KEY_LINE.match(line)
        key = m.group(1) if m else None
        if key in drop:
            continue
        if key in todo:
            out.append(f"{key}={todo.pop(key)}")
            continue
        out.append(line)
    out += [f"{k}={v}" for k, v in todo.items()]
    path = tmp_path / (name or source)
    path.write_text("\n".join(out) + "\n")
    return path


def load(env: str | Path = "finesse.env", core: Path | None = FIX / "core.env",
         installer: Path | None = FIX / "installer.env", addrs=ADDRS, name: str = "proxy1"):
    env_path = env if isinstance(env, Path) else FIX / env
    return envfiles.load_container(name, env_path, core, installer, NIC, list(addrs))


def error(**kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load(**kwargs)
    return info.value


def triple(c) -> tuple[int, int, int]:
    return (c.limits.connlimit_above, c.limits.hash_upto, c.limits.hash_burst)


# -- the sample components parse to the documented defaults (§3.2, §3.4) ---------------

SAMPLES = [
    ("finesse.env", "finesse", (8445,), (10, 6, 8)),
    ("ids.env", "ids", (8553,), (6, 2, 4)),
    ("cuic.env", "cuic", (443,), (6, 2, 4)),
    ("cuic_12.6.1.env", "cuic_12.6(1)", (8444, 8447), (6, 2, 4)),
    ("livedata.env", "livedata", (443,), (10, 6, 8)),
    ("livedata_12.6.1.env", "livedata_12.6(1)", (12005, 12008), (10, 6, 8)),
    ("chat.env", "chat", (5280, 15280, 25280), (30, 20, 25)),
    ("cloudconnect.env", "cloudconnect", (443,), (8, 4, 6)),
    ("idp.env", "idp-adfs3", (443,), (8, 4, 6)),
]


def test_samples_cover_every_template_type():
    assert sorted(t for _, t, _, _ in SAMPLES) == sorted(envfiles.PORTS)


def test_samples_have_iptables_keys_in_some_files_only():
    has = {f: "IPTABLES_CONNECTION_LIMIT_ABOVE" in (FIX / f).read_text() for f, _, _, _ in SAMPLES}
    assert (sorted(f for f, v in has.items() if v), sorted(f for f, v in has.items() if not v)) == (
        ["chat.env", "cloudconnect.env", "cuic_12.6.1.env", "finesse.env", "livedata_12.6.1.env"],
        ["cuic.env", "idp.env", "ids.env", "livedata.env"])


@pytest.mark.parametrize("env,template,ports,limits", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_sample_parses_to_documented_defaults(env, template, ports, limits):
    c = load(env)
    assert (c.template, c.ports, triple(c), c.limits.log_burst, c.limits.log_limit) == (
        template, ports, limits, 1, 1)


@pytest.mark.parametrize("env,template,ports,limits", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_sample_core_and_installer_settings(env, template, ports, limits):
    c = load(env)
    assert (c.name, c.dest, c.family, c.hardening, c.restricted, c.load_balancers) == (
        "proxy1", ipaddress.ip_address("192.0.2.10"), 4, True, False, ())


def test_iptables_keys_removed_fall_back_to_defaults(tmp_path):
    keys = ("IPTABLES_CONNECTION_LIMIT_ABOVE", "IPTABLES_HASH_LIMIT_UPTO", "IPTABLES_HASH_LIMIT_BURST",
            "IPTABLES_LOG_LIMIT", "IPTABLES_LOG_LIMIT_BURST")
    bare = load(variant(tmp_path, "chat.env", drop=keys))
    assert bare.limits == load("chat.env").limits


def test_iptables_values_override_defaults(tmp_path):
    c = load(variant(tmp_path, "ids.env", set={"IPTABLES_CONNECTION_LIMIT_ABOVE": "40",
                                                "IPTABLES_HASH_LIMIT_UPTO": "12",
                                                "IPTABLES_HASH_LIMIT_BURST": "30",
                                                "IPTABLES_LOG_LIMIT": "5",
                                                "IPTABLES_LOG_LIMIT_BURST": "3"}))
    assert c.limits.as_dict() == {"connlimit_above": 40, "hash_upto": 12, "hash_burst": 30,
                                  "log_limit": 5, "log_burst": 3}


@pytest.mark.parametrize("written,value", [
    ('" 10 "', 10),             # quoted, spaces kept by dotenv, stripped by hostprep
    ("10   ", 10),
    ("10 # per second", 10),   # inline comment
    ("010", 10),
    ("1000", 1000),
])
def test_integer_forms_accepted(tmp_path, written, value):
    c = load(variant(tmp_path, "finesse.env", set={"IPTABLES_HASH_LIMIT_UPTO": written}))
    assert c.limits.hash_upto == value


def test_empty_iptables_value_takes_the_default(tmp_path):
    c = load(variant(tmp_path, "finesse.env", set={"IPTABLES_HASH_LIMIT_UPTO": ""}))
    assert c.limits.hash_upto == 6


def test_port_property_absent_or_empty_takes_the_default(tmp_path):
    absent = load(variant(tmp_path, "livedata_12.6.1.env", drop=("NGX_PRXY_LD_SCKT_IO_PORT",)))
    empty = load(variant(tmp_path, "livedata_12.6.1.env", set={"NGX_PRXY_LD_PORT": ""}, name="ld-empty.env"))
    assert (absent.ports, empty.ports) == ((12005, 12008), (12005, 12008))


def test_port_property_set_is_used(tmp_path):
    c = load(variant(tmp_path, "finesse.env", set={"NGX_PRXY_FIN_PORT": "9445"}))
    assert c.ports == (9445,)


def test_alternate_side_port_is_not_opened(tmp_path):
    c = load(variant(tmp_path, "finesse.env", set={"NGX_PRXY_ALT_FIN_PORT": "8446"}))
    assert c.ports == (8445,)


def test_chat_upstream_port_is_not_opened(tmp_path):
    c = load(variant(tmp_path, "chat.env", set={"NGX_CHAT_PORT": "5281"}))
    assert c.ports == (5280, 15280, 25280)


def test_chat_proxy_ports_follow_the_chat_port_in_key_order(tmp_path):
    c = load(variant(tmp_path, "chat.env", set={"NGX_CHAT_HOST3_PROXY": "imp-c.example.com:35280",
                                                 "NGX_CHAT_HOST1_PROXY": "imp-a.example.com:16280"}))
    assert c.ports == (5280, 16280, 25280, 35280)


def test_chat_proxy_ninth_host_key_is_not_read(tmp_path):
    c = load(variant(tmp_path, "chat.env", set={"NGX_CHAT_HOST9_PROXY": "imp-i.example.com:45280"}))
    assert c.ports == (5280, 15280, 25280)


# -- core.env and cloudconnect.env address lists (§3.5) ----------------------------

def test_core_without_ratelimit_disable_ips_takes_the_documented_default():
    assert "NGX_RATELIMIT_DISABLE_IPS" not in (FIX / "core.env").read_text()
    assert load("finesse.env").exempt == nets(*RATELIMIT_DEFAULT)


def test_ratelimit_disable_ips_set_empty_means_no_exemption(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": ""})
    assert load("finesse.env", core=core).exempt == ()


def test_ratelimit_disable_ips_set(tmp_path):
    core = variant(tmp_path, "core.env",
                   set={"NGX_RATELIMIT_DISABLE_IPS": "192.0.2.10|198.51.100.10| 203.0.113.0/24 |2001:db8::10"})
    assert load("finesse.env", core=core).exempt == nets("192.0.2.10", "198.51.100.10", "203.0.113.0/24",
                                                         "2001:db8::10")


def test_no_core_file_means_documented_core_defaults():
    c = load("finesse.env", core=None)
    assert (c.hardening, c.restricted, c.load_balancers, c.exempt) == (True, False, (), nets(*RATELIMIT_DEFAULT))


def test_cloudconnect_client_ips_are_exempt():
    c = load("cloudconnect.env")
    assert c.exempt == nets(*RATELIMIT_DEFAULT, "203.0.113.40", "203.0.113.41")


def test_cloudconnect_client_ips_absent_take_the_twelve_documented_addresses(tmp_path):
    c = load(variant(tmp_path, "cloudconnect.env", drop=("NGX_CLOUDCONNECT_CLIENT_IPS",)))
    assert (len(CLOUDCONNECT_DEFAULT), c.exempt) == (12, nets(*RATELIMIT_DEFAULT, *CLOUDCONNECT_DEFAULT))


def test_cloudconnect_client_ips_already_exempt_are_not_repeated(tmp_path):
    env = variant(tmp_path, "cloudconnect.env", set={"NGX_CLOUDCONNECT_CLIENT_IPS": "127.0.0.1|203.0.113.40"})
    assert load(env).exempt == nets(*RATELIMIT_DEFAULT, "203.0.113.40")


def test_cloudconnect_client_ips_ignored_for_other_components(tmp_path):
    env = variant(tmp_path, "finesse.env", set={"NGX_CLOUDCONNECT_CLIENT_IPS": "203.0.113.40"})
    assert load(env).exempt == nets(*RATELIMIT_DEFAULT)


def test_load_balancer_ips_parsed_and_deduplicated(tmp_path):
    core = variant(tmp_path, "core.env", set={
        "NGX_LOAD_BALANCER_IPS": "198.51.100.0/24|203.0.113.7|203.0.113.7/32||2001:db8::/64"})
    assert load("finesse.env", core=core).load_balancers == nets("198.51.100.0/24", "203.0.113.7",
                                                                 "2001:db8::/64")


# -- issue 10 item 9: lists are never widened silently --------------------------------

@pytest.mark.parametrize("key,written,meant", [
    ("NGX_LOAD_BALANCER_IPS", "198.51.100.7/24", "198.51.100.0/24"),
    ("NGX_RATELIMIT_DISABLE_IPS", "203.0.113.7|1.2.3.4/8", "1.0.0.0/8"),
    ("NGX_RATELIMIT_DISABLE_IPS", "2001:db8::7/64", "2001:db8::/64"),
])
def test_host_bits_refused_naming_the_network_meant(tmp_path, key, written, meant):
    core = variant(tmp_path, "core.env", set={key: written})
    err = error(core=core)
    bad = written.split("|")[-1]
    assert (err.field, err.problem) == (f"{key} in {core}", f"{bad!r} has host bits set: it would stand for {meant}")
    assert err.fix.startswith(f"write {meant} if the whole network is meant")


@pytest.mark.parametrize("key,written", [
    ("NGX_RATELIMIT_DISABLE_IPS", "0.0.0.0/1|128.0.0.0/1"),
    ("NGX_LOAD_BALANCER_IPS", "198.51.100.9|64.0.0.0/7"),
    ("NGX_RATELIMIT_DISABLE_IPS", "2001:db8::/31"),
    ("NGX_RATELIMIT_DISABLE_IPS", "::/1"),
])
def test_wide_prefix_refused_without_the_flag(tmp_path, key, written):
    core = variant(tmp_path, "core.env", set={key: written})
    err = error(core=core)
    assert (err.field, "shorter than /" in err.problem, "--allow-wide-exempt" in err.fix) == (
        f"{key} in {core}", True, True)


def test_wide_prefix_accepted_with_the_flag_but_zero_prefix_never(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": "0.0.0.0/1|128.0.0.0/1|2001:db8::/31"})
    c = envfiles.load_container("proxy1", FIX / "finesse.env", core, FIX / "installer.env", NIC, list(ADDRS),
                                allow_wide=True)
    assert c.exempt == nets("0.0.0.0/1", "128.0.0.0/1", "2001:db8::/31")
    zero = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": "0.0.0.0/0"}, name="zero.env")
    with pytest.raises(InputError):
        envfiles.load_container("proxy1", FIX / "finesse.env", zero, None, NIC, list(ADDRS), allow_wide=True)


def test_narrowest_allowed_prefixes_accepted(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": "10.0.0.0/8|2001:db8::/32"})
    assert load(core=core).exempt == nets("10.0.0.0/8", "2001:db8::/32")


def test_env_values_are_not_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HP_TEST_WIDE", "0.0.0.0/1")
    monkeypatch.setenv("HP_TEST_LB", "203.0.113.0/24")
    lb = variant(tmp_path, "core.env", set={"NGX_LOAD_BALANCER_IPS": "${HP_TEST_LB}"}, name="lb.env")
    assert envfiles.read_env(lb, "--core").values["NGX_LOAD_BALANCER_IPS"] == "${HP_TEST_LB}"
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": "${HP_TEST_WIDE}"})
    err = error(core=core)
    assert (err.field, "'${HP_TEST_WIDE}' is not an IP" in err.problem) == (
        f"NGX_RATELIMIT_DISABLE_IPS in {core}", True)


def test_permission_warnings(tmp_path):
    d = tmp_path / "proxy"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    ok, group, world = (variant(d, "core.env", name=n) for n in ("ok.env", "group.env", "world.env"))
    ok.chmod(0o644)
    group.chmod(0o664)
    world.chmod(0o646)
    warnings = envfiles.permission_warnings([ok, group, world])
    assert warnings == [
        f"{group} is writable by group {group.stat().st_gid} (mode 0664): another user can change what is "
        f"loaded into the firewall (chmod go-w {group})",
        f"{world} is writable by anyone (mode 0646): another user can change what is loaded into the "
        f"firewall (chmod go-w {world})"]
    d.chmod(0o777)
    assert envfiles.permission_warnings([ok]) == [
        f"{ok} is in {d}, writable by others (mode 0777): another user can replace the file (chmod go-w {d})"]
    d.chmod(0o1777)       # sticky, as /tmp: others cannot replace a file they do not own
    assert envfiles.permission_warnings([ok]) == []
    d.chmod(0o755)


# -- issue 10 item 14: list sizes are capped before anything is parsed -----------------

def test_list_over_the_cap_refused_with_cap_and_reason(tmp_path):
    from hostprep.model import MAX_LIST_ENTRIES
    n = MAX_LIST_ENTRIES + 1
    base = int(ipaddress.ip_address("198.18.0.0"))
    core = variant(tmp_path, "core.env", set={
        "NGX_RATELIMIT_DISABLE_IPS": "|".join(str(ipaddress.ip_address(base + i)) for i in range(n))})
    err = error(core=core)
    assert (err.field, err.problem.split(";")[0]) == (f"NGX_RATELIMIT_DISABLE_IPS in {core}",
                                                      f"has {n:,} entries")
    assert f"at most {MAX_LIST_ENTRIES:,} are accepted (the size hostprep's ipsets are made for" in err.problem
    assert MAX_LIST_ENTRIES == 65536


def test_list_at_the_cap_accepted(tmp_path):
    from hostprep.model import MAX_LIST_ENTRIES
    base = int(ipaddress.ip_address("198.18.0.0"))
    core = variant(tmp_path, "core.env", set={
        "NGX_RATELIMIT_DISABLE_IPS": "|".join(str(ipaddress.ip_address(base + i)) for i in range(MAX_LIST_ENTRIES))})
    assert len(load(core=core).exempt) == MAX_LIST_ENTRIES


def test_cloudconnect_lists_together_over_the_cap_refused(tmp_path):
    from hostprep.model import MAX_LIST_ENTRIES
    half = MAX_LIST_ENTRIES // 2 + 1
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": "|".join(
        str(ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.0")) + i)) for i in range(half))})
    env = variant(tmp_path, "cloudconnect.env", set={"NGX_CLOUDCONNECT_CLIENT_IPS": "|".join(
        str(ipaddress.ip_address(int(ipaddress.ip_address("198.19.0.0")) + i)) for i in range(half))})
    err = error(env=env, core=core)
    assert (err.field, err.problem.split(";")[0]) == (
        f"NGX_RATELIMIT_DISABLE_IPS in {core} and NGX_CLOUDCONNECT_CLIENT_IPS in {env}",
        f"together list {2 * half:,} exempt entries")


@pytest.mark.parametrize("written,hardening", [("1", True), ("0", False), ("", True)])
def test_iptables_hardening_flag(tmp_path, written, hardening):
    core = variant(tmp_path, "core.env", set={"NGX_IPTABLES_HARDENING": written})
    assert load("finesse.env", core=core).hardening is hardening


def test_traffic_restricted_with_load_balancers(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_TRAFFIC_RESTRICTED": "true",
                                              "NGX_LOAD_BALANCER_IPS": "198.51.100.0/24"})
    c = load("finesse.env", core=core)
    assert (c.restricted, c.load_balancers) == (True, nets("198.51.100.0/24"))


# -- binding address (installer.env PROXY_BINDING_IP) ------------------------------

def test_binding_ip_from_installer_env():
    c = load("finesse.env", addrs=["198.51.100.10/24", "192.0.2.10/24"])
    assert c.dest == ipaddress.ip_address("192.0.2.10")


def test_binding_ip_defaults_to_the_nics_only_ipv4_address():
    c = load("finesse.env", installer=None)
    assert c.dest == ipaddress.ip_address("192.0.2.10")


def test_binding_ip_absent_from_installer_env_defaults_to_the_only_ipv4(tmp_path):
    inst = variant(tmp_path, "installer.env", drop=("PROXY_BINDING_IP",))
    assert load("finesse.env", installer=inst, addrs=["203.0.113.5/24", "2001:db8::5/64"]).dest == \
        ipaddress.ip_address("203.0.113.5")


def test_binding_ip_ipv6_gives_an_ipv6_container(tmp_path):
    inst = variant(tmp_path, "installer.env", set={"PROXY_BINDING_IP": "2001:db8::10"})
    c = load("finesse.env", installer=inst)
    assert (c.dest, c.family) == (ipaddress.ip_address("2001:db8::10"), 6)


def test_files_are_recorded_with_role_size_mtime_and_no_plain_hash():
    c = load("finesse.env")
    assert c.files == tuple(EnvFile(str((FIX / f).resolve()), "", role, (FIX / f).stat().st_size,
                                    (FIX / f).stat().st_mtime)
                            for f, role in (("finesse.env", "env"), ("core.env", "core"),
                                            ("installer.env", "installer")))
    plain = {hashlib.sha256((FIX / f).read_bytes()).hexdigest() for f in ("finesse.env", "core.env")}
    assert [f for f in c.files if f.digest in plain] == []


def test_files_digest_is_an_hmac_with_the_host_key():
    key = bytes(range(32))
    c = envfiles.load_container("proxy1", FIX / "finesse.env", FIX / "core.env", None, NIC, list(ADDRS), key=key)
    raw = (FIX / "core.env").read_bytes()
    assert c.file("core").digest == hmac.new(key, raw, hashlib.sha256).hexdigest()
    assert c.file("core").digest != hashlib.sha256(raw).hexdigest()
    # the same file under another host's key gives another digest: no cross-host oracle either
    other = envfiles.load_container("proxy1", FIX / "finesse.env", FIX / "core.env", None, NIC, list(ADDRS),
                                    key=bytes(32))
    assert other.file("core").digest != c.file("core").digest


def test_files_without_core_and_installer():
    c = load("ids.env", core=None, installer=None)
    assert [f.path for f in c.files] == [str((FIX / "ids.env").resolve())]


# -- validation, with the original launcher's meaning ----------------------------

LIMIT_KEYS = [("IPTABLES_CONNECTION_LIMIT_ABOVE", 65535), ("IPTABLES_HASH_LIMIT_UPTO", 1000),
              ("IPTABLES_HASH_LIMIT_BURST", 10000), ("IPTABLES_LOG_LIMIT", 10000),
              ("IPTABLES_LOG_LIMIT_BURST", 10000)]


@pytest.mark.parametrize("value", ["6/sec", "ten", "-1", "0", "1e3", "10.5", "0x0A", "+5", "1 0",
                                   "\uff11\uff10", "1/min"])
def test_non_integer_limit_names_key_file_and_value(tmp_path, value):
    env = variant(tmp_path, "finesse.env", set={"IPTABLES_HASH_LIMIT_UPTO": value})
    err = error(env=env)
    assert (err.field, err.problem, err.fix) == (
        f"IPTABLES_HASH_LIMIT_UPTO in {env}", f"is not in expected format. Input Provided= {value!r}",
        "Expected Format <Integer> from 1 to 1000. Eg. 10")


@pytest.mark.parametrize("key,top", LIMIT_KEYS)
def test_every_limit_key_is_validated_with_its_maximum(tmp_path, key, top):
    ok = load(variant(tmp_path, "cuic.env", set={key: str(top)}))
    env = variant(tmp_path, "cuic.env", set={key: str(top + 1)}, name="over.env")
    err = error(env=env)
    assert (ok.limits.as_dict()[{"IPTABLES_CONNECTION_LIMIT_ABOVE": "connlimit_above",
                                 "IPTABLES_HASH_LIMIT_UPTO": "hash_upto",
                                 "IPTABLES_HASH_LIMIT_BURST": "hash_burst",
                                 "IPTABLES_LOG_LIMIT": "log_limit",
                                 "IPTABLES_LOG_LIMIT_BURST": "log_burst"}[key]],
            err.field, err.fix) == (top, f"{key} in {env}", f"Expected Format <Integer> from 1 to {top}. Eg. 10")


def test_limit_error_line_reads_like_the_original(tmp_path):
    env = variant(tmp_path, "finesse.env", set={"IPTABLES_CONNECTION_LIMIT_ABOVE": "6/sec"})
    assert str(error(env=env)) == (f"IPTABLES_CONNECTION_LIMIT_ABOVE in {env}: is not in expected format. "
                                   "Input Provided= '6/sec' (Expected Format <Integer> from 1 to 65535. Eg. 10)")


def test_ten_digit_limit_refused(tmp_path):
    env = variant(tmp_path, "finesse.env", set={"IPTABLES_LOG_LIMIT": "1234567890"})
    assert error(env=env).problem == "is not in expected format. Input Provided= '1234567890'"


@pytest.mark.parametrize("key,value,bad", [
    ("NGX_LOAD_BALANCER_IPS", "lb.example.com", "lb.example.com"),
    ("NGX_LOAD_BALANCER_IPS", "198.51.100.7|lb.example.com", "lb.example.com"),
    ("NGX_RATELIMIT_DISABLE_IPS", "proxy-b.example.com", "proxy-b.example.com"),
    ("NGX_RATELIMIT_DISABLE_IPS", "192.0.2.300", "192.0.2.300"),
    ("NGX_LOAD_BALANCER_IPS", "198.51.100.0/33", "198.51.100.0/33"),
])
def test_hostname_in_core_ip_list_refused(tmp_path, key, value, bad):
    core = variant(tmp_path, "core.env", set={key: value})
    err = error(core=core)
    assert (err.field, err.problem, err.fix) == (
        f"{key} in {core}", f"should contain only IP addresses: {bad!r} is not an IP address or CIDR",
        "write e.g. 203.0.113.7|198.51.100.0/24|2001:db8::/64")


def test_hostname_in_cloudconnect_client_ips_refused(tmp_path):
    env = variant(tmp_path, "cloudconnect.env", set={"NGX_CLOUDCONNECT_CLIENT_IPS": "webex.example.com"})
    err = error(env=env)
    assert (err.field, err.problem) == (
        f"NGX_CLOUDCONNECT_CLIENT_IPS in {env}",
        "should contain only IP addresses: 'webex.example.com' is not an IP address or CIDR")


@pytest.mark.parametrize("value", ["0", "65536", "99999", "8445/tcp", "-1", "eighty", "8445 8446"])
def test_port_outside_1_to_65535_refused(tmp_path, value):
    env = variant(tmp_path, "finesse.env", set={"NGX_PRXY_FIN_PORT": value})
    err = error(env=env)
    assert (err.field, err.problem, err.fix) == (
        f"NGX_PRXY_FIN_PORT in {env}", f"is not a port: Input Provided= {value!r}",
        "Expected Format <Integer> from 1 to 65535. Eg. 8445")


def test_second_port_property_validated_too(tmp_path):
    env = variant(tmp_path, "cuic_12.6.1.env", set={"NGX_PRXY_CUIC_DOC_PORT": "70000"})
    assert error(env=env).field == f"NGX_PRXY_CUIC_DOC_PORT in {env}"


@pytest.mark.parametrize("value,pair,port", [
    ("imp-c.example.com:0", "imp-c.example.com:0", 0),
    ("imp-c.example.com:70000", "imp-c.example.com:70000", 70000),
    ("imp-c.example.com:5280/imp-d.example.com:99999", "imp-d.example.com:99999", 99999)])
def test_chat_proxy_port_outside_range_refused(tmp_path, value, pair, port):
    env = variant(tmp_path, "chat.env", set={"NGX_CHAT_HOST2_PROXY": value})
    err = error(env=env)
    assert (err.field, err.problem) == (f"NGX_CHAT_HOST2_PROXY in {env}",
                                        f"port {port} in {pair!r} is outside 1..65535")


def test_chat_proxy_port_with_six_digits_refused(tmp_path):
    env = variant(tmp_path, "chat.env", set={"NGX_CHAT_HOST2_PROXY": "imp-c.example.com:123456"})
    with pytest.raises(InputError):
        load(env)


def test_chat_proxy_ipv6_literal_host_gives_only_its_port(tmp_path):
    env = variant(tmp_path, "chat.env", set={"NGX_CHAT_HOST2_PROXY": "[2001:db8::15]:25280"})
    assert load(env).ports == (5280, 15280, 25280)


@pytest.mark.parametrize("written", ["finesse2", "FINESSE", "idp", "cuic_12.6.1", "", None])
def test_unknown_template_type_lists_the_valid_ones(tmp_path, written):
    env = (variant(tmp_path, "finesse.env", drop=("TEMPLATE_TYPE",)) if written is None
           else variant(tmp_path, "finesse.env", set={"TEMPLATE_TYPE": written}))
    err = error(env=env)
    if not written:     # absent or empty: say it is missing (issue 15, item 8), not "None is not known"
        assert (err.field, err.problem, err.fix) == (
            f"TEMPLATE_TYPE in {env}", "TEMPLATE_TYPE is missing", "add TEMPLATE_TYPE=<component>, one of: "
            + VALID_TEMPLATES)
        return
    assert (err.field, err.problem, err.fix) == (
        f"TEMPLATE_TYPE in {env}", f"{written!r} is not a known component", "one of: " + VALID_TEMPLATES)


@pytest.mark.parametrize("name", ["a;b", "", "-x", "x" * 64, "a b", "a\n", ".x", "_x", "a/b", "a$(id)", "fin\u00e9sse"])
def test_unsafe_container_name_refused(name):
    # The name is refused before any file is read.
    err = error(name=name, env=FIX / "no-such.env")
    assert (err.field, err.problem, err.fix) == (
        "NAME", f"{name!r} is not a safe container name",
        "use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit")


@pytest.mark.parametrize("name", ["x" * 63, "finesse-a", "cuic_12.6.1", "0proxy", "A"])
def test_safe_container_names_accepted(name):
    assert load(name=name).name == name


def test_traffic_restricted_with_empty_load_balancer_list_refused(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_TRAFFIC_RESTRICTED": "true"})
    err = error(core=core)
    assert (err.field, err.problem, err.fix) == (
        "NGX_TRAFFIC_RESTRICTED", "is true but NGX_LOAD_BALANCER_IPS has no IPv4 address for 192.0.2.10: "
        "nobody could reach the container",
        "list the load balancers, or set it to false")


def test_traffic_restricted_with_only_other_family_load_balancers_refused(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_TRAFFIC_RESTRICTED": "true",
                                              "NGX_LOAD_BALANCER_IPS": "2001:db8:1::/64"})
    with pytest.raises(InputError):
        load(core=core)


def test_traffic_restricted_not_a_boolean_refused(tmp_path):
    core = variant(tmp_path, "core.env", set={"NGX_TRAFFIC_RESTRICTED": "maybe"})
    err = error(core=core)
    assert (err.field, err.problem, err.fix) == (
        f"NGX_TRAFFIC_RESTRICTED in {core}", "is not in expected format. Input Provided= 'maybe'",
        "Expected true or false")


@pytest.mark.parametrize("value", ["2", "on", "-1", "1 0"])
def test_iptables_hardening_other_than_1_or_0_refused(tmp_path, value):
    core = variant(tmp_path, "core.env", set={"NGX_IPTABLES_HARDENING": value})
    err = error(core=core)
    assert (err.field, err.problem, err.fix) == (
        f"NGX_IPTABLES_HARDENING in {core}", f"is not in expected format. Input Provided= {value!r}",
        "Expected 1 or 0")


def test_binding_ip_not_on_the_nic_refused(tmp_path):
    inst = variant(tmp_path, "installer.env", set={"PROXY_BINDING_IP": "198.51.100.99"})
    err = error(installer=inst)
    assert (err.field, err.problem, err.fix) == (
        f"PROXY_BINDING_IP in {inst}", "198.51.100.99 is not an address of eth1",
        "its addresses: 192.0.2.10, 2001:db8::10, fe80::1")


def test_binding_ip_not_an_address_refused(tmp_path):
    inst = variant(tmp_path, "installer.env", set={"PROXY_BINDING_IP": "proxy.example.com"})
    err = error(installer=inst)
    assert (err.field, err.problem) == (f"PROXY_BINDING_IP in {inst}", "'proxy.example.com' is not an IP address")


def test_nic_with_two_ipv4_addresses_and_no_binding_ip_refused():
    err = error(installer=None, addrs=["192.0.2.10/24", "192.0.2.11/24", "2001:db8::10/64"])
    assert (err.field, err.problem, err.fix) == (
        "PROXY_BINDING_IP", "External NIC configured has multiple IPs (192.0.2.10, 192.0.2.11)",
        "Please provide a valid IP to bind from this list as the value for PROXY_BINDING_IP in installer.env "
        "configuration file")


def test_nic_with_two_ipv4_addresses_and_empty_binding_ip_refused(tmp_path):
    inst = variant(tmp_path, "installer.env", set={"PROXY_BINDING_IP": ""})
    err = error(installer=inst, addrs=["192.0.2.10/24", "192.0.2.11/24"])
    assert (err.field, err.problem) == (
        "PROXY_BINDING_IP", "External NIC configured has multiple IPs (192.0.2.10, 192.0.2.11)")


def test_nic_without_ipv4_and_no_binding_ip_refused():
    err = error(installer=None, addrs=["2001:db8::10/64"])
    assert (err.field, err.problem, err.fix) == (
        "PROXY_BINDING_IP", "eth1 has no IPv4 address to bind to",
        "set PROXY_BINDING_IP in installer.env (pass it with --installer)")


def test_missing_env_file_refused():
    err = error(env=FIX / "no-such.env")
    assert (err.field, err.problem.startswith(f"cannot read {FIX / 'no-such.env'} ("), err.fix) == (
        "--env", True, "give the path of the .env file")


def test_non_utf8_env_file_refused(tmp_path):
    env = tmp_path / "finesse.env"
    env.write_bytes(b"TEMPLATE_TYPE=finesse\nNGX_PRXY_FIN_HOSTNAME=fin\xe9.example.com\n")
    err = error(env=env)
    assert (err.field, err.problem) == ("--env", f"{env} is not a UTF-8 text file")


def test_missing_core_file_named_as_core(tmp_path):
    assert error(core=tmp_path / "core.env").field == "--core"


# -- hostile values: nothing that could reach a rule or a script gets through ------

HOSTILE = [
    ("core.env", "NGX_LOAD_BALANCER_IPS", '"203.0.113.7\\n-A INPUT -j ACCEPT"'),
    ("core.env", "NGX_LOAD_BALANCER_IPS", "203.0.113.7\" -j ACCEPT"),
    ("core.env", "NGX_LOAD_BALANCER_IPS", "203.0.113.7 -j ACCEPT"),
    ("core.env", "NGX_LOAD_BALANCER_IPS", "203.0.113.7|-A INPUT -j ACCEPT"),
    ("core.env", "NGX_RATELIMIT_DISABLE_IPS", '"127.0.0.1\\ncreate evil hash:net"'),
    ("core.env", "NGX_RATELIMIT_DISABLE_IPS", "127.0.0.1' src -j ACCEPT"),
    ("cloudconnect.env", "NGX_CLOUDCONNECT_CLIENT_IPS", '"203.0.113.40\\nflush hostprep-x-ex4"'),
    ("finesse.env", "NGX_PRXY_FIN_PORT", '"8445\\n-A INPUT -j ACCEPT"'),
    ("finesse.env", "NGX_PRXY_FIN_PORT", "8445\" -j ACCEPT"),
    ("finesse.env", "IPTABLES_HASH_LIMIT_UPTO", '"6\\n-A INPUT -j ACCEPT"'),
    ("finesse.env", "IPTABLES_CONNECTION_LIMIT_ABOVE", "10 -j ACCEPT"),
    ("finesse.env", "TEMPLATE_TYPE", '"finesse\\n-A INPUT -j ACCEPT"'),
    ("installer.env", "PROXY_BINDING_IP", '"192.0.2.10\\n-A INPUT -j ACCEPT"'),
    ("installer.env", "PROXY_BINDING_IP", "192.0.2.10\" -j ACCEPT"),
    ("core.env", "NGX_IPTABLES_HARDENING", '"1\\n-A INPUT -j ACCEPT"'),
]


@pytest.mark.parametrize("source,key,written", HOSTILE)
def test_hostile_values_refused(tmp_path, source, key, written):
    path = variant(tmp_path, source, set={key: written})
    role = {"core.env": "core", "installer.env": "installer"}.get(source, "env")
    raw = envfiles.read_env(path, "--x").values[key]
    err = error(**{role: path})
    # the value as hostprep read it still carries the attack, and the error names key and file
    assert (any(ch in raw for ch in "\n\"' |"), err.field) == (True, f"{key} in {path}")


@pytest.mark.parametrize("written", ['"2001:db8::7%x\\ncreate evil hash:net"', "2001:db8::7%eth1"])
def test_ipv6_scope_id_in_ip_list_refused(tmp_path, written):
    core = variant(tmp_path, "core.env", set={"NGX_LOAD_BALANCER_IPS": written})
    inst = variant(tmp_path, "installer.env", set={"PROXY_BINDING_IP": "2001:db8::10"})
    with pytest.raises(InputError):
        load(core=core, installer=inst)


@pytest.mark.parametrize("written", ["0.0.0.0/0", "198.51.100.0/24|0.0.0.0/0"])
def test_zero_prefix_in_ip_list_refused(tmp_path, written):
    core = variant(tmp_path, "core.env", set={"NGX_RATELIMIT_DISABLE_IPS": written})
    with pytest.raises(InputError):
        load(core=core)
