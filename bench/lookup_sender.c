/*
 * lookup_sender: the packet source of bench/exempt_lookup.py, compiled by it at run time (cc -O2).
 *
 * Sends prepared IPv4 TCP SYNs on one interface with an AF_PACKET socket and reports the CPU
 * time this thread spent sending them.  On a veth pair the receiving namespace's whole path
 * (ip_rcv, conntrack, the firewall's hooks, the verdict) runs in softirq on the sending CPU,
 * inside sendmmsg(); the kernel here has no CONFIG_IRQ_TIME_ACCOUNTING, so that softirq time is
 * charged to the sending thread (CLOCK_THREAD_CPUTIME_ID) and time other processes run on the
 * CPU is not.  Only for a veth pair the bench made inside its own network namespaces.
 *
 *   lookup_sender IFNAME SRCMAC DSTMAC DSTIP DPORT MAXRATE MAXSECONDS LISTFILE...
 *
 * Each LISTFILE holds one IPv4 source address per line; list k (0-based, in argument order) is
 * what "send k COUNT" uses: COUNT packets, cycling through the list's sources in order.  Every
 * source has one fixed source port and sequence number, so the same source always sends the
 * same frame (the bench drops every packet before conntrack confirms it: each is NEW).
 * Commands on stdin, one per line; one line of JSON per command on stdout:
 *   send K COUNT   -> {"sent": N, "cpu_ns": C, "wall_ns": W}
 * EOF ends the program.  Bounds: at most MAXRATE packets per second (token bucket, sleeping
 * when ahead), a "send" stops after MAXSECONDS of wall time (the reply says how many were sent),
 * and the program exits after 3600 s whatever it is told.
 * Every segment carries an MSS option of 1460, as real stacks send (hostprep's ddos group drops
 * a SYN without one).  Checksums are correct.
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

#define BATCH 32
#define FRAME 58 /* 14 Ethernet + 20 IPv4 + 24 TCP (with an MSS option) */
#define MAXLISTS 16
#define LIFETIME 3600.0

struct list {
    uint8_t (*frames)[FRAME];
    size_t n;
    size_t next;
};

static int64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The SYN from source number i (address src, network order) to dst:dport. */
static void build(uint8_t *buf, const uint8_t *src_mac, const uint8_t *dst_mac, uint32_t src, uint32_t dst,
                  uint16_t dport, size_t i) {
    uint8_t *ip = buf + 14, *tcp = buf + 34;
    uint16_t sport = (uint16_t)(20000 + i % 40000);
    uint32_t seq = htonl((uint32_t)(0x9e3779b9u * (i + 1)));
    memcpy(buf, dst_mac, 6);
    memcpy(buf + 6, src_mac, 6);
    buf[12] = 0x08; buf[13] = 0x00;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    ip[2] = 0; ip[3] = 44;
    ip[4] = (uint8_t)(i >> 8); ip[5] = (uint8_t)i;
    ip[6] = 0x40;                                /* DF */
    ip[8] = 64; ip[9] = 6;
    memcpy(ip + 12, &src, 4);
    memcpy(ip + 16, &dst, 4);
    uint16_t ipsum = fold(sum16(ip, 20, 0));
    ip[10] = (uint8_t)(ipsum >> 8); ip[11] = (uint8_t)ipsum;
    memset(tcp, 0, 24);
    tcp[0] = (uint8_t)(sport >> 8); tcp[1] = (uint8_t)sport;
    tcp[2] = (uint8_t)(dport >> 8); tcp[3] = (uint8_t)dport;
    memcpy(tcp + 4, &seq, 4);
    tcp[12] = 0x60;                              /* data offset 6: one option */
    tcp[13] = 0x02;                              /* SYN */
    tcp[14] = 0xfa; tcp[15] = 0xf0;              /* window 64240 */
    tcp[20] = 2; tcp[21] = 4; tcp[22] = 0x05; tcp[23] = 0xb4;   /* MSS 1460 */
    uint8_t pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0; pseudo[9] = 6; pseudo[10] = 0; pseudo[11] = 24;
    uint16_t tsum = fold(sum16(tcp, 24, sum16(pseudo, 12, 0)));
    tcp[16] = (uint8_t)(tsum >> 8); tcp[17] = (uint8_t)tsum;
}

static int load_list(struct list *l, const char *path, const uint8_t *src_mac, const uint8_t *dst_mac,
                     uint32_t dst, uint16_t dport) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return -1; }
    size_t cap = 1024;
    l->frames = malloc(cap * FRAME);
    l->n = l->next = 0;
    char line[128];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        struct in_addr a;
        if (inet_pton(AF_INET, line, &a) != 1) {
            fprintf(stderr, "lookup_sender: %s: not an IPv4 address: %s\n", path, line);
            fclose(f);
            return -1;
        }
        if (l->n == cap) {
            cap *= 2;
            l->frames = realloc(l->frames, cap * FRAME);
        }
        build(l->frames[l->n], src_mac, dst_mac, a.s_addr, dst, dport, l->n);
        l->n++;
    }
    fclose(f);
    if (l->n == 0) { fprintf(stderr, "lookup_sender: %s: no address\n", path); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 9 || argc - 8 > MAXLISTS) {
        fprintf(stderr, "usage: %s IFNAME SRCMAC DSTMAC DSTIP DPORT MAXRATE MAXSECONDS LISTFILE...\n", argv[0]);
        return 2;
    }
    uint8_t src_mac[6], dst_mac[6];
    struct in_addr dst;
    long rate = strtol(argv[6], NULL, 10);
    double seconds = strtod(argv[7], NULL);
    int dport = atoi(argv[5]);
    if (parse_mac(argv[2], src_mac) || parse_mac(argv[3], dst_mac) || inet_pton(AF_INET, argv[4], &dst) != 1
        || rate <= 0 || rate > 1000000 || seconds <= 0 || seconds > 60 || dport <= 0 || dport > 65535) {
        fprintf(stderr, "lookup_sender: bad arguments (MAXRATE 1..1000000, MAXSECONDS up to 60)\n");
        return 2;
    }
    struct list lists[MAXLISTS];
    int nlists = argc - 8;
    for (int k = 0; k < nlists; k++)
        if (load_list(&lists[k], argv[8 + k], src_mac, dst_mac, dst.s_addr, (uint16_t)dport)) return 2;

    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_IP));
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_ll addr = {0};
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_IP);
    addr.sll_ifindex = (int)if_nametoindex(argv[1]);
    addr.sll_halen = 6;
    memcpy(addr.sll_addr, dst_mac, 6);
    if (addr.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }

    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_len = FRAME;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int64_t born = clock_ns(CLOCK_MONOTONIC);
    printf("{\"ready\": %d}\n", nlists);
    fflush(stdout);
    char cmd[128];
    while (fgets(cmd, sizeof cmd, stdin)) {
        int k;
        long long count;
        if (sscanf(cmd, "send %d %lld", &k, &count) != 2 || k < 0 || k >= nlists || count < 1) {
            fprintf(stderr, "lookup_sender: bad command: %s", cmd);
            return 2;
        }
        struct list *l = &lists[k];
        int64_t start = clock_ns(CLOCK_MONOTONIC), stop = start + (int64_t)(seconds * 1e9);
        if ((double)(start - born) / 1e9 > LIFETIME) { fprintf(stderr, "lookup_sender: lifetime over\n"); return 1; }
        int64_t cpu = 0;
        long long sent = 0;
        while (sent < count) {
            int64_t t = clock_ns(CLOCK_MONOTONIC);
            if (t >= stop) break;
            long long allowed = (long long)((double)(t - start) * (double)rate / 1e9) + 1;
            if (allowed > count) allowed = count;
            if (sent >= allowed) {
                struct timespec ts = {0, (long)((double)(sent - allowed + 1) * 1e9 / (double)rate)};
                if (ts.tv_nsec > 2000000) ts.tv_nsec = 2000000;
                nanosleep(&ts, NULL);
                continue;
            }
            int n = (int)((allowed - sent) < BATCH ? (allowed - sent) : BATCH);
            for (int i = 0; i < n; i++) {
                iov[i].iov_base = l->frames[l->next];
                l->next = (l->next + 1) % l->n;
            }
            int64_t c0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
            int got = sendmmsg(fd, msgs, (unsigned int)n, 0);
            cpu += clock_ns(CLOCK_THREAD_CPUTIME_ID) - c0;
            if (got < 0) {
                if (errno == ENOBUFS || errno == EAGAIN) continue;
                perror("sendmmsg");
                return 1;
            }
            if (got < n) /* not sent: step the cycle back so every source keeps its turn */
                l->next = (l->next + l->n - (size_t)(n - got)) % l->n;
            sent += got;
        }
        printf("{\"sent\": %lld, \"cpu_ns\": %lld, \"wall_ns\": %lld}\n", sent, (long long)cpu,
               (long long)(clock_ns(CLOCK_MONOTONIC) - start));
        fflush(stdout);
    }
    return 0;
}
