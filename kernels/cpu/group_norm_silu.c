/* GroupNorm (+ SiLU) over channels-last images in two passes over memory.
 *
 * x (N, H*W, C) in memory (an NHWC image, or channels-last (N, C, H, W) in torch), groups of
 * C / G consecutive channels. ATen's channels-last GroupNorm and the SiLU after it make four
 * passes in bf16 and round the norm's output to bf16 before the activation. Here, per image:
 *   1. per-channel mean and squared deviations over the H*W pixels in fp32, 16 channels at a time
 *      (sums shifted by the first pixel's value, so that squares do not cancel where the mean
 *      dwarfs the spread); channels merged into their group by Chan's formula;
 *   2. y = x * a_c + b_c (a_c = w_c / std_g, b_c = bias_c - mean_g a_c), then SiLU, rounded once.
 * C must be a multiple of 16. Images are split over `threads` POSIX threads. Weight and bias: C values in x's dtype, or NULL
 * (1 and 0). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

typedef struct {
    const char *x; char *y;
    const void *weight, *bias;
    long HW, C, G;
    float eps;
    int silu, dtype;
    long n0, n1;
    int status;
} GTask;

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

static inline __attribute__((always_inline)) void normalize(
        const char *x, char *y, long HW, long C, const float *a, const float *b, int silu, int dtype) {
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    for (long p = 0; p < HW; p++) {
        const char *xp = x + (size_t)(p * C) * esize;
        char *yp = y + (size_t)(p * C) * esize;
        for (long c = 0; c < C; c += VL) {
            vf va, vb;
            memcpy(&va, a + c, sizeof va);
            memcpy(&vb, b + c, sizeof vb);
            vf v = vload(xp + (size_t)c * esize, dtype) * va + vb;
            if (silu) v = vsilu(v);
            vstore(yp + (size_t)c * esize, v, dtype);
        }
    }
}

static void image(const GTask *T, const char *x, char *y, float *mean, float *m2, float *a, float *b,
                  const float *w, const float *bias) {
    const long HW = T->HW, C = T->C, cg = C / T->G;
    for (long c = 0; c < C; c += VL) {
        if (T->dtype == AA_BF16) channel_stats(x, HW, C, c, AA_BF16, mean, m2);
        else channel_stats(x, HW, C, c, AA_F32, mean, m2);
    }
    for (long g = 0; g < T->G; g++) {  /* Chan's merge of the group's channels */
        double gm = 0.0, gm2 = 0.0;
        for (long c = g * cg; c < (g + 1) * cg; c++) gm += mean[c];
        gm /= (double)cg;
        for (long c = g * cg; c < (g + 1) * cg; c++) {
            const double dm = (double)mean[c] - gm;
            gm2 += (double)m2[c] + (double)HW * dm * dm;
        }
        const double rstd = 1.0 / sqrt((gm2 > 0 ? gm2 : 0) / (double)(HW * cg) + (double)T->eps);
        for (long c = g * cg; c < (g + 1) * cg; c++) {
            a[c] = (float)(w[c] * rstd);
            b[c] = (float)(bias[c] - gm * w[c] * rstd);
        }
    }
    if (T->dtype == AA_BF16) {
        if (T->silu) normalize(x, y, HW, C, a, b, 1, AA_BF16); else normalize(x, y, HW, C, a, b, 0, AA_BF16);
    } else {
        if (T->silu) normalize(x, y, HW, C, a, b, 1, AA_F32); else normalize(x, y, HW, C, a, b, 0, AA_F32);
    }
}

static void *gn_images(void *arg) {
    GTask *T = (GTask *)arg;
    const long HW = T->HW, C = T->C;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    float *mem = malloc(sizeof(float) * (size_t)(6 * C));  /* mean, m2, a, b, w, bias */
    if (!mem) { T->status = -1; return NULL; }
    float *mean = mem, *m2 = mean + C, *a = m2 + C, *b = a + C, *w = b + C, *bias = w + C;
    for (long c = 0; c < C; c++) { w[c] = 1.0f; bias[c] = 0.0f; }
    if (T->weight) row_to_f32(w, T->weight, C, T->dtype);
    if (T->bias) row_to_f32(bias, T->bias, C, T->dtype);
    for (long n = T->n0; n < T->n1; n++)
        image(T, T->x + (size_t)(n * HW * C) * esize, T->y + (size_t)(n * HW * C) * esize, mean, m2, a, b, w, bias);
    free(mem);
    return NULL;
}

/* Returns 0; -1 when scratch memory could not be had; -2 for arguments it does not take. */
int aa_group_norm_silu_nhwc(const void *x, void *y, const void *weight, const void *bias,
                            long N, long HW, long C, long G, float eps, int silu, int dtype, int threads) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G || C % VL) return -2;
    if (threads < 1) threads = 1;
    if (threads > N) threads = (int)N;
    if (threads > 256) threads = 256;
    GTask tasks[256];
    pthread_t ids[256];
    for (int i = 0; i < threads; i++)
        tasks[i] = (GTask){(const char *)x, (char *)y, weight, bias, HW, C, G, eps, silu, dtype,
                           N * i / threads, N * (i + 1) / threads, 0};
    int started = 0, status = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, gn_images, &tasks[i]) != 0) { status = -1; break; }
        started = i;
    }
    gn_images(&tasks[0]);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
    for (int i = 0; i < threads; i++) if (tasks[i].status) status = -1;
    return status;
}
