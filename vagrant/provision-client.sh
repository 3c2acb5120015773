#!/bin/bash
# Provision the `client` VM of hostprep's test bed (run by Vagrant as root): an
# "internet" host on the proxy's external network.  It gets the tools the probe
# uses, and a second address on the external network: the proxy lets the first
# address ping (hostprep apply -p) and not the second, so the probe can show both.
#
# Environment (set by the Vagrantfile):
#   CLIENT_EXT_IP  the client's address on the external network (192.168.57.20)
#   CLIENT_ALT_IP  its second address there (192.168.57.21)
set -euo pipefail

: "${CLIENT_EXT_IP:?set by the Vagrantfile}" "${CLIENT_ALT_IP:?set by the Vagrantfile}"

say() { printf '==> provision-client: %s\n' "$*"; }

# nmap-ncat (nc) for poking at the proxy by hand; timeout (coreutils), ping
# (iputils) and bash's /dev/tcp are what probe-from-client.sh uses.
# The local Debian box has ping and timeout already (and reaches no registry).
if command -v dnf >/dev/null 2>&1; then
    say "dnf install nmap-ncat iputils"
    dnf install -y -q nmap-ncat iputils
fi

# Vagrant has just configured the NIC (systemd-networkd applies it a moment later).
for _ in $(seq 1 30); do
    ext=$(ip -o -4 addr show | awk -v a="$CLIENT_EXT_IP" '{ split($4, p, "/"); if (p[1] == a && !n++) print $2 }')
    [ -z "$ext" ] || break
    sleep 1
done
[ -n "$ext" ] || { echo "provision-client: no NIC holds $CLIENT_EXT_IP: $(ip -o -4 addr show | awk '{print $2, $4}' | tr '\n' ' ')" >&2; exit 1; }
prefix=$(ip -o -4 addr show dev "$ext" | awk -v a="$CLIENT_EXT_IP" '{ split($4, p, "/"); if (p[1] == a && !n++) print p[2] }')

# The second address, in NetworkManager's profile of the NIC when there is one
# (it survives a reboot), else on the NIC directly (probe-from-client.sh adds it
# again when it is missing).
con=$(nmcli -g GENERAL.CONNECTION device show "$ext" 2>/dev/null || true)
# systemd-networkd (the local Debian box): a drop-in of Vagrant's file for the NIC.
if [ -f "/etc/systemd/network/50-vagrant-$ext.network" ]; then
    mkdir -p "/etc/systemd/network/50-vagrant-$ext.network.d"
    printf '[Network]\nAddress=%s/%s\n' "$CLIENT_ALT_IP" "$prefix" \
        > "/etc/systemd/network/50-vagrant-$ext.network.d/alt.conf"
    restorecon -R "/etc/systemd/network" 2>/dev/null || true
fi
if [ -n "$con" ]; then
    case " $(nmcli -g ipv4.addresses connection show "$con" | tr ',' ' ') " in
        *" $CLIENT_ALT_IP/"*) ;;
        *) nmcli connection modify "$con" +ipv4.addresses "$CLIENT_ALT_IP/$prefix"
           nmcli device reapply "$ext" || nmcli connection up "$con" ;;
    esac
fi
case " $(ip -o -4 addr show dev "$ext") " in
    *" $CLIENT_ALT_IP/"*) ;;
    *) ip addr add "$CLIENT_ALT_IP/$prefix" dev "$ext" ;;
esac
say "external NIC $ext: $(ip -o -4 addr show dev "$ext" | awk '{print $4}' | tr '\n' ' ')"
