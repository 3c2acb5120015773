#!/usr/bin/env bash
# Run the testinfra host specs (tests/host) against a freshly hardened sandbox host.
#
# As root, from anywhere:  bash scripts/run-host-specs.sh
#   HOSTPREP_BACKEND=legacy bash scripts/run-host-specs.sh   (the other iptables variant)
#
# 1. `hostprep sandbox up` builds the namespaces hpspec<pid>, -inet, -admin and runs
#    `apply -i eth1 -y --ignore-selinux` inside with its state under a fresh
#    /var/tmp/hpspec<pid>.XXXXXX (mktemp -d);
# 2. `apply -k` inside it, with the kernel.*, vm.*, fs.*, dev.* keys pointed at a
#    temporary stand-in (HOSTPREP_PROC_SYS_NONNET: a copy of the machine's current
#    values, read only): the machine's own kernel/vm/fs sysctls are never written
#    (checked before and after); net.* keys are the sandbox namespace's own;
# 3. `container up finesse` with tests/fixtures/env/finesse.env and core.env;
# 4. pytest tests/host --hosts=local:// inside the sandbox namespace.
# The sandbox is always removed by name afterwards (trap), and the script fails if
# any of its namespaces is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "run-host-specs.sh: must run as root (it creates network namespaces)" >&2
    exit 2
fi
case "${HOSTPREP_BACKEND:-}" in
    ""|nft|legacy) ;;
    *) echo "run-host-specs.sh: HOSTPREP_BACKEND must be nft or legacy" >&2; exit 2 ;;
esac

repo=$(pwd)
py="$repo/.venv/bin/python"
name="hpspec$$"
# Fresh directories of root's (mktemp -d: 0700, fails rather than reuse what another
# user may have prepared under /var/tmp).
root=$(mktemp -d "/var/tmp/$name.XXXXXX")
standin=$(mktemp -d "/var/tmp/$name-procsys.XXXXXX")
# The specs read iptables (iptables -S, ipset): hostprep runs its iptables backend here,
# the variant asked for (hostprep's names: its own "nft" is the native nftables backend).
hp_backend="iptables${HOSTPREP_BACKEND:+-$HOSTPREP_BACKEND}"
backend_opt=(--backend "$hp_backend")
envs=(HOSTPREP_ROOT="$root" HOSTPREP_PROC_SYS_NONNET="$standin" SSH_CONNECTION= HOSTPREP_BACKEND="$hp_backend")

# The profile's keys that are not per network namespace's net.*: they go to the stand-in.
mapfile -t nonnet < <("$py" -c 'from hostprep import sysctl
print("\n".join(s.key for s in sysctl.profile() if not s.key.startswith("net.")))')
[ "${#nonnet[@]}" -gt 0 ] || { echo "run-host-specs.sh: no non-net key in the profile?" >&2; exit 1; }

machine_values() {   # this shell runs in the machine's own namespace; read only
    local k
    for k in "${nonnet[@]}" net.ipv4.ip_forward; do
        printf '%s=%s\n' "$k" "$(cat "/proc/sys/${k//.//}" 2>/dev/null || echo MISSING)"
    done
}

in_sandbox() {
    ip netns exec "$name" env "${envs[@]}" "$@"
}

left_behind() {
    ip netns list | awk '{print $1}' | grep -x -e "$name" -e "$name-inet" -e "$name-admin" || true
}

machine_before=$(machine_values)

cleanup() {
    local rc=$?
    trap - EXIT
    "$repo/.venv/bin/hostprep" sandbox down --name "$name" --root "$root" || true
    rm -rf -- "$standin"
    local left
    left=$(left_behind)
    if [ -n "$left" ]; then
        echo "run-host-specs.sh: namespaces left behind: $left" >&2
        rc=1
    fi
    if [ "$(machine_values)" != "$machine_before" ]; then
        echo "run-host-specs.sh: the machine's own kernel values changed:" >&2
        diff <(echo "$machine_before") <(machine_values) >&2 || true
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. the sandbox host, hardened (apply -i eth1 -y --ignore-selinux, then status)
"$repo/.venv/bin/hostprep" sandbox up --name "$name" --root "$root" "${backend_opt[@]}"

# 2. apply -k with the stand-in for the non-net keys
for k in "${nonnet[@]}"; do
    src="/proc/sys/${k//.//}"
    [ -r "$src" ] || continue            # a key this kernel lacks stays missing in the stand-in
    mkdir -p "$(dirname "$standin/${k//.//}")"
    cat "$src" > "$standin/${k//.//}"
done
# Before anything is written: hostprep must resolve the non-net keys into the
# stand-in and the net keys into the sandbox namespace's /proc/sys, or stop here.
where=$(cd "$repo" && in_sandbox "$py" -c 'from hostprep.sysctl import Kernel
k = Kernel(); print(k.path("vm.swappiness"), k.path("net.ipv4.ip_forward"))')
if [ "$where" != "$standin/vm/swappiness /proc/sys/net/ipv4/ip_forward" ]; then
    echo "run-host-specs.sh: hostprep would write the kernel keys elsewhere ($where); stopping" >&2
    exit 1
fi
in_sandbox "$py" -m hostprep apply -k --ignore-selinux

# 3. one container
in_sandbox "$py" -m hostprep container up finesse \
    --env tests/fixtures/env/finesse.env --core tests/fixtures/env/core.env

# 4. the specs, inside the sandbox host namespace
rc=0
in_sandbox HOSTPREP_CMD="$py -m hostprep" HOSTPREP_BACKEND="${HOSTPREP_BACKEND:-}" \
    "$py" -m pytest tests/host --hosts=local:// -q -p no:cacheprovider -rfEs || rc=$?
if [ "$rc" = 5 ]; then
    echo "run-host-specs.sh: pytest collected no host spec: that is a failure here" >&2
    exit 1
fi
exit "$rc"
