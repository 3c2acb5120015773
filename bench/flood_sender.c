/*
 * flood_sender: the flood of bench/flood.py, compiled by it at run time (cc -O2).
 *
 * Sends crafted IPv4 frames on one interface with an AF_PACKET socket, at most
 * RATE packets per second for SECONDS seconds, then prints one line of JSON:
 * {"sent": N, "seconds": S}.  Only for a veth pair the bench made inside its own
 * network namespaces: the interface and both MAC addresses are given by the bench.
 *
 *   flood_sender IFNAME SRCMAC DSTMAC DSTIP DPORT KIND RATE SECONDS SEED
 *
 * KIND: syn   TCP SYN from a different source address each packet (198.18.0.0/15,
 *             the benchmarking range of RFC 2544) and a random source port
 *       ack   the same with only ACK set (NEW without SYN for conntrack)
 *       junk  bogus flag combinations (SYN+FIN, XMAS, NULL) from random sources
 *       frag  IPv4 first fragments (MF set) of a TCP SYN from random sources
 *
 * Every segment carries an MSS option of 1460, as real stacks and real SYN floods
 * send (a SYN without one is dropped early by hostprep's "odd mss" rule, which would
 * flatter it).  Checksums are correct, so what the receiver drops it drops for its rules.
 * No packet is addressed outside the bench's namespaces: the destination is the
 * sandbox host, and its replies go to the spoofed sources, routed to the bench's
 * "internet" namespace, which does not forward them.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "packet_util.h"

#define BATCH 64
#define FRAME 58 /* 14 Ethernet + 20 IPv4 + 24 TCP (with an MSS option, as real stacks send) */

static uint64_t rng;
static uint32_t next_rand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)rng;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One frame of KIND from a fresh random source into buf. */
static void build(uint8_t *buf, const uint8_t *src_mac, const uint8_t *dst_mac, uint32_t dst_ip,
                  uint16_t dport, const char *kind) {
    uint8_t *ip = buf + 14, *tcp = buf + 34;
    uint32_t src_ip = htonl(0xC6120000u | (next_rand() & 0x1ffffu)); /* 198.18.0.0/15 */
    uint16_t sport = (uint16_t)(1024 + next_rand() % 64000);
    uint32_t seq = next_rand();
    uint8_t flags;
    memcpy(buf, dst_mac, 6);
    memcpy(buf + 6, src_mac, 6);
    buf[12] = 0x08; buf[13] = 0x00;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    ip[2] = 0; ip[3] = 44;                       /* total length */
    ip[4] = (uint8_t)(next_rand() >> 8); ip[5] = (uint8_t)next_rand();
    ip[8] = 64; ip[9] = 6;
    if (strcmp(kind, "frag") == 0) ip[6] = 0x20; /* MF, offset 0 */
    memcpy(ip + 12, &src_ip, 4);
    memcpy(ip + 16, &dst_ip, 4);
    uint16_t ipsum = fold(sum16(ip, 20, 0));
    ip[10] = (uint8_t)(ipsum >> 8); ip[11] = (uint8_t)ipsum;

    if (strcmp(kind, "ack") == 0) flags = 0x10;
    else if (strcmp(kind, "junk") == 0) {
        static const uint8_t bogus[] = {0x03 /* SYN+FIN */, 0x29 /* FIN+PSH+URG */, 0x00 /* NULL */,
                                        0x3f /* all */, 0x06 /* SYN+RST */};
        flags = bogus[next_rand() % sizeof bogus];
    } else flags = 0x02;                         /* syn, frag */
    memset(tcp, 0, 24);
    tcp[0] = (uint8_t)(sport >> 8); tcp[1] = (uint8_t)sport;
    tcp[2] = (uint8_t)(dport >> 8); tcp[3] = (uint8_t)dport;
    memcpy(tcp + 4, &seq, 4);
    if (flags & 0x10) { uint32_t ack = next_rand(); memcpy(tcp + 8, &ack, 4); }
    tcp[12] = 0x60;                              /* data offset 6: one option */
    tcp[13] = flags;
    tcp[14] = 0xfa; tcp[15] = 0xf0;              /* window 64240 */
    tcp[20] = 2; tcp[21] = 4; tcp[22] = 0x05; tcp[23] = 0xb4;   /* MSS 1460 */
    /* pseudo header: src, dst, zero, protocol, TCP length */
    uint8_t pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0; pseudo[9] = 6; pseudo[10] = 0; pseudo[11] = 24;
    uint16_t tsum = fold(sum16(tcp, 24, sum16(pseudo, 12, 0)));
    tcp[16] = (uint8_t)(tsum >> 8); tcp[17] = (uint8_t)tsum;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s IFNAME SRCMAC DSTMAC DSTIP DPORT KIND RATE SECONDS SEED\n", argv[0]);
        return 2;
    }
    uint8_t src_mac[6], dst_mac[6];
    struct in_addr dst;
    const char *kind = argv[6];
    long rate = strtol(argv[7], NULL, 10);
    double seconds = strtod(argv[8], NULL);
    rng = strtoull(argv[9], NULL, 10) | 1;
    if (parse_mac(argv[2], src_mac) || parse_mac(argv[3], dst_mac) || inet_pton(AF_INET, argv[4], &dst) != 1
        || rate <= 0 || rate > 5000000 || seconds <= 0 || seconds > 120
        || (strcmp(kind, "syn") && strcmp(kind, "ack") && strcmp(kind, "junk") && strcmp(kind, "frag"))) {
        fprintf(stderr, "flood_sender: bad arguments (RATE 1..5000000, SECONDS up to 120, KIND syn|ack|junk|frag)\n");
        return 2;
    }
    uint16_t dport = (uint16_t)atoi(argv[5]);
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_IP));
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_ll addr = {0};
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_IP);
    addr.sll_ifindex = (int)if_nametoindex(argv[1]);
    addr.sll_halen = 6;
    memcpy(addr.sll_addr, dst_mac, 6);
    if (addr.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }

    static uint8_t frames[BATCH][FRAME];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = frames[i];
        iov[i].iov_len = FRAME;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    double start = now(), end = start + seconds;
    uint64_t sent = 0;
    for (;;) {
        double t = now();
        if (t >= end) break;
        /* token bucket: what the rate allows by now, in batches */
        uint64_t allowed = (uint64_t)((t - start) * (double)rate) + 1;
        if (sent >= allowed) {
            double wait = (double)(sent - allowed + 1) / (double)rate;
            struct timespec ts = {0, (long)(wait * 1e9)};
            if (ts.tv_nsec > 2000000) ts.tv_nsec = 2000000;
            nanosleep(&ts, NULL);
            continue;
        }
        int n = (int)((allowed - sent) < BATCH ? (allowed - sent) : BATCH);
        for (int i = 0; i < n; i++) build(frames[i], src_mac, dst_mac, dst.s_addr, dport, kind);
        int k = sendmmsg(fd, msgs, (unsigned int)n, 0);
        if (k < 0) {
            if (errno == ENOBUFS || errno == EAGAIN) continue;
            perror("sendmmsg");
            return 1;
        }
        sent += (uint64_t)k;
    }
    printf("{\"sent\": %llu, \"seconds\": %.3f}\n", (unsigned long long)sent, now() - start);
    return 0;
}
