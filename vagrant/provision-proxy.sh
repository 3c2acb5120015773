#!/bin/bash
# Provision the `proxy` VM of hostprep's test bed (run by Vagrant as root, again
# with `vagrant provision proxy`; every step is safe to repeat):
#   1. SELinux enforcing, now and in /etc/selinux/config
#   2. the original installer's prerequisites: the distribution's iptables service with
#      RHEL's stock rules (ssh in, the rest rejected) enabled and started.  EL:
#      firewalld masked, iptables-services installed.  Debian (the local box):
#      netfilter-persistent, with the same stock rules in /etc/iptables/rules.v4/v6
#   3. hostprep installed with the README's system install (scripts/install.sh:
#      /opt/hostprep, /usr/local/sbin/hostprep), from the copy in SRC_DIR
#   4. a stand-in for the Finesse proxy container on FINESSE_PORT
#   5. hostprep apply on the external NIC (found by its address), with -k and -a
#   6. hostprep container up finesse, with env files written here
#
# Environment (set by the Vagrantfile):
#   PROXY_EXT_IP   the proxy's address on the external network (192.168.57.10)
#   PROXY_MGMT_IP  the proxy's address on the management network (192.168.56.10)
#   PING_FROM      the one source allowed to ping (the client, 192.168.57.20)
#   FINESSE_PORT   the Finesse port (8445)
#   STANDIN        podman (default; falls back to systemd) or systemd
#   SRC_DIR        where Vagrant copied the repository (/opt/hostprep-src)
set -euo pipefail

: "${PROXY_EXT_IP:?set by the Vagrantfile}" "${PROXY_MGMT_IP:?set by the Vagrantfile}"
: "${PING_FROM:?set by the Vagrantfile}"
FINESSE_PORT=${FINESSE_PORT:-8445}
STANDIN=${STANDIN:-podman}
SRC=${SRC_DIR:-/opt/hostprep-src}
LAB=/etc/hostprep-lab                 # the env files of the lab's Finesse container
HOSTPREP=/usr/local/sbin/hostprep     # scripts/install.sh's system install
IMAGE=registry.access.redhat.com/ubi9/ubi   # has python3 (dnf needs it); ~80 MB

say() { printf '==> provision-proxy: %s\n' "$*"; }
die() { printf '==> provision-proxy: ERROR: %s\n' "$*" >&2; exit 1; }

# The NIC that holds an IPv4 address, e.g. "192.168.57.10" -> eth2 (or enp0s9...).
nic_of() {
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a && !n++) print $2 }'
}

# --- 1. SELinux enforcing -------------------------------------------------------------
sed -i 's/^SELINUX=.*/SELINUX=enforcing/' /etc/selinux/config
case "$(getenforce)" in
    Enforcing) say "SELinux: enforcing" ;;
    Permissive) setenforce 1; say "SELinux: was permissive, now enforcing" ;;
    *)
        # Disabled cannot be switched on at runtime: the whole file system needs
        # labels, which the next boot does (autorelabel).
        grubby --update-kernel ALL --remove-args "selinux enforcing" || true
        touch /.autorelabel
        die "SELinux is disabled in this box; configured enforcing now: run 'vagrant reload proxy --provision'"
        ;;
esac

# --- 2. the original installer's prerequisites -----------------------------------------
if command -v dnf >/dev/null 2>&1; then
    say "dnf install iptables-services (the installer's 'Prepare Host' step)"
    dnf install -y -q iptables-services
    systemctl mask --now firewalld
    # enable --now is a no-op when iptables is already running: a re-provision does not
    # reload the stock rules over hostprep's (a restart would flush them).
    systemctl enable --now iptables
else
    # Debian: netfilter-persistent (iptables-persistent) is the service that loads saved
    # rules at boot, with iptables-restore without --noflush like iptables-services.
    # The same stock rules as RHEL's /etc/sysconfig/iptables and ip6tables.
    command -v netfilter-persistent >/dev/null 2>&1 \
        || die "netfilter-persistent is missing (apt-get install iptables-persistent)"
    mkdir -p /etc/iptables
    if [ ! -f /etc/iptables/rules.v4 ]; then
        cat > /etc/iptables/rules.v4 <<'EOF'
# hostprep lab: RHEL 9's stock /etc/sysconfig/iptables (iptables-services)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p icmp -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT
-A INPUT -j REJECT --reject-with icmp-host-prohibited
-A FORWARD -j REJECT --reject-with icmp-host-prohibited
COMMIT
EOF
        cat > /etc/iptables/rules.v6 <<'EOF'
# hostprep lab: RHEL 9's stock /etc/sysconfig/ip6tables (iptables-services)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -m state --state NEW -m udp -p udp --dport 546 -d fe80::/64 -j ACCEPT
-A INPUT -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT
-A INPUT -j REJECT --reject-with icmp6-adm-prohibited
-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
EOF
        restorecon -F /etc/iptables/rules.v4 /etc/iptables/rules.v6 2>/dev/null || true
        say "netfilter-persistent: RHEL's stock rules in /etc/iptables/rules.v4 and rules.v6"
        systemctl enable -q netfilter-persistent
        systemctl restart netfilter-persistent
    else
        systemctl enable -q netfilter-persistent
    fi
    # RHEL's Podman hosts have container-selinux (the 'container' policy module, container_t),
    # which `hostprep selinux install` builds on.  Debian 12's reference policy has no
    # 'container' module (selinux-policy-dev ships only its interface file): the lab loads
    # a STAND-IN built here from vagrant/selinux-standin/container.te, which declares
    # container_t and nothing else (that file says what it is and is not).  Lab only:
    # hostprep itself never builds or loads it.  A distribution module of that name, if
    # the box has one, is used instead.
    if ! semodule -l | grep -q '^container\b'; then
        pp=/usr/share/selinux/default/container.pp
        if [ -f "$pp" ] || [ -f "$pp.bz2" ]; then
            semodule -i "$( [ -f "$pp" ] && echo "$pp" || echo "$pp.bz2")"
            say "SELinux: the distribution's policy module 'container' loaded"
        else
            standin=$(mktemp -d /tmp/hostprep-lab-container.XXXXXX)
            cp "$SRC/vagrant/selinux-standin/container.te" "$standin/"
            make -s -C "$standin" -f /usr/share/selinux/devel/Makefile container.pp >/dev/null
            semodule -i "$standin/container.pp"
            rm -rf "$standin"
            say "SELinux: LAB STAND-IN policy module 'container' loaded (only container_t;" \
                "vagrant/selinux-standin/container.te): Debian 12 has no container-selinux"
        fi
    fi
    # Debian's procps ships /usr/lib/sysctl.d/99-protect-links.conf (fs.protected_fifos = 1,
    # ...), which sorts after hostprep's 90-hostprep.conf: `apply -k` reports the key as
    # overridden and exits non-zero (seen in this bed).  RHEL 9 has no such file.  Masked
    # the sysctl.d(5) way (same name in /etc, to /dev/null): hostprep's profile sets all
    # four of its keys (fs.protected_fifos 2, _regular 2, _hardlinks 1, _symlinks 1).
    if [ -f /usr/lib/sysctl.d/99-protect-links.conf ] && [ ! -e /etc/sysctl.d/99-protect-links.conf ]; then
        ln -s /dev/null /etc/sysctl.d/99-protect-links.conf
        say "sysctl.d: Debian's 99-protect-links.conf masked (it overrides hostprep's fs.protected_fifos)"
    fi
fi

# --- 3. hostprep, with the README's system install ------------------------------------
[ -f "$SRC/scripts/install.sh" ] || die "$SRC/scripts/install.sh missing: is the rsync synced folder there?"
say "sh scripts/install.sh (in $SRC): /opt/hostprep, $HOSTPREP"
(cd "$SRC" && sh scripts/install.sh)
# RHEL 9's sudo secure_path has no /usr/local/sbin: `sudo hostprep` (and the host specs
# over ssh --sudo) find it through /usr/sbin there (lab VM only; install.sh says so).
[ -x /usr/sbin/hostprep ] || ln -sfn "$HOSTPREP" /usr/sbin/hostprep

# Vagrant has just configured the NICs (systemd-networkd applies them a moment later).
for _ in $(seq 1 30); do
    ext=$(nic_of "$PROXY_EXT_IP")
    mgmt=$(nic_of "$PROXY_MGMT_IP")
    [ -z "$ext" ] || [ -z "$mgmt" ] || break
    sleep 1
done
[ -n "$ext" ] || die "no NIC holds $PROXY_EXT_IP: $(ip -o -4 addr show | awk '{print $2, $4}' | tr '\n' ' ')"
[ -n "$mgmt" ] || die "no NIC holds $PROXY_MGMT_IP"
say "external NIC: $ext ($PROXY_EXT_IP), management NIC: $mgmt ($PROXY_MGMT_IP)"

# --- 4. the Finesse stand-in ----------------------------------------------------------
# An HTTP server answering on FINESSE_PORT of every address.  Podman (default):
# a container with a published port, so the FORWARD-after-DNAT path is the one
# exercised, as with the installer's containers.  It starts BEFORE hostprep
# apply: netavark inserts its FORWARD jump at position 1 when its network comes
# up, and apply puts hostprep's jumps first after it.  The server's listen
# backlog is raised (python's default is 5) so the probe's bursts are limited by
# the firewall, not by a full accept queue.
server='import http.server as h, sys
h.ThreadingHTTPServer.request_queue_size = 128
h.ThreadingHTTPServer(("", int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()'

standin_podman() {
    command -v podman >/dev/null 2>&1 || dnf install -y -q podman || return 1
    podman pull -q "$IMAGE" >/dev/null || return 1
    podman run -d --replace --name finesse-standin --restart=always \
        -p "$FINESSE_PORT:8080" -w /tmp "$IMAGE" python3 -c "$server" 8080 >/dev/null || return 1
    systemctl enable -q podman-restart.service || true
}

standin_systemd() {
    mkdir -p /srv/finesse-standin
    echo "hostprep lab: Finesse stand-in" > /srv/finesse-standin/index.html
    printf '%s\n' "$server" > /usr/local/libexec/finesse-standin.py
    cat > /etc/systemd/system/finesse-standin.service <<EOF
[Unit]
Description=hostprep lab: HTTP stand-in for the Finesse proxy on port $FINESSE_PORT
After=network-online.target

[Service]
WorkingDirectory=/srv/finesse-standin
ExecStart=/usr/bin/python3 /usr/local/libexec/finesse-standin.py $FINESSE_PORT
Restart=always

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --now finesse-standin.service
}

mkdir -p /usr/local/libexec
if [ "$STANDIN" = podman ] && standin_podman; then
    say "stand-in: podman container finesse-standin ($IMAGE), published on $FINESSE_PORT"
    systemctl disable --now finesse-standin.service 2>/dev/null || true
else
    [ "$STANDIN" = podman ] && say "podman stand-in failed; falling back to a systemd unit"
    podman rm -f finesse-standin >/dev/null 2>&1 || true
    standin_systemd
    say "stand-in: systemd unit finesse-standin.service (host network) on $FINESSE_PORT"
fi
# Checked from the proxy itself on the management address (the client checks the
# external one): a local connection takes neither hostprep's chains nor FORWARD.
url="http://$PROXY_MGMT_IP:$FINESSE_PORT/"
for _ in $(seq 1 30); do
    curl -fsS -o /dev/null "$url" && break
    sleep 1
done
curl -fsS -o /dev/null "$url" || die "the stand-in does not answer on $url"

# --- 5. hostprep apply ----------------------------------------------------------------
# -a: the lab's external network is RFC 1918 (192.168.57.0/24); the spoof group
# drops private sources on the external NIC, so without -a every packet of the
# client would be dropped there and the probes would measure only that.
# -p: the client's first address may ping; its second address may not.
# --backend iptables: the host specs (tests/host) and run-bed's checks read iptables
# (iptables -S, ipset); without it the automatic choice takes the native nft backend
# here (Debian 12's kernel and nft pass its probe).  Later applies keep the remembered one.
say "hostprep apply -i $ext -y -k -a -p $PING_FROM --backend iptables"
"$HOSTPREP" apply -i "$ext" -y -k -a -p "$PING_FROM" --backend iptables

# --- 6. hostprep container up finesse -------------------------------------------------
mkdir -p "$LAB"
cat > "$LAB/finesse.env" <<EOF
# hostprep lab: the Finesse proxy container's env file (installer format)
TEMPLATE_TYPE=finesse
NGX_PRXY_FIN_PORT=$FINESSE_PORT
EOF
cat > "$LAB/core.env" <<EOF
# hostprep lab: core.env.  No load balancer in front of the proxy; only the
# proxy's own addresses are exempt from the rate limits, so the client is limited.
NGX_IPTABLES_HARDENING=1
NGX_LOAD_BALANCER_IPS=
NGX_RATELIMIT_DISABLE_IPS=$PROXY_EXT_IP|$PROXY_MGMT_IP|127.0.0.1
NGX_TRAFFIC_RESTRICTED=false
EOF
cat > "$LAB/installer.env" <<EOF
# hostprep lab: the address the Finesse container is bound to
PROXY_BINDING_IP=$PROXY_EXT_IP
EOF
say "hostprep container up finesse (env files in $LAB)"
"$HOSTPREP" container up finesse --env "$LAB/finesse.env" --core "$LAB/core.env" \
    --installer "$LAB/installer.env"

# --- the result -----------------------------------------------------------------------
"$HOSTPREP" container list
rc=0
"$HOSTPREP" status || rc=$?
if [ "$rc" = 0 ]; then
    say "done: hostprep status says live; now run the probe from the client (README.md)"
else
    # Not fatal, so `vagrant up` goes on to the client: tests/host and the probe judge.
    say "WARNING: hostprep status exited $rc (1 = desired and live differ, 2 = error); see above"
fi
