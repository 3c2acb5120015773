#!/bin/bash
# Probe the proxy's external address from the client VM, as an internet host
# would, and judge each answer (or its absence):
#   vagrant ssh client -c 'bash /opt/hostprep/vagrant/probe-from-client.sh'
#
#   control  ping from the allowed source (hostprep apply -p)        answered
#   icmp     ping from the client's other address                    dropped
#   finesse  HTTP GET on the Finesse port                            answered
#   ssh      TCP 22 on the external address                          dropped (timeout, not refused)
#   deny     TCP on a port no container opened                       dropped (timeout, not refused)
#   burst    BURST new connections at once to the Finesse port       partly answered, partly dropped
#   recover  one connection a few seconds after the burst            answered
# "Dropped" means no answer at all within the timeout: a refusal (RST, or the
# ICMP reject of iptables-services' stock rules) is a failure.  Exit status: 0
# when every check passed, 1 otherwise.
#
# Environment (defaults are the Vagrantfile's addresses):
#   PROXY_EXT_IP (192.168.57.10)  CLIENT_EXT_IP (192.168.57.20)  CLIENT_ALT_IP (192.168.57.21)
#   FINESSE_PORT (8445)  CLOSED_PORT (8446)  BURST (40)
#   RATE (6) and RATE_BURST (8): the container's IPTABLES_HASH_LIMIT_UPTO and _BURST
set -uo pipefail

PROXY_EXT_IP=${PROXY_EXT_IP:-192.168.57.10}
CLIENT_EXT_IP=${CLIENT_EXT_IP:-192.168.57.20}
CLIENT_ALT_IP=${CLIENT_ALT_IP:-192.168.57.21}
FINESSE_PORT=${FINESSE_PORT:-8445}
CLOSED_PORT=${CLOSED_PORT:-8446}
BURST=${BURST:-40}
RATE=${RATE:-6}
RATE_BURST=${RATE_BURST:-8}
WAIT=3          # seconds without an answer that count as "dropped"

failed=0
pass() { printf 'PASS  %-8s %s\n' "$1" "$2"; }
fail() { printf 'FAIL  %-8s %s\n' "$1" "$2"; failed=1; }

# connect PORT SECONDS: open a TCP connection to the proxy and close it.
# Exit 0 connected, 124 no answer (dropped), anything else refused/unreachable.
# The inner script is single-quoted on purpose: the address and port are its $0, $1.
# shellcheck disable=SC2016
connect() {
    timeout "$2" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$PROXY_EXT_IP" "$1" 2>/dev/null
}

# The second address (provision-client.sh adds it; a reboot without
# NetworkManager's profile loses it).
ext=$(ip -o -4 addr show | awk -v a="$CLIENT_EXT_IP" '{ split($4, p, "/"); if (p[1] == a && !n++) print $2 }')
if [ -z "$ext" ]; then
    echo "probe: this host has no address $CLIENT_EXT_IP: run it on the client VM" >&2
    exit 2
fi
case " $(ip -o -4 addr show dev "$ext") " in
    *" $CLIENT_ALT_IP/"*) ;;
    *) sudo ip addr add "$CLIENT_ALT_IP/24" dev "$ext" ;;
esac
echo "probe: $PROXY_EXT_IP from $CLIENT_EXT_IP and $CLIENT_ALT_IP ($ext)"

# --- ICMP -------------------------------------------------------------------------------
if ping -q -c 2 -W 2 -I "$CLIENT_EXT_IP" "$PROXY_EXT_IP" >/dev/null 2>&1; then
    pass control "ping from $CLIENT_EXT_IP (allowed with -p) answered"
else
    fail control "ping from $CLIENT_EXT_IP (allowed with -p) not answered: the proxy is not reachable at all"
fi
ping -q -c 3 -W 2 -I "$CLIENT_ALT_IP" "$PROXY_EXT_IP" >/dev/null 2>&1
rc=$?
case $rc in
    1) pass icmp "ping from $CLIENT_ALT_IP dropped (no reply)" ;;
    0) fail icmp "ping from $CLIENT_ALT_IP answered: it should be dropped" ;;
    *) fail icmp "ping from $CLIENT_ALT_IP could not be sent (ping exit $rc)" ;;
esac

# --- the Finesse port, within the limits --------------------------------------------------
# shellcheck disable=SC2016  # single quotes on purpose: the address and port are $0, $1
reply=$(timeout "$WAIT" bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "GET / HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3
    IFS= read -r line <&3 && printf "%s" "$line"' "$PROXY_EXT_IP" "$FINESSE_PORT" 2>/dev/null)
rc=$?
url="http://$PROXY_EXT_IP:$FINESSE_PORT/"
case $reply in
    "HTTP/"*" 200"*) pass finesse "GET $url answered: ${reply%$'\r'}" ;;
    "") case $rc in
            124) fail finesse "GET $url: no answer in ${WAIT}s (dropped?)" ;;
            *) fail finesse "GET $url: connection refused or unreachable, or closed without a reply" ;;
        esac ;;
    *) fail finesse "GET $url answered: ${reply%$'\r'} (not 200)" ;;
esac

# --- ports that must be dropped -----------------------------------------------------------
for check in "ssh 22" "deny $CLOSED_PORT"; do
    name=${check% *}; port=${check#* }
    connect "$port" "$WAIT"
    rc=$?
    case $rc in
        124) pass "$name" "TCP $port on $PROXY_EXT_IP dropped (no answer in ${WAIT}s)" ;;
        0) fail "$name" "TCP $port on $PROXY_EXT_IP accepted: it should be dropped" ;;
        *) fail "$name" "TCP $port on $PROXY_EXT_IP refused or unreachable (exit $rc): it should be dropped silently" ;;
    esac
done

# --- a burst beyond the rate limit ----------------------------------------------------------
# Finesse's defaults: 6 new connections/s per source, burst 8, at most 10 at a time.
# BURST connections start together; each waits 0.9 s (below the 1 s SYN retransmit,
# so a dropped SYN is not retried into a refilled bucket).  The bucket refills first.
# At most RATE_BURST + RATE per second of the burst (+2 for rounding) may be
# answered: more means the limit did not bite, and timeouts came from elsewhere.
sleep 3
dir=$(mktemp -d)
start=$(date +%s%N)
for i in $(seq 1 "$BURST"); do
    ( connect "$FINESSE_PORT" 0.9; echo $? > "$dir/$i" ) &
done
wait
ms=$(( ($(date +%s%N) - start) / 1000000 ))
most=$(( RATE_BURST + (RATE * ms + 999) / 1000 + 2 ))
ok=0; dropped=0; other=0
for f in "$dir"/*; do
    case $(cat "$f") in
        0) ok=$((ok + 1)) ;;
        124) dropped=$((dropped + 1)) ;;
        *) other=$((other + 1)) ;;
    esac
done
rm -rf "$dir"
summary="$BURST connections to $FINESSE_PORT in ${ms} ms: $ok answered, $dropped dropped, $other refused"
if [ "$ok" -ge 1 ] && [ "$ok" -le "$most" ] && [ "$dropped" -ge 1 ] && [ "$other" = 0 ]; then
    pass burst "$summary"
else
    fail burst "$summary (expected 1..$most answered, the rest dropped, none refused)"
fi

# --- the limit lets the source back in ------------------------------------------------------
sleep 3
if connect "$FINESSE_PORT" "$WAIT"; then
    pass recover "TCP $FINESSE_PORT answered again 3 s after the burst"
else
    fail recover "TCP $FINESSE_PORT still not answered 3 s after the burst"
fi

if [ "$failed" = 0 ]; then
    echo "probe: all checks passed (on the proxy: sudo hostprep container list shows the drop counters)"
else
    echo "probe: some checks FAILED"
fi
exit "$failed"
