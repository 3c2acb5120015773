"""Specs of a host hardened by hostprep (testinfra; see conftest.py for how they run).

The same file runs inside the sandbox namespace (--hosts=local://, HOSTPREP_ROOT a
temporary root) and against the VM (--hosts=ssh://..., root "/").  It reads the
host's own record of what it should be (remembered NIC, containers, kernel
drop-in) and checks the live kernel against it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import pytest

# -- the documented layout ------------------------------------------------------------

BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
CONTAINER_CHAIN_PREFIX = "HOSTPREP-C-"
SHORTENED = re.compile(r".{8}-[0-9a-f]{8}")
DROPIN = "etc/sysctl.d/90-hostprep.conf"


def base_chains(settings: dict) -> list[str]:
    """HOSTPREP-IN's targets in the documented order (README "What is loaded"), for these settings."""
    return (["HOSTPREP-FAST"] + ([] if settings.get("skip_ddos") else ["HOSTPREP-COOKIES"]) + ["HOSTPREP-ICMP"]
            + ([] if settings.get("skip_ddos") else ["HOSTPREP-DDOS"])
            + ([] if settings.get("allow_private") else ["HOSTPREP-SPOOF"])
            + ["HOSTPREP-SSH", "HOSTPREP-UDP", "HOSTPREP-CONTAINERS", "HOSTPREP-DENY"])


def all_base_chains(settings: dict) -> set[str]:
    """Every base chain of the layout: the dispatcher, its targets, RST (under DDOS) and OUT."""
    return ({"HOSTPREP-IN", "HOSTPREP-OUT"} | set(base_chains(settings))
            | (set() if settings.get("skip_ddos") else {"HOSTPREP-RST", "HOSTPREP-SYNPROXY"}))


def container_chain(name: str) -> str:
    """HOSTPREP-C-<name>; names over 17 characters (xtables' 28-character limit) are shortened
    to their first 8 characters and 8 hex digits of their sha256 (README, per-container rules)."""
    fits = len(name) <= 17 and not SHORTENED.fullmatch(name)
    short = name if fits else f"{name[:8]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return CONTAINER_CHAIN_PREFIX + short


def container_family(container: dict) -> int:
    return 6 if ":" in container["dest"] else 4


def parse_dropin(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(keys to be live -> value, keys the kernel lacks ("-key = value") -> value), as sysctl.d(5)."""
    live: dict[str, str] = {}
    lacking: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        lacks = line.startswith("-")
        if lacks:
            line = line[1:].strip()
        if "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if "/" in key and ("." not in key or key.index("/") < key.index(".")):
            key = key.translate(str.maketrans("./", "/."))      # slash form: '.' and '/' swap
        (lacking if lacks else live)[key] = " ".join(value.split())
    return live, lacking


def proc_sys_rel(key: str) -> str:
    """net.ipv4.conf.eth0/100.rp_filter -> net/ipv4/conf/eth0.100/rp_filter"""
    return "/".join(part.replace("/", ".") for part in key.split("."))


def targets(rules: list[str]) -> list[str]:
    out = []
    for rule in rules:
        tokens = shlex.split(rule)
        jump = "-j" if "-j" in tokens else "-g"
        out.append(tokens[tokens.index(jump) + 1] if jump in tokens else "")
    return out


IFACE_NAME = re.compile(r"[A-Za-z0-9._-]{1,15}")


# -- the external NIC ----------------------------------------------------------------------


def test_the_external_nic_is_remembered_and_present(hp, settings, applied, nic):
    assert IFACE_NAME.fullmatch(nic) is not None, f"settings.json has no usable interface: {settings!r}"
    # the last successful apply was for the remembered NIC
    assert applied["settings"]["interface"] == nic
    assert hp.host.interface(nic).exists is True
    operstate = hp.host.file(f"/sys/class/net/{nic}/operstate").content_string.strip()
    assert operstate == "up"


# -- iptables / ip6tables: chains and jumps ------------------------------------------------


def test_every_hostprep_chain_of_the_layout_exists(hp, settings, containers, family):
    """The HOSTPREP-* chains are exactly the documented base chains (for the remembered -e/-a)
    plus one HOSTPREP-C-<name> per container of this family whose hardening is on."""
    live = {c for c in hp.rules(family) if c.startswith("HOSTPREP-")}
    wanted = all_base_chains(settings) | {container_chain(c["name"]) for c in containers
                                          if c["hardening"] and container_family(c) == family}
    assert sorted(live) == sorted(wanted)


def test_one_jump_per_builtin_chain_first_on_the_external_nic(hp, nic, settings, family):
    rules = hp.rules(family)
    wanted = {"INPUT": [f"-A INPUT -i {nic} -j HOSTPREP-IN"],
              "FORWARD": [f"-A FORWARD -i {nic} -j HOSTPREP-IN"],
              "OUTPUT": [f"-A OUTPUT -o {nic} -j HOSTPREP-OUT"]}
    if not settings.get("skip_ddos"):
        # the SYN synproxy sends for a client that returned a valid cookie (README: SYN cookies)
        wanted["OUTPUT"].append("-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype ! --src-type "
                                "LOCAL -m conntrack --ctstate NEW -j HOSTPREP-CONTAINERS")
    # (every rule of the chain that enters hostprep, the chain's first rule)
    live = {chain: ([r for r, t in zip(rules.get(chain, []), targets(rules.get(chain, [])))
                     if t.startswith("HOSTPREP-")], rules.get(chain, [None])[0]) for chain in BUILTIN}
    assert live == {chain: (lines, lines[0]) for chain, lines in wanted.items()}


def test_dispatch_order_ends_in_the_default_deny(hp, settings, family):
    rules = hp.rules(family)
    assert targets(rules.get("HOSTPREP-IN", [])) == base_chains(settings)
    assert rules["HOSTPREP-IN"][-1] == "-A HOSTPREP-IN -j HOSTPREP-DENY"
    assert rules["HOSTPREP-DENY"] == ['-A HOSTPREP-DENY -m comment --comment "hostprep deny: default deny" -j DROP']


# -- counters --------------------------------------------------------------------------------


def parse_listing(text: str, chain: str) -> list[tuple[int, int, str]] | str:
    """`iptables -L CHAIN -v -x -n` -> [(packets, bytes, target)], or what did not parse."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith(f"Chain {chain} ("):
        return f"no 'Chain {chain} (' header: {lines[:1]}"
    if lines[1].split()[:3] != ["pkts", "bytes", "target"]:
        return f"no 'pkts bytes target' column header: {lines[1]!r}"
    rows = []
    for line in lines[2:]:
        fields = line.split()
        if len(fields) < 3 or not (fields[0].isdigit() and fields[1].isdigit()):
            return f"row without integer counters: {line!r}"
        rows.append((int(fields[0]), int(fields[1]), fields[2]))
    return rows


def test_iptables_counters_are_readable(hp, family):
    """Every HOSTPREP chain lists with exact counters, one row per rule of `-S`, same targets."""
    rules = hp.rules(family)
    chains = sorted(c for c in rules if c.startswith("HOSTPREP-"))
    assert "HOSTPREP-IN" in chains
    listed, wanted = {}, {}
    for chain in chains:
        res = hp.ipt(family, f"-L {chain} -v -x -n")
        rows = parse_listing(res.stdout, chain) if res.rc == 0 else f"rc {res.rc}: {res.stderr.strip()}"
        listed[chain] = rows if isinstance(rows, str) else [t for _, _, t in rows]
        wanted[chain] = targets(rules[chain])
    assert listed == wanted


def nft_counters(listing: str) -> dict[str, tuple[int, int]]:
    """comment -> (packets, bytes) of each rule with a counter in `nft list table` text."""
    out = {}
    for line in listing.splitlines():
        m = re.search(r'counter packets (\d+) bytes (\d+)\b.*comment "([^"]*)"', line)
        if m:
            out[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    return out


def test_nft_ingress_table_is_hooked_on_the_external_nic(hp, settings, nic):
    res = hp.host.run("nft list table netdev hostprep")
    if settings.get("skip_ddos"):
        # -e leaves the fragments out, and with them the whole table
        assert res.rc != 0, f"-e is remembered but the table is loaded:\n{res.stdout}"
        return
    assert res.rc == 0, res.stderr
    chains = re.findall(r"^\s*chain (\S+) \{", res.stdout, re.M)
    hooks = [(m.group("dev") or m.group("devs").replace(" ", ""), int(m.group("prio"))) for m in re.finditer(
        r'type filter hook ingress (?:device "?(?P<dev>[^";\s]+)"?|devices = \{ (?P<devs>[^}]*) \}) '
        r'priority (?P<prio>-?\d+);', res.stdout)]
    # ingress is the hooked chain; syn4/syn6 are its SYN-counting chains (jumped to, no hook)
    assert (chains, hooks) == (["ingress", "syn4", "syn6"], [(nic, -500)])


def test_nft_counters_are_readable(hp, settings, applied):
    if settings.get("skip_ddos") or not applied.get("nft"):
        pytest.skip("-e (skip_ddos) is remembered: no nft ingress table, fragments are not handled")
    res = hp.host.run("nft list table netdev hostprep")
    assert res.rc == 0, res.stderr
    # the rules with a counter that the last apply loaded (its nft script), by comment
    wanted = sorted(re.findall(r'\bcounter\b.*comment "([^"]*)"', applied["nft"]["script"]))
    assert len(wanted) >= 1
    assert sorted(nft_counters(res.stdout)) == wanted


# -- containers -----------------------------------------------------------------------------


def container_rules(hp, c: dict) -> list[str]:
    """The live lines of one container: its dispatch rule(s) and its chain's rules."""
    rules = hp.rules(container_family(c))
    chain = container_chain(c["name"])
    dispatch = [r for r, t in zip(rules.get("HOSTPREP-CONTAINERS", []),
                                  targets(rules.get("HOSTPREP-CONTAINERS", []))) if t == chain]
    return dispatch + rules.get(chain, [])


def test_each_container_has_its_chain_and_dispatch_rule(hp, containers):
    if not containers:
        pytest.skip(f"no container is up ({hp.path('var/lib/hostprep/containers')} has no *.json)")
    live, wanted = {}, {}
    for c in containers:
        rules = hp.rules(container_family(c))
        chain = container_chain(c["name"])
        dispatch = [r for r in rules.get("HOSTPREP-CONTAINERS", []) if r.endswith(f" -j {chain}")]
        live[c["name"]] = (chain in rules, dispatch)
        # hardening off (NGX_IPTABLES_HARDENING=0): nothing is opened, no chain at all
        wanted[c["name"]] = ((True, [f"-A HOSTPREP-CONTAINERS -m conntrack --ctorigdst {c['dest']} -j {chain}"])
                             if c["hardening"] else (False, []))
    assert live == wanted


def test_each_container_log_exists_and_matches_the_live_rules(hp, containers):
    """iptables_logs/<name>.log starts with '# hostprep container up' and its added and kept
    rules are exactly the container's live rules."""
    if not containers:
        pytest.skip(f"no container is up ({hp.path('var/lib/hostprep/containers')} has no *.json)")
    heads, logged, live = {}, {}, {}
    for c in containers:
        text = hp.text(f"var/log/hostprep/iptables_logs/{c['name']}.log")
        lines = (text or "").splitlines()
        heads[c["name"]] = lines[0].startswith(f"# hostprep container up: {c['name']} at ") if lines else None
        logged[c["name"]] = sorted(ln.split(": ", 1)[1] for ln in lines if ln.startswith(("added: ", "kept: ")))
        live[c["name"]] = sorted(container_rules(hp, c))
    assert heads == {c["name"]: True for c in containers}
    assert logged == live


def test_each_container_ipset_is_loaded_with_its_members(hp, containers):
    """The ipsets a container's log lists (hostprep-<hash>-lb4/-ex6...) exist with that many
    entries, and they are exactly the sets its live rules match on."""
    if not containers:
        pytest.skip(f"no container is up ({hp.path('var/lib/hostprep/containers')} has no *.json)")
    logged, live, referenced = {}, {}, {}
    for c in containers:
        text = hp.text(f"var/log/hostprep/iptables_logs/{c['name']}.log") or ""
        sets = dict(re.findall(r"^# ipset (hostprep-\S+): (\d+) members$", text, re.M))
        logged[c["name"]] = {name: int(n) for name, n in sets.items()}
        live[c["name"]] = {}
        for name in sets:
            res = hp.host.run(f"ipset list -t {name}")
            m = re.search(r"^Number of entries: (\d+)$", res.stdout, re.M)
            live[c["name"]][name] = int(m.group(1)) if res.rc == 0 and m else None
        referenced[c["name"]] = sorted(set(re.findall(r"--match-set (\S+) src", "\n".join(container_rules(hp, c)))))
    assert live == logged
    assert referenced == {name: sorted(sets) for name, sets in logged.items()}


# -- journal, status -------------------------------------------------------------------------


def test_the_journal_has_a_line_per_apply(hp, settings, containers):
    text = hp.text("var/log/hostprep/journal.log")
    assert text is not None, f"{hp.path('var/log/hostprep/journal.log')} is missing"
    lines = [ln.split("\t") for ln in text.splitlines()]
    # time, user, command, what changed, result
    assert [len(f) for f in lines if len(f) != 5] == []
    assert len(lines) >= 1

    def cmd(f):
        return f[2].split()

    firewall = [f for f in lines if cmd(f)[1:2] == ["apply"] and not {"-d", "--disable"} & set(cmd(f))
                and not f[3].startswith("kernel profile:")]
    kernel = [f for f in lines if cmd(f)[1:2] == ["apply"] and f[3].startswith("kernel profile:")]
    ups = {c["name"]: [f for f in lines if cmd(f)[1:4] == ["container", "up", c["name"]]] for c in containers}
    seen = {"firewall apply": bool(firewall), "last firewall apply ok": firewall[-1][4] if firewall else None}
    wanted = {"firewall apply": True, "last firewall apply ok": "ok"}
    if settings.get("kernel"):
        seen.update({"apply -k": bool(kernel), "last apply -k": kernel[-1][4] if kernel else None})
        wanted.update({"apply -k": True, "last apply -k": "ok"})
    seen.update({f"container up {n}": bool(v) for n, v in ups.items()})
    wanted.update({f"container up {n}": True for n in ups})
    assert seen == wanted


def test_status_json_reports_no_problem(hp, nic):
    res = hp.hostprep("status --json")
    try:
        report = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"status --json printed no JSON (exit {res.rc}): {res.stderr.strip()}")
    # exit 0 <=> no problem; both shown on failure
    assert (res.rc, report["problems"]) == (0, []), "\n".join(report["problems"])
    assert (report["schema"], report["settings"]["interface"]) == (1, nic)
    assert {fam: v["jumps_in_place"] for fam, v in report["families"].items()} == {
        fam: True for fam in report["families"]}


# -- kernel ----------------------------------------------------------------------------------


def dropin_keys(hp) -> tuple[dict[str, str], dict[str, str]]:
    text = hp.text(DROPIN)
    if text is None:
        pytest.skip(f"apply -k not used on this host (no {hp.path(DROPIN)})")
    return parse_dropin(text)


def live_value(hp, key: str) -> str | None:
    if hp.nonnet and not key.startswith("net."):
        f = hp.host.file(f"{hp.nonnet.rstrip('/')}/{proc_sys_rel(key)}")
        return " ".join(f.content_string.split()) if f.is_file else None
    try:
        return " ".join(str(hp.host.sysctl(key)).split())
    except AssertionError:          # sysctl -n failed: the kernel has no such key
        return None


def key_present(hp, key: str) -> bool:
    if hp.nonnet and not key.startswith("net."):
        return hp.host.file(f"{hp.nonnet.rstrip('/')}/{proc_sys_rel(key)}").exists
    return hp.host.file(f"/proc/sys/{proc_sys_rel(key)}").exists


def test_each_kernel_key_of_the_dropin_is_live(hp):
    wanted, _ = dropin_keys(hp)
    assert len(wanted) >= 1
    assert {k: live_value(hp, k) for k in wanted} == wanted


def test_keys_the_kernel_lacks_are_absent(hp):
    """'-key = value' lines: apply -k found no such key; the kernel still has none."""
    _, lacking = dropin_keys(hp)
    if not lacking:
        pytest.skip(f"no '-key' line in {hp.path(DROPIN)}: the kernel had every key")
    assert [k for k in lacking if key_present(hp, k)] == []


# -- SELinux, persistence ---------------------------------------------------------------------


def test_selinux_is_enforcing(hp):
    fs = hp.host.file(hp.selinuxfs)
    if not fs.is_directory:
        pytest.skip(f"no SELinux on this host ({hp.selinuxfs} does not exist)")
    runtime = hp.host.file(f"{hp.selinuxfs}/enforce").content_string.strip()
    config = hp.text("etc/selinux/config") or ""
    configured = dict(re.findall(r"^\s*(SELINUX)\s*=\s*(\S+)", config, re.M)).get("SELINUX")
    # enforcing now, and after the next boot
    assert (runtime, configured) == ("1", "enforcing")


def test_the_persistence_unit_is_enabled(hp):
    unit = "etc/systemd/system/hostprep.service"
    assert hp.file(unit).is_file
    root = "" if hp.root == "/" else f"--root={hp.root} "
    res = hp.host.run(f"systemctl {root}is-enabled hostprep.service")
    assert res.stdout.strip() == "enabled"


def test_the_boot_unit_runs_before_the_network_and_after_iptables_services(hp):
    text = hp.text("etc/systemd/system/hostprep.service")
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).extend(v.split())
    assert "network-pre.target" in keys["Before"] and "network-pre.target" in keys["Wants"]
    assert {"iptables.service", "ip6tables.service"} <= set(keys["After"])
    assert keys["ExecStart"][-1] == "boot"


def test_the_external_nic_unit_is_wanted_by_its_device(hp, settings):
    nic = settings["interface"]
    root = "" if hp.root == "/" else f"--root={hp.root} "
    res = hp.host.run(f"systemctl {root}is-enabled hostprep-nic@{nic}.service")
    assert res.stdout.strip() == "enabled"


def test_iptables_services_restarts_put_the_chains_back(hp):
    for svc in ("iptables", "ip6tables"):
        text = hp.text(f"etc/systemd/system/{svc}.service.d/hostprep.conf") or ""
        execs = [ln.split("=", 1)[0] for ln in text.splitlines() if ln.startswith("Exec")]
        # each: the family's fail-safe (no Python), then hostprep boot
        assert execs == ["ExecStartPost", "ExecStartPost", "ExecReload", "ExecReload", "ExecStopPost", "ExecStopPost"]


def test_the_failsafe_is_installed_for_the_external_nic_and_not_live(hp, settings, family):
    nic = settings["interface"]
    text = hp.text(f"etc/hostprep/failsafe.v{family}.rules") or ""
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert [ln for ln in lines if ln.startswith("-I ")] == [f"-I INPUT 1 -i {nic} -j HOSTPREP-FAILSAFE",
                                                            f"-I FORWARD 1 -i {nic} -j HOSTPREP-FAILSAFE"]
    assert lines[-2:] == ['-A HOSTPREP-FAILSAFE -m comment --comment "hostprep failsafe: default deny" -j DROP',
                          "COMMIT"]
    unit = hp.text("etc/systemd/system/hostprep.service") or ""
    # loaded before 'hostprep boot' (unless its jump is live already: /bin/sh and a -C check),
    # which replaced it: it is not what is live
    pre = [ln[len("ExecStartPre=-"):] for ln in unit.splitlines() if ln.startswith("ExecStartPre=-")]
    assert [ln.split()[:2] for ln in pre] == [["/bin/sh", "-c"]] * 2
    assert [f"-C INPUT -i {nic} -j HOSTPREP-FAILSAFE 2>/dev/null || exec " in ln for ln in pre] == [True, True]
    assert [ln.split()[-1] for ln in pre] == [hp.path(f"etc/hostprep/failsafe.v{f}.rules") + "'" for f in (4, 6)]
    assert "HOSTPREP-FAILSAFE" not in hp.rules(family)


def test_the_journal_is_rotated(hp):
    text = hp.text("etc/logrotate.d/hostprep") or ""
    journal = "/var/log/hostprep/journal.log" if hp.root == "/" else f"{hp.root}/var/log/hostprep/journal.log"
    assert text.count(journal + " {") == 1


def test_no_change_waits_for_confirmation_or_was_interrupted(hp):
    assert (hp.file("var/lib/hostprep/pending.json").exists,
            hp.file("var/lib/hostprep/inflight.json").exists) == (False, False)
