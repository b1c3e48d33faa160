/* gpuplane's hardware verification probe, CPU reference (tests and the format's definition).
 *
 * Reads GPUPLANE_PROBE_N, GPUPLANE_PROBE_ROUNDS and GPUPLANE_PROBE_SEEDS (hex seeds, comma
 * separated, one per GPU) and writes /output/product-<i>.bin for each seed: the n x n matrix
 * S = sum_j A_j * B_j as little-endian uint32, row-major, where A_j, B_j hold the low 3 bits
 * of the bytes of SHA-256(seed || j as u32 LE || 0 or 1 || block as u64 LE), block = t / 32
 * (controlplane/verification/challenge.py). The production probe (probe.py) computes the
 * same on the GPUs with torch. Build: gcc -O2 -static -o probe probe.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

/* SHA-256 of a message shorter than 56 bytes (one block). */
static void sha256_short(const uint8_t *msg, size_t len, uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint8_t block[64] = {0};
    memcpy(block, msg, len);
    block[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) block[63 - i] = (uint8_t)(bits >> (8 * i));
    compress(h, block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = h[i] >> 24; out[4 * i + 1] = h[i] >> 16;
        out[4 * i + 2] = h[i] >> 8; out[4 * i + 3] = h[i];
    }
}

static void matrix(const uint8_t *seed, size_t seed_len, uint32_t round, uint8_t which,
                   size_t n, uint8_t *out) {
    uint8_t msg[48], digest[32];
    size_t total = n * n;
    memcpy(msg, seed, seed_len);
    for (int i = 0; i < 4; i++) msg[seed_len + i] = (uint8_t)(round >> (8 * i));
    msg[seed_len + 4] = which;
    for (uint64_t block = 0; block * 32 < total; block++) {
        for (int i = 0; i < 8; i++) msg[seed_len + 5 + i] = (uint8_t)(block >> (8 * i));
        sha256_short(msg, seed_len + 13, digest);
        for (size_t t = 0; t < 32 && block * 32 + t < total; t++) out[block * 32 + t] = digest[t] & 7;
    }
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int main(void) {
    const char *ns = getenv("GPUPLANE_PROBE_N"), *rs = getenv("GPUPLANE_PROBE_ROUNDS");
    const char *seeds = getenv("GPUPLANE_PROBE_SEEDS");
    if (!ns || !rs || !seeds) { fprintf(stderr, "probe: GPUPLANE_PROBE_* not set\n"); return 2; }
    size_t n = strtoul(ns, NULL, 10), rounds = strtoul(rs, NULL, 10);
    if (n == 0 || n > 4096 || rounds == 0) { fprintf(stderr, "probe: bad n or rounds\n"); return 2; }
    uint8_t *a = malloc(n * n), *b = malloc(n * n);
    uint32_t *s = malloc(n * n * sizeof(uint32_t));
    if (!a || !b || !s) { fprintf(stderr, "probe: out of memory\n"); return 3; }
    for (int index = 0; *seeds; index++) {
        uint8_t seed[32];
        size_t len = 0;
        while (*seeds && *seeds != ',') {
            int hi = hexval(seeds[0]), lo = hexval(seeds[1]);
            if (hi < 0 || lo < 0 || len == sizeof(seed)) { fprintf(stderr, "probe: bad seed\n"); return 2; }
            seed[len++] = (uint8_t)(hi << 4 | lo);
            seeds += 2;
        }
        if (*seeds == ',') seeds++;
        memset(s, 0, n * n * sizeof(uint32_t));
        for (uint32_t r = 0; r < rounds; r++) {
            matrix(seed, len, r, 0, n, a);
            matrix(seed, len, r, 1, n, b);
            for (size_t i = 0; i < n; i++)
                for (size_t j = 0; j < n; j++) {
                    uint32_t x = a[i * n + j];
                    if (!x) continue;
                    for (size_t k = 0; k < n; k++) s[i * n + k] += x * b[j * n + k];
                }
        }
        char path[4200];
        const char *dir = getenv("GPUPLANE_PROBE_OUTPUT");
        snprintf(path, sizeof(path), "%s/product-%d.bin", dir ? dir : "/output", index);
        FILE *f = fopen(path, "wb");
        if (!f) { perror(path); return 4; }
        for (size_t t = 0; t < n * n; t++) {
            uint8_t le[4] = {s[t], s[t] >> 8, s[t] >> 16, s[t] >> 24};
            fwrite(le, 1, 4, f);
        }
        fclose(f);
    }
    return 0;
}
