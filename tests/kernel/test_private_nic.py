"""An external NIC with a private address behind 1:1 NAT (a cloud host), issue 12 item 5.

The ingress hook drops stateless junk (fragments, bogus TCP flags) but not private
sources: a DHCP server, a DNS or an NTP server on the cloud's link answers from a private
address, and DHCP clients (NetworkManager's n-dhcp4, dhclient) read the offer through a
packet socket that sees a packet after the ingress hook but before any iptables table.
The spoof group stays in the filter table, after the fast path, where conntrack knows a
reply: the DNS reply gets through, the DHCP offer reaches the packet socket, while a
private-source SYN (even from the DNS server's address and port 53) and an unsolicited
"reply" are dropped; with the container ports flooded, a private-source SYN gets no cookie.
Both firewall variants (``host``).
"""

from __future__ import annotations

import json
import sys

from hostprep.model import SYNPROXY_BURST

from bgproc import Bg

NIC_PRIV, SERVER = "10.0.0.10", "10.0.0.1"      # the host's private address, the cloud's DNS/DHCP server
PORT = 8445

# A DNS-like server on SERVER:53 in the inet namespace: echoes every datagram once.
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(512)
    s.sendto(data, peer)
"""

# The host's query from its private address; prints the reply or "timeout".
QUERY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(1.0)
s.sendto(b"query", (sys.argv[2], 53))
try:
    print(s.recvfrom(512)[0].decode())
except OSError:
    print("timeout")
"""

# A packet socket as a DHCP client uses it (ETH_P_IP on eth1): prints how many UDP 67->68
# datagrams from SERVER it saw within 2 s.
DHCP_LISTEN = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind(("eth1", 0))
s.settimeout(0.2)
print("listening", flush=True)
seen, end = 0, time.monotonic() + 2.0
while time.monotonic() < end:
    try:
        pkt = s.recv(2048)
    except OSError:
        continue
    ihl = (pkt[0] & 15) * 4
    if pkt[9] == 17 and socket.inet_ntoa(pkt[12:16]) == sys.argv[1] and \
            struct.unpack("!HH", pkt[ihl:ihl + 4]) == (67, 68):
        seen += 1
print(seen, flush=True)
"""

SEND = r"""
import json, sys
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.sendrecv import sendp, send
p = json.load(sys.stdin)
if p["kind"] == "dhcp":
    sendp(Ether(dst=p["mac"]) / IP(src=p["src"], dst="255.255.255.255") / UDP(sport=67, dport=68) / (b"\x02" + b"\0" * 299),
          iface="eth0", count=3, verbose=0)
elif p["kind"] == "udp":
    send(IP(src=p["src"], dst=p["dst"]) / UDP(sport=53, dport=p["dport"]) / b"reply", verbose=0)
else:
    send(IP(src=p["src"], dst=p["dst"]) / TCP(sport=p["sport"], dport=p["dport"], flags="S", seq=1,
         options=[("MSS", 1460)]), verbose=0)
print("sent")
"""

FLOOD = r"""
import random, socket, sys
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
n, dst, mac = int(sys.argv[1]), sys.argv[2], sys.argv[3]
frames = [bytes(Ether(dst=mac) / IP(src=f"198.18.{i // 256}.{i % 256}", dst=dst) /
                TCP(sport=random.randint(1024, 65535), dport=8445, flags="S", options=[("MSS", 1460)]))
          for i in range(n)]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for f in frames:      # back to back: over the threshold's rate however slowly they were built
    s.send(f)
"""


def send(host, **p) -> None:
    assert host.run(host.box.inet, [sys.executable, "-c", SEND], input=json.dumps(p)).stdout.strip() == "sent"


def spoof_drops(host) -> int:
    return host.counter(4, "HOSTPREP-SPOOF", "hostprep spoof: 10.0.0.0/8")


def syn_cookies_sent(host) -> int:
    lines = host.run(host.box.host, ["cat", "/proc/net/stat/synproxy"]).stdout.split("\n")
    col = lines[0].split().index("syn_received")
    return sum(int(ln.split()[col], 16) for ln in lines[1:] if ln.split())


def test_private_external_nic_gets_replies_and_drops_private_spoofs(host, tmp_path):
    host.run(host.box.host, ["ip", "addr", "add", f"{NIC_PRIV}/24", "dev", "eth1"])
    host.run(host.box.inet, ["ip", "addr", "add", f"{SERVER}/24", "dev", "eth0"])
    host.apply()
    env, installer = tmp_path / "finesse.env", tmp_path / "installer.env"
    env.write_text("TEMPLATE_TYPE=finesse\n")
    installer.write_text(f"PROXY_BINDING_IP={NIC_PRIV}\n")      # 1:1 NAT: clients reach the private address
    host.hostprep("container", "up", "fin", "--env", str(env), "--installer", str(installer))
    dns = dhcp = None
    try:
        # DNS from the private server: the reply is tracked (fast path), the spoof group never sees it
        dns = Bg(host.box.inet, UDP_ECHO, SERVER)
        assert dns.readline() == "listening", dns.stderr()
        spoof0 = spoof_drops(host)
        got = host.run(host.box.host, [sys.executable, "-c", QUERY, NIC_PRIV, SERVER]).stdout.strip()
        assert (got, spoof_drops(host) - spoof0) == ("query", 0)

        # the DHCP offer from the private server reaches a packet socket on eth1 (not dropped at ingress)
        dhcp = Bg(host.box.host, DHCP_LISTEN, SERVER)
        assert dhcp.readline() == "listening", dhcp.stderr()
        mac = host.run(host.box.host, ["cat", "/sys/class/net/eth1/address"]).stdout.strip()
        send(host, kind="dhcp", src=SERVER, mac=mac)
        assert dhcp.readline() == "3"
        # (the filter table then drops the broadcast copies: nothing on the host listens on UDP 68
        # except through that packet socket)
        spoof0 = spoof_drops(host)

        # the same private source, unsolicited: a "reply" from port 53 and SYNs (from port 53 too)
        send(host, kind="udp", src=SERVER, dst=NIC_PRIV, dport=33333)
        send(host, kind="tcp", src=SERVER, dst=NIC_PRIV, sport=53, dport=PORT)
        send(host, kind="tcp", src="10.0.0.99", dst=NIC_PRIV, sport=40000, dport=PORT)
        assert spoof_drops(host) - spoof0 == 3

        # flooded container ports: a private-source SYN is dropped before the SYNPROXY target
        host.run(host.box.inet, [sys.executable, "-c", FLOOD, str(2 * SYNPROXY_BURST), NIC_PRIV, mac])
        cookies0 = syn_cookies_sent(host)
        assert cookies0 > 0
        send(host, kind="tcp", src="10.0.0.99", dst=NIC_PRIV, sport=40001, dport=PORT)
        assert (syn_cookies_sent(host), spoof_drops(host) - spoof0) == (cookies0, 4)
        # a public client still gets its cookie (control)
        r = host.probe1(host.box.inet, kind="tcp", dst=NIC_PRIV, dport=PORT, src="203.0.113.7", timeout=1.0)
        assert (r["reply"], syn_cookies_sent(host)) == ("SA", cookies0 + 1)
        # no stateless drop at ingress for any of these
        assert host.nft_counter("hostprep ddos: bogus tcp flags") == 0
    finally:
        for p in (dns, dhcp):
            if p is not None:
                p.kill()
