"""A tracked TCP connection from the sandbox host to the inet peer, for ICMP errors that quote it.

The peer sniffs the host's segments to learn the host's snd_nxt (the kernel ignores an
ICMP error whose embedded sequence number is outside snd_una..snd_nxt), and reports
it with the host's source port; the connection then stays open and idle, so an
``icmperr`` probe (hostprep/probe.py) can quote it exactly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from typing import Iterator

from bgproc import Bg
from hostprep.sandbox import HOST_EXT4, HOST_EXT6

FLOW_PEER = r"""
import json, socket, sys, time
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import AsyncSniffer
host, me, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
L3 = IPv6 if ":" in host else IP
sniffer = AsyncSniffer(iface="eth0", store=True,
                       lfilter=lambda p: L3 in p and TCP in p and p[L3].src == host and p[TCP].dport == port)
sniffer.start()
time.sleep(0.3)
ls = socket.socket(socket.AF_INET6 if ":" in me else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((me, port))
ls.listen(1)
print("listening", flush=True)
conn, peer = ls.accept()
line = conn.makefile("rb").readline()
time.sleep(0.3)
sniffer.stop()
def end(p):
    ip, t = p[L3], p[TCP]
    data = (ip.plen if L3 is IPv6 else ip.len - ip.ihl * 4) - t.dataofs * 4
    return (t.seq + data + (1 if t.flags.S else 0) + (1 if t.flags.F else 0)) % 2**32
segs = sniffer.results or []
print(json.dumps({"line": line.decode(), "sport": peer[1], "segments": len(segs), "seq": end(segs[-1])}),
      flush=True)
sys.stdin.readline()
"""

FLOW_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello\n")
print("connected", flush=True)
sys.stdin.readline()
s.close()
"""


@contextlib.contextmanager
def tracked_flow(host, peer: str, port: int = 8080) -> Iterator[dict]:
    """An idle TCP connection the sandbox host opened to ``peer`` (an inet address); yields the
    ``quote`` of an icmperr probe: the host's next segment of it (src, dst, sport, dport, seq)."""
    me = HOST_EXT4 if ipaddress.ip_address(peer).version == 4 else HOST_EXT6
    server = Bg(host.box.inet, FLOW_PEER, me, peer, str(port))
    client = None
    try:
        assert server.readline() == "listening", server.stderr()
        client = Bg(host.box.host, FLOW_CLIENT, peer, str(port))
        assert client.readline() == "connected"
        info = json.loads(server.readline())
        assert info["line"] == "hello\n"
        time.sleep(0.2)     # let the last ACK settle: the connection is idle from here on
        yield {"src": me, "dst": peer, "sport": info["sport"], "dport": port, "seq": info["seq"]}
    finally:
        for p in (client, server):
            if p is not None:
                p.kill()
