#!/bin/sh
# Install hostprep: the OS packages it runs (iptables in both variants, nftables,
# iproute2, ipset, conntrack, logrotate for its journal) with dnf or apt-get, and the Python package in a
# virtual environment at ./.venv.  Run as root from the source tree.
#   sh scripts/install.sh          runtime only
#   sh scripts/install.sh --test   plus what the tests need (scapy, pytest, testinfra)
set -eu
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs OS packages)" >&2
    exit 2
fi

if command -v dnf >/dev/null 2>&1; then
    # RHEL 9 family: nft-based iptables; the legacy variant is not shipped there.
    dnf install -y -q iptables-nft nftables iproute ipset conntrack-tools ethtool logrotate python3.11 python3.11-pip \
        || dnf install -y -q iptables-nft nftables iproute ipset conntrack-tools ethtool logrotate python3 python3-pip
elif command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's iptables package carries both the nft and the legacy variant.
    apt-get install -y -qq iptables nftables iproute2 ipset conntrack ethtool logrotate python3-venv >/dev/null \
        || apt-get install -y -qq iptables nftables iproute2 ipset conntrack ethtool logrotate >/dev/null
    # The tests check the boot units with systemd-analyze verify (Debian: package systemd;
    # installing it does not make it PID 1).
    if [ "$want_test" = 1 ] && ! command -v systemd-analyze >/dev/null 2>&1; then
        apt-get install -y -qq systemd >/dev/null || echo "install.sh: systemd-analyze not installed: the unit-file check will be skipped" >&2
    fi
else
    echo "install.sh: neither dnf nor apt-get found; install iptables, nftables, iproute2 by hand" >&2
    exit 2
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

[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$want_test" = 1 ]; then
    .venv/bin/python -m pip install -q ".[test]"
else
    .venv/bin/python -m pip install -q ".[probe]"
fi
echo "hostprep installed in $(pwd)/.venv ($(.venv/bin/hostprep --version))"
