"""Real packets for proving the hardening: run inside a peer network namespace.

    ip netns exec <peer-ns> python -m hostprep.probe < probes.json > results.json

Input: a JSON list of probes; output: a JSON list of results, one per probe, in
order.  Each probe is a dict with a ``kind``:

  tcp      crafted TCP segment: dst, dport, [src, sport, flags="S", mss, timeout]
           (a SYN gets a real MSS option unless "mss" is given; null: none)
           -> answered, reply ("SA", "RA", "icmp 3/3"...)
  connect  a real socket connect(): dst, port, [src, timeout] -> answered (True
           when the handshake completed or was refused with RST)
  icmp     echo request: dst, [src, timeout] -> answered, reply
  udp      datagram: dst, dport, [src, timeout] -> answered (reply or ICMP error)
  frag     an echo request split into fragments: dst, [src, timeout]
  flood    count packets of TCP ``flags`` (default "R") within ``seconds``: dst,
           dport, count, [src, flags, seconds] -> sent
  ns       IPv6 neighbour solicitation for dst on iface -> answered (an NA came)
  icmperr  an ICMP error or redirect quoting a TCP segment of a flow: dst, type,
           [code=0, src, mtu (IPv4 3/4, IPv6 2), gw (IPv4 5, IPv6 137: the
           better first hop), hlim (IPv6, default 255)] and quote {src, dst,
           sport, dport, seq} (the segment as the host sent it) -> sent (no
           answer is waited for; the counters judge it)

The kernel tests and ``hostprep selftest`` share this module, so there is one
copy of the probe code.  scapy is imported lazily (extra ``probe``).
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import sys
import time


def _ip(dst: str, src: str | None):
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    kw = {"dst": dst}
    if src:
        kw["src"] = src
    return IP(**kw) if ipaddress.ip_address(dst).version == 4 else IPv6(**kw)


def _describe(reply) -> str | None:
    if reply is None:
        return None
    from scapy.layers.inet import ICMP, TCP, UDP
    from scapy.layers.inet6 import _ICMPv6

    if reply.haslayer(TCP):
        return str(reply[TCP].flags)
    if reply.haslayer(ICMP):
        return f"icmp {reply[ICMP].type}/{reply[ICMP].code}"
    # haslayer() matches the exact class only; the ICMPv6 messages are subclasses.
    layer = next((lay for lay in reply.iterpayloads() if isinstance(lay, _ICMPv6)), None)
    if layer is not None:
        return f"icmp6 {layer.type}/{getattr(layer, 'code', 0)}"
    if reply.haslayer(UDP):
        return "udp"
    return reply.summary()


def probe_tcp(p: dict) -> dict:
    from scapy.layers.inet import TCP
    from scapy.sendrecv import sr1

    # A SYN carries an MSS option as every real stack sends one (1460 on IPv4,
    # 1440 on IPv6) unless the probe says "mss": null (no option) or a value.
    mss = p["mss"] if "mss" in p else (
        (1460 if ipaddress.ip_address(p["dst"]).version == 4 else 1440) if "S" in p.get("flags", "S") else None)
    opts = [("MSS", int(mss))] if mss is not None else []
    pkt = _ip(p["dst"], p.get("src")) / TCP(sport=int(p.get("sport") or random.randint(20000, 60000)),
                                            dport=int(p["dport"]), flags=p.get("flags", "S"),
                                            seq=random.randint(1, 2**31), options=opts)
    reply = sr1(pkt, timeout=float(p.get("timeout", 1.0)), verbose=0)
    return {"answered": reply is not None, "reply": _describe(reply)}


def probe_connect(p: dict) -> dict:
    family = socket.AF_INET if ipaddress.ip_address(p["dst"]).version == 4 else socket.AF_INET6
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(float(p.get("timeout", 1.0)))
    try:
        if p.get("src"):
            s.bind((p["src"], 0))
        s.connect((p["dst"], int(p["port"])))
        return {"answered": True, "reply": "connected"}
    except ConnectionRefusedError:
        return {"answered": True, "reply": "refused"}
    except (TimeoutError, socket.timeout):
        return {"answered": False, "reply": None}
    except OSError as err:
        return {"answered": False, "reply": f"error {err.errno}"}
    finally:
        s.close()


def probe_icmp(p: dict) -> dict:
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoRequest
    from scapy.sendrecv import sr1

    base = _ip(p["dst"], p.get("src"))
    ident = random.randint(1, 65535)
    pkt = base / (ICMP(id=ident) if ipaddress.ip_address(p["dst"]).version == 4
                  else ICMPv6EchoRequest(id=ident))
    reply = sr1(pkt, timeout=float(p.get("timeout", 1.0)), verbose=0)
    return {"answered": reply is not None, "reply": _describe(reply)}


def probe_udp(p: dict) -> dict:
    from scapy.layers.inet import UDP
    from scapy.sendrecv import sr1

    pkt = _ip(p["dst"], p.get("src")) / UDP(sport=random.randint(20000, 60000), dport=int(p["dport"])) \
        / b"hostprep-probe"
    reply = sr1(pkt, timeout=float(p.get("timeout", 1.0)), verbose=0)
    return {"answered": reply is not None, "reply": _describe(reply)}


def probe_frag(p: dict) -> dict:
    """An echo request in fragments; answered when the reassembled echo gets its reply."""
    from scapy.layers.inet import ICMP, fragment
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6ExtHdrFragment, fragment6
    from scapy.sendrecv import AsyncSniffer, send

    timeout = float(p.get("timeout", 1.0))
    ident = random.randint(1, 65535)
    if ipaddress.ip_address(p["dst"]).version == 4:
        frags = fragment(_ip(p["dst"], p.get("src")) / ICMP(id=ident) / (b"x" * 1200), fragsize=512)

        def is_reply(r) -> bool:
            return r.haslayer(ICMP) and r[ICMP].type == 0 and r[ICMP].id == ident
    else:
        pkt = _ip(p["dst"], p.get("src")) / IPv6ExtHdrFragment() / ICMPv6EchoRequest(id=ident, data=b"x" * 1200)
        frags = fragment6(pkt, 600)

        def is_reply(r) -> bool:
            return r.haslayer(ICMPv6EchoReply) and r[ICMPv6EchoReply].id == ident
    sniffer = AsyncSniffer(lfilter=is_reply, count=1, store=True)
    sniffer.start()
    time.sleep(0.2)
    for f in frags:
        send(f, verbose=0)
    sniffer.join(timeout=timeout)
    if sniffer.running:
        sniffer.stop()
    got = sniffer.results or []
    return {"answered": bool(got), "reply": _describe(got[0]) if got else None, "fragments": len(frags)}


def probe_flood(p: dict) -> dict:
    from scapy.layers.inet import TCP
    from scapy.sendrecv import send

    count, seconds = int(p["count"]), float(p.get("seconds", 1.0))
    base = _ip(p["dst"], p.get("src"))
    pkts = [base / TCP(sport=random.randint(20000, 60000), dport=int(p["dport"]), flags=p.get("flags", "R"),
                       seq=random.randint(1, 2**31)) for _ in range(count)]
    start = time.monotonic()
    send(pkts, inter=seconds / max(count, 1) * 0.9, verbose=0)
    return {"answered": False, "sent": count, "elapsed": round(time.monotonic() - start, 3)}


def probe_ns(p: dict) -> dict:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
    from scapy.layers.l2 import Ether
    from scapy.arch import get_if_hwaddr
    from scapy.sendrecv import srp1
    from scapy.utils6 import in6_getnsma, in6_getnsmac

    iface, target = p["iface"], p["dst"]
    mac = get_if_hwaddr(iface)
    nsma = socket.inet_ntop(socket.AF_INET6, in6_getnsma(socket.inet_pton(socket.AF_INET6, target)))
    pkt = (Ether(src=mac, dst=in6_getnsmac(socket.inet_pton(socket.AF_INET6, nsma)))
           / IPv6(src=p["src"], dst=nsma, hlim=255) / ICMPv6ND_NS(tgt=target) / ICMPv6NDOptSrcLLAddr(lladdr=mac))
    reply = srp1(pkt, iface=iface, timeout=float(p.get("timeout", 1.0)), verbose=0)
    answered = reply is not None and reply.haslayer(ICMPv6ND_NA)
    return {"answered": answered, "reply": _describe(reply)}


def probe_icmperr(p: dict) -> dict:
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.inet6 import (IPv6, ICMPv6DestUnreach, ICMPv6ND_Redirect, ICMPv6NDOptRedirectedHdr,
                                    ICMPv6PacketTooBig, ICMPv6ParamProblem, ICMPv6TimeExceeded)
    from scapy.sendrecv import send

    q = p["quote"]
    segment = TCP(sport=int(q["sport"]), dport=int(q["dport"]), seq=int(q["seq"]), flags="PA")
    kind, code = int(p["type"]), int(p.get("code", 0))
    outer = _ip(p["dst"], p.get("src"))
    if ipaddress.ip_address(p["dst"]).version == 4:
        # the header of a full-size segment sent with DF, as PMTU discovery sends them
        quoted = IP(src=q["src"], dst=q["dst"], flags="DF", len=1500) / segment
        kw = {"nexthopmtu": int(p["mtu"])} if "mtu" in p else {}
        if "gw" in p:
            kw["gw"] = p["gw"]
        pkt = outer / ICMP(type=kind, code=code, **kw) / quoted
    else:
        quoted = IPv6(src=q["src"], dst=q["dst"]) / segment
        outer.hlim = int(p.get("hlim", 255))
        if kind == 137:
            msg = ICMPv6ND_Redirect(code=code, tgt=p.get("gw", "fe80::1"), dst=q["dst"]) \
                / ICMPv6NDOptRedirectedHdr(pkt=bytes(quoted))
        elif kind == 2:
            msg = ICMPv6PacketTooBig(code=code, mtu=int(p.get("mtu", 1280))) / quoted
        else:
            # 1, 3, 4 have their scapy classes; any other type (e.g. an unassigned error
            # type below 128) is sent in the layout of a destination unreachable
            cls = {3: ICMPv6TimeExceeded, 4: ICMPv6ParamProblem}.get(kind, ICMPv6DestUnreach)
            msg = cls(code=code) / quoted
            msg.type = kind
        pkt = outer / msg
    send(pkt, verbose=0)
    return {"answered": False, "sent": 1}


KINDS = {"tcp": probe_tcp, "connect": probe_connect, "icmp": probe_icmp, "udp": probe_udp,
         "frag": probe_frag, "flood": probe_flood, "ns": probe_ns, "icmperr": probe_icmperr}


def run(probes: list[dict]) -> list[dict]:
    results = []
    for p in probes:
        kind = p.get("kind")
        if kind not in KINDS:
            results.append({"answered": False, "error": f"unknown probe kind {kind!r}"})
            continue
        results.append(KINDS[kind](p))
    return results


def main() -> None:
    import logging

    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    probes = json.load(sys.stdin)
    json.dump(run(probes), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
