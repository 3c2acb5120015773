"""Issue 10, items 7, 11 and 14 on the unit level: the container log's mode, no plain
hash of an env file, the host's file key, what a re-up widens, the remembered files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from pathlib import Path

import pytest

from hostprep.errors import StateError
from hostprep.model import Container, EnvFile, Limits
from hostprep.paths import Paths
from hostprep.state import Store

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "env"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(Paths(tmp_path / "root"))


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- item 11: the container log ------------------------------------------------------

def test_container_log_created_0640_whatever_the_umask(store, open_umask):
    store.write_container_log("fin", "one\n", append=False)
    assert (mode(store.container_log("fin")), store.container_log("fin").read_text()) == (0o640, "one\n")


def test_container_log_existing_world_readable_file_is_fixed(store, open_umask):
    log = store.container_log("fin")
    log.parent.mkdir(parents=True)
    log.write_text("old\n")
    log.chmod(0o644)
    store.write_container_log("fin", "more\n", append=True)
    assert (mode(log), log.read_text()) == (0o640, "old\nmore\n")
    log.chmod(0o666)
    store.write_container_log("fin", "new\n", append=False)
    assert (mode(log), log.read_text()) == (0o640, "new\n")


def test_container_log_symlink_refused(store, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    log = store.container_log("fin")
    log.parent.mkdir(parents=True)
    log.symlink_to(target)
    with pytest.raises(StateError):
        store.write_container_log("fin", "x\n", append=False)
    assert target.read_text() == "precious\n"


def test_file_key_made_once_0600_and_not_by_a_dry_run(store, open_umask):
    assert store.file_key(create=False) is None
    assert store.file_key_path.exists() is False
    key = store.file_key()
    assert (len(key), mode(store.file_key_path), store.file_key(), store.file_key(create=False)) == (
        32, 0o600, key, key)


def test_file_key_of_the_wrong_size_refused(store):
    store.file_key_path.parent.mkdir(parents=True)
    store.file_key_path.write_bytes(b"short")
    with pytest.raises(StateError):
        store.file_key()


def test_log_text_names_files_without_their_sha256(store):
    from hostprep import envfiles
    from hostprep.records import container_log_text
    c = envfiles.load_container("fin", FIX / "finesse.env", FIX / "core.env", FIX / "installer.env", "eth1",
                                ["192.0.2.10/24"], key=store.file_key())
    text = container_log_text("fin", c, [], [], "up")
    files = [ln for ln in text.splitlines() if ln.startswith("# file ")]
    core = FIX / "core.env"
    assert len(files) == 3
    assert files[1].startswith(f"# file {core.resolve()} (core): {core.stat().st_size} bytes, modified ")
    assert files[1].endswith(f", hmac-sha256 {c.file('core').digest} (host key)")
    for f in ("finesse.env", "core.env", "installer.env"):
        assert hashlib.sha256((FIX / f).read_bytes()).hexdigest() not in text


# -- item 7: what a re-up widens, and which files it reads -----------------------------

def make(**kw) -> Container:
    base = dict(name="fin", template="finesse", ports=(8445,), dest=ipaddress.ip_address("192.0.2.10"),
                limits=Limits(10, 6, 8, 1, 1), hardening=True, restricted=True,
                load_balancers=(ipaddress.ip_network("198.51.100.0/24"),),
                exempt=(ipaddress.ip_network("203.0.113.7/32"),))
    base.update(kw)
    return Container(**base)


def widening(before, after) -> list[str]:
    from hostprep.plan import container_widening
    return container_widening(before, after)


def test_same_or_narrower_container_widens_nothing():
    assert widening(make(), make()) == []
    assert widening(make(restricted=False), make(restricted=True)) == []
    assert widening(make(), make(exempt=(), limits=Limits(5, 3, 4, 9, 9), ports=(8445,))) == []


def test_lost_core_lists_every_widening():
    """The reported bug: an up without --core turned restriction off and dropped LBs/exempt."""
    defaults = make(restricted=False, load_balancers=(),
                    exempt=tuple(ipaddress.ip_network(n) for n in ("192.168.1.69/32", "127.0.0.1/32")))
    assert widening(make(), defaults) == [
        "NGX_TRAFFIC_RESTRICTED true -> false: every source may reach ports 8445, not only the load balancers",
        "exempt from the limits (NGX_RATELIMIT_DISABLE_IPS, NGX_CLOUDCONNECT_CLIENT_IPS) added (2): "
        "192.168.1.69/32, 127.0.0.1/32"]


def test_each_kind_of_widening_is_listed():
    after = make(limits=Limits(11, 7, 9, 1, 1), ports=(8445, 8446), dest=ipaddress.ip_address("192.0.2.11"),
                 load_balancers=tuple(ipaddress.ip_network(f"198.51.100.{i}/32") for i in range(7)) +
                 (ipaddress.ip_network("198.51.100.0/24"),))
    assert widening(make(), after) == [
        "destination 192.0.2.10 -> 192.0.2.11: the ports are opened on 192.0.2.11",
        "ports added: 8446",
        "load balancers (NGX_LOAD_BALANCER_IPS) added (7): 198.51.100.0/32, 198.51.100.1/32, 198.51.100.2/32, "
        "198.51.100.3/32, 198.51.100.4/32 and 2 more",
        "IPTABLES_CONNECTION_LIMIT_ABOVE raised 10 -> 11",
        "IPTABLES_HASH_LIMIT_UPTO raised 6 -> 7",
        "IPTABLES_HASH_LIMIT_BURST raised 8 -> 9"]


def test_longer_ipv6_source_prefix_is_a_widening_shorter_is_not():
    six = dict(dest=ipaddress.ip_address("2001:db8::10"), load_balancers=(), restricted=False)
    assert (widening(make(**six), make(ipv6_source_prefix=128, **six)),
            widening(make(ipv6_source_prefix=128, **six), make(ipv6_source_prefix=56, **six)),
            widening(make(), make(ipv6_source_prefix=128))) == (
        ["HOSTPREP_IPV6_SOURCE_PREFIX raised 64 -> 128: each /128 gets the limits, not each /64"], [], [])


def test_hardening_switched_either_way_is_listed():
    assert widening(make(), make(hardening=False)) == [
        "NGX_IPTABLES_HARDENING 1 -> 0: the container's limits, exemptions and load-balancer restriction are "
        "removed (the base hardening keeps its ports closed)"]
    assert widening(make(hardening=False), make(restricted=False)) == [
        "NGX_IPTABLES_HARDENING 0 -> 1: ports 8445 on 192.0.2.10 are opened to the internet"]


def recorded(tmp_path: Path, roles=("env", "core", "installer")) -> Container:
    files = []
    for role in roles:
        path = tmp_path / f"{role}.env"
        path.write_text("X=1\n")
        files.append(EnvFile(str(path), "", role, 4, 0.0))
    return make(files=tuple(files))


def test_files_remembered_given_and_dropped(tmp_path):
    from hostprep.envfiles import choose_files
    prev = recorded(tmp_path)
    got = choose_files("fin", prev, env=None, core=None, installer=None)
    assert (got.env, got.core, got.installer, got.sources) == (
        tmp_path / "env.env", tmp_path / "core.env", tmp_path / "installer.env",
        {"env": "remembered", "core": "remembered", "installer": "remembered"})
    other = tmp_path / "other-core.env"
    got = choose_files("fin", prev, env=None, core=other, installer=None, no_installer=True)
    assert (got.core, got.installer, got.sources) == (other, None, {
        "env": "remembered", "core": "given", "installer": "dropped (--no-installer)"})
    assert got.describe() == (f"env {tmp_path / 'env.env'} (remembered); core {other} (given); "
                              "installer: dropped (--no-installer)")


def test_files_of_a_new_container_and_errors(tmp_path):
    from hostprep.envfiles import choose_files
    from hostprep.errors import InputError
    got = choose_files("fin", None, env=FIX / "finesse.env", core=None, installer=None, no_core=True)
    assert (got.core, got.sources["core"]) == (None, "none")
    with pytest.raises(InputError) as info:
        choose_files("fin", None, env=None, core=None, installer=None)
    assert info.value.field == "--env"
    with pytest.raises(InputError) as info:
        choose_files("fin", None, env=FIX / "finesse.env", core=FIX / "core.env", installer=None, no_core=True)
    assert info.value.field == "--no-core"
    prev = recorded(tmp_path)
    (tmp_path / "core.env").unlink()
    with pytest.raises(InputError) as info:
        choose_files("fin", prev, env=None, core=None, installer=None)
    assert (info.value.field, info.value.fix) == ("--core", "give --core PATH, or --no-core to go on without it")
    assert choose_files("fin", prev, env=None, core=None, installer=None, no_core=True).core is None


# -- item 14: status does not re-parse what is already loaded or already read ---------------

def test_ipset_save_ipv4_members_not_parsed_again(monkeypatch):
    from hostprep.observed import parse_ipset_save
    text = ("create hostprep-0123abcd-ex4 hash:net family inet hashsize 1024 maxelem 65536\n"
            + "".join(f"add hostprep-0123abcd-ex4 198.18.{i // 256}.{i % 256}\n" for i in range(1000))
            + "add hostprep-0123abcd-ex4 203.0.113.0/24\nadd hostprep-0123abcd-ex4 10.0.0.0/8\n"
            + "create hostprep-0123abcd-ex6 hash:net family inet6 hashsize 1024 maxelem 65536\n"
            + "add hostprep-0123abcd-ex6 2001:db8::/64\n")
    calls = []
    real = ipaddress.ip_network
    monkeypatch.setattr(ipaddress, "ip_network", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    got = parse_ipset_save(text, "hostprep-")
    assert calls == ["2001:db8::/64"]          # only the IPv6 member, whose text forms vary
    assert got["hostprep-0123abcd-ex4"] == frozenset(
        [f"198.18.{i // 256}.{i % 256}/32" for i in range(1000)] + ["203.0.113.0/24", "10.0.0.0/8"])
    assert got["hostprep-0123abcd-ex6"] == frozenset(["2001:db8::/64"])


@pytest.mark.parametrize("text", ["192.0.2.7", "192.0.2.0/24", "192.0.2.7/24", "0.0.0.0/1", "255.255.255.255/32",
                                  "192.0.2.0/024", "2001:db8::7", "2001:DB8::/32"])
def test_ipset_member_normalised_as_ipaddress_does(text):
    from hostprep.observed import normalise_member
    assert normalise_member(text) == str(ipaddress.ip_network(text, strict=False))


def test_container_records_parsed_once_per_process_until_changed(store, monkeypatch):
    c = make(restricted=False, load_balancers=(), exempt=tuple(
        ipaddress.ip_network(f"198.18.0.{i}") for i in range(50)))
    store.save_container(c)
    parsed = []
    real = Container.from_dict.__func__
    monkeypatch.setattr(Container, "from_dict", classmethod(lambda cls, d: parsed.append(d["name"]) or real(cls, d)))
    assert (store.containers(), store.containers(), parsed) == ({"fin": c}, {"fin": c}, ["fin"])
    changed = make(restricted=False, load_balancers=(), exempt=())
    store.save_container(changed)
    assert (store.containers(), parsed) == ({"fin": changed}, ["fin", "fin"])
