#!/bin/bash
# Build the local Debian 12 libvirt box of hostprep's VM test bed, from Debian
# packages alone, and register it with Vagrant.  Run as root on a Debian 12 machine:
#
#   bash vagrant/build-box.sh            build the box unless the cached one is current,
#                                        then `vagrant box add` it (when not yet added)
#   bash vagrant/build-box.sh --print    print the box's name and cache directory, build nothing
#
# The box (vagrant/README.md, "The local Debian 12 box"):
#   - an mmdebstrap rootfs (minbase) of Debian 12 with systemd, udev, openssh-server,
#     sudo, iptables (+ netfilter-persistent), nftables, ipset, conntrack, python3
#     (+ venv), rsync, the Debian kernel and an initramfs;
#   - SELinux: the reference policy (selinux-policy-default, policycoreutils, auditd,
#     selinux-policy-dev to build hostprep's module), every file labelled at build
#     time with this machine's setfiles against the guest's file_contexts, so the
#     first boot needs no relabel; enforcing in /etc/selinux/config and on the kernel
#     command line (security=selinux);
#   - a `vagrant` user (passwordless sudo) with Vagrant's insecure public key
#     (Vagrant swaps it for a key of its own at the first `vagrant up`);
#   - hostprep's Python dependencies as wheels in /var/cache/hostprep-wheels,
#     downloaded here from PyPI for the guest's Python (3.11), with /etc/pip.conf
#     pointing pip there and at no index: the guests reach no registry, and
#     scripts/install.sh runs unchanged in them.  The apt sources are emptied for
#     the same reason (every package install.sh asks for is already installed).
#   - booted by libvirt's direct kernel boot (vmlinuz and initrd.img travel in the
#     box; the box's Vagrantfile sets kernel, initrd and the command line), the
#     root file system on /dev/vda (ext4, no partition table), eth0 by DHCP
#     (systemd-networkd), the other NICs configured by Vagrant.
#
# Cached in /var/cache/hostprep-vagrant/ (HOSTPREP_VAGRANT_CACHE), keyed by the
# sha256 of this script and of pyproject.toml (the wheels): a change to either
# builds a new box, named hostprep-debian12-<key>.  Vagrant's own state
# (VAGRANT_HOME) is <cache>/vagrant.d unless VAGRANT_HOME is set.
#
# Needs: mmdebstrap, qemu-utils, e2fsprogs (mkfs.ext4 -d keeps xattrs), policycoreutils
# (setfiles), python3 with pip, vagrant; network access to the Debian and PyPI
# registries (this machine's apt sources are used as they are).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${HOSTPREP_VAGRANT_CACHE:-/var/cache/hostprep-vagrant}
export VAGRANT_HOME=${VAGRANT_HOME:-$cache/vagrant.d}
export VAGRANT_CHECKPOINT_DISABLE=1
SUITE=bookworm
DISK_GIB=6
# The kernel command line of the box (direct kernel boot).  net.ifnames=0: eth0 is
# Vagrant's management NIC, eth1.. the private networks in the Vagrantfile's order.
CMDLINE="root=/dev/vda rw console=ttyS0 net.ifnames=0 security=selinux selinux=1 enforcing=1"

say() { printf '==> build-box: %s\n' "$*"; }
die() { printf 'build-box: %s\n' "$*" >&2; exit 1; }

key=$(cat "$0" "$repo/pyproject.toml" | sha256sum | cut -c1-12)
name="hostprep-debian12-$key"
dir="$cache/$name"
box="$dir/$name.box"

if [ "${1:-}" = --print ]; then
    printf '%s %s\n' "$name" "$dir"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap --mode=root, setfiles, mkfs)"

registered() {
    vagrant box list --machine-readable 2>/dev/null | awk -F, -v n="$name" '$3 == "box-name" && $4 == n { f = 1 } END { exit !f }'
}

if [ -f "$box" ]; then
    say "cached: $box"
else
    for tool in mmdebstrap qemu-img mkfs.ext4 setfiles vagrant; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (apt-get install mmdebstrap qemu-utils e2fsprogs policycoreutils vagrant)"
    done
    sources=/etc/apt/sources.list.d/debian.sources
    [ -f "$sources" ] || sources=/etc/apt/sources.list
    [ -s "$sources" ] || die "no apt sources on this machine ($sources): mmdebstrap needs a Debian mirror"
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf -- "$work"' EXIT
    trap 'exit 130' INT TERM
    root="$work/rootfs"
    started=$(date +%s)

    # 1. the wheels, for the guest's Python (3.11, manylinux x86_64): hostprep's
    #    dependencies with the [probe] and [test] extras, and what pip needs to build
    #    hostprep itself from its sources (setuptools, wheel) and to upgrade itself.
    say "wheels (pip download for CPython 3.11, x86_64)"
    mapfile -t reqs < <(python3 - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
reqs = list(p["project"]["dependencies"]) + list(p["build-system"]["requires"]) + ["pip"]
for extra in ("probe", "test"):
    reqs += p["project"].get("optional-dependencies", {}).get(extra, [])
print("\n".join(sorted(set(reqs))))
EOF
)
    mkdir -p "$work/wheels"
    [ "${#reqs[@]}" -gt 3 ] || die "no requirements read from pyproject.toml"
    # (without pip's warnings about this machine's own file:// indexes, one per package)
    python3 -m pip download -q --dest "$work/wheels" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        "${reqs[@]}" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    say "wheels: $(find "$work/wheels" -name '*.whl' | wc -l) files"

    # 2. the rootfs
    pkgs=(systemd-sysv udev dbus kmod procps iproute2 iputils-ping openssh-server sudo
          less curl ca-certificates rsync python3 python3-venv
          linux-image-amd64 initramfs-tools
          iptables iptables-persistent netfilter-persistent nftables ipset conntrack ethtool logrotate
          selinux-basics selinux-policy-default selinux-policy-dev policycoreutils semodule-utils
          checkpolicy auditd make m4)
    # iptables-persistent would save the rules it sees at install: the build machine's.
    # shellcheck disable=SC2016  # $1 is mmdebstrap's: the rootfs
    preseed='printf "iptables-persistent iptables-persistent/autosave_v4 boolean false\niptables-persistent iptables-persistent/autosave_v6 boolean false\n" | chroot "$1" debconf-set-selections'
    say "mmdebstrap $SUITE (minbase + ${#pkgs[@]} packages)"
    DEBIAN_FRONTEND=noninteractive mmdebstrap --variant=minbase --mode=root --format=directory \
        --include="$(IFS=,; echo "${pkgs[*]}")" \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --essential-hook="$preseed" \
        "$SUITE" "$root" "$sources" >"$work/mmdebstrap.log" 2>&1 \
        || { tail -n 30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }

    # 3. configuration
    say "configure (vagrant user, sshd, networkd, SELinux, pip)"
    echo proxy > "$root/etc/hostname"            # Vagrant sets the real one
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
    printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > "$root/etc/fstab"
    : > "$root/etc/apt/sources.list"
    rm -f "$root"/etc/apt/sources.list.d/*
    # eth0: Vagrant's management network, by DHCP.  Only eth0: the private networks are
    # Vagrant's files (50-vagrant-ethN.network), which an earlier wider match would beat.
    mkdir -p "$root/etc/systemd/network"
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/99-dhcp.network"
    chroot "$root" systemctl enable -q systemd-networkd.service
    # Vagrant writes its .network files in /tmp and moves them: they keep user_tmp_t, which
    # systemd-networkd may not read under SELinux (an AVC denial, the NIC left unconfigured).
    # Vagrant restarts networkd next: the files get their policy labels first ('+': outside
    # the unit's sandbox, where /etc is read-only).
    mkdir -p "$root/etc/systemd/system/systemd-networkd.service.d"
    printf '[Service]\nExecStartPre=-+/sbin/restorecon -R /etc/systemd/network\n' \
        > "$root/etc/systemd/system/systemd-networkd.service.d/vagrant-labels.conf"
    chroot "$root" systemctl enable -q serial-getty@ttyS0.service 2>/dev/null || true
    chroot "$root" useradd -m -s /bin/bash vagrant
    install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
    vkey=$(dpkg -L vagrant 2>/dev/null | grep '/keys/vagrant\.pub$' | head -n 1 || true)
    [ -f "$vkey" ] || vkey=$(ruby -e 'print Gem::Specification.find_by_name("vagrant").gem_dir' 2>/dev/null)/keys/vagrant.pub
    [ -f "$vkey" ] || die "Vagrant's insecure public key (keys/vagrant.pub of the vagrant gem) not found"
    install -m 600 -o 1000 -g 1000 "$vkey" "$root/home/vagrant/.ssh/authorized_keys"
    printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' > "$root/etc/sudoers.d/vagrant"
    chmod 440 "$root/etc/sudoers.d/vagrant"
    printf 'UseDNS no\nPasswordAuthentication no\n' > "$root/etc/ssh/sshd_config.d/vagrant.conf"
    # Host keys of their own in each VM (the rootfs's ones would be shared by every box user).
    rm -f "$root"/etc/ssh/ssh_host_*
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    # (before Debian's own `sshd -t`, which fails without host keys: the list is reset)
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
        > "$root/etc/systemd/system/ssh.service.d/hostkeys.conf"
    # SELinux enforcing on the reference policy ("default" on Debian).
    sed -i 's/^SELINUX=.*/SELINUX=enforcing/; s/^SELINUXTYPE=.*/SELINUXTYPE=default/' "$root/etc/selinux/config"
    grep -q '^SELINUX=enforcing' "$root/etc/selinux/config" || die "no SELINUX= line in the guest's /etc/selinux/config"
    # pip: the wheels, no index (the guests reach no registry).
    mkdir -p "$root/var/cache/hostprep-wheels"
    cp "$work"/wheels/*.whl "$root/var/cache/hostprep-wheels/"
    printf '[global]\nno-index = true\nfind-links = /var/cache/hostprep-wheels\ndisable-pip-version-check = true\n' \
        > "$root/etc/pip.conf"
    # The kernel and initramfs leave with the box (direct kernel boot).
    cp -L "$root/vmlinuz" "$work/vmlinuz"
    cp -L "$root/initrd.img" "$work/initrd.img"
    chmod 644 "$work/vmlinuz" "$work/initrd.img"

    # 4. SELinux labels, with this machine's setfiles and the guest's file_contexts
    #    (mkfs.ext4 -d copies the security.selinux xattrs): no relabel at the first boot.
    say "setfiles (label the rootfs)"
    fc="$root/etc/selinux/default/contexts/files/file_contexts"
    [ -f "$fc" ] || die "$fc missing: selinux-policy-default did not install its policy"
    setfiles -F -r "$root" "$fc" "$root"
    label=$(python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "security.selinux").rstrip(b"\0").decode())' \
        "$root/etc/shadow" 2>/dev/null || true)
    case "$label" in *:shadow_t:*) ;; *) die "setfiles left no label on /etc/shadow (got '$label')" ;; esac

    # 5. disk image: ext4 from the directory, then a compressed qcow2
    say "mkfs.ext4 -d + qemu-img convert"
    truncate -s "${DISK_GIB}G" "$work/root.raw"
    mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw"
    qemu-img convert -c -O qcow2 "$work/root.raw" "$work/box.img"
    rm -f "$work/root.raw"

    # 6. the box: metadata, a Vagrantfile with the direct kernel boot, the files
    cat > "$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GIB}
EOF
    cat > "$work/Vagrantfile" <<EOF
# hostprep's local Debian 12 box (vagrant/build-box.sh): direct kernel boot.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    box_dir = File.dirname(__FILE__)
    lv.kernel = File.join(box_dir, "vmlinuz")
    lv.initrd = File.join(box_dir, "initrd.img")
    lv.cmd_line = "$CMDLINE"
    lv.disk_bus = "virtio"
  end
end
EOF
    rm -rf "$root"
    mkdir -p "$dir"
    tar -C "$work" -cf "$box.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img
    mv "$box.tmp" "$box"
    say "built $box ($(du -m "$box" | cut -f1) MiB) in $(( $(date +%s) - started )) s"
    rm -rf -- "$work"
    trap - EXIT
fi

if registered; then
    say "registered: $name (VAGRANT_HOME=$VAGRANT_HOME)"
else
    say "vagrant box add $name"
    vagrant box add -f --name "$name" "$box" >/dev/null
fi
# Older boxes of this script (another key) go: one box in the cache at a time.
for old in "$cache"/hostprep-debian12-*; do
    if [ ! -d "$old" ] || [ "$old" = "$dir" ]; then continue; fi
    vagrant box remove -f --all "$(basename "$old")" >/dev/null 2>&1 || true
    rm -rf -- "$old"
done
printf '%s\n' "$name"
