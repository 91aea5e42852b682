/* GroupNorm (+ SiLU) over channels-last images in two passes over memory.
 *
 * x (N, H*W, C) in memory (an NHWC image, or channels-last (N, C, H, W) in torch), groups of
 * C / G consecutive channels. ATen's channels-last GroupNorm and the SiLU after it make four
 * passes in bf16 and round the norm's output to bf16 before the activation. Here, per image:
 *   1. per-channel mean and squared deviations in fp32, over chunks of pixels small enough to
 *      stay in L1 while each 16 channels are summed over them (the chunk is read from memory
 *      once, in order; sums shifted by the chunk's first pixel, so that squares do not cancel
 *      where the mean dwarfs the spread); chunks, then a group's channels, merged by Chan's
 *      formula;
 *   2. y = x * a_c + b_c (a_c = w_c / std_g, b_c = bias_c - mean_g a_c), then SiLU, rounded once.
 * C must be a multiple of 16. Weight and bias: C values in x's dtype, or NULL
 * (1 and 0). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vec.h"

typedef struct {
    const char *x; char *y;
    long N, HW, C, G;
    int silu, dtype;
    float *mean, *m2, *a, *b;  /* (N, C) each */
    long chunk, chunks;        /* pixels per statistics chunk, chunks per image */
    float *cmean, *cm2;        /* (N, chunks, C) each: the chunks' own statistics */
} GN;

/* Per-channel statistics of `count` pixels (rows C apart), 16 channels [c, c + 16) at a time,
 * accumulators in registers: sums of x - k and (x - k)^2 around k = the first pixel's value (the
 * shift keeps the squares from cancelling where the mean dwarfs the spread). */
static inline __attribute__((always_inline)) void channel_stats(
        const char *x, long count, long C, long c, int dtype, float *mean, float *m2) {
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    const vf k = vload(x + (size_t)c * esize, dtype);
    vf s1 = vsplat(0.0f), s2 = vsplat(0.0f);
    for (long p = 0; p < count; p++) {
        const vf d = vload(x + (size_t)(p * C + c) * esize, dtype) - k;
        s1 += d;
        s2 += d * d;
    }
    const vf mu = s1 / (float)count;
    const vf out_mean = k + mu, out_m2 = s2 - s1 * mu;
    memcpy(mean + c, &out_mean, sizeof out_mean);
    memcpy(m2 + c, &out_m2, sizeof out_m2);
}

/* Items: (image, chunk of pixels); all channels of the chunk, 16 at a time, while it is in L1. */
static int stats_items(void *ctx, long i0, long i1) {
    const GN *T = (const GN *)ctx;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    for (long i = i0; i < i1; i++) {
        const long n = i / T->chunks, p0 = i % T->chunks * T->chunk;
        const long count = T->HW - p0 < T->chunk ? T->HW - p0 : T->chunk;
        const char *x = T->x + (size_t)((n * T->HW + p0) * T->C) * esize;
        float *mean = T->cmean + i * T->C, *m2 = T->cm2 + i * T->C;
        for (long c = 0; c < T->C; c += VL) {
            if (T->dtype == AA_BF16) channel_stats(x, count, T->C, c, AA_BF16, mean, m2);
            else channel_stats(x, count, T->C, c, AA_F32, mean, m2);
        }
    }
    return 0;
}

/* Items: (image, 16 channels): the image's chunks merged (Chan: counts, means, squared
 * deviations), in order. */
static int merge_items(void *ctx, long i0, long i1) {
    const GN *T = (const GN *)ctx;
    for (long i = i0; i < i1; i++) {
        const long n = i / (T->C / VL), c = i % (T->C / VL) * VL;
        const float *cm = T->cmean + n * T->chunks * T->C + c, *c2 = T->cm2 + n * T->chunks * T->C + c;
        vf mean, m2;
        memcpy(&mean, cm, sizeof mean);
        memcpy(&m2, c2, sizeof m2);
        long na = T->chunk < T->HW ? T->chunk : T->HW;
        for (long j = 1; j < T->chunks; j++) {
            const long nb = T->HW - j * T->chunk < T->chunk ? T->HW - j * T->chunk : T->chunk;
            vf mb, m2b;
            memcpy(&mb, cm + j * T->C, sizeof mb);
            memcpy(&m2b, c2 + j * T->C, sizeof m2b);
            const float fb = (float)nb / (float)(na + nb), w = (float)na * fb;
            const vf delta = mb - mean;
            mean += delta * fb;
            m2 += m2b + delta * delta * w;
            na += nb;
        }
        memcpy(T->mean + n * T->C + c, &mean, sizeof mean);
        memcpy(T->m2 + n * T->C + c, &m2, sizeof m2);
    }
    return 0;
}

static inline __attribute__((always_inline)) void normalize(
        const char *x, char *y, long C, const float *a, const float *b, int silu, int dtype) {
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    for (long c = 0; c < C; c += VL) {
        vf va, vb;
        memcpy(&va, a + c, sizeof va);
        memcpy(&vb, b + c, sizeof vb);
        vf v = vload(x + (size_t)c * esize, dtype) * va + vb;
        if (silu) v = vsilu(v);
        vstore(y + (size_t)c * esize, v, dtype);
    }
}

/* Items: pixels of all images, (n, p) -> n * HW + p. */
static int normalize_items(void *ctx, long i0, long i1) {
    const GN *T = (const GN *)ctx;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    for (long i = i0; i < i1; i++) {
        const long n = i / T->HW;
        const char *x = T->x + (size_t)(i * T->C) * esize;
        char *y = T->y + (size_t)(i * T->C) * esize;
        const float *a = T->a + n * T->C, *b = T->b + n * T->C;
        if (T->dtype == AA_BF16) {
            if (T->silu) normalize(x, y, T->C, a, b, 1, AA_BF16); else normalize(x, y, T->C, a, b, 0, AA_BF16);
        } else {
            if (T->silu) normalize(x, y, T->C, a, b, 1, AA_F32); else normalize(x, y, T->C, a, b, 0, AA_F32);
        }
    }
    return 0;
}

/* Returns 0; -1 when scratch memory could not be had; -2 for arguments it does not take.
 * Phase 1 over (image, chunk of pixels), phase 2 over pixels: an image alone (the reference net,
 * the VAE encoder) still uses every thread. */
int aa_group_norm_silu_nhwc(const void *x, void *y, const void *weight, const void *bias,
                            long N, long HW, long C, long G, float eps, int silu, int dtype, int threads) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G || C % VL) return -2;
    const long cg = C / G;
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    /* ~32 KiB of pixels a chunk, and enough chunks for every thread */
    long chunk = (long)(32768 / ((size_t)C * esize));
    if (chunk < 8) chunk = 8;
    while (chunk > 8 && N * ((HW + chunk - 1) / chunk) < 4L * threads) chunk /= 2;
    if (chunk > HW) chunk = HW;
    const long chunks = (HW + chunk - 1) / chunk;
    float *mem = malloc(sizeof(float) * (size_t)(4 * N * C + 2 * C + 2 * N * chunks * C));
    if (!mem) return -1;
    GN T = {(const char *)x, (char *)y, N, HW, C, G, silu, dtype, mem, mem + N * C, mem + 2 * N * C, mem + 3 * N * C,
            chunk, chunks, mem + 4 * N * C + 2 * C, mem + 4 * N * C + 2 * C + N * chunks * C};
    float *w = mem + 4 * N * C, *bb = w + C;
    for (long c = 0; c < C; c++) { w[c] = 1.0f; bb[c] = 0.0f; }
    if (weight) row_to_f32(w, weight, C, dtype);
    if (bias) row_to_f32(bb, bias, C, dtype);
    int status = aa_parallel_for(stats_items, &T, N * chunks, threads);
    if (status == 0) status = aa_parallel_for(merge_items, &T, N * (C / VL), threads);
    for (long n = 0; n < N && status == 0; n++) {
        const float *mean = T.mean + n * C, *m2 = T.m2 + n * C;
        float *a = T.a + n * C, *b = T.b + n * C;
        for (long g = 0; g < G; g++) {  /* Chan's merge of the group's channels */
            double gm = 0.0, gm2 = 0.0;
            for (long c = g * cg; c < (g + 1) * cg; c++) gm += mean[c];
            gm /= (double)cg;
            for (long c = g * cg; c < (g + 1) * cg; c++) {
                const double dm = (double)mean[c] - gm;
                gm2 += (double)m2[c] + (double)HW * dm * dm;
            }
            const double rstd = 1.0 / sqrt((gm2 > 0 ? gm2 : 0) / (double)(HW * cg) + (double)eps);
            for (long c = g * cg; c < (g + 1) * cg; c++) {
                a[c] = (float)(w[c] * rstd);
                b[c] = (float)(bb[c] - gm * w[c] * rstd);
            }
        }
    }
    if (status == 0) status = aa_parallel_for(normalize_items, &T, N * HW, threads);
    free(mem);
    return status;
}
