#!/bin/sh
# Check the Vagrant test bed in vagrant/ without a hypervisor:
#   1. shellcheck on its shell scripts (and on this script)
#   2. `vagrant validate` of the Vagrantfile, when the distribution packages
#      Vagrant (Debian 12 does: `apt-cache policy vagrant` shows a candidate);
#      otherwise says so
#   3. `ruby -c` of the Vagrantfile (Ruby syntax), in every case
# Nothing is started: no VM, no box download, no network of the VMs.
#
#   sh scripts/check-vagrant.sh           check vagrant/
#   sh scripts/check-vagrant.sh DIR       check a copy of vagrant/ in DIR
#
# Installs what it needs when it is missing (as root, with apt-get, Debian): the
# packages shellcheck, vagrant (--no-install-recommends: not vagrant-libvirt nor
# libvirt) and ruby.  Vagrant's own state goes to a temporary directory (VAGRANT_HOME,
# VAGRANT_DOTFILE_PATH), so no .vagrant/ or ~/.vagrant.d is left behind.
set -eu
cd "$(dirname "$0")/.."
dir=${1:-vagrant}
self=scripts/check-vagrant.sh

if [ ! -f "$dir/Vagrantfile" ]; then
    echo "check-vagrant: $dir/Vagrantfile not found" >&2
    exit 2
fi

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "check-vagrant: $1 is missing and apt-get is not available: install $1 by hand" >&2
        exit 2
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "check-vagrant: $1 is missing: run as root to install it (apt-get install $1)" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. shellcheck: the scripts of the test bed (bash, by their shebang) and this one (sh).
command -v shellcheck >/dev/null 2>&1 || apt_install shellcheck
set -- "$dir"/*.sh "$self"
echo "check-vagrant: shellcheck $*"
if ! shellcheck "$@"; then
    echo "check-vagrant: FAILED: shellcheck" >&2
    exit 1
fi

# 2. vagrant validate, when the distribution has a vagrant package.
work=$(mktemp -d "${TMPDIR:-/tmp}/hostprep-vagrant-check.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
validated=no
if ! command -v vagrant >/dev/null 2>&1 && command -v apt-cache >/dev/null 2>&1 \
        && apt-cache policy vagrant 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_install vagrant
fi
if command -v vagrant >/dev/null 2>&1; then
    # No hypervisor here: --ignore-provider stands mock providers in, so validate
    # checks the machine definitions (boxes named, networks, synced folders,
    # provisioner paths exist) without VirtualBox or the vagrant-libvirt plugin.
    # The box is not downloaded.
    echo "check-vagrant: vagrant validate --ignore-provider ($(vagrant --version 2>/dev/null))"
    if ! (cd "$dir" && VAGRANT_HOME="$work/home" VAGRANT_DOTFILE_PATH="$work/dot" \
            VAGRANT_CHECKPOINT_DISABLE=1 vagrant validate --ignore-provider); then
        echo "check-vagrant: FAILED: vagrant validate" >&2
        exit 1
    fi
    validated=yes
else
    echo "check-vagrant: vagrant is not installed and the distribution has no vagrant" \
         "package: vagrant validate NOT run (only ruby -c below)"
fi

# 3. ruby -c: the Vagrantfile's Ruby syntax (vagrant depends on ruby; install it if not).
command -v ruby >/dev/null 2>&1 || apt_install ruby
echo "check-vagrant: ruby -c $dir/Vagrantfile"
if ! ruby -c "$dir/Vagrantfile"; then
    echo "check-vagrant: FAILED: ruby -c $dir/Vagrantfile" >&2
    exit 1
fi

echo "check-vagrant: ok (shellcheck: $# scripts; vagrant validate: $validated; ruby -c: ok)"
