/* LayerNorm over the last axis of contiguous rows (fp32 or bf16), fp32 weight and bias.
 *
 * Per row of C values (C a multiple of 16, at most a few thousand): converted to fp32 into an L1
 * scratch row while summed, the mean, the sum of squared deviations from it (two passes over the
 * row in cache: no cancellation), then y = (x - mean) * rstd * w + b rounded once. ATen's bf16
 * LayerNorm pays a per-row set-up that dominates rows of 160-640 channels. Rows are split over
 * `threads` threads (parallel.h). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vec.h"

typedef struct {
    const char *x; char *y;
    const float *w, *b;
    long C;
    float eps;
    int dtype;
} LN;

static inline __attribute__((always_inline)) void ln_row(const char *x, char *y, float *row, long C,
                                                         const float *w, const float *b, float eps, int dtype) {
    const size_t esize = dtype == AA_BF16 ? 2 : 4;
    vf s = vsplat(0.0f);
    for (long c = 0; c < C; c += VL) {
        const vf v = vload(x + (size_t)c * esize, dtype);
        s += v;
        memcpy(row + c, &v, sizeof v);
    }
    float mean = 0.0f;
    for (int l = 0; l < VL; l++) mean += s[l];
    mean /= (float)C;
    const vf vm = vsplat(mean);
    vf q = vsplat(0.0f);
    for (long c = 0; c < C; c += VL) {
        vf v;
        memcpy(&v, row + c, sizeof v);
        v -= vm;
        q += v * v;
    }
    float var = 0.0f;
    for (int l = 0; l < VL; l++) var += q[l];
    const vf rstd = vsplat(1.0f / sqrtf(var / (float)C + eps));
    for (long c = 0; c < C; c += VL) {
        vf v, vw = vsplat(1.0f), vb = vsplat(0.0f);
        memcpy(&v, row + c, sizeof v);
        if (w) memcpy(&vw, w + c, sizeof vw);
        if (b) memcpy(&vb, b + c, sizeof vb);
        vstore(y + (size_t)c * esize, (v - vm) * rstd * vw + vb, dtype);
    }
}

static int ln_rows(void *ctx, long r0, long r1) {
    const LN *T = (const LN *)ctx;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    float *row = aligned_alloc(64, (sizeof(float) * (size_t)T->C + 63) / 64 * 64);
    if (!row) return -1;
    for (long r = r0; r < r1; r++) {
        const char *x = T->x + (size_t)(r * T->C) * esize;
        char *y = T->y + (size_t)(r * T->C) * esize;
        if (T->dtype == AA_BF16) ln_row(x, y, row, T->C, T->w, T->b, T->eps, AA_BF16);
        else ln_row(x, y, row, T->C, T->w, T->b, T->eps, AA_F32);
    }
    free(row);
    return 0;
}

/* Returns 0; -1 when scratch memory could not be had; -2 for arguments it does not take. */
int aa_layer_norm(const void *x, void *y, const float *weight, const float *bias, long R, long C,
                  float eps, int dtype, int threads) {
    if (R < 0 || C < VL || C % VL) return -2;
    LN T = {(const char *)x, (char *)y, weight, bias, C, eps, dtype};
    /* at least ~64 KB of rows per thread: thread start-up outweighs less */
    long per = (65536 / ((long)C * (dtype == AA_BF16 ? 2 : 4))) + 1;
    long want = (R + per - 1) / per;
    if (want < threads) threads = (int)(want > 0 ? want : 1);
    return aa_parallel_for(ln_rows, &T, R, threads);
}
