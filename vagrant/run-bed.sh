#!/bin/bash
# shellcheck disable=SC2317,SC2015  # functions run through check(), traps; A && B || true on purpose
# Run hostprep's whole VM test bed, as root, on a Debian 12 machine:
#
#   bash vagrant/run-bed.sh          build (or reuse) the local box, vagrant up proxy and
#                                    client, run every check, vagrant destroy
#   HOSTPREP_BED_KEEP_LOGS=DIR ...   also copy the VMs' serial consoles and libvirt's
#                                    logs to DIR
#
# Where it runs (the sandbox rule: nothing in the machine's own network namespace):
#   - a network namespace of its own, hpvbed<pid>, holds libvirt's bridges, dnsmasq and
#     NAT, the VMs' tap devices, and every packet between Vagrant and the VMs;
#   - inside it, a private mount namespace where libvirt's directories (/etc/libvirt,
#     /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt) are
#     bind-mounted from a fresh temporary directory, so libvirtd and virtlogd started
#     here see no other configuration and leave nothing behind; qemu.conf there sets
#     namespaces = [ ] and /dev/kvm is hidden (see vagrant/README.md);
#   - the VMs run under QEMU's TCG (lv.driver "qemu" in the Vagrantfile).
# Everything is removed by name at the end, on success, failure, SIGINT or SIGTERM:
# vagrant destroy, then any domain libvirt still knows, the daemons (by their pid
# files), the namespace, the temporary directory.
#
# The checks (vagrant/README.md, "What run-bed.sh checks"), each a PASS/FAIL line:
#   up          vagrant up: both VMs provisioned (hostprep's system install, apply -i
#               <external> -y -k -a -p <client>, container up finesse), SELinux enforcing
#   specs       tests/host (testinfra) over `vagrant ssh-config` against the proxy
#   probes      vagrant/probe-from-client.sh on the client, through the external NIC
#   restart     netfilter-persistent restarted (its iptables-restore flushes the
#               filter table): hostprep's chains are back right after, status exit 0
#   selinux     apply refused under setenforce 0, done under enforcing; no AVC denial
#               for hostprep's processes
#   selinux-module  selinux install --working-dir: module loaded, the module's types on
#               the directory's logs, cache, conf; selinux remove undoes both
#   confirm     apply --confirm 60 over ssh, the session killed: the systemd timer rolls
#               back at the deadline; status in a new session says so
#   reboot      a real reboot: hostprep.service ran before the network came up (boot
#               journal), specs and probes pass again without anyone running hostprep
#   failsafe    hostprep's interpreter moved away, reboot: the external NIC comes up
#               closed (fail-safe, its jump in INPUT and FORWARD once per family, though two
#               units load it), status says the fail-safe was live
#   avc         over the whole run: no AVC denial naming hostprep or its files; its sysctl
#               drop-in, fail-safe and unit carry their paths' default labels
# HOSTPREP_BED_KNOWN_FAILURES="name=why;...": those checks' failures are XFAIL (not counted,
# the reason shown); one that passes is an XPASS, a failure (.ci/run sets the list).
# Exit status: 0 when every check passed, 1 when one failed, 2 when the bed could not run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
self="$here/$(basename "$0")"

say() { printf '==> run-bed: %s\n' "$*"; }
die() { printf 'run-bed: %s\n' "$*" >&2; exit 2; }

# ----------------------------------------------------------------------------------------
# The inner part: in the namespace, after `unshare --mount`.
# ----------------------------------------------------------------------------------------
if [ "${1:-}" = --inner ]; then
    state=$2
    box=$3
    ssh_config="$state/ssh-config"
    export VAGRANT_CWD="$here" VAGRANT_DOTFILE_PATH="$state/dot" VAGRANT_DEFAULT_PROVIDER=libvirt
    export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_HOME=${VAGRANT_HOME:?set by the outer part}
    export LIBVIRT_DEFAULT_URI=qemu:///system
    export HOSTPREP_BED_CONSOLE_DIR="$state/console"
    mkdir -p "$HOSTPREP_BED_CONSOLE_DIR"
    unset HOSTPREP_BOX
    PROXY_EXT_IP=192.168.57.10
    CLIENT_EXT_IP=192.168.57.20
    CLIENT_ALT_IP=192.168.57.21
    FINESSE_PORT=8445

    # -- libvirt, private to this mount namespace ---------------------------------------
    setup_libvirt() {
        local d
        for d in etc run lib log cache; do mkdir -p "$state/libvirt/$d"; done
        cp -a /etc/libvirt/. "$state/libvirt/etc/"
        # No network of the package's (the "default" NAT network): only Vagrant's.
        rm -f "$state/libvirt/etc/qemu/networks/autostart/"* "$state/libvirt/etc/qemu/networks/default.xml"
        # Measured here: with the mount namespace of each QEMU (the default), hiding
        # /dev/kvm below breaks the domain's /dev; and without a security driver
        # (no AppArmor or SELinux on the build machine) DAC alone labels the files.
        cat >> "$state/libvirt/etc/qemu.conf" <<'EOF'

# hostprep run-bed.sh: QEMU in this mount namespace as it is (no /dev of its own)
namespaces = [ ]
security_driver = "none"
EOF
        mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
        mount --bind "$state/libvirt/etc" /etc/libvirt
        mount --bind "$state/libvirt/run" /run/libvirt
        mount --bind "$state/libvirt/lib" /var/lib/libvirt
        mount --bind "$state/libvirt/log" /var/log/libvirt
        mount --bind "$state/libvirt/cache" /var/cache/libvirt
        # /dev/kvm: a nested device here that cannot run a stock kernel.  Seen by libvirt
        # it is "usable" and QEMU's capabilities are probed again on every domain start
        # (52 s each, measured); an inaccessible stand-in makes libvirt use TCG only.
        if [ -e /dev/kvm ]; then
            : > "$state/nokvm"
            chmod 000 "$state/nokvm"
            mount --bind "$state/nokvm" /dev/kvm
        fi
        virtlogd --daemon --pid-file=/run/libvirt/hostprep-virtlogd.pid
        libvirtd --daemon --pid-file=/run/libvirt/hostprep-libvirtd.pid
        for _ in $(seq 1 60); do
            virsh -q version >/dev/null 2>&1 && return 0
            sleep 1
        done
        die "libvirtd did not answer on qemu:///system within 60 s"
    }

    stop_libvirt() {
        local dom f
        for dom in $(virsh -q list --all --name 2>/dev/null); do
            virsh -q destroy "$dom" >/dev/null 2>&1 || true
            virsh -q undefine "$dom" --remove-all-storage >/dev/null 2>&1 || true
        done
        for f in /run/libvirt/hostprep-libvirtd.pid /run/libvirt/hostprep-virtlogd.pid; do
            [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
        done
    }

    keep_logs() {
        [ -n "${HOSTPREP_BED_KEEP_LOGS:-}" ] || return 0
        mkdir -p "$HOSTPREP_BED_KEEP_LOGS"
        cp -r /var/log/libvirt/. "$HOSTPREP_BED_CONSOLE_DIR"/. "$HOSTPREP_BED_KEEP_LOGS/" 2>/dev/null || true
    }

    inner_cleanup() {
        local rc=$?
        trap - EXIT INT TERM
        if [ -f "$ssh_config" ]; then
            ssh -F "$ssh_config" -O exit proxy >/dev/null 2>&1 || true
            ssh -F "$ssh_config" -O exit client >/dev/null 2>&1 || true
        fi
        say "cleanup: vagrant destroy -f"
        timeout 180 vagrant destroy -f >/dev/null 2>&1 || say "vagrant destroy failed; destroying the domains with virsh"
        keep_logs
        stop_libvirt
        exit "$rc"
    }
    trap inner_cleanup EXIT
    trap 'exit 130' INT TERM

    setup_libvirt
    say "libvirtd $(virsh -q version --daemon 2>/dev/null | awk '/daemon/ {print $NF}') in namespace $(ip netns identify $$ 2>/dev/null || echo '?'), box $box"

    passed=0
    failed=0
    failures=()
    t0=$(date +%s)
    # HOSTPREP_BED_KNOWN_FAILURES="name=why;name=why": checks that fail for a reason on record
    # (.ci/run says which and why).  Shown as XFAIL with the reason, not counted; one that
    # passes is an XPASS and counts as a failure, so the entry is removed (pytest's strict xfail).
    known_why() {
        local entry
        local IFS=';'
        for entry in ${HOSTPREP_BED_KNOWN_FAILURES:-}; do
            [ "${entry%%=*}" = "$1" ] && { printf '%s' "${entry#*=}"; return 0; }
        done
        return 1
    }
    xfailed=()
    check() {   # check NAME COMMAND...: run it, count and print PASS/FAIL with its time
        local name=$1 start rc=0 why
        shift
        start=$(date +%s)
        say "check $name"
        # In the background and waited for: a signal's trap runs at once (not after the
        # check); not in an `||` list, where bash would ignore set -e in the subshell.
        ( set -euo pipefail; "$@" ) &
        wait "$!" || rc=$?
        if why=$(known_why "$name"); then
            if [ "$rc" = 0 ]; then
                failed=$((failed + 1))
                failures+=("$name")
                printf 'XPASS %-9s (%d s): it passes now: remove it from HOSTPREP_BED_KNOWN_FAILURES (%s)\n' \
                    "$name" $(( $(date +%s) - start )) "$why"
            else
                xfailed+=("$name")
                printf 'XFAIL %-9s (%d s, exit %d): known failure: %s\n' "$name" $(( $(date +%s) - start )) "$rc" "$why"
            fi
        elif [ "$rc" = 0 ]; then
            passed=$((passed + 1))
            printf 'PASS  %-9s (%d s)\n' "$name" $(( $(date +%s) - start ))
        else
            failed=$((failed + 1))
            failures+=("$name")
            printf 'FAIL  %-9s (%d s, exit %d)\n' "$name" $(( $(date +%s) - start )) "$rc"
        fi
    }

    on() {      # on VM COMMAND...: run COMMAND on the VM (as vagrant), over ssh, argv kept
        local vm=$1
        shift
        # ssh joins its arguments into one line for the remote shell: each one quoted
        ssh -F "$ssh_config" -o BatchMode=yes -o ConnectTimeout=10 "$vm" -- "$(printf '%q ' "$@")"
    }
    root_on() { # root_on VM COMMAND: the same with sudo
        local vm=$1
        shift
        on "$vm" sudo "$@"
    }

    wait_ssh() {   # wait_ssh VM SECONDS: until the VM answers over ssh
        local vm=$1 until=$(( $(date +%s) + $2 ))
        while [ "$(date +%s)" -lt "$until" ]; do
            timeout 30 ssh -F "$ssh_config" -o BatchMode=yes -o ConnectTimeout=10 "$vm" true 2>/dev/null && return 0
            sleep 2
        done
        echo "$vm: no ssh within $2 s" >&2
        return 1
    }

    reboot_vm() {  # reboot_vm VM: a reboot from inside the guest; waits for a new boot id
        local vm=$1 before after start
        start=$(date +%s)
        before=$(on "$vm" cat /proc/sys/kernel/random/boot_id)
        root_on "$vm" systemctl reboot || true
        # the shared connection goes with the old boot (a stale one would hang the next command)
        ssh -F "$ssh_config" -O exit "$vm" >/dev/null 2>&1 || true
        sleep 5
        wait_ssh "$vm" 600
        after=$(on "$vm" cat /proc/sys/kernel/random/boot_id)
        [ "$before" != "$after" ] || { echo "$vm: the boot id did not change: no reboot" >&2; return 1; }
        echo "$vm: rebooted in $(( $(date +%s) - start )) s (boot id $after)"
    }

    ext_nic() { root_on proxy python3 -c 'import json; print(json.load(open("/etc/hostprep/settings.json"))["interface"])'; }

    # -- the checks ----------------------------------------------------------------------
    do_up() {
        # (without the upload's progress bar: one line per percent)
        vagrant up --provider=libvirt 2>&1 | sed -u 's/\x1b\[KProgress: [0-9]*%//g; /^\r*$/d'
        vagrant ssh-config > "$ssh_config"
        # One ssh connection per VM, reused (testinfra runs one command per ssh call; each
        # handshake costs about a second of the guest's emulated CPU).
        # A dead connection (the guest rebooted) is noticed in 15 s, not hung on.
        printf 'Host *\n  ControlMaster auto\n  ControlPath %s/cm-%%h\n  ControlPersist 600\n  ServerAliveInterval 5\n  ServerAliveCountMax 3\n' \
            "$state" >> "$ssh_config"
        [ "$(root_on proxy getenforce)" = Enforcing ]
        root_on proxy hostprep status >/dev/null
    }

    do_specs() {
        "$repo/.venv/bin/python" -m pytest "$repo/tests/host" --hosts=ssh://proxy \
            --ssh-config="$ssh_config" --sudo -q -p no:cacheprovider -rfEs
    }

    do_probes() {
        on client bash /opt/hostprep-src/vagrant/probe-from-client.sh
    }

    do_restart() {
        # netfilter-persistent's start runs iptables-restore without --noflush: every chain of
        # the filter table is flushed, hostprep's included (like iptables-services' start).
        root_on proxy systemctl restart netfilter-persistent
        root_on proxy iptables -S HOSTPREP-IN >/dev/null || { echo "after the restart: no HOSTPREP-IN chain" >&2; return 1; }
        root_on proxy hostprep status >/dev/null || { echo "after the restart: hostprep status is not clean" >&2; return 1; }
    }

    do_selinux() {
        local ext out rc
        ext=$(ext_nic)
        root_on proxy setenforce 0
        rc=0
        out=$(root_on proxy hostprep apply -i "$ext" -y -k -a -p "$CLIENT_EXT_IP" 2>&1) || rc=$?
        root_on proxy setenforce 1
        printf '%s\n' "$out" | tail -n 3
        [ "$rc" != 0 ] || { echo "apply under setenforce 0 did not refuse" >&2; return 1; }
        printf '%s\n' "$out" | grep -qi selinux || { echo "the refusal does not name SELinux" >&2; return 1; }
        [ "$(root_on proxy getenforce)" = Enforcing ]
        root_on proxy hostprep apply -i "$ext" -y -k -a -p "$CLIENT_EXT_IP" | tail -n 2
        # AVC denials of hostprep itself: its commands and its interpreter
        out=$(root_on proxy sh -c 'grep -h "avc: *denied" /var/log/audit/audit.log 2>/dev/null' \
              | grep -E 'comm="(hostprep|python3[.0-9]*)"|exe="/opt/hostprep/' || true)
        [ -z "$out" ] || { echo "AVC denials for hostprep:"; printf '%s\n' "$out"; return 1; } >&2
        echo "no AVC denial for hostprep in /var/log/audit/audit.log"
    }

    do_selinux_module() {
        local out wd=/srv/hostprep-bed-wd
        # the proxy container's working directory (HOST_WORKING_DIR) with the subdirectories
        # the module labels (selinux/hostprep_proxy.fc)
        root_on proxy mkdir -p "$wd/logs" "$wd/cache" "$wd/conf" "$wd/ssl" "$wd/html" "$wd/lua"
        # (the audit log's denials so far: those of install and remove are shown below)
        local seen
        seen=$(root_on proxy sh -c 'grep -c "avc: *denied" /var/log/audit/audit.log || true')
        root_on proxy hostprep selinux install --working-dir "$wd"
        root_on proxy semodule -l | grep -q '^hostprep_proxy\b' \
            || { echo "semodule -l: no hostprep_proxy after selinux install" >&2; return 1; }
        # (stat keeps the order of its arguments; ls sorts them)
        out=$(root_on proxy stat -c '%C %n' "$wd/logs" "$wd/cache" "$wd/conf")
        printf '%s\n' "$out"
        [ "$(printf '%s\n' "$out" | awk '{split($1, c, ":"); print c[3]}' | tr '\n' ' ')" \
          = "hostprep_proxy_log_t hostprep_proxy_cache_t hostprep_proxy_ro_t " ] \
            || { echo "not the module's types on $wd/logs, cache, conf" >&2; return 1; }
        root_on proxy hostprep selinux remove --working-dir "$wd"
        ! root_on proxy semodule -l | grep -q '^hostprep_proxy\b' || { echo "module still loaded after selinux remove" >&2; return 1; }
        out=$(root_on proxy stat -c '%C %n' "$wd/logs" "$wd/cache" "$wd/conf")
        printf '%s\n' "$out"
        ! printf '%s\n' "$out" | grep -q hostprep_proxy || { echo "labels left after selinux remove" >&2; return 1; }
        root_on proxy rm -rf "$wd"
        # For the record (the avc check judges hostprep's own): every denial during install
        # and remove, e.g. the reference policy's load_policy_t on the pipes of whoever ran
        # semodule.
        echo "AVC denials during selinux install/remove:"
        root_on proxy sh -c "grep 'avc: *denied' /var/log/audit/audit.log | tail -n +$((seen + 1)) | cut -c1-330" || true
    }

    do_confirm() {
        local ext pid out deadline cid
        ext=$(ext_nic)
        # The change under test: the client's second address may ping too.
        # (a connection of its own, not the shared one: killing it ends the session)
        ssh -n -F "$ssh_config" -o BatchMode=yes -o ControlMaster=no -o ControlPath=none proxy -- sudo hostprep apply -i "$ext" -y -k -a \
            -p "$CLIENT_EXT_IP" -p "$CLIENT_ALT_IP" --confirm 60 \; sleep 600 > "$state/confirm.out" 2>&1 &
        pid=$!
        deadline=$(( $(date +%s) + 120 ))
        until grep -q -i 'confirm' "$state/confirm.out"; do
            [ "$(date +%s)" -lt "$deadline" ] || { cat "$state/confirm.out"; echo "apply --confirm printed nothing" >&2; return 1; }
            sleep 1
        done
        sleep 2
        cat "$state/confirm.out"
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "the ssh session of apply --confirm 60 killed at $(date +%T)"
        root_on proxy systemctl list-timers --all --no-pager | grep hostprep-rollback \
            || { echo "no hostprep-rollback timer armed" >&2; return 1; }
        cid=$(root_on proxy python3 -c 'import json; print(json.load(open("/var/lib/hostprep/pending.json"))["id"])') \
            || { echo "no pending.json: no change waits for confirmation" >&2; return 1; }
        echo "change $cid waits for confirmation"
        on client ping -q -c 2 -W 2 -I "$CLIENT_ALT_IP" "$PROXY_EXT_IP" >/dev/null \
            || { echo "the change (ping from $CLIENT_ALT_IP) is not live before the deadline" >&2; return 1; }
        sleep 70
        # rolled back by the timer's unit (systemd's journal), recorded in hostprep's journal
        root_on proxy journalctl -b --no-pager -u "hostprep-rollback-$cid.service" | tail -n 3
        root_on proxy grep -F "rolled back change $cid" /var/log/hostprep/journal.log \
            || { echo "hostprep's journal has no rollback of change $cid" >&2; return 1; }
        out=$(root_on proxy hostprep status 2>&1) || true
        printf '%s\n' "$out" | grep -F "$cid" | grep -i 'rolled back' \
            || { printf '%s\n' "$out" | tail -n 15; echo "status does not say that change $cid was rolled back" >&2; return 1; }
        ! on client ping -q -c 2 -W 2 -I "$CLIENT_ALT_IP" "$PROXY_EXT_IP" >/dev/null \
            || { echo "ping from $CLIENT_ALT_IP still answered after the rollback" >&2; return 1; }
        root_on proxy test ! -e /var/lib/hostprep/pending.json
    }

    do_reboot() {
        local ext
        ext=$(ext_nic)
        reboot_vm proxy
        [ "$(root_on proxy getenforce)" = Enforcing ]
        # The boot journal, in order: hostprep.service finished before network-pre.target,
        # which systemd-networkd waits for, before it configured the external NIC.
        root_on proxy journalctl -b --no-pager -o short-monotonic \
            | grep -E "hostprep|network-pre|systemd-networkd|$ext" > "$state/boot-journal" || true
        awk 'NR <= 25' "$state/boot-journal"     # (not head: under pipefail its early exit fails the pipe)
        root_on proxy python3 - "$ext" <<'EOF'
import subprocess, sys
ext = sys.argv[1]
def show(unit, prop):
    return int(subprocess.run(["systemctl", "show", "-p", prop, "--value", unit],
                              capture_output=True, text=True, check=True).stdout.strip() or 0)
state = subprocess.run(["systemctl", "show", "-p", "ActiveState,Result", "hostprep.service"],
                       capture_output=True, text=True).stdout.split()
hp_done = show("hostprep.service", "ExecMainExitTimestampMonotonic")
pre = show("network-pre.target", "ActiveEnterTimestampMonotonic")
nd = show("systemd-networkd.service", "ExecMainStartTimestampMonotonic")
out = subprocess.run(["journalctl", "-b", "-o", "export", "-u", "systemd-networkd.service"],
                     capture_output=True, text=True).stdout
first_ext = 0
for entry in out.split("\n\n"):
    f = dict(l.split("=", 1) for l in entry.splitlines() if "=" in l)
    if f.get("MESSAGE", "").startswith(ext + ":"):
        first_ext = int(f["__MONOTONIC_TIMESTAMP"]); break
print(f"hostprep.service {state}: exited at {hp_done} us; network-pre.target at {pre} us; "
      f"systemd-networkd started at {nd} us; its first {ext} line at {first_ext} us")
ok = sorted(state) == ["ActiveState=active", "Result=success"] and 0 < hp_done <= pre <= nd < first_ext
sys.exit(0 if ok else 1)
EOF
        do_specs
        do_probes
    }

    do_failsafe() {
        local out cur
        cur=$(root_on proxy readlink /opt/hostprep/current)
        # hostprep boot cannot run: the interpreter the units name is gone.
        root_on proxy mv /opt/hostprep/current /opt/hostprep/current.away
        reboot_vm proxy || { root_on proxy mv /opt/hostprep/current.away /opt/hostprep/current; return 1; }
        root_on proxy systemctl is-failed hostprep.service || true
        root_on proxy journalctl -b --no-pager -o short-monotonic -u hostprep.service \
            -u netfilter-persistent.service -u nftables.service | tail -n 12
        root_on proxy sh -c 'grep "avc: *denied" /var/log/audit/audit.log | grep -v agetty | tail -n 6' || true
        out=$(root_on proxy iptables -S INPUT)
        printf '%s\n' "$out"
        # Loaded once: netfilter-persistent's drop-in loads it first, hostprep.service's
        # ExecStartPre= finds its jump live and skips it (one jump per chain and family).
        local tool chain n jumps=""
        for tool in iptables ip6tables; do
            for chain in INPUT FORWARD; do
                n=$(root_on proxy "$tool" -S "$chain" | grep -c -- '-j HOSTPREP-FAILSAFE$' || true)
                jumps="$jumps $tool/$chain:$n"
            done
        done
        echo "jumps into HOSTPREP-FAILSAFE:$jumps"
        # The external NIC came up closed: the Finesse port and the allowed ping get no answer.
        local rc=0 closed=1
        on client timeout 4 bash -c "exec 3<>/dev/tcp/$PROXY_EXT_IP/$FINESSE_PORT" 2>/dev/null && closed=0
        on client ping -q -c 2 -W 2 -I "$CLIENT_EXT_IP" "$PROXY_EXT_IP" >/dev/null 2>&1 && closed=0
        # the interpreter back; status says the fail-safe is (was) live
        root_on proxy mv /opt/hostprep/current.away /opt/hostprep/current
        [ "$(root_on proxy readlink /opt/hostprep/current)" = "$cur" ]
        out=$(root_on proxy hostprep status 2>&1) || rc=$?
        printf '%s\n' "$out" | grep -i 'fail-safe' || true
        [ "$closed" = 1 ] || { echo "the external NIC was open after the reboot without hostprep" >&2; return 1; }
        [ "$jumps" = " iptables/INPUT:1 iptables/FORWARD:1 ip6tables/INPUT:1 ip6tables/FORWARD:1" ] \
            || { echo "the fail-safe's jumps are not there exactly once each:$jumps" >&2; return 1; }
        printf '%s\n' "$out" | grep -q 'FAIL-SAFE is live' || { echo "status does not say the fail-safe is live" >&2; return 1; }
        [ "$rc" != 0 ] || { echo "status exited 0 with the fail-safe live" >&2; return 1; }
        # back to the real hardening: the unit again, then everything passes
        root_on proxy systemctl restart hostprep.service
        root_on proxy hostprep status >/dev/null
        do_probes
    }

    do_avc() {
        # Over the whole run (both reboots included): no AVC denial of hostprep's processes or
        # of another domain on hostprep's files (its sysctl drop-in, fail-safe rules, state).
        local out
        out=$(root_on proxy sh -c 'grep -h "avc: *denied" /var/log/audit/audit.log 2>/dev/null' \
              | grep -E 'hostprep|comm="python3[.0-9]*"|failsafe\.v[46]\.rules' || true)
        [ -z "$out" ] || { echo "AVC denials involving hostprep:"; printf '%s\n' "$out" | cut -c1-400; return 1; } >&2
        echo "no AVC denial involving hostprep in /var/log/audit/audit.log"
        # The files units rewrote (the confirm rollback, hostprep boot) carry the policy's default
        # label for their path, not the unit's (etc_runtime_t): what systemd-sysctl and
        # iptables-restore may read.
        local f ctx want bad=0
        for f in /etc/sysctl.d/90-hostprep.conf /etc/hostprep/failsafe.v4.rules /etc/systemd/system/hostprep.service; do
            ctx=$(root_on proxy stat -c %C "$f")
            want=$(root_on proxy matchpathcon -n "$f")
            echo "$f: $ctx (policy default: $want)"
            [ "$ctx" = "$want" ] || bad=1
        done
        [ "$bad" = 0 ] || { echo "a file of hostprep's does not carry its path's default label" >&2; return 1; }
    }

    check up do_up
    if [ "$failed" = 0 ]; then
        check specs do_specs
        check probes do_probes
        check restart do_restart
        check selinux do_selinux
        check selinux-module do_selinux_module
        check confirm do_confirm
        check reboot do_reboot
        check failsafe do_failsafe
        check avc do_avc
    else
        say "vagrant up failed: the other checks cannot run"
    fi
    say "VM stage: $(( $(date +%s) - t0 )) s; failed: ${failures[*]:-none}; known failures (not counted): ${xfailed[*]:-none}"
    echo "run-bed: $passed passed, $failed failed"
    [ "$failed" = 0 ] && exit 0
    exit 1
fi

# ----------------------------------------------------------------------------------------
# The outer part: in the machine's namespaces.  Packages, the box, the namespace.
# ----------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (network and mount namespaces, libvirtd)"
[ -x "$repo/.venv/bin/python" ] || die "$repo/.venv is missing: run 'sh scripts/install.sh --test' first (testinfra runs the host specs)"

# The packages of the bed, from Debian (--no-install-recommends).  A package's maintainer
# scripts must not start libvirtd in the machine's own namespace (its default network
# would add a bridge and NAT rules there): invoke-rc.d is told no by a policy-rc.d for
# the time of the install, when the machine has none of its own.
PKGS="qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-system-sysv libvirt-daemon-driver-qemu
libvirt-clients vagrant vagrant-libvirt mmdebstrap dnsmasq-base policycoreutils e2fsprogs rsync openssh-client"
missing=""
for p in $PKGS; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "apt-get install$missing"
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# hostprep run-bed.sh: no service starts during its install\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    # shellcheck disable=SC2086  # package names
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
        || { [ -z "$policy" ] || rm -f "$policy"; die "apt-get install$missing failed"; }
    [ -z "$policy" ] || rm -f "$policy"
fi

cache=${HOSTPREP_VAGRANT_CACHE:-/var/cache/hostprep-vagrant}
export VAGRANT_HOME=${VAGRANT_HOME:-$cache/vagrant.d}
t_box=$(date +%s)
bash "$here/build-box.sh"
box=$(bash "$here/build-box.sh" --print | cut -d' ' -f1)
say "box $box ready in $(( $(date +%s) - t_box )) s"

ns="hpvbed$$"
state=$(mktemp -d "/var/tmp/$ns.XXXXXX")
inner=""
outer_cleanup() {
    local rc=$? f p
    trap - EXIT INT TERM
    # The inner part leads a process group of its own (setsid): the signal reaches it
    # and what it runs (vagrant, ssh); its trap destroys the VMs.  Then, if it still
    # runs after 180 s, the whole group is killed.
    if [ -n "$inner" ] && kill -0 "$inner" 2>/dev/null; then
        kill -TERM -- "-$inner" 2>/dev/null || true
        for _ in $(seq 1 180); do kill -0 "$inner" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$inner" 2>/dev/null || true
    fi
    # What the inner part could not stop: QEMU and the daemons, by their pid files.
    for f in "$state"/libvirt/run/qemu/*.pid "$state"/libvirt/run/hostprep-*.pid; do
        [ -f "$f" ] || continue
        p=$(cat "$f" 2>/dev/null) || continue
        [ -n "$p" ] && kill -0 "$p" 2>/dev/null || continue
        say "cleanup: stopping PID $p ($(basename "$f"))"
        kill "$p" 2>/dev/null || true
    done
    sleep 1
    for f in "$state"/libvirt/run/qemu/*.pid; do
        [ -f "$f" ] && p=$(cat "$f" 2>/dev/null) && [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
    done
    # dnsmasq of libvirt's networks: started with pid files in the same place
    for f in "$state"/libvirt/lib/dnsmasq/*.pid "$state"/libvirt/run/network/*.pid; do
        [ -f "$f" ] && p=$(cat "$f" 2>/dev/null) && [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        echo "run-bed: namespace $ns left behind" >&2
        rc=2
    fi
    rm -rf -- "$state"
    exit "$rc"
}
trap outer_cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
say "namespace $ns, state in $state"
setsid ip netns exec "$ns" unshare --mount --propagation private -- \
    env VAGRANT_HOME="$VAGRANT_HOME" bash "$self" --inner "$state" "$box" &
inner=$!
rc=0
wait "$inner" || rc=$?
inner=""
exit "$rc"
