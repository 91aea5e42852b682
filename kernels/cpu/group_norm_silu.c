/* GroupNorm (+ SiLU) over channels-last images in two passes over memory.
 *
 * x (N, H*W, C) in memory (an NHWC image, or channels-last (N, C, H, W) in torch), groups of
 * C / G consecutive channels. ATen's channels-last GroupNorm and the SiLU after it make four
 * passes in bf16 and round the norm's output to bf16 before the activation. Here, per image:
 *   1. per-channel mean and squared deviations over the H*W pixels in fp32, 16 channels at a time
 *      (sums shifted by the first pixel's value, so that squares do not cancel where the mean
 *      dwarfs the spread); channels merged into their group by Chan's formula;
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
} GN;

/* Per-channel statistics of one image over its HW pixels, 16 channels [c, c + 16) at a time,
 * accumulators in registers: sums of x - k and (x - k)^2 around k = the first pixel's value (the
 * shift keeps the squares from cancelling where the mean dwarfs the spread). */
static inline __attribute__((always_inline)) void channel_stats(
        const char *x, long HW, long C, long c, int dtype, float *mean, float *m2) {
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    const vf k = vload(x + (size_t)c * esize, dtype);
    vf s1 = vsplat(0.0f), s2 = vsplat(0.0f);
    for (long p = 0; p < HW; p++) {
        const vf d = vload(x + (size_t)(p * C + c) * esize, dtype) - k;
        s1 += d;
        s2 += d * d;
    }
    const vf mu = s1 / (float)HW;
    const vf out_mean = k + mu, out_m2 = s2 - s1 * mu;
    memcpy(mean + c, &out_mean, sizeof out_mean);
    memcpy(m2 + c, &out_m2, sizeof out_m2);
}

/* Items: (image, block of 16 channels). */
static int stats_items(void *ctx, long i0, long i1) {
    const GN *T = (const GN *)ctx;
    const long blocks = T->C / VL;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    for (long i = i0; i < i1; i++) {
        const long n = i / blocks, c = i % blocks * VL;
        const char *x = T->x + (size_t)(n * T->HW * T->C) * esize;
        if (T->dtype == AA_BF16) channel_stats(x, T->HW, T->C, c, AA_BF16, T->mean + n * T->C, T->m2 + n * T->C);
        else channel_stats(x, T->HW, T->C, c, AA_F32, T->mean + n * T->C, T->m2 + n * T->C);
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
 * Phase 1 over (image, 16 channels), phase 2 over pixels: an image alone (the reference net, the
 * VAE encoder) still uses every thread. */
int aa_group_norm_silu_nhwc(const void *x, void *y, const void *weight, const void *bias,
                            long N, long HW, long C, long G, float eps, int silu, int dtype, int threads) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G || C % VL) return -2;
    const long cg = C / G;
    float *mem = malloc(sizeof(float) * (size_t)(4 * N * C + 2 * C));
    if (!mem) return -1;
    GN T = {(const char *)x, (char *)y, N, HW, C, G, silu, dtype, mem, mem + N * C, mem + 2 * N * C, mem + 3 * N * C};
    float *w = mem + 4 * N * C, *bb = w + C;
    for (long c = 0; c < C; c++) { w[c] = 1.0f; bb[c] = 0.0f; }
    if (weight) row_to_f32(w, weight, C, dtype);
    if (bias) row_to_f32(bb, bias, C, dtype);
    int status = aa_parallel_for(stats_items, &T, N * (C / VL), threads);
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
