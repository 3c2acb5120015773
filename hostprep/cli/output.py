"""How the CLI words and lays out what it prints: the one output module (no other module prints).

The consoles (``out``, ``err``) and every table and line the commands print.  The
status layout builds Rich ``Text`` lines and tables from the JSON-able reports of
``status`` (and friends).  About 590 lines, over the ~500 of the rest: every printed
word of hostprep is here, on purpose in one place.  Values are
never parsed as markup: every line is assembled from (text, style) pieces.
State words are styled (green live, red missing, yellow pending); Rich drops
the colours when the output is not a terminal or NO_COLOR is set.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from hostprep import nic as nicmod
from hostprep import ops, persist, selftest, sysctl
from hostprep.exits import broken_pipe
from hostprep.model import GROUPS
from hostprep.backend import NFT_REMOVE
from hostprep.plan import ApplyPlan, plural
from hostprep.render import NFT_HEADER
from hostprep.state import Store


GREEN, RED, YELLOW = "green", "red", "yellow"
VERDICT_STYLE = {"protected": "bold green", "NOT protected": "bold red",
                 "changes pending confirmation": "bold yellow"}


def limits_text(lim: dict) -> str:
    """Limits as an admin reads them: ``10 conn, 6/s burst 8`` (per source)."""
    return f"{lim['connlimit_above']} conn, {lim['hash_upto']}/s burst {lim['hash_burst']}"


def short_time(stamp: str | None) -> str:
    """``2026-12-05T19:39:53+01:00`` -> ``2026-12-05 18:39 UTC``."""
    if not stamp:
        return "never"
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if when.tzinfo is None:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- status: verdict --------------------------------------------------------

def verdict_line(report: dict) -> Text:
    v = report["verdict"]
    word = {"protected": "protected", "not protected": "NOT protected",
            "pending": "changes pending confirmation"}[v["state"]]
    nic = report.get("nic") or {}
    last = report.get("last_apply")
    parts = []
    if nic.get("name"):
        parts.append(nic["name"])
    # the backend by the name of its tool: nftables, iptables-nft, iptables-legacy
    parts.append("nftables" if report["backend"] == "nft" else str(report["backend"]))
    if last:
        parts.append(plural(len(report.get("containers") or []), "container"))
        parts.append(f"applied {short_time(last.get('time'))}")
    line = Text.assemble((word, VERDICT_STYLE[word]), ": ", ", ".join(parts))
    if report["problems"]:
        line.append(f"\n  {plural(len(report['problems']), 'problem')} below")
    return line


# -- status: what is open to whom --------------------------------------------

def open_lines(report: dict) -> list[Text]:
    """What reaches the host through the external NIC, and from where (as ``ufw status verbose``)."""
    last = report.get("last_apply")
    nic = report.get("nic") or {}
    if not last:
        return []
    s = last.get("settings") or {}
    name = s.get("interface") or nic.get("name")
    addrs = ", ".join(a.split("/")[0] for a in (nic.get("ipv4") or []) + (nic.get("ipv6") or [])
                      if not a.startswith("fe80:"))
    live = report.get("verdict", {}).get("firewall_problems", 0) == 0
    lines = [Text(f"open on {name}" + (f" ({addrs})" if addrs else "")
                  + (":" if live else " as recorded, NOT all live:"))]
    containers = report.get("containers") or []
    for c in containers:
        if not c["hardening"]:
            lines.append(Text.assemble(f"  {c['name']}: tcp {','.join(map(str, c['ports']))} to {c['dest']} ",
                                       ("CLOSED", RED), " (NGX_IPTABLES_HARDENING=0)"))
        else:
            where, _, limits = container_opening(c).partition("; ")
            lines.append(Text(f"  {c['name']}: {where}"))
            lines.append(Text(f"    {limits}"))
    if not containers:
        lines.append(Text("  no container port ('hostprep container up' opens one)"))
    ping = s.get("ping_from") or []
    lines.append(Text("  ping (ICMP echo): " + (f"from {', '.join(ping)} only" if ping else "from nowhere")))
    lines.append(Text("  everything else dropped, IPv4 and IPv6; SSH in/out dropped"))
    left_out = [g for g, flag in (("ddos", "skip_ddos"), ("spoof", "allow_private")) if s.get(flag)]
    if left_out:
        lines.append(Text(f"  left out: {', '.join(left_out)} group"
                          + ("s" if len(left_out) > 1 else "") + " (-e/-a)"))
    return lines


# -- status: details -----------------------------------------------------------

def state_text(word: str) -> Text:
    style = GREEN if word in ("live", "UP", "yes") else RED if word in ("MISSING", "NO") else YELLOW if word == "pending" else ""
    return Text(word, style)


def groups_table(report: dict) -> Table:
    t = Table(title="hardening groups (packets matched)", title_justify="left", box=None,
              show_edge=False, pad_edge=False)
    t.add_column("group", overflow="fold")
    fams = list(report["families"])
    for fam in fams:
        t.add_column(f"IPv{fam}", overflow="fold")
        t.add_column("packets", justify="right", overflow="fold")
    for g in GROUPS:
        row: list = [g]
        for fam in fams:
            v = report["families"][fam]["groups"][g]
            state = ("live" if v["present"] else "MISSING") if v["wanted"] else \
                ("left out" if report.get("last_apply") else "-")
            row += [state_text(state), str(v["packets"])]
        t.add_row(*row)
    return t


def attack_lines(att: dict | None) -> list[str]:
    """What an attack left: the ingress drops per reason, SYNs to the container ports
    (tracked or answered with a cookie), conntrack fill; each line within 80 columns."""
    if not att:
        return []
    out = []
    ing = att.get("ingress")
    if ing:
        r = ing["dropped_or_counted"]
        out.append(f"ingress ({ing['device']}) dropped: {r.get('fragments', 0):,} fragments, "
                   f"{r.get('bogus_flags', 0):,} bogus flags")
    sc = att.get("syn_cookies")
    if sc and ing:      # (the SYN counting lives in the ingress table)
        r = (ing or {}).get("dropped_or_counted") or {}
        flooded = ", ".join(sc["flooded"]) or "none now"
        out.append(f"SYN to container ports: {r.get('syn_tracked', 0):,} tracked, "
                   f"{sc.get('syn_received', 0):,} cookies sent, {sc.get('cookie_valid', 0):,} returned")
        out.append(f"SYN cookies active on: {flooded}")
    ct = att.get("conntrack")
    if ct:
        since = sum(v for v in (ct.get("full_since_last_change") or {}).values() if v)
        out.append(f"conntrack: {ct['count']:,} of {ct['max']:,} entries, "
                   f"{since:,} refused since the last change")
    for lim in att.get("limiters") or []:
        if lim["entries"] is not None:
            out.append(f"limiter {lim['container']}:{lim['port']}: {lim['entries']:,} of {lim['max']:,} sources")
    return out


def container_state(r: dict) -> list[Text]:
    """One container: its state, then its counters (packets)."""
    if r["hardening"]:
        state = state_text("live" if r["present"] else "MISSING")
    else:
        state = Text("hardening off (ports closed)", YELLOW)
    lines = [Text.assemble(f"container {r['name']} ({r['template']}): ", state),
             Text(f"  packets: {r['accepted_within_rate']} accepted, dropped {r['dropped_connlimit']} (conn "
                  f"limit), {r['dropped_rate']} (rate)"
                  + (f", {r['dropped_restricted']} (not an LB)" if r["restricted"] else ""))]
    if r["hardening"] and r.get("limiter"):
        lines.append(Text(limiter_text(r["limiter"], r["source_prefix"])))
    return lines


def limiter_text(b: dict, prefix: int) -> str:
    """``  limiter: max 131072 sources/port, 16384 buckets, idle 2 s, source /32`` (the hashlimit
    table's bounds: beyond the max, SYNs from new sources are dropped)."""
    return (f"  limiter: max {b['htable_max']} sources/port, {b['htable_size']} buckets, "
            f"idle {b['htable_expire_ms'] / 1000:g} s, source /{prefix}")


def container_lines(rows: list[dict]) -> list[Text]:
    return [line for r in rows for line in container_state(r)]


def container_opening(c: dict) -> str:
    """``tcp 8445 to 198.51.100.10, from anywhere; per source 10 conn, 6/s burst 8; ...``"""
    ports = ",".join(map(str, c["ports"]))
    if not c["hardening"]:
        return f"tcp {ports} to {c['dest']} CLOSED (NGX_IPTABLES_HARDENING=0)"
    who = f"only from its {plural(c['load_balancers'], 'load balancer')}" if c["restricted"] else "from anywhere"
    extra = []
    if c["exempt"]:
        extra.append(f"{c['exempt']} exempt from limits")
    if c["load_balancers"] and not c["restricted"]:
        extra.append(plural(c["load_balancers"], "load balancer"))
    per = "per source" if c.get("source_prefix", 32) in (32, 128) else f"per /{c['source_prefix']} source"
    return (f"tcp {ports} to {c['dest']}, {who}; {per} {limits_text(c['limits'])}"
            + (f"; {', '.join(extra)}" if extra else ""))


def containers_listing(rows: list[dict]) -> list[Text]:
    """``container list``: each container's state, counters, opening and limits, in lines
    (no table to cut at 80 columns)."""
    out: list[Text] = []
    for r in rows:
        out += container_state(r)
        where, _, limits = container_opening(r).partition("; ")
        out.append(Text(f"  {where}"))
        if limits:
            out.append(Text(f"  {limits}"))
    return out


def kernel_summary(kern: dict) -> Text:
    keys = kern["keys"]
    ok = sum(1 for k in keys if k["state"] == "ok")
    by_state: dict[str, int] = {}
    for k in keys:
        if k["state"] != "ok":
            by_state[k["state"]] = by_state.get(k["state"], 0) + 1
    rest = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    return Text(f"kernel profile: {ok} of {len(keys)} keys live" + (f" ({rest})" if rest else "")
                + "; -v lists them")


def kernel_table(kern: dict) -> Table:
    t = Table(title="kernel profile (apply -k)", title_justify="left", box=None, show_edge=False, pad_edge=False)
    for col in ("key", "desired", "live", "state"):
        t.add_column(col, overflow="fold")
    for k in kern["keys"]:
        word = "live" if k["state"] == "ok" else k["state"]
        state = state_text(word) if word == "live" else Text(f"{word.upper()}: {k['detail']}",
                                                             YELLOW if word == "machine-wide" else RED)
        t.add_row(k["key"], k["desired"], k["live"] or "-", state)
    return t


def kernel_drifts(kern: dict) -> bool:
    return any(k["state"] in ("drift", "overridden") for k in kern.get("keys") or [])


def persistence_lines(report: dict) -> list[Text]:
    pers = report.get("persistence") or {}
    tx = report.get("transaction") or {}
    if not pers:
        return []
    if not pers.get("installed"):
        return [Text("boot persistence: not installed")]
    kernel = (report.get("kernel") or {}).get("applied")
    if pers["matches_live"]:
        nxt = "exactly what is live"
    elif tx.get("pending"):
        nxt = "the state before the PENDING change"
    elif pers["matches_live"] is None:
        nxt = "no firewall rules (nothing applied)" + (" and re-applies the kernel profile" if kernel else "")
    else:
        nxt = "the RECORDED state, which differs from what is live"
    ipt = [svc for svc in pers["iptables_dropins"] if svc in ("iptables", "ip6tables")]
    other = [svc for svc in pers["iptables_dropins"] if svc not in ipt]     # Debian's services
    return [Text.assemble("boot persistence: hostprep.service ",
                         ("enabled" if pers["enabled"] else ("NOT enabled", RED)), ", ",
                         ("up to date" if pers["up_to_date"] else ("OUT OF DATE", RED)),
                         ),
            *([Text("  " + ", ".join(([pers["nic_unit"]] if pers.get("nic_unit") else [])
                                     + ([f"iptables-services drop-ins ({', '.join(ipt)})"] if ipt else [])
                                     + ([f"drop-ins of {', '.join(other)}"] if other else [])))]
              if pers.get("nic_unit") or pers["iptables_dropins"] else []),
            Text(f"  the next boot loads {nxt}")]


def selinux_line(sel: dict) -> Text:
    runtime = sel["runtime"]
    if not sel.get("present") and sel.get("config_present") is False:
        return Text.assemble("SELinux: ", ("not installed", YELLOW), " (no /etc/selinux/config)")
    return Text.assemble("SELinux: runtime ", (runtime, GREEN if runtime == "enforcing" else YELLOW),
                         f", configured {sel['configured'] or 'no config'}"
                         + (f", policy {sel['policy']}" if sel.get("policy") else "")
                         + (", REBOOT REQUIRED" if sel.get("reboot_required") else ""))


def transaction_lines(tx: dict) -> list[Text]:
    out = []
    if tx.get("pending"):
        p = tx["pending"]
        out.append(Text.assemble(("PENDING CONFIRMATION", "bold yellow"),
                                 f": change {p['id']} ({p['command']}) is rolled back at {p['deadline']} "
                                 f"({p['seconds_left']} s left) unless 'hostprep confirm' runs; timer: "
                                 f"{p['mechanism']}" + ("" if p["timer_alive"] else " (NOT RUNNING)"
                                                        if p["timer_alive"] is False else "")))
    if tx.get("rolled_back"):
        g = tx["rolled_back"]
        out.append(Text.assemble(("ROLLED BACK", "bold yellow"), f": change {g['id']} ({g['command']}) was rolled "
                                 f"back at {g['time']} ({g['why']}); apply it again if you want it"))
    if tx.get("rollback_available") and not tx.get("pending"):
        out.append(Text(f"rollback: change {tx['rollback_available']} ('hostprep rollback' undoes it)"))
    return out


def fail2ban_lines(f2b: dict) -> list[Text]:
    """fail2ban (container up --fail2ban): the server, then bans per container; nothing when unused."""
    rows = f2b.get("containers") or []
    if not rows and not f2b.get("jails"):
        return []
    server = Text("running", GREEN) if f2b.get("running") else Text("NOT RUNNING", RED) if f2b.get("installed") \
        else Text("NOT INSTALLED", RED)
    out = [Text.assemble("fail2ban: ", server, f", hostprep jails: {', '.join(f2b.get('jails') or []) or 'none'}")]
    for r in rows:
        out.append(Text.assemble(f"  {r['name']}: {plural(r['bans'], 'address', 'addresses')} banned",
                                 f" (newest {r['newest']})" if r.get("newest") else "",
                                 "" if r["jail"] else Text(", jail MISSING", RED)))
    return out


def print_status(out: Console, err: Console, report: dict, *, verbose: bool = False) -> None:
    """Verdict, then what is open to whom, then the details; problems last (on stderr)."""
    # 1. the verdict: am I protected?
    out.print(verdict_line(report))
    # 2. what is open to whom on the external NIC
    nic = report.get("nic")
    if nic and "error" in nic:
        out.print(Text.assemble("external NIC: ", nic["name"], " ", (f"({nic['error']})", RED)))
    opened = open_lines(report)
    if opened:
        out.print()
        for line in opened:
            out.print(line)
    # 3. details
    out.print()
    if nic and "error" not in nic:
        shown = [a for a in nic["ipv4"] + nic["ipv6"] if not a.startswith("fe80:")]
        out.print(Text.assemble(f"external NIC: {nic['name']} ", state_text("UP") if nic["up"] else
                                Text("DOWN", RED), " ", ", ".join(shown)
                                + (" (and link-local)" if len(shown) < len(nic["ipv4"] + nic["ipv6"]) else "")))
    ident = (nic or {}).get("identity")
    if ident and ident.get("recorded"):
        rec = ident["recorded"]
        state = {"ok": Text("same device", GREEN), "unverifiable": Text("CANNOT BE VERIFIED", YELLOW),
                 "missing": Text("NIC MISSING", RED), "renamed": Text(f"RENAMED to {ident.get('now_named')}", RED),
                 "swapped": Text("ANOTHER DEVICE", RED)}.get(ident["state"], Text(str(ident["state"]), YELLOW))
        out.print(Text.assemble(f"external NIC identity: {'permanent' if rec['permanent'] else 'random'} MAC "
                                f"{rec['mac']} at apply: ", state))
    fs = report.get("failsafe") or {}
    if fs.get("live"):
        out.print(Text.assemble(("fail-safe: LIVE", RED), " on " + ", ".join(f"IPv{f}" for f in fs["live"])
                                + " (HOSTPREP-FAILSAFE; 'hostprep boot' replaces it with the hardening)"))
    choice = report.get("backend_choice")
    if choice:
        # which backend, and why this one: asked for, remembered from the last apply, or auto
        out.print(f"backend: {report['backend']}, {choice['why']}" + (f" ({choice['detail']})"
                                                                      if choice.get("detail") else ""), markup=False)
    last = report.get("last_apply")
    if last:
        s = last["settings"]
        out.print(f"last apply: {last['time']} -i {s['interface']}"
                  + (" -e" if s["skip_ddos"] else "") + (" -a" if s["allow_private"] else "")
                  + "".join(f" -p {p}" for p in s["ping_from"]))
    out.print(groups_table(report))
    for line in attack_lines(report.get("attack")):
        out.print(line)
    if report.get("ipv6_parity") is not None:
        out.print(Text.assemble("IPv6 parity: ", state_text("yes") if report["ipv6_parity"] else state_text("NO")))
    for line in container_lines(report.get("containers") or []):
        out.print(line)
    for line in fail2ban_lines(report.get("fail2ban") or {}):
        out.print(line)
    kern = report.get("kernel") or {}
    if kern.get("applied"):
        if verbose or kernel_drifts(kern):
            out.print(kernel_table(kern))
        else:
            out.print(kernel_summary(kern))
    for line in persistence_lines(report):
        out.print(line)
    sel = report.get("selinux")
    if sel:
        out.print(selinux_line(sel))
    for line in transaction_lines(report.get("transaction") or {}):
        out.print(line)
    for w in report["warnings"]:
        err.print(Text.assemble(("warning:", YELLOW), " ", w))
    if report["problems"]:
        for p in report["problems"]:
            err.print(Text.assemble(("difference:", RED), " ", p))
    else:
        out.print("everything desired is live")


# -- the consoles, and what the commands print -----------------------------------------

# Tables keep their columns when the output is a pipe or a file (rich would assume 80),
# unless COLUMNS says how wide the reader is.
_width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
# markup=False, emoji=False: nothing printed is read as Rich markup or an emoji code,
# so a value from a flag, a file or a subprocess ('[/]', '[bold]', 'hostprep[probe]',
# a MAC such as 62:ab:9d...) is printed as it is; styled labels go through say(),
# which builds a Text instead.
class _Console(Console):
    def on_broken_pipe(self) -> None:      # the reader went away: 141, as for SIGPIPE
        self.quiet = True
        broken_pipe()


out = _Console(highlight=False, soft_wrap=True, width=_width, markup=False, emoji=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def say(console: Console, style: str, label: str, text: str) -> None:
    """``label`` in ``style``, then ``text`` exactly as given (never parsed as markup)."""
    console.print(Text.assemble((label, style), " ", text))


def say_warnings(warnings: list[str]) -> None:
    for w in warnings:
        say(err, "yellow", "warning:", f"{w}")


def say_pending(ch) -> None:
    if ch is None or ch.pending is None:
        return
    p = ch.pending
    how = f"systemd timer {p.unit}" if p.mechanism == "systemd" else \
        f"watcher process {p.watcher_pid} (no systemd in this namespace)"
    say(err, "bold yellow", f"confirm within {p.seconds} s:", f"run 'hostprep confirm' before "
        f"{p.deadline_text}, or the state before this change is restored ({how}); "
        "'hostprep rollback' restores it now")


def show_nic(info: nicmod.NicInfo) -> None:
    t = Table(title=f"External NIC {info.name}", show_header=False)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold")           # a long address is folded, never cut with an ellipsis
    t.add_row("state", ("UP" if info.up else "DOWN") + f" (operstate {info.operstate})")
    t.add_row("IPv4", ", ".join(info.ipv4) or "-")
    t.add_row("IPv6", ", ".join(info.ipv6) or "-")
    t.add_row("MAC", info.mac or "-")
    t.add_row("speed", f"{info.speed_mbps} Mb/s" if info.speed_mbps else "not reported by the driver")
    t.add_row("MTU", str(info.mtu))
    out.print(t)
    if info.slow:
        say(err, "yellow", "warning:", f"{info.name} runs at {info.speed_mbps} Mb/s; the reverse-proxy "
                  "launcher refuses NICs slower than 1000 Mb/s")


def print_plan(plan: ApplyPlan) -> None:
    if plan.empty:
        out.print("plan: nothing to change")
        return
    out.print("plan:")
    for note in plan.notes():
        out.print(f"  - {note}")
    # The native nft backend loads one script (the plan's families are its view of it).
    native = bool(plan.desired and plan.desired.nft and plan.desired.nft.script.startswith(NFT_HEADER)) or \
        bool(plan.desired is None and plan.live.nft and "table inet hostprep" in plan.live.nft.text)
    for fam, text in plan.texts.items():
        if not plan.families[fam].empty and not native:
            tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
            out.print(f"\n# {tool} --noflush <<EOF", markup=False)
            out.print(text.rstrip(), markup=False)
            out.print("EOF", markup=False)
    if plan.nft.action == "load" and plan.desired and plan.desired.nft:
        out.print("\n# nft -f - <<EOF", markup=False)
        out.print(plan.desired.nft.script.rstrip(), markup=False)
        out.print("EOF", markup=False)
    elif plan.nft.action == "delete" and native:
        out.print("\n# nft -f - <<EOF", markup=False)
        out.print(NFT_REMOVE.rstrip(), markup=False)
        out.print("EOF", markup=False)
    elif plan.nft.action == "delete":
        out.print("\n# nft delete table netdev hostprep", markup=False)


def print_kernel_dry_run(store: Store) -> None:
    kernel = sysctl.Kernel()
    settings = sysctl.profile()
    missing, machine = kernel.skipped(settings)
    changes = [f"  {s.key}: {kernel.read(s.key)} -> {s.value}" for s in settings
               if s.key not in missing and s.key not in machine and kernel.read(s.key) != s.value]
    out.print(f"\n# kernel: {store.paths.root / 'etc/sysctl.d' / sysctl.DROPIN_NAME} would be:", markup=False)
    out.print(sysctl.render(missing, machine).rstrip(), markup=False)
    out.print(f"kernel keys that would change ({len(changes)}):", markup=False)
    for line in changes:
        out.print(line, markup=False)
    for key in sorted(missing):
        out.print(f"  {key}: not in this kernel, would be skipped", markup=False)
    if machine:
        out.print(f"machine-wide keys left alone ({len(machine)}; this is not the machine's own network "
                  "namespace):", markup=False)
        for key in sorted(machine):
            out.print(f"  {key}: {sysctl.MACHINE_WIDE_DETAIL}", markup=False)


def print_kernel_part(store: Store, result: ops.KernelResult) -> None:
    report, notes, bad = result.report, result.notes, result.bad
    for n in notes:
        say(err, "yellow", "note:", f"{n}")
    for r in bad:
        say(err, "red", "kernel drift:", f"{r.key}: wanted {r.desired}, {r.detail}")
    ok = sum(1 for r in report if r.state == "ok")
    out.print(f"kernel: {ok} of {len(report)} keys live and verified"
              + (f", {len(bad)} overridden or drifting (see above)" if bad else "")
              + f"; drop-in {store.paths.root / 'etc/sysctl.d' / sysctl.DROPIN_NAME}")


def print_persistence(store: Store, result: ops.PersistResult) -> None:
    """What the boot units' part of a change did (the units were written inside the change)."""
    if result.error is not None:
        say(err, "bold red", "WARNING:", f"boot persistence not installed: {result.error}; the hardening is live "
                  "now but will be gone after a reboot")
    elif result.changed:
        out.print(f"boot persistence: {persist.UNIT}"
                  + (f" and {persist.nic_instance(result.interface)}" if result.interface else "")
                  + f" enabled ({len(result.changed)} files written under "
                  + " and ".join(written_under(store, result.changed)) + ")")


def written_under(store: Store, files: list[str]) -> list[str]:
    """Where the files of the boot persistence went: <root>/etc, and the state directory (fail-safe)."""
    places = {str(store.paths.state_dir) if Path(f.removeprefix("removed ")).is_relative_to(store.paths.state_dir)
              else str(store.paths.root / "etc") for f in files}
    return sorted(places)


def report_firewall(info, desired, outcome) -> None:
    for w in outcome.warnings:
        say(err, "yellow", "warning:", f"{w}")
    if not outcome.changed:
        out.print(f"nothing changed: the hardening on {info.name} is already live")
        return
    for action in outcome.notes:
        out.print(f"  - {action}")
    out.print(f"applied: {', '.join(desired.v4.groups)} on {info.name} (IPv4 {desired.v4.rule_count} rules, "
              f"IPv6 {desired.v6.rule_count} rules, fragments {'dropped' if desired.nft else 'not handled (-e)'})")


def print_containers(rows: list[dict], title: str) -> None:
    out.print(f"{title}:")
    for line in containers_listing(rows):
        out.print(line)


def run_with_progress(work):
    """Run ``work(progress)`` under a live progress line (a terminal only): one step per
    probe group, as the engine reports them."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=out, transient=True) as bar:
        task = bar.add_task("selftest: starting", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"selftest: {what}")
            bar.refresh()       # every step is drawn, even one shorter than the refresh period
        return work(progress)


def _selftest_tail(report: dict, *, hint: str = "") -> None:
    """The end of both selftest views: how to remove a kept sandbox, then the summary line
    (``hint`` after it when every probe passed)."""
    if report["sandbox"]["kept"]:
        out.print(f"kept (--keep): remove with: hostprep sandbox down --name {report['sandbox']['name']} "
                  f"--root {report['sandbox']['root']}", markup=False)
    n = len(report["probes"])
    if report["ok"]:
        out.print(f"selftest: all {n} probes as expected ({report['seconds']} s){hint}")
    else:
        say(err, "bold red", "selftest:", f"{report['mismatches']} of {n} probes not as expected "
                  f"({report['seconds']} s)")


def print_selftest(report: dict) -> None:
    s = report["settings"]
    out.print(f"selftest: sandbox {', '.join(report['sandbox']['namespaces'])} (backend {report['backend']}); "
              f"settings from {s['source']}: -i {report['sandbox']['external_nic']}"
              + (" -e" if s["skip_ddos"] else "") + (" -a" if s["allow_private"] else "")
              + "".join(f" -p {p}" for p in s["ping_from_in_sandbox"]))
    for c in report["containers"]:
        lim = c["limits"]
        out.print(f"container {c['name']} ({c['template']}, {c['from']}): ports {','.join(map(str, c['ports']))} "
                  f"on {c['dest']} -> {c['dest_in_sandbox']} in the sandbox, limits {lim['connlimit_above']}/"
                  f"{lim['hash_upto']}/s/{lim['hash_burst']}")
    for note in report["notes"]:
        out.print(f"note: {note}", markup=False)
    out.print(selftest.report_table(report))
    _selftest_tail(report)


def print_selftest_compact(report: dict) -> None:
    """On a terminal: one line per probe group (passed/failed), the failures in full."""
    s = report["settings"]
    out.print(f"selftest: sandbox {report['sandbox']['name']} (backend {report['backend']}); settings from "
              f"{s['source']}: -i {report['sandbox']['external_nic']}" + (" -e" if s["skip_ddos"] else "")
              + (" -a" if s["allow_private"] else "") + "".join(f" -p {p}" for p in s["ping_from_in_sandbox"])
              + (f"; {plural(len(report['containers']), 'container')}" if report["containers"] else ""))
    for group, passed, failed in selftest.group_results(report):
        out.print(Text.assemble(f"  {group}: ", (f"{passed} passed", "green"),
                                *((", ", (f"{failed} FAILED", "bold red")) if failed else ())))
    if report["mismatches"]:
        out.print(selftest.report_table(report, only_failed=True))
    _selftest_tail(report, hint="; --json or a pipe shows each probe")
