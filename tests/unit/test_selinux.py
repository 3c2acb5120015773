"""selinux: state from fixture files, the check before apply, install/remove argv, the module compiles."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hostprep import selinux
from hostprep.errors import CommandFailed, InputError, MissingBinary, RefusedError, StateError
from hostprep.runner import Runner
from hostprep.selinux import SelinuxState, check_enforcing, ignore_from_core, read_state

RHEL_CONFIG = """\
# This file controls the state of SELinux on the system.
# SELINUX= can take one of these three values:
#     enforcing - SELinux security policy is enforced.
#     permissive - SELinux prints warnings instead of enforcing.
#     disabled - No SELinux policy is loaded.
SELINUX={mode}
# SELINUXTYPE= can take one of these three values:
#     targeted - Targeted processes are protected,
#     minimum - Modification of targeted policy. Only selected processes are protected.
#     mls - Multi Level Security protection.
SELINUXTYPE=targeted
"""


def host(tmp_path: Path, enforce: str | None, mode: str | None, config_text: str | None = None):
    """A fake selinuxfs (``enforce`` None: not mounted) and /etc/selinux/config (None: absent)."""
    fs = tmp_path / "sys/fs/selinux"
    if enforce is not None:
        fs.mkdir(parents=True)
        (fs / "enforce").write_text(enforce)
    cfg = tmp_path / "etc/selinux/config"
    if mode is not None or config_text is not None:
        cfg.parent.mkdir(parents=True)
        cfg.write_text(config_text if config_text is not None else RHEL_CONFIG.format(mode=mode))
    return fs, cfg


# -- read_state ------------------------------------------------------------------

def test_enforcing(tmp_path):
    state = read_state(*host(tmp_path, "1", "enforcing"))
    assert state == SelinuxState(True, "enforcing", "enforcing", "targeted", False)
    assert state.describe() == "SELinux enforcing, /etc/selinux/config: SELINUX=enforcing, policy targeted"
    assert state.as_dict() == {"present": True, "config_present": True, "runtime": "enforcing", "configured": "enforcing",
                               "policy": "targeted", "reboot_required": False, "differs": False}


def test_permissive(tmp_path):
    state = read_state(*host(tmp_path, "0\n", "permissive"))
    assert state == SelinuxState(True, "permissive", "permissive", "targeted", False)


def test_disabled_no_selinuxfs(tmp_path):
    state = read_state(*host(tmp_path, None, "disabled"))
    assert state == SelinuxState(False, "disabled", "disabled", "targeted", False)
    assert state.describe() == ("SELinux disabled (no selinuxfs), /etc/selinux/config: SELINUX=disabled, "
                                "policy targeted")


def test_no_selinuxfs_no_config(tmp_path):
    state = read_state(*host(tmp_path, None, None))
    assert state == SelinuxState(False, "disabled", None, None, False, config_present=False)
    assert state.describe() == "SELinux disabled (no selinuxfs), /etc/selinux/config: missing"


def test_selinuxfs_dir_without_enforce_file(tmp_path):
    fs, cfg = host(tmp_path, None, "enforcing")
    fs.mkdir(parents=True)
    assert read_state(fs, cfg) == SelinuxState(False, "disabled", "enforcing", "targeted", True)


def test_config_enforcing_runtime_permissive_needs_no_reboot(tmp_path):
    # setenforce 1 switches at once: differs, but no reboot.
    state = read_state(*host(tmp_path, "0", "enforcing"))
    assert state == SelinuxState(True, "permissive", "enforcing", "targeted", False)
    assert state.differs is True
    assert state.describe() == ("SELinux permissive, /etc/selinux/config: SELINUX=enforcing, policy targeted; "
                                "the next boot is enforcing")


def test_config_disabled_runtime_enforcing_needs_reboot(tmp_path):
    state = read_state(*host(tmp_path, "1", "disabled"))
    assert state == SelinuxState(True, "enforcing", "disabled", "targeted", True)
    assert state.describe() == ("SELinux enforcing, /etc/selinux/config: SELINUX=disabled, policy targeted; "
                                "reboot required to become disabled")


def test_config_enforcing_runtime_disabled_needs_reboot(tmp_path):
    state = read_state(*host(tmp_path, None, "enforcing"))
    assert state == SelinuxState(False, "disabled", "enforcing", "targeted", True)


def test_config_malformed_lines_ignored_values_case_insensitive(tmp_path):
    text = ("garbage line\n"
            "SELINUX=enforcin\n"          # not a mode: ignored
            "selinux=disabled\n"          # lower-case key: libselinux ignores it too
            "SELINUX = permissive\n"      # space before '=': not the key
            "  SELINUX=Permissive   # trailing comment\n"
            "SELINUX=enforcing\n"         # the first valid line wins
            "SELINUXTYPE=targeted extra\n"
            "SELINUXTYPE=mls\n"
            "SELINUXTYPE=targeted\n")
    state = read_state(*host(tmp_path, "0", None, text))
    assert state == SelinuxState(True, "permissive", "permissive", "mls", False)


def test_config_without_selinux_line(tmp_path):
    state = read_state(*host(tmp_path, "1", None, "SELINUXTYPE=targeted\n"))
    assert state == SelinuxState(True, "enforcing", None, "targeted", False)


def test_enforce_file_unexpected_content(tmp_path):
    fs, cfg = host(tmp_path, "2", "enforcing")
    with pytest.raises(StateError) as err:
        read_state(fs, cfg)
    assert err.value.field == str(fs / "enforce")
    assert err.value.problem == "unexpected content '2' (expected 0 or 1)"


def test_state_validated_at_construction():
    with pytest.raises(ValueError):
        SelinuxState(False, "enforcing", None, None, False)
    with pytest.raises(ValueError):
        SelinuxState(True, "Enforcing", None, None, False)


def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.delenv("HOSTPREP_SELINUXFS", raising=False)
    assert selinux.default_paths(tmp_path) == (Path("/sys/fs/selinux"), tmp_path / "etc/selinux/config")
    monkeypatch.setenv("HOSTPREP_SELINUXFS", str(tmp_path / "fs"))
    assert selinux.default_paths(Path("/")) == (tmp_path / "fs", Path("/etc/selinux/config"))


# -- check_enforcing and the ignore switches ------------------------------------------

ENFORCING = SelinuxState(True, "enforcing", "enforcing", "targeted", False)
PERMISSIVE = SelinuxState(True, "permissive", "permissive", "targeted", False)
PERMISSIVE_NOW = SelinuxState(True, "permissive", "enforcing", "targeted", False)
DISABLED = SelinuxState(False, "disabled", "disabled", "targeted", False)


def test_check_enforcing_passes():
    assert check_enforcing(ENFORCING, False, False) == []
    assert check_enforcing(ENFORCING, True, True) == []


def test_check_enforcing_warns_when_next_boot_is_not_enforcing():
    state = SelinuxState(True, "enforcing", "permissive", "targeted", False)
    assert check_enforcing(state, False, False) == [
        "SELinux is enforcing now but /etc/selinux/config has SELINUX=permissive: the next boot will not be "
        "enforcing (set SELINUX=enforcing there)"]


def test_check_refuses_permissive():
    with pytest.raises(RefusedError) as err:
        check_enforcing(PERMISSIVE, False, False)
    assert str(err.value) == (
        "SELinux: not enforcing (runtime: permissive, /etc/selinux/config: SELINUX=permissive) "
        "(to enable enforcing mode: run `setenforce 1` and set SELINUX=enforcing in /etc/selinux/config; "
        "to skip this check: --ignore-selinux, or NGX_IGNORE_SELINUX=true in the core.env given with --core)")


def test_check_refuses_permissive_config_enforcing():
    with pytest.raises(RefusedError) as err:
        check_enforcing(PERMISSIVE_NOW, False, False)
    assert err.value.fix.startswith("to enable enforcing mode: run `setenforce 1`; to skip")


def test_check_refuses_disabled():
    with pytest.raises(RefusedError) as err:
        check_enforcing(DISABLED, False, False)
    assert err.value.problem == "not enforcing (runtime: disabled, /etc/selinux/config: SELINUX=disabled)"
    assert err.value.fix == (
        "to enable enforcing mode: set SELINUX=enforcing in /etc/selinux/config, run `touch /.autorelabel` "
        "and reboot; to skip this check: --ignore-selinux, or NGX_IGNORE_SELINUX=true in the core.env "
        "given with --core")


def test_check_refuses_disabled_by_kernel_command_line():
    state = SelinuxState(False, "disabled", "enforcing", "targeted", True)
    with pytest.raises(RefusedError) as err:
        check_enforcing(state, False, False)
    assert err.value.fix == (
        "to enable enforcing mode: run `touch /.autorelabel` and reboot (if it stays disabled, remove selinux=0 "
        "from the kernel command line: `grubby --update-kernel ALL --remove-args selinux`); to skip this check: "
        "--ignore-selinux, or NGX_IGNORE_SELINUX=true in the core.env given with --core")


def test_ignore_flag_warns_in_one_short_line():
    # issue 15, item 7: one short line, no advice the admin chose to skip
    assert check_enforcing(DISABLED, True, False) == [
        "SELinux check skipped (--ignore-selinux): SELinux is disabled, the proxy containers are not confined"]


def test_ignore_core_warns():
    assert check_enforcing(PERMISSIVE, False, True) == [
        "SELinux check skipped (NGX_IGNORE_SELINUX=true in core.env (--core)): SELinux is permissive, the proxy "
        "containers are not confined"]


def test_ignore_both_named():
    warnings = check_enforcing(PERMISSIVE, True, True)
    assert warnings[0].startswith("SELinux check skipped (--ignore-selinux and NGX_IGNORE_SELINUX=true "
                                  "in core.env (--core)): ")


NOT_INSTALLED = SelinuxState(False, "disabled", None, None, False, config_present=False)


def test_not_installed_names_the_packages_not_autorelabel(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    with pytest.raises(RefusedError) as err:
        check_enforcing(NOT_INSTALLED, False, False)
    assert str(err.value) == (
        "SELinux: not installed on this host (no /etc/selinux/config) (to install it: apt-get install "
        "selinux-basics selinux-policy-default, run selinux-activate, reboot; to skip this check: "
        "--ignore-selinux, or NGX_IGNORE_SELINUX=true in the core.env given with --core)")
    assert check_enforcing(NOT_INSTALLED, True, False) == [
        "SELinux check skipped (--ignore-selinux): SELinux is not installed, the proxy containers are not "
        "confined"]


def test_read_state_without_a_config_file_is_not_installed(tmp_path):
    state = read_state(tmp_path / "no-selinuxfs", tmp_path / "no-config")
    assert (state.installed, state.config_present, state.as_dict()["config_present"]) == (False, False, False)


def write_core(tmp_path, text):
    core = tmp_path / "core.env"
    core.write_text(text)
    return core


@pytest.mark.parametrize("text, expected", [
    ("NGX_IGNORE_SELINUX=true\n", True),
    ("NGX_IGNORE_SELINUX=TRUE\n", True),
    ('NGX_IGNORE_SELINUX="True"\n', True),
    ("NGX_IGNORE_SELINUX=false\n", False),
    ("NGX_IGNORE_SELINUX=False\n", False),
    ("NGX_IGNORE_SELINUX=\n", False),
    ("NGX_IPTABLES_HARDENING=1\n", False),
])
def test_ignore_from_core(tmp_path, text, expected):
    assert ignore_from_core(write_core(tmp_path, text)) == expected


def test_ignore_from_core_without_core():
    assert ignore_from_core(None) is False


def test_ignore_from_core_bad_value(tmp_path):
    core = write_core(tmp_path, "NGX_IGNORE_SELINUX=maybe\n")
    with pytest.raises(InputError) as err:
        ignore_from_core(core)
    assert str(err.value) == (f"NGX_IGNORE_SELINUX in {core}: is not in expected format. Input Provided= "
                              "'maybe' (Expected true or false (default false))")


def test_ignore_from_core_missing_file(tmp_path):
    with pytest.raises(InputError) as err:
        ignore_from_core(tmp_path / "nope.env")
    assert err.value.field == "--core"


def test_ignore_from_core_then_check(tmp_path):
    # The apply path end to end: core.env says true -> warning, no refusal.
    ignore = ignore_from_core(write_core(tmp_path, "NGX_IGNORE_SELINUX=true\n"))
    state = read_state(*host(tmp_path, "0", "permissive"))
    assert len(check_enforcing(state, False, ignore)) == 1


# -- working directory validation -------------------------------------------------

@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "reverse_proxy" / "fin.v1"
    for sub in ("cache", "ssl", "logs", "conf", "html", "lua"):
        (wd / sub).mkdir(parents=True)
    return wd


def test_validate_working_dir_ok(workdir):
    assert selinux.validate_working_dir(workdir) == workdir


def test_validate_working_dir_resolves_symlinks(workdir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(workdir)
    assert selinux.validate_working_dir(link) == workdir


@pytest.mark.parametrize("path, problem", [
    ("reverse_proxy/finesse", "'reverse_proxy/finesse' is not an absolute path"),
    ("/home/nginx user/rp", "'/home/nginx user/rp' contains whitespace, a newline or a quote"),
    ("/home/nginx/rp\n", "'/home/nginx/rp\\n' contains whitespace, a newline or a quote"),
    ("/home/nginx/rp'x", "\"/home/nginx/rp'x\" contains whitespace, a newline or a quote"),
    ('/home/nginx/rp"x', "'/home/nginx/rp\"x' contains whitespace, a newline or a quote"),
    ("/home/nginx/rp(1)", "'/home/nginx/rp(1)' contains one of \\ ( ) [ ] { } * + ? | ^ $"),
    ("/", "/ is / or a top-level directory"),
    ("/home", "/home is / or a top-level directory"),
    ("/etc/nginx", "/etc/nginx is inside /etc"),
    ("/usr/share/rp", "/usr/share/rp is inside /usr"),
])
def test_validate_working_dir_refused(path, problem):
    with pytest.raises(InputError) as err:
        selinux.validate_working_dir(Path(path), must_exist=False)
    assert err.value.field == "--working-dir"
    assert err.value.problem == problem


def test_validate_working_dir_must_exist(tmp_path):
    with pytest.raises(InputError) as err:
        selinux.validate_working_dir(tmp_path / "nope")
    assert err.value.problem == f"{tmp_path / 'nope'} does not exist"
    assert selinux.validate_working_dir(tmp_path / "nope", must_exist=False) == tmp_path / "nope"


def test_validate_working_dir_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError) as err:
        selinux.validate_working_dir(tmp_path / "file")
    assert err.value.problem == f"{tmp_path / 'file'} is not a directory"


def test_fcontext_spec_escapes_dots():
    assert selinux.fcontext_spec(Path("/home/ngx/reverse_proxy/fin.v1"), "logs") == \
        r"/home/ngx/reverse_proxy/fin\.v1/logs(/.*)?"


# -- install / remove ---------------------------------------------------------------

SEMODULE_LIST = "base\ncontainer\nunconfined\n"


@pytest.fixture
def makefile(tmp_path):
    mk = tmp_path / "devel/Makefile"
    mk.parent.mkdir()
    mk.write_text("# stand-in for /usr/share/selinux/devel/Makefile\n")
    return mk


def fcontext_listing(entries: dict[str, str]) -> str:
    lines = ["SELinux fcontext                                   type               Context", ""]
    lines += [f"{spec:50} all files          system_u:object_r:{t}:s0" for spec, t in entries.items()]
    return "\n".join(lines) + "\n"


def spec(wd: Path, sub: str) -> str:
    return str(wd).replace(".", "\\.") + f"/{sub}(/.*)?"


def test_install_refuses_without_selinux(fake_runner, workdir, makefile):
    runner = fake_runner()
    with pytest.raises(RefusedError) as err:
        selinux.install(runner, workdir, DISABLED, devel_makefile=makefile)
    assert str(err.value) == ("SELinux: not enabled on this host (no selinuxfs): nothing to install "
                              "(enable SELinux first (SELINUX=enforcing in /etc/selinux/config, "
                              "`touch /.autorelabel`, reboot), then run this again)")
    assert runner.calls == []


def test_remove_refuses_without_selinux(fake_runner, workdir):
    runner = fake_runner()
    with pytest.raises(RefusedError) as err:
        selinux.remove(runner, workdir, DISABLED)
    assert err.value.problem == "not enabled on this host (no selinuxfs): nothing to remove"
    assert runner.calls == []


@pytest.mark.parametrize("missing, package", [
    ("semodule", "policycoreutils"),
    ("semanage", "policycoreutils-python-utils"),
    ("restorecon", "policycoreutils"),
    ("make", "selinux-policy-devel"),
])
def test_install_refuses_missing_tool(fake_runner, workdir, makefile, missing, package):
    runner = fake_runner(installed={"semodule", "semanage", "restorecon", "make"} - {missing})
    with pytest.raises(MissingBinary) as err:
        selinux.install(runner, workdir, ENFORCING, devel_makefile=makefile)
    assert err.value.field == missing
    assert err.value.fix.startswith(f"install it: dnf install {package}  or  apt-get install ")
    assert runner.calls == []


def test_install_refuses_missing_devel_makefile(fake_runner, workdir, tmp_path):
    runner = fake_runner()
    with pytest.raises(MissingBinary) as err:
        selinux.install(runner, workdir, ENFORCING, devel_makefile=tmp_path / "no/Makefile")
    assert str(err.value) == (f"{tmp_path / 'no/Makefile'}: file not found (the reference policy development "
                              "files) (install it: dnf install selinux-policy-devel  or  apt-get install "
                              "selinux-policy-dev)")


def test_remove_refuses_missing_semanage(fake_runner, workdir):
    runner = fake_runner(installed={"semodule", "restorecon"})
    with pytest.raises(MissingBinary) as err:
        selinux.remove(runner, workdir, ENFORCING)
    assert err.value.field == "semanage"
    assert runner.calls == []


def test_install_refuses_without_container_selinux(fake_runner, workdir, makefile):
    runner = fake_runner({("semodule", "-l"): (0, "base\nunconfined\n", "")})
    with pytest.raises(RefusedError) as err:
        selinux.install(runner, workdir, ENFORCING, devel_makefile=makefile)
    assert err.value.field == "container-selinux"
    assert [argv for argv, _, _ in runner.calls] == [["semodule", "-l"]]


def test_install_argv_sequence(fake_runner, workdir, makefile):
    runner = fake_runner({
        ("semodule", "-l"): (0, SEMODULE_LIST, ""),
        ("restorecon", "-R", "-F", "-v", str(workdir)): (
            0, f"Relabeled {workdir}/logs from a to b\nRelabeled {workdir}/ssl from a to b\n", ""),
    })
    done = selinux.install(runner, workdir, PERMISSIVE, devel_makefile=makefile)
    calls = [(argv, mutates) for argv, _, mutates in runner.calls]
    build = calls[1][0][2]
    assert build.startswith("/") and "hostprep-selinux-" in build
    assert not Path(build).exists()   # the temporary build directory is cleaned up
    assert calls == [
        (["semodule", "-l"], False),
        (["make", "-C", build, "-f", str(makefile), "hostprep_proxy.pp"], False),
        (["semodule", "-i", f"{build}/hostprep_proxy.pp"], True),
        (["semanage", "fcontext", "-l", "-C"], False),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_log_t", spec(workdir, "logs")], True),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_cache_t", spec(workdir, "cache")], True),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "conf")], True),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "ssl")], True),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "html")], True),
        (["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "lua")], True),
        (["restorecon", "-R", "-F", "-v", str(workdir)], True),
    ]
    assert done[0] == f"built hostprep_proxy.pp from {selinux.MODULE_DIR}"
    assert done[1] == "loaded policy module hostprep_proxy (semodule -i)"
    assert done[2] == f"file context {spec(workdir, 'logs')} -> hostprep_proxy_log_t (added)"
    assert done[-1] == f"relabelled {workdir} (restorecon -R -F -v): 2 path(s) changed"
    assert len(done) == 9


def test_install_copies_module_sources(fake_runner, workdir, makefile):
    seen = {}

    class Capturing(type(fake_runner())):
        def run(self, argv, **kw):
            if argv[0] == "make":
                seen["files"] = sorted(p.name for p in Path(argv[2]).iterdir())
            return super().run(argv, **kw)

    runner = Capturing({("semodule", "-l"): (0, SEMODULE_LIST, "")})
    selinux.install(runner, workdir, ENFORCING, devel_makefile=makefile)
    assert seen["files"] == ["hostprep_proxy.fc", "hostprep_proxy.if", "hostprep_proxy.te"]


def test_install_modifies_existing_and_skips_identical(fake_runner, workdir, makefile):
    existing = {spec(workdir, "logs"): "hostprep_proxy_log_t", spec(workdir, "conf"): "container_file_t"}
    runner = fake_runner({
        ("semodule", "-l"): (0, SEMODULE_LIST, ""),
        ("semanage", "fcontext", "-l", "-C"): (0, fcontext_listing(existing), ""),
    })
    done = selinux.install(runner, workdir, ENFORCING, devel_makefile=makefile)
    semanage = [argv for argv, _, _ in runner.calls if argv[:2] == ["semanage", "fcontext"]]
    assert semanage == [
        ["semanage", "fcontext", "-l", "-C"],
        ["semanage", "fcontext", "-a", "-t", "hostprep_proxy_cache_t", spec(workdir, "cache")],
        ["semanage", "fcontext", "-m", "-t", "hostprep_proxy_ro_t", spec(workdir, "conf")],
        ["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "ssl")],
        ["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "html")],
        ["semanage", "fcontext", "-a", "-t", "hostprep_proxy_ro_t", spec(workdir, "lua")],
    ]
    assert f"file context {spec(workdir, 'logs')} -> hostprep_proxy_log_t (already there)" in done
    assert f"file context {spec(workdir, 'conf')} -> hostprep_proxy_ro_t (changed from container_file_t)" in done


def test_install_notes_missing_subdirectories(fake_runner, tmp_path, makefile):
    wd = tmp_path / "rp"
    (wd / "logs").mkdir(parents=True)
    runner = fake_runner({("semodule", "-l"): (0, SEMODULE_LIST, "")})
    done = selinux.install(runner, wd, ENFORCING, devel_makefile=makefile)
    assert done[-1] == (f"not there yet: cache, conf, ssl, html, lua; run `restorecon -R {wd}` after creating "
                        "them (new directories inherit their parent's label)")


def test_install_compile_error_names_the_source(fake_runner, workdir, makefile):
    class FailingMake(type(fake_runner())):
        def run(self, argv, **kw):
            if argv[0] == "make":
                raise CommandFailed("make -C", "exit 2: make: *** [tmp/hostprep_proxy.mod] Error 1")
            return super().run(argv, **kw)

    runner = FailingMake({("semodule", "-l"): (0, SEMODULE_LIST, "")})
    with pytest.raises(CommandFailed) as err:
        selinux.install(runner, workdir, ENFORCING, devel_makefile=makefile)
    assert err.value.field == str(selinux.MODULE_DIR / "hostprep_proxy.te")
    assert [argv[0] for argv, _, _ in runner.calls] == ["semodule"]   # nothing loaded


def test_remove_argv_sequence(fake_runner, workdir):
    existing = {s: t for s, t in ((spec(workdir, sub), t) for sub, t in selinux.CONTEXTS)}
    existing["/srv/www(/.*)?"] = "httpd_sys_content_t"
    runner = fake_runner({
        ("semanage", "fcontext", "-l", "-C"): (0, fcontext_listing(existing), ""),
        ("semodule", "-l"): (0, SEMODULE_LIST + "hostprep_proxy\n", ""),
    })
    done = selinux.remove(runner, workdir, ENFORCING)
    assert [(argv, mutates) for argv, _, mutates in runner.calls] == [
        (["semanage", "fcontext", "-l", "-C"], False),
        (["semanage", "fcontext", "-d", spec(workdir, "logs")], True),
        (["semanage", "fcontext", "-d", spec(workdir, "cache")], True),
        (["semanage", "fcontext", "-d", spec(workdir, "conf")], True),
        (["semanage", "fcontext", "-d", spec(workdir, "ssl")], True),
        (["semanage", "fcontext", "-d", spec(workdir, "html")], True),
        (["semanage", "fcontext", "-d", spec(workdir, "lua")], True),
        (["restorecon", "-R", str(workdir)], True),
        (["semodule", "-l"], False),
        (["semodule", "-r", "hostprep_proxy"], True),
    ]
    assert done[-1] == "removed policy module hostprep_proxy (semodule -r)"


def test_remove_keeps_module_used_by_another_directory(fake_runner, workdir):
    other = "/home/ngx/reverse_proxy/cuic/logs(/.*)?"
    existing = {spec(workdir, "logs"): "hostprep_proxy_log_t", other: "hostprep_proxy_log_t",
                spec(workdir, "ssl"): "cert_t"}
    runner = fake_runner({("semanage", "fcontext", "-l", "-C"): (0, fcontext_listing(existing), "")})
    done = selinux.remove(runner, workdir, ENFORCING)
    assert [argv for argv, _, _ in runner.calls] == [
        ["semanage", "fcontext", "-l", "-C"],
        ["semanage", "fcontext", "-d", spec(workdir, "logs")],
        ["restorecon", "-R", str(workdir)],
    ]
    assert done == [
        f"file context {spec(workdir, 'logs')} -> hostprep_proxy_log_t deleted",
        f"file context {spec(workdir, 'ssl')} -> cert_t left alone (not a hostprep type)",
        f"relabelled {workdir} to the policy's defaults (restorecon -R)",
        f"kept policy module hostprep_proxy: still used by {other}",
    ]


def test_remove_when_directory_is_gone_and_module_not_loaded(fake_runner, tmp_path):
    runner = fake_runner({("semodule", "-l"): (0, SEMODULE_LIST, "")})
    done = selinux.remove(runner, tmp_path / "gone", ENFORCING)
    assert [argv for argv, _, _ in runner.calls] == [["semanage", "fcontext", "-l", "-C"], ["semodule", "-l"]]
    assert done == ["policy module hostprep_proxy was not loaded"]


def test_module_status(fake_runner, workdir):
    existing = {spec(workdir, "logs"): "hostprep_proxy_log_t", "/srv/www(/.*)?": "httpd_sys_content_t"}
    runner = fake_runner({
        ("semanage", "fcontext", "-l", "-C"): (0, fcontext_listing(existing), ""),
        ("semodule", "-l"): (0, SEMODULE_LIST + "hostprep_proxy\n", ""),
    })
    assert selinux.module_status(runner, ENFORCING) == {
        "module": "hostprep_proxy", "loaded": True,
        "file_contexts": {spec(workdir, "logs"): "hostprep_proxy_log_t"}, "error": None}
    off = selinux.module_status(fake_runner(), DISABLED)
    assert off["loaded"] is None
    assert off["error"].startswith("SELinux: not enabled on this host")


# -- the module sources -----------------------------------------------------------

TE = (selinux.MODULE_DIR / "hostprep_proxy.te").read_text()


def test_module_dir_is_the_source_tree():
    assert selinux.MODULE_DIR == Path(selinux.__file__).resolve().parent.parent / "selinux"


def test_every_type_used_by_install_is_declared():
    declared = set(re.findall(r"^type (\w+);", TE, re.M))
    assert declared == set(selinux.TYPES)
    assert re.search(r"^\tgen_require\(`\n\t\ttype container_t;\n\t'\)|^gen_require\(`\n\ttype container_t;\n'\)",
                     TE, re.M) is not None


def test_every_rule_has_a_comment():
    lines = TE.splitlines()
    statement = re.compile(r"^(allow|type|typeattribute|type_transition|gen_require|require|[a-z_]+\()")
    uncommented = [line for i, line in enumerate(lines)
                   if statement.match(line) and not line.startswith("policy_module(")
                   and not lines[i - 1].lstrip().startswith("#")]
    assert uncommented == []
    assert len([line for line in lines if line.startswith("allow ")]) == 7


def test_read_only_type_gets_no_write_permission():
    ro_rules = [line for line in TE.splitlines() if line.startswith("allow container_t hostprep_proxy_ro_t:")]
    perms = set()
    for rule in ro_rules:
        perms |= set(re.search(r"\{([^}]*)\}", rule).group(1).split())
    assert perms == {"getattr", "search", "open", "read"}


def test_created_files_get_level_s0():
    # Podman's new categories at every start must not lock a run out of the previous run's files.
    assert re.findall(r"^\trange_transition .*$", TE, re.M) == [
        "\trange_transition container_t hostprep_proxy_log_t:file s0;",
        "\trange_transition container_t hostprep_proxy_cache_t:dir s0;",
        "\trange_transition container_t hostprep_proxy_cache_t:file s0;",
    ]


def test_fc_has_no_paths():
    fc = (selinux.MODULE_DIR / "hostprep_proxy.fc").read_text().splitlines()
    assert [line for line in fc if line.strip() and not line.startswith("#")] == []


# -- the module compiles (CI installs the devel files: scripts/check-selinux-module.sh) -----

needs_devel = pytest.mark.skipif(
    not selinux.DEVEL_MAKEFILE.is_file() or shutil.which("checkmodule") is None,
    reason=f"{selinux.DEVEL_MAKEFILE} or checkmodule missing (run scripts/check-selinux-module.sh as root: "
           "it installs selinux-policy-devel / selinux-policy-dev)")


def build(src_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src_dir.glob("hostprep_proxy.*"):
        shutil.copyfile(f, dest / f.name)
    Runner(timeout=120).run(["make", "-C", str(dest), "-f", str(selinux.DEVEL_MAKEFILE), "hostprep_proxy.pp"])
    return dest / "hostprep_proxy.pp"


@needs_devel
def test_module_compiles(tmp_path):
    pp = build(selinux.MODULE_DIR, tmp_path / "build")
    # SEPOL_MODULE_PACKAGE_MAGIC, little endian: a real policy package came out.
    assert pp.read_bytes()[:4] == (0xF97CFF8F).to_bytes(4, "little")


@needs_devel
def test_broken_module_does_not_compile(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in selinux.MODULE_DIR.glob("hostprep_proxy.*"):
        shutil.copyfile(f, broken / f.name)
    with open(broken / "hostprep_proxy.te", "a") as fh:
        fh.write("# an undefined type\nallow container_t hostprep_proxy_nosuch_t:file read;\n")
    with pytest.raises(CommandFailed) as err:
        build(broken, tmp_path / "build")
    assert err.value.problem.startswith("exit 2: ")
