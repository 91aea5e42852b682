/* Attention among the n entries of each row of a packed q|k|v projection, in one pass.
 *
 * The motion modules attend over frames: for every (batch, position) row there are n <= 32
 * frames, each with a q|k|v vector of 3c values from one GEMM. In ATen this takes a copy laying
 * q, k and v out head-major (gathering runs of d values), a batched GEMM writing the scores, a
 * softmax pass over them and a second batched GEMM: four passes over memory for work that fits
 * in a core's L2 per row. Here each row's n x 3c block is read once (bf16 or fp32, the positional
 * encoding's per-frame bias added on the way), everything else happens in fp32 scratch, and the
 * result is written once, rounded to the output dtype, wherever the caller's strides say.
 *
 * Layouts (element strides; the last axis is contiguous):
 *   qkv  row r = (b, p): entry t at qkv + b*sb + p*sp + t*sn, [q | k | v] of c each,
 *        head h's columns h*d .. h*d + d - 1 of each part.
 *   bias (3, heads, n, d) contiguous, the dtype of qkv, or NULL.
 *   out  row r entry t at out + b*ob + p*op + t*on, c values (head-major within, as merged heads).
 *
 * Rows are split over `threads` threads (parallel.h).
 * Plain C: the compiler vectorises the inner loops (over keys, over the head dim), and the
 * exponential is a branch-free polynomial so that those loops stay vectorisable.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


#include "parallel.h"
#include "vec.h"

typedef struct {
    const char *qkv; long sb, sp, sn;
    char *out; long ob, op, on;
    const void *bias;
    long P, n, c, heads;
    float scale;
    int dtype;
} Task;

/* One head of one row, transposed so that every vector runs over the queries (padded to np, a
 * multiple of VL; the padding's columns are computed and dropped):
 *   qt (d, np) = q^T * scale,  st (n, np): st[j][i] = k_j . q_i, the scores transposed,
 *   softmax over j for all i at once (elementwise max / exp / sum over the n rows of st),
 *   ot (d, np): ot[e][i] = sum_j v[j][e] st[j][i], scattered into o (n, c) at the head's columns.
 * nv = np / VL is a literal at the call sites (always inlined: fixed trip counts, the
 * accumulators stay in registers). */
static inline __attribute__((always_inline)) void one_head(
        const float *q, const float *k, const float *v, long c3, long d, long n, long nv, float scale,
        float *o, long oc, vf *qt, vf *st, vf *ot) {
    float *qs = (float *)qt;
    for (long i = 0; i < n; i++)
        for (long e = 0; e < d; e++) qs[e * nv * VL + i] = q[i * c3 + e] * scale;
    for (long j = 0; j < n; j++) {
        vf acc[4] = {0};
        const float *kj = k + j * c3;
        for (long e = 0; e < d; e++) {
            const vf ke = vsplat(kj[e]);
            for (long u = 0; u < nv; u++) acc[u] += ke * qt[e * nv + u];
        }
        for (long u = 0; u < nv; u++) st[j * nv + u] = acc[u];
    }
    vf m[4], sum[4];
    for (long u = 0; u < nv; u++) { m[u] = st[u]; sum[u] = vsplat(0.0f); }
    for (long j = 1; j < n; j++)
        for (long u = 0; u < nv; u++) m[u] = vmax(m[u], st[j * nv + u]);
    for (long j = 0; j < n; j++)
        for (long u = 0; u < nv; u++) {
            st[j * nv + u] = vexp_nonpositive(st[j * nv + u] - m[u]);
            sum[u] += st[j * nv + u];
        }
    for (long u = 0; u < nv; u++) sum[u] = 1.0f / sum[u];
    for (long e = 0; e < d; e++) {
        vf acc[4] = {0};
        for (long j = 0; j < n; j++) {
            const vf ve = vsplat(v[j * c3 + e]);
            for (long u = 0; u < nv; u++) acc[u] += ve * st[j * nv + u];
        }
        for (long u = 0; u < nv; u++) ot[u] = acc[u] * sum[u];
        const float *os = (const float *)ot;
        for (long i = 0; i < n; i++) o[i * oc + e] = os[i];
    }
}

static void head_any(const float *q, const float *k, const float *v, long c3, long d, long n, float scale,
                     float *o, long oc, vf *qt, vf *st, vf *ot) {
    switch ((n + VL - 1) / VL) {  /* literals: see one_head */
        case 1: one_head(q, k, v, c3, d, n, 1, scale, o, oc, qt, st, ot); break;
        default: one_head(q, k, v, c3, d, n, 2, scale, o, oc, qt, st, ot); break;
    }
}

static int run_rows(void *ctx, long r0, long r1) {
    const Task *T = (const Task *)ctx;
    const long n = T->n, c = T->c, c3 = 3 * c, heads = T->heads, d = c / heads;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    const long nv = (n + VL - 1) / VL;
    /* vectors: qt (d, nv) | st (n, nv) | ot (nv); floats: x (n, 3c) | bias (n * 3c) | o (n, c) */
    size_t bytes = sizeof(vf) * (size_t)(d * nv + n * nv + nv) + sizeof(float) * (size_t)(2 * n * c3 + n * c);
    vf *qt = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!qt) return -1;
    vf *st = qt + d * nv, *ot = st + n * nv;
    float *x = (float *)(ot + nv), *bias = x + n * c3, *o = bias + n * c3;
    memset(qt, 0, sizeof(vf) * (size_t)(d * nv));  /* the padding queries stay 0 */
    if (T->bias) row_to_f32(bias, T->bias, n * c3, T->dtype);  /* (3, heads, n, d), once per thread */
    for (long r = r0; r < r1; r++) {
        const long b = r / T->P, p = r % T->P;
        const char *in = T->qkv + (size_t)(b * T->sb + p * T->sp) * esize;
        for (long t = 0; t < n; t++) row_to_f32(x + t * c3, in + (size_t)(t * T->sn) * esize, c3, T->dtype);
        if (T->bias) {
            for (long part = 0; part < 3; part++)
                for (long h = 0; h < heads; h++)
                    for (long t = 0; t < n; t++) {
                        const float *bb = bias + ((part * heads + h) * n + t) * d;
                        float *xx = x + t * c3 + part * c + h * d;
                        for (long e = 0; e < d; e++) xx[e] += bb[e];
                    }
        }
        for (long h = 0; h < heads; h++)
            head_any(x + h * d, x + c + h * d, x + 2 * c + h * d, c3, d, n, T->scale, o + h * d, c, qt, st, ot);
        char *dst = T->out + (size_t)(b * T->ob + p * T->op) * esize;
        for (long t = 0; t < n; t++) row_from_f32(dst + (size_t)(t * T->on) * esize, o + t * c, c, T->dtype);
    }
    free(qt);
    return 0;
}

/* Returns 0; -1 when scratch memory could not be had; -2 for arguments it does not take. */
int aa_motion_attention(const void *qkv, long sb, long sp, long sn,
                        void *out, long ob, long op, long on, const void *bias,
                        long B, long P, long n, long c, long heads, float scale, int dtype, int threads) {
    if (n < 1 || n > 2 * VL || heads < 1 || c % heads) return -2;
    Task T = {(const char *)qkv, sb, sp, sn, (char *)out, ob, op, on, bias, P, n, c, heads, scale, dtype};
    return aa_parallel_for(run_rows, &T, B * P, threads);
}
