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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

#ifdef __AVX512F__
/* The AVX-512 build of a row (c a multiple of 16): no scalar transposes. The row's keys are
 * transposed once for all heads by 16x16 register transposes into kt (c, np) (keys padded to
 * np = 16 or 32 with zeros); per head, each query's scores are a vector over the keys (its q
 * values broadcast from memory), the softmax runs along that vector (masked past n), and the
 * normalised probabilities, kept in pm (n, np), are broadcast from memory against v's rows, 16
 * of the head's columns at a time. Four queries at a time keep four independent FMA chains. */
static inline void transpose16(const float *src, long ld_src, float *dst, long ld_dst) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld_src);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 8; i++) {
        const int a = (i & 3) + (i >> 2) * 8;  /* rows 0-3 with 4-7, 8-11 with 12-15 */
        t[a] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0x88);
        t[a + 4] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ld_dst, r[i]);  /* r[i]: column i */
}

/* Scores and softmax of queries i0 .. i0 + QN - 1 of one head (QN a literal: the accumulators
 * stay in registers), normalised probabilities to pm. */
static inline __attribute__((always_inline)) void probs_block(
        const float *x, long c3, long hd, const float *kh, long d, long np, long nv, long n, long i0,
        float scale, __mmask16 last, float *pm, const int QN) {
    __m512 s0[4], s1[4];
    for (int a = 0; a < QN; a++) s0[a] = s1[a] = _mm512_setzero_ps();
    for (long e = 0; e < d; e++) {
        const __m512 k0 = _mm512_loadu_ps(kh + e * np);
        if (nv > 1) {
            const __m512 k1 = _mm512_loadu_ps(kh + e * np + 16);
            for (int a = 0; a < QN; a++) {
                const __m512 qv = _mm512_set1_ps(x[(i0 + a) * c3 + hd + e]);
                s0[a] = _mm512_fmadd_ps(qv, k0, s0[a]);
                s1[a] = _mm512_fmadd_ps(qv, k1, s1[a]);
            }
        } else {
            for (int a = 0; a < QN; a++)
                s0[a] = _mm512_fmadd_ps(_mm512_set1_ps(x[(i0 + a) * c3 + hd + e]), k0, s0[a]);
        }
    }
    const __m512 neg = _mm512_set1_ps(-INFINITY);
    for (int a = 0; a < QN; a++) {
        float m;
        if (nv > 1) {
            s1[a] = _mm512_mask_blend_ps(last, neg, s1[a]);
            m = _mm512_reduce_max_ps(_mm512_max_ps(s0[a], s1[a]));
        } else {
            s0[a] = _mm512_mask_blend_ps(last, neg, s0[a]);
            m = _mm512_reduce_max_ps(s0[a]);
        }
        const vf vm = vsplat(m), vs = vsplat(scale);
        vf p0 = vexp_nonpositive(((vf)s0[a] - vm) * vs), p1 = vsplat(0.0f);
        if (nv > 1) p1 = (vf)_mm512_maskz_mov_ps(last, (__m512)vexp_nonpositive(((vf)s1[a] - vm) * vs));
        else p0 = (vf)_mm512_maskz_mov_ps(last, (__m512)p0);
        const __m512 r = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps((__m512)(p0 + p1)));
        _mm512_storeu_ps(pm + (i0 + a) * np, _mm512_mul_ps((__m512)p0, r));
        if (nv > 1) _mm512_storeu_ps(pm + (i0 + a) * np + 16, _mm512_mul_ps((__m512)p1, r));
    }
}

/* o[i][col .. col + 15] (mask mk) = sum_j pm[i][j] v[j][col ..], queries i0 .. i0 + QN - 1. */
static inline __attribute__((always_inline)) void out_block(
        const float *v, long c3, const float *pm, long np, long n, long i0, __mmask16 mk,
        float *o, long c, const int QN) {
    __m512 acc[4];
    for (int a = 0; a < QN; a++) acc[a] = _mm512_setzero_ps();
    for (long j = 0; j < n; j++) {
        const __m512 vv = _mm512_maskz_loadu_ps(mk, v + j * c3);
        for (int a = 0; a < QN; a++)
            acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(pm[(i0 + a) * np + j]), vv, acc[a]);
    }
    for (int a = 0; a < QN; a++) _mm512_mask_storeu_ps(o + (i0 + a) * c, mk, acc[a]);
}

static void row_avx512(const float *x, long n, long c, long heads, float scale, float *o,
                       float *kt, float *pm, const float *zeros) {
    const long c3 = 3 * c, d = c / heads, np = n > 16 ? 32 : 16, nv = np / 16;
    /* kt[ch][j] = k[j][ch]; keys past n from the zero rows */
    for (long kb = 0; kb < nv; kb++)
        for (long ch = 0; ch < c; ch += 16) {
            float blk[16 * 16];
            for (long j = 0; j < 16; j++) {
                const long key = kb * 16 + j;
                memcpy(blk + j * 16, key < n ? x + key * c3 + c + ch : zeros, 16 * sizeof(float));
            }
            transpose16(blk, 16, kt + ch * np + kb * 16, np);
        }
    const long rem = n - (nv - 1) * 16;
    const __mmask16 last = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1));
    const long chunks = (d + 15) / 16;
    const __mmask16 tail = (__mmask16)((d % 16) ? ((1u << (d % 16)) - 1) : 0xFFFF);
    const long n4 = n / 4 * 4;
    for (long h = 0; h < heads; h++) {
        const float *kh = kt + h * d * np;
        long i = 0;
        for (; i < n4; i += 4) probs_block(x, c3, h * d, kh, d, np, nv, n, i, scale, last, pm, 4);
        for (; i < n; i++) probs_block(x, c3, h * d, kh, d, np, nv, n, i, scale, last, pm, 1);
        for (long ch = 0; ch < chunks; ch++) {
            const __mmask16 mk = ch == chunks - 1 ? tail : 0xFFFF;
            const float *v = x + 2 * c + h * d + ch * 16;
            float *oc = o + h * d + ch * 16;
            for (i = 0; i < n4; i += 4) out_block(v, c3, pm, np, n, i, mk, oc + i * 0, c, 4);
            for (; i < n; i++) out_block(v, c3, pm, np, n, i, mk, oc, c, 1);
        }
    }
}
#endif

static int run_rows(void *ctx, long r0, long r1) {
    const Task *T = (const Task *)ctx;
    const long n = T->n, c = T->c, c3 = 3 * c, heads = T->heads, d = c / heads;
    const size_t esize = T->dtype == AA_BF16 ? 2 : 4;
    const long nv = (n + VL - 1) / VL;
#ifdef __AVX512F__
    const int wide = c % 16 == 0;
#else
    const int wide = 0;
#endif
    const long np = n > 16 ? 32 : 16;
    /* vectors: qt (d, nv) | st (n, nv) | ot (nv); floats: x (n, 3c) | bias (n, 3c) | o (n, c)
     * | kt (c, np) | pm (n, np) | 16 zeros (the last three for the AVX-512 build) */
    size_t bytes = sizeof(vf) * (size_t)(d * nv + n * nv + nv)
                   + sizeof(float) * (size_t)(2 * n * c3 + n * c + c * np + n * np + 16);
    vf *qt = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!qt) return -1;
    vf *st = qt + d * nv, *ot = st + n * nv;
    float *x = (float *)(ot + nv), *bias = x + n * c3, *o = bias + n * c3;
    float *kt = o + n * c, *pm = kt + c * np, *zeros = pm + n * np;
    memset(qt, 0, sizeof(vf) * (size_t)(d * nv));  /* the padding queries stay 0 */
    memset(zeros, 0, 16 * sizeof(float));
    if (T->bias) {  /* (3, heads, n, d) -> the rows' own layout (n, 3c), once per thread */
        const char *bsrc = (const char *)T->bias;
        for (long part = 0; part < 3; part++)
            for (long h = 0; h < heads; h++)
                for (long t = 0; t < n; t++)
                    row_to_f32(bias + t * c3 + part * c + h * d,
                               bsrc + (size_t)(((part * heads + h) * n + t) * d) * esize, d, T->dtype);
    }
    for (long r = r0; r < r1; r++) {
        const long b = r / T->P, p = r % T->P;
        const char *in = T->qkv + (size_t)(b * T->sb + p * T->sp) * esize;
        for (long t = 0; t < n; t++) {
            float *xt = x + t * c3;
            row_to_f32(xt, in + (size_t)(t * T->sn) * esize, c3, T->dtype);
            if (T->bias) {
                const float *bt = bias + t * c3;
                for (long e = 0; e < c3; e++) xt[e] += bt[e];
            }
        }
#ifdef __AVX512F__
        if (wide)
            row_avx512(x, n, c, heads, T->scale, o, kt, pm, zeros);
        else
#endif
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
