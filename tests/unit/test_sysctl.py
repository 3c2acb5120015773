"""Kernel profile (apply -k): the shipped profile, the sysctl.d parser and search
path, and check/apply/flush against a fake /proc/sys made of temporary files.

No root, no real /proc/sys: every Kernel here gets two temporary directories as
its roots (net.* keys under one, kernel.*, vm.*, fs.*, dev.* under the other).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from hostprep import sysctl
from hostprep.errors import CommandFailed, RefusedError
from hostprep.data import data_dir
from hostprep.paths import Paths
from hostprep.sysctl import DROPIN_NAME, Kernel, Setting

BASELINE_LETTERS = "CSDBLXR"
# A baseline reference in a comment: one of the letters as a word of its own
# ("C 3.3.1", "B sysctl-19", "(X)", "L,").
LETTER_RE = re.compile(r"(?<![\w.-])[" + BASELINE_LETTERS + r"](?![\w-])")

# Values a stock kernel has before hostprep (Debian 12 / RHEL 9 defaults), all
# different from the profile where the distribution differs from it.
STOCK = {
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.send_redirects": "1",
    "net.ipv4.conf.default.send_redirects": "1",
    "net.ipv4.icmp_ignore_bogus_error_responses": "1",
    "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.icmp_ratelimit": "1000",
    "net.ipv4.icmp_ratemask": "6168",
    "net.ipv4.conf.all.accept_redirects": "1",
    "net.ipv4.conf.default.accept_redirects": "1",
    "net.ipv4.conf.all.secure_redirects": "1",
    "net.ipv4.conf.default.secure_redirects": "1",
    "net.ipv6.conf.all.accept_redirects": "1",
    "net.ipv6.conf.default.accept_redirects": "1",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv4.conf.default.accept_source_route": "1",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv6.conf.default.accept_source_route": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.conf.all.log_martians": "0",
    "net.ipv4.conf.default.log_martians": "0",
    "net.ipv4.conf.all.arp_ignore": "0",
    "net.ipv4.conf.all.arp_announce": "0",
    "net.ipv6.conf.all.accept_ra": "1",
    "net.ipv6.conf.default.accept_ra": "1",
    "net.ipv4.tcp_syncookies": "1",
    "net.ipv4.tcp_rfc1337": "0",
    "net.ipv4.tcp_syn_retries": "6",
    "net.ipv4.tcp_synack_retries": "5",
    "net.ipv4.tcp_fin_timeout": "60",
    "net.core.somaxconn": "4096",
    "net.core.netdev_max_backlog": "1000",
    "net.core.bpf_jit_harden": "0",
    "kernel.randomize_va_space": "2",
    "kernel.yama.ptrace_scope": "0",
    "kernel.kptr_restrict": "0",
    "kernel.dmesg_restrict": "0",
    "kernel.sysrq": "16",
    "kernel.core_uses_pid": "0",
    "kernel.perf_event_paranoid": "2",
    "kernel.msgmnb": "16384",
    "kernel.msgmax": "8192",
    "dev.tty.ldisc_autoload": "1",
    "fs.suid_dumpable": "0",
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
    "fs.protected_fifos": "0",
    "fs.protected_regular": "0",
    "vm.swappiness": "60",
    "vm.mmap_min_addr": "4096",
}


def profile_map() -> dict[str, str]:
    return {s.key: s.value for s in sysctl.profile()}


def stock(key: str) -> str:
    # A key added to the profile later gets a value that differs from any profile value.
    return STOCK.get(key, "12345")


# -- a fake /proc/sys -----------------------------------------------------------


def fake_kernel(tmp_path: Path, values: dict[str, str | None] | None = None,
                cls: type[Kernel] = Kernel) -> Kernel:
    """A Kernel whose roots are temporary directories holding one file per key.

    ``values``: key -> value (None: the key does not exist); default: STOCK for
    every profile key.
    """
    k = cls(net_root=tmp_path / "proc-net", other_root=tmp_path / "proc-other")
    k.net_root.mkdir(exist_ok=True)
    k.other_root.mkdir(exist_ok=True)
    if values is None:
        values = {key: stock(key) for key in profile_map()}
    for key, value in values.items():
        if value is not None:
            p = k.path(key)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(value + "\n")
    return k


def snapshot(k: Kernel) -> dict[str, str]:
    """Every file under both roots, path -> exact text (for byte-exact comparisons)."""
    out = {}
    for root in (k.net_root, k.other_root):
        for f in sorted(root.rglob("*")):
            if f.is_file():
                out[str(f)] = f.read_text()
    return out


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    root = tmp_path / "root"
    root.mkdir()
    return Paths(root)


class RefusingKernel(Kernel):
    """The kernel answers EINVAL for some values, as Linux does for tcp_syn_retries = 0."""

    refuse: dict[str, str] = {}

    def write(self, key: str, value: str) -> str | None:
        if self.refuse.get(key) == value:
            return "Invalid argument"
        return super().write(key, value)


# -- the shipped profile ----------------------------------------------------------


def key_lines(text: str) -> list[int]:
    return [i for i, ln in enumerate(text.splitlines())
            if ln.strip() and not ln.lstrip().startswith(("#", ";")) and "=" in ln]


def undocumented_keys(text: str) -> list[str]:
    """Key lines not directly preceded by a '#' comment block naming a baseline letter.

    The block is the run of '# ' lines right above the key (section headers '## '
    excluded); a blank line or another key line ends it.
    """
    lines = text.splitlines()
    bad = []
    for i in key_lines(text):
        block = []
        j = i - 1
        while j >= 0 and lines[j].startswith("#") and not lines[j].startswith("##"):
            block.append(lines[j])
            j -= 1
        if not block or not any(LETTER_RE.search(ln.lstrip("# ")) for ln in block):
            bad.append(lines[i].split("=")[0].strip())
    return bad


def test_the_comment_checker_can_fail():
    text = ("# Why (C 3.3.1).\nnet.a = 1\n"
            "net.b = 2\n"                         # no comment at all
            "# A comment without any baseline.\nnet.c = 3\n"
            "# Why (X)\n\nnet.d = 4\n"            # blank line between
            "## Section (C)\nnet.e = 5\n"         # only a section header
            "# CSV is not a letter (CAT)\nnet.f = 6\n")
    assert undocumented_keys(text) == ["net.b", "net.c", "net.d", "net.e", "net.f"]


def test_every_key_of_the_rendered_profile_has_a_why_comment_naming_a_baseline():
    text = sysctl.render()
    assert len(key_lines(text)) == len(sysctl.profile())
    assert undocumented_keys(text) == []


def test_every_key_of_the_shipped_template_has_a_comment_line_above_it():
    """The template itself (what a reviewer reads): each key() call follows a '#' line."""
    lines = (data_dir("sysctl.d") / f"{DROPIN_NAME}.j2").read_text().splitlines()
    calls = [i for i, ln in enumerate(lines) if ln.startswith("{{ key(")]
    assert len(calls) == len(sysctl.profile())
    assert [lines[i] for i in calls if not lines[i - 1].startswith("# ")] == []


def test_profile_keys_are_unique_and_every_line_is_a_comment_a_key_or_blank():
    keys = [s.key for s in sysctl.profile()]
    assert len(keys) == len(set(keys))
    odd = [ln for ln in sysctl.render().splitlines()
           if ln.strip() and not ln.startswith("#") and not re.fullmatch(r"[a-z0-9_.]+ = \S+", ln)]
    assert odd == []


def test_tcp_syn_retries_is_valid_not_the_originals_zero():
    p = profile_map()
    assert int(p["net.ipv4.tcp_syn_retries"]) >= 1       # the kernel minimum; 0 is EINVAL
    assert p["net.ipv4.tcp_syn_retries"] == "2"
    assert int(p["net.ipv4.tcp_synack_retries"]) >= 1


def test_somaxconn_is_not_lowered():
    assert int(profile_map()["net.core.somaxconn"]) >= 4096


def test_ip_forward_is_on_for_containers():
    assert profile_map()["net.ipv4.ip_forward"] == "1"


@pytest.mark.parametrize("key", ["kernel.modules_disabled", "user.max_user_namespaces"])
def test_dangerous_keys_are_not_set(key):
    assert key not in profile_map()
    # ... not even with another value, nor commented in as a key line.
    assert [ln for ln in sysctl.render().splitlines() if ln.lstrip("-").startswith(key)] == []


def test_rp_filter_is_strict_as_cis_wants():
    p = profile_map()
    assert (p["net.ipv4.conf.all.rp_filter"], p["net.ipv4.conf.default.rp_filter"]) == ("1", "1")


def test_render_without_missing_prefixes_nothing():
    assert [s.key for s in sysctl.profile() if s.ignore_failure] == []
    assert [ln for ln in sysctl.render().splitlines() if ln.startswith("-")] == []


@pytest.mark.parametrize("key", ["net.core.netdev_max_backlog", "kernel.yama.ptrace_scope"])
def test_render_missing_prefixes_exactly_that_key(key):
    plain = sysctl.render().splitlines()
    marked = sysctl.render(frozenset({key})).splitlines()
    changed = [(a, b) for a, b in zip(plain, marked) if a != b]
    assert len(plain) == len(marked)
    assert changed == [(f"{key} = {profile_map()[key]}", f"-{key} = {profile_map()[key]}")]
    assert [s.key for s in sysctl.parse_conf("\n".join(marked)) if s.ignore_failure] == [key]


# -- parse_conf ---------------------------------------------------------------------


def test_parse_conf_forms():
    text = "\n".join([
        "# a comment = not a key",
        "; a semicolon comment = not a key",
        "   # an indented comment = not a key",
        "",
        "-net.core.bpf_jit_harden = 2",
        "kernel.sysrq=0",
        "  net.ipv4.tcp_rmem \t=   4096   87380\t6291456  ",
        "kernel.core_pattern = |/bin/false a=b",
        "kernel/yama/ptrace_scope = 1",
        "- vm.swappiness = 1",
        "a line without an equals sign",
    ])
    assert sysctl.parse_conf(text) == [
        Setting("net.core.bpf_jit_harden", "2", True),
        Setting("kernel.sysrq", "0", False),
        Setting("net.ipv4.tcp_rmem", "4096 87380 6291456", False),
        Setting("kernel.core_pattern", "|/bin/false a=b", False),
        Setting("kernel.yama.ptrace_scope", "1", False),
        Setting("vm.swappiness", "1", True),
    ]


def test_parse_conf_of_the_rendered_profile_round_trips():
    settings = sysctl.parse_conf(sysctl.render())
    assert settings == sysctl.profile()
    assert all(not s.ignore_failure for s in settings)
    assert len(settings) == len(key_lines(sysctl.render()))


def test_parse_conf_slash_form_keeps_dots_of_interface_names():
    assert sysctl.parse_conf("net/ipv4/conf/eth0.100/rp_filter = 2") == [
        Setting("net.ipv4.conf.eth0/100.rp_filter", "2", False)]


# -- search path -------------------------------------------------------------------


def put(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_search_files_shadowing_order_and_sysctl_conf_last(tmp_path):
    r = tmp_path
    vendor_50 = put(r, "usr/lib/sysctl.d/50-a.conf", "vm.swappiness = 10\nkernel.sysrq = 1\n")
    etc_50 = put(r, "etc/sysctl.d/50-a.conf", "vm.swappiness = 20\n")
    vendor_10 = put(r, "usr/lib/sysctl.d/10-b.conf", "vm.swappiness = 5\nfs.suid_dumpable = 2\n")
    run_60 = put(r, "run/sysctl.d/60-c.conf", "fs.suid_dumpable = 1\n")
    local_55 = put(r, "usr/local/lib/sysctl.d/55-d.conf", "kernel.msgmax = 1\n")
    lib_05 = put(r, "lib/sysctl.d/05-e.conf", "kernel.msgmnb = 1\n")
    put(r, "etc/sysctl.d/README", "vm.swappiness = 99\n")             # not *.conf
    put(r, "etc/sysctl.d/70-x.conf.rpmsave", "vm.swappiness = 98\n")  # not *.conf
    legacy = put(r, "etc/sysctl.conf", "kernel.msgmax = 2\n")
    put(r, "etc/sysctl.d/99-z.conf", "kernel.msgmax = 3\n")
    z99 = r / "etc/sysctl.d/99-z.conf"

    files = sysctl.search_files(r)
    assert files == [lib_05, vendor_10, etc_50, local_55, run_60, z99, legacy]
    assert vendor_50 not in files

    src = sysctl.effective_sources(r)
    assert src == {
        "vm.swappiness": (etc_50, "20"),        # the shadowed vendor file's 10 never counts
        "fs.suid_dumpable": (run_60, "1"),      # 60-c after 10-b, across directories
        "kernel.msgmax": (legacy, "2"),         # /etc/sysctl.conf after 99-z.conf
        "kernel.msgmnb": (lib_05, "1"),
    }
    assert "kernel.sysrq" not in src


def test_search_files_masking_with_dev_null_and_empty_root(tmp_path):
    assert sysctl.search_files(tmp_path) == []
    assert sysctl.effective_sources(tmp_path) == {}
    put(tmp_path, "usr/lib/sysctl.d/50-a.conf", "vm.swappiness = 10\n")
    (tmp_path / "etc/sysctl.d").mkdir(parents=True)
    (tmp_path / "etc/sysctl.d/50-a.conf").symlink_to("/dev/null")
    assert sysctl.search_files(tmp_path) == [tmp_path / "etc/sysctl.d/50-a.conf"]
    assert sysctl.effective_sources(tmp_path) == {}


# -- Kernel paths ---------------------------------------------------------------------


def test_kernel_routes_net_keys_and_the_others_to_their_roots(tmp_path, monkeypatch):
    k = Kernel(net_root=tmp_path / "n", other_root=tmp_path / "o")
    assert k.path("net.ipv4.ip_forward") == tmp_path / "n/net/ipv4/ip_forward"
    assert k.path("kernel.yama.ptrace_scope") == tmp_path / "o/kernel/yama/ptrace_scope"
    assert k.path("vm.swappiness") == tmp_path / "o/vm/swappiness"
    monkeypatch.setenv("HOSTPREP_PROC_SYS", str(tmp_path / "n2"))
    monkeypatch.setenv("HOSTPREP_PROC_SYS_NONNET", str(tmp_path / "o2"))
    k = Kernel()
    assert (k.path("net.core.somaxconn"), k.path("fs.suid_dumpable")) == (
        tmp_path / "n2/net/core/somaxconn", tmp_path / "o2/fs/suid_dumpable")
    monkeypatch.delenv("HOSTPREP_PROC_SYS_NONNET")
    assert Kernel().path("fs.suid_dumpable") == tmp_path / "n2/fs/suid_dumpable"
    monkeypatch.delenv("HOSTPREP_PROC_SYS")
    assert Kernel().path("fs.suid_dumpable") == Path("/proc/sys/fs/suid_dumpable")


def test_kernel_read_folds_white_space_and_write_reports_errors(tmp_path):
    k = fake_kernel(tmp_path, {"net.ipv4.tcp_rmem": "4096\t87380   6291456"})
    assert k.read("net.ipv4.tcp_rmem") == "4096 87380 6291456"
    assert k.read("net.ipv4.nothing") is None
    assert k.has("net.ipv4.tcp_rmem") is True
    assert k.has("net.ipv4.nothing") is False
    assert k.write("vm.swappiness", "1") == "No such file or directory"
    assert k.write("net.ipv4.tcp_rmem", "1 2 3") is None
    assert k.path("net.ipv4.tcp_rmem").read_text() == "1 2 3\n"


# -- check() ----------------------------------------------------------------------


def applied_kernel(tmp_path: Path, paths: Paths, missing: set[str] = frozenset()) -> Kernel:
    """Every profile key live at its profile value and the drop-in in place."""
    values = {k: (None if k in missing else v) for k, v in profile_map().items()}
    k = fake_kernel(tmp_path, values)
    put(paths.root, f"etc/sysctl.d/{DROPIN_NAME}", sysctl.render(frozenset(missing)))
    return k


def states(reports) -> dict[str, str]:
    return {r.key: r.state for r in reports}


def test_check_all_ok(tmp_path, paths):
    k = applied_kernel(tmp_path, paths)
    reports = sysctl.check(k, paths)
    dropin = str(paths.root / "etc/sysctl.d" / DROPIN_NAME)
    assert [r.key for r in reports] == [s.key for s in sysctl.profile()]
    assert {r.state for r in reports} == {"ok"}
    assert {(r.desired, r.live, r.source) for r in reports if r.key == "net.core.somaxconn"} == {
        ("4096", "4096", dropin)}
    assert [r.key for r in reports if r.source != dropin] == []


def test_check_drift_when_a_live_value_differs(tmp_path, paths):
    k = applied_kernel(tmp_path, paths)
    k.path("net.ipv4.tcp_rfc1337").write_text("0\n")
    k.path("vm.swappiness").write_text("60\n")
    reports = {r.key: r for r in sysctl.check(k, paths)}
    bad = {key: (r.state, r.live, r.detail) for key, r in reports.items() if r.state != "ok"}
    assert bad == {"net.ipv4.tcp_rfc1337": ("drift", "0", "live value 0"),
                   "vm.swappiness": ("drift", "60", "live value 60")}


def test_check_overridden_by_a_later_file_is_named(tmp_path, paths):
    k = applied_kernel(tmp_path, paths)
    later = put(paths.root, "etc/sysctl.d/99-local.conf", "net.ipv4.tcp_syncookies = 0\n"
                "net.core.somaxconn = 4096\n")                       # same value: no conflict
    earlier = put(paths.root, "usr/lib/sysctl.d/50-default.conf", "kernel.sysrq = 16\n")
    legacy = put(paths.root, "etc/sysctl.conf", "vm.swappiness=30\n")
    reports = {r.key: r for r in sysctl.check(k, paths)}
    bad = {key: (r.state, r.source, r.live, r.detail) for key, r in reports.items() if r.state != "ok"}
    assert bad == {
        "net.ipv4.tcp_syncookies": ("overridden", str(later), "1", f"{later} sets 0 after {DROPIN_NAME}"),
        "vm.swappiness": ("overridden", str(legacy), "1", f"{legacy} sets 30 after {DROPIN_NAME}"),
    }
    assert reports["net.core.somaxconn"].source == str(later)
    assert reports["kernel.sysrq"].source == str(paths.root / "etc/sysctl.d" / DROPIN_NAME)
    assert earlier.is_file()


def test_check_missing_key_is_reported(tmp_path, paths):
    k = applied_kernel(tmp_path, paths, missing={"net.core.netdev_max_backlog", "kernel.sysrq"})
    reports = {r.key: r for r in sysctl.check(k, paths)}
    bad = {key: (r.state, r.live) for key, r in reports.items() if r.state != "ok"}
    assert bad == {"net.core.netdev_max_backlog": ("missing", None), "kernel.sysrq": ("missing", None)}
    assert reports["kernel.sysrq"].detail == "the running kernel has no such key"


# -- apply_kernel / flush_kernel ------------------------------------------------------


def record(paths: Paths) -> dict:
    return json.loads((paths.state_dir / "kernel.json").read_text())


def test_apply_writes_every_present_key_and_records_previous_values(tmp_path, paths):
    missing = {"net.core.netdev_max_backlog", "net.core.bpf_jit_harden", "kernel.yama.ptrace_scope"}
    k = fake_kernel(tmp_path, {key: (None if key in missing else stock(key)) for key in profile_map()})
    applied = sysctl.apply_kernel(k, paths)
    report, notes = applied.report, applied.notes

    want = profile_map()
    assert {key: k.read(key) for key in want} == {key: (None if key in missing else v) for key, v in want.items()}
    assert states(report) == {key: ("missing" if key in missing else "ok") for key in want}
    assert notes == [f"{key} is not in this kernel: skipped (written as '-{key}')" for key in sorted(missing)]
    dropin = paths.root / "etc/sysctl.d" / DROPIN_NAME
    assert dropin.read_text() == sysctl.render(frozenset(missing))
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert record(paths) == {"previous": {key: stock(key) for key in want if key not in missing},
                             "applied": True}
    # the missing keys were not created in the fake /proc/sys
    assert [key for key in missing if k.path(key).exists()] == []


def test_a_directory_where_a_key_should_be_is_treated_as_missing(tmp_path, paths):
    k = fake_kernel(tmp_path)
    k.path("net.ipv4.tcp_rfc1337").unlink()
    k.path("net.ipv4.tcp_rfc1337").mkdir()
    applied = sysctl.apply_kernel(k, paths)
    report, notes = applied.report, applied.notes
    assert states(report)["net.ipv4.tcp_rfc1337"] == "missing"
    assert notes == ["net.ipv4.tcp_rfc1337 is not in this kernel: skipped (written as '-net.ipv4.tcp_rfc1337')"]


def test_a_second_apply_keeps_the_first_previous_values(tmp_path, paths):
    k = fake_kernel(tmp_path)
    sysctl.apply_kernel(k, paths)
    first = record(paths)
    # someone changes values by hand, then apply -k runs again
    k.path("vm.swappiness").write_text("30\n")
    k.path("net.ipv4.tcp_syn_retries").write_text("4\n")
    report = sysctl.apply_kernel(k, paths).report
    assert record(paths) == first
    assert record(paths)["previous"]["vm.swappiness"] == "60"
    assert (k.read("vm.swappiness"), k.read("net.ipv4.tcp_syn_retries")) == ("1", "2")
    assert {r.state for r in report} == {"ok"}


def test_apply_refused_key_fails_after_loading_the_others(tmp_path, paths):
    RefusingKernel.refuse = {"net.ipv4.tcp_syn_retries": "2", "kernel.msgmax": "65536"}
    k = fake_kernel(tmp_path, cls=RefusingKernel)
    with pytest.raises(CommandFailed) as exc:
        sysctl.apply_kernel(k, paths)
    assert exc.value.problem == ("the kernel refused: net.ipv4.tcp_syn_retries = 2: Invalid argument; "
                                 "kernel.msgmax = 65536: Invalid argument")
    assert str(paths.root / "etc/sysctl.d" / DROPIN_NAME) in exc.value.fix
    refused = {"net.ipv4.tcp_syn_retries", "kernel.msgmax"}
    want = profile_map()
    assert {key: k.read(key) for key in want} == {key: (stock(key) if key in refused else v)
                                                  for key, v in want.items()}
    # the values before are recorded, so flush --kernel can still undo the loaded keys
    assert record(paths)["previous"] == {key: stock(key) for key in want}
    RefusingKernel.refuse = {}
    restored = sysctl.flush_kernel(k, paths)
    assert {key: k.read(key) for key in want} == {key: stock(key) for key in want}
    assert len(restored) == len([key for key in want if key not in refused and want[key] != stock(key)])


def test_flush_restores_exactly_and_removes_dropin_and_record(tmp_path, paths):
    k = fake_kernel(tmp_path, {**{key: stock(key) for key in profile_map()},
                               "net.ipv4.tcp_rmem": "4096\t131072  6291456",   # not a profile key
                               "kernel.sysrq": None})
    before = snapshot(k)
    sysctl.apply_kernel(k, paths)
    assert snapshot(k) != before
    restored = sysctl.flush_kernel(k, paths)
    assert snapshot(k) == before                            # byte for byte, untouched keys too
    assert restored == [f"{key} = {stock(key)}" for key, v in profile_map().items()
                        if key != "kernel.sysrq" and v != stock(key)]
    assert not (paths.root / "etc/sysctl.d" / DROPIN_NAME).exists()
    assert not (paths.state_dir / "kernel.json").exists()
    assert not k.path("kernel.sysrq").exists()
    with pytest.raises(RefusedError):
        sysctl.flush_kernel(k, paths)


def test_flush_restores_the_first_values_after_two_applies(tmp_path, paths):
    k = fake_kernel(tmp_path)
    sysctl.apply_kernel(k, paths)
    k.path("vm.swappiness").write_text("30\n")
    sysctl.apply_kernel(k, paths)
    sysctl.flush_kernel(k, paths)
    assert {key: k.read(key) for key in profile_map()} == {key: stock(key) for key in profile_map()}


def test_flush_that_cannot_restore_keeps_the_record(tmp_path, paths):
    k = fake_kernel(tmp_path, cls=RefusingKernel)
    RefusingKernel.refuse = {}
    sysctl.apply_kernel(k, paths)
    RefusingKernel.refuse = {"vm.swappiness": "60"}
    try:
        with pytest.raises(CommandFailed) as exc:
            sysctl.flush_kernel(k, paths)
    finally:
        RefusingKernel.refuse = {}
    assert exc.value.problem == "could not restore: vm.swappiness = 60: Invalid argument"
    assert (paths.state_dir / "kernel.json").is_file()
    assert k.read("vm.swappiness") == "1"
    assert k.read("net.ipv4.tcp_syn_retries") == "6"        # the others are restored
    sysctl.flush_kernel(k, paths)                           # a retry finishes the job
    assert k.read("vm.swappiness") == "60"
    assert not (paths.state_dir / "kernel.json").exists()


def test_flush_without_a_record_is_refused(tmp_path, paths):
    with pytest.raises(RefusedError) as exc:
        sysctl.flush_kernel(fake_kernel(tmp_path), paths)
    assert exc.value.problem == "no kernel settings were applied by hostprep"


def test_flush_restores_a_key_that_appeared_after_the_first_apply(tmp_path, paths):
    k = fake_kernel(tmp_path, {key: (None if key == "kernel.yama.ptrace_scope" else stock(key))
                               for key in profile_map()})
    sysctl.apply_kernel(k, paths)
    p = k.path("kernel.yama.ptrace_scope")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("0\n")                                     # yama appears
    sysctl.apply_kernel(k, paths)
    assert k.read("kernel.yama.ptrace_scope") == "1"
    sysctl.flush_kernel(k, paths)
    assert k.read("kernel.yama.ptrace_scope") == "0"
