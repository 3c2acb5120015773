/* Helpers shared by bench/flood_sender.c and bench/lookup_sender.c (the two AF_PACKET
 * senders of the benches): the Internet checksum and a MAC address from its text form.
 * Included by both as "packet_util.h" (same folder; each is compiled alone with cc). */
#ifndef HOSTPREP_BENCH_PACKET_UTIL_H
#define HOSTPREP_BENCH_PACKET_UTIL_H

#include <stdint.h>
#include <stdio.h>

/* One's-complement sum of 16-bit big-endian words, added to acc (RFC 1071). */
static uint32_t sum16(const uint8_t *p, size_t n, uint32_t acc) {
    for (size_t i = 0; i + 1 < n; i += 2) acc += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) acc += (uint32_t)(p[n - 1] << 8);
    return acc;
}

/* The checksum of a sum16 total: carries folded in, complemented. */
static uint16_t fold(uint32_t acc) {
    while (acc >> 16) acc = (acc & 0xffff) + (acc >> 16);
    return (uint16_t)~acc;
}

/* "aa:bb:cc:dd:ee:ff" into mac[6]; -1 when it is not six hex bytes. */
static int parse_mac(const char *s, uint8_t *mac) {
    unsigned int b[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)b[i];
    return 0;
}

#endif
