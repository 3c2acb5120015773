#!/bin/sh
# Install hostprep: the OS packages it runs (iptables in both variants, nftables,
# iproute2, ipset, conntrack, logrotate for its journal) with dnf or apt-get, then
# hostprep itself.  Run as root, from the source tree (any directory: it finds it).
#
#   sh scripts/install.sh              the system install: a self-contained environment
#                                      in /opt/hostprep, the command /usr/local/sbin/hostprep
#                                      (on root's PATH and sudo's secure_path); the boot
#                                      units 'apply' writes point there, so the source
#                                      tree can be moved or deleted afterwards.  Run it
#                                      again to upgrade in place: /etc/hostprep and
#                                      /var/lib/hostprep are left as they are.
#   sh scripts/install.sh --test       for development: ./.venv in the source tree with
#                                      what the tests need (scapy, pytest, testinfra), and
#                                      fail2ban (its service left off: the tests run their own)
#   sh scripts/install.sh --uninstall  remove the program (not the hardening: see below)
#
# --prefix DIR (default /opt/hostprep) and --sbindir DIR (default /usr/local/sbin) place
# the system install elsewhere (the tests install into a temporary directory);
# --no-packages skips dnf/apt-get.
set -eu
cd "$(dirname "$0")/.."
src=$(pwd)
mode=system
prefix=/opt/hostprep
sbindir=/usr/local/sbin
packages=1
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --test) mode=test ;;
        --uninstall) mode=uninstall ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --sbindir) sbindir=${2:?--sbindir needs a directory}; shift ;;
        --no-packages) packages=0 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see: sh scripts/install.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac
case "$sbindir" in /*) ;; *) echo "install.sh: --sbindir must be an absolute path" >&2; exit 2 ;; esac

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs OS packages and a system tool)" >&2
    exit 2
fi

if [ "$mode" = uninstall ]; then
    unit="${HOSTPREP_ROOT:-}/etc/systemd/system/hostprep.service"
    if [ -f "$unit" ] && grep -q "^ExecStart=$prefix/" "$unit" && [ "$force" = 0 ]; then
        echo "install.sh: $unit still starts $prefix at boot; remove the hardening first:" >&2
        echo "  hostprep flush --persistent     (the firewall rules and the boot units)" >&2
        echo "  hostprep flush --kernel         (the kernel profile, if 'apply -k' was used)" >&2
        echo "then run this again (or add --force to remove the program anyway)" >&2
        exit 1
    fi
    rm -f "$sbindir/hostprep"
    rm -rf "$prefix"
    echo "hostprep removed ($prefix, $sbindir/hostprep); /etc/hostprep, /var/lib/hostprep and"
    echo "/var/log/hostprep are kept (remove them by hand if you no longer want the records)"
    exit 0
fi

if [ "$packages" = 1 ]; then
    if command -v dnf >/dev/null 2>&1; then
        # RHEL 9 family: nft-based iptables; the legacy variant is not shipped there.
        dnf install -y -q iptables-nft nftables iproute ipset conntrack-tools ethtool logrotate python3.11 python3.11-pip \
            || dnf install -y -q iptables-nft nftables iproute ipset conntrack-tools ethtool logrotate python3 python3-pip
        # The fail2ban tests: EPEL's fail2ban-server (never fail2ban-firewalld); its service stays off.
        if [ "$mode" = test ] && ! command -v fail2ban-client >/dev/null 2>&1; then
            dnf install -y -q fail2ban-server \
                || echo "install.sh: fail2ban-server (EPEL) not installed: tests/kernel/test_fail2ban.py will be skipped" >&2
            systemctl disable --now fail2ban >/dev/null 2>&1 || true
        fi
    elif command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # Debian's iptables package carries both the nft and the legacy variant.
        apt-get install -y -qq iptables nftables iproute2 ipset conntrack ethtool logrotate python3-venv >/dev/null \
            || apt-get install -y -qq iptables nftables iproute2 ipset conntrack ethtool logrotate >/dev/null
        # The tests check the boot units with systemd-analyze verify (Debian: package systemd;
        # installing it does not make it PID 1).
        if [ "$mode" = test ] && ! command -v systemd-analyze >/dev/null 2>&1; then
            apt-get install -y -qq systemd >/dev/null || echo "install.sh: systemd-analyze not installed: the unit-file check will be skipped" >&2
        fi
        # fail2ban for tests/kernel/test_fail2ban.py, which runs its own server inside a sandbox
        # namespace: the package's own service must not start in the machine's namespace (its
        # sshd jail would ban there), so the install runs under a policy-rc.d that denies
        # starting services (only when none exists; removed afterwards) and, where systemd
        # runs, the service is disabled and stopped.  A system install leaves fail2ban to the
        # admin ('container up --fail2ban' names the package when it is missing).
        if [ "$mode" = test ] && ! command -v fail2ban-client >/dev/null 2>&1; then
            rcd=""
            if [ ! -e /usr/sbin/policy-rc.d ]; then
                rcd=/usr/sbin/policy-rc.d
                printf '#!/bin/sh\n# install.sh --test: no service starts while fail2ban is installed\nexit 101\n' >"$rcd"
                chmod 0755 "$rcd"
            fi
            apt-get install -y -qq --no-install-recommends fail2ban >/dev/null \
                || echo "install.sh: fail2ban not installed: tests/kernel/test_fail2ban.py will be skipped" >&2
            [ -n "$rcd" ] && rm -f "$rcd"
            if [ -d /run/systemd/system ]; then
                systemctl disable --now fail2ban >/dev/null 2>&1 || true
            fi
        fi
    else
        echo "install.sh: neither dnf nor apt-get found; install iptables, nftables, iproute2 by hand" >&2
        exit 2
    fi
fi

py=""
for cand in python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=$cand; break
    fi
done
if [ -z "$py" ]; then
    echo "install.sh: Python >= 3.11 is needed (RHEL 9: dnf install python3.11)" >&2
    exit 2
fi

if [ "$mode" = test ]; then
    [ -x .venv/bin/python ] || "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q ".[test]"
    echo "hostprep installed for development in $src/.venv ($(.venv/bin/hostprep --version))"
    echo "next: .venv/bin/python -m pytest -q -rfEs   (about 20 minutes as root on 2 cores: unit tests, kernel tests on three backends)"
    exit 0
fi

# The system install: each version in a venv of its own ($prefix/venv-<time>), and
# $prefix/current pointing at the one in use.  A new version is built and checked
# beside the old one, then 'current' is switched in one rename: an upgrade that fails
# half-way leaves the installed version working, and a boot at any moment finds one.
umask 022
mkdir -p "$prefix" "$sbindir"
ver="venv-$(date +%Y%m%d%H%M%S)-$$"
trap 'rm -rf "$prefix/$ver"' EXIT
"$py" -m venv "$prefix/$ver"
"$prefix/$ver/bin/python" -m pip install -q --upgrade pip >/dev/null
# Installed from the sources as a wheel (a copy): nothing links back to this tree.
"$prefix/$ver/bin/python" -m pip install -q "$src[probe]"
"$prefix/$ver/bin/hostprep" --version >/dev/null
ln -sfn "$ver" "$prefix/current.new"
mv -T "$prefix/current.new" "$prefix/current"
trap - EXIT
for old in "$prefix"/venv-*; do
    [ "$old" = "$prefix/$ver" ] || rm -rf "$old"
done
ln -sfn "$prefix/current/bin/hostprep" "$sbindir/hostprep"
echo "hostprep $("$sbindir/hostprep" --version | sed 's/^hostprep //') installed: $prefix, command $sbindir/hostprep"
# sudo finds commands only in its secure_path (RHEL's default has no /usr/local/sbin).
sp=$(grep -hs '^[[:space:]]*Defaults[[:space:]].*secure_path' /etc/sudoers /etc/sudoers.d/* | tail -n 1 | sed 's/.*secure_path[[:space:]]*=[[:space:]]*//; s/"//g')
if [ -n "$sp" ]; then
    case ":$sp:" in
        *":$sbindir:"*) ;;
        *) echo "note: sudo's secure_path ($sp) does not include $sbindir: use 'sudo $sbindir/hostprep ...'," \
                "or install again with --sbindir /usr/sbin" ;;
    esac
fi
echo "next: hostprep sandbox up          (try it in a throwaway sandbox)"
echo "  or: hostprep apply -i <external NIC>   (harden this host; 'hostprep apply --help' first)"
