/* Attention for bf16 tokens in one pass over the keys (flash attention), on AVX-512 BF16.
 *
 * out[b, i, head h] = softmax_j(q_i . k_j * scale) v_j over the M keys of row b followed by M2
 * keys shared by every row (the reference attention's; M2 = 0 for self-attention), without the
 * (N, M + M2) scores ever reaching memory: ATen's choices either write them (GEMM + softmax +
 * GEMM: the softmax pass is a third of the time at head dim 40) or block them with fp32 GEMMs.
 * Here both products are bf16 pair dot products (vdpbf16ps, fp32 accumulation):
 *   1. per (row, head), k and v are packed once into the layouts those instructions read:
 *      k as [16-key block][d/2][16 keys] pairs, v as [key pair][d padded to 16s] pairs;
 *   2. per (row, head, 16 queries): for every 64 keys, the 16 x 64 scores in registers/L1,
 *      the running maximum and sum per query (online softmax: earlier output rescaled when the
 *      maximum grows), the probabilities rounded to bf16 (as the ATen paths round them before
 *      their second GEMM), and the output accumulated in fp32; divided by the sum and rounded
 *      to bf16 once at the end.
 * Layouts (elements; the last axis contiguous): q row b, token i at q + b*qb + i*qn, head h's d
 * values from h*d; k, v likewise (kb, kn / vb, vn); kr, vr (M2 tokens, strides krn / vrn) or
 * NULL; out (ob, on). d even and at most 256.
 * Built only where the compiler targets AVX-512 BF16; elsewhere aa_flash_attention returns -3
 * and the caller keeps ATen's paths. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flash_common.h"
#include "parallel.h"
#include "vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

enum { QT = 16, KS = 16, KB = 64 };  /* queries per tile, keys per sub-tile, keys per block */

typedef struct {
    const uint16_t *q, *k, *v, *kr, *vr;
    uint16_t *out;
    long qb, qn, kb, kn, vb, vn, krn, vrn, ob, on;
    long B, N, M, M2, H, d;
    float scale;
    long T, nks, NE, nev, d2;  /* keys, 16-key sub-tiles, padded d, d / 16 rounded up, d / 2 */
    uint32_t *kp, *vp;         /* packed per (row, head) */
    size_t kp_size, vp_size;   /* uint32 per (row, head) */
} FA;

static inline const uint16_t *key_row(const FA *A, const uint16_t *own, long ob_, long on_,
                                      const uint16_t *shared, long sn, long b, long h, long t) {
    return aa_flash_key_row(own, ob_, on_, shared, sn, A->M, A->T, A->d, b, h, t);
}

static int pack_items(void *ctx, long i0, long i1) {
    const FA *A = (const FA *)ctx;
    const long d = A->d, d2 = A->d2, NE = A->NE;
    for (long item = i0; item < i1; item++) {
        const long b = item / A->H, h = item % A->H;
        uint32_t *kp = A->kp + (size_t)item * A->kp_size;
        uint16_t *vp = (uint16_t *)(A->vp + (size_t)item * A->vp_size);
        for (long t = 0; t < A->nks * KS; t++) {
            const uint16_t *kr = key_row(A, A->k, A->kb, A->kn, A->kr, A->krn, b, h, t);
            const uint16_t *vr = key_row(A, A->v, A->vb, A->vn, A->vr, A->vrn, b, h, t);
            uint32_t *kdst = kp + (t / KS) * d2 * KS + t % KS;
            for (long e2 = 0; e2 < d2; e2++)
                kdst[e2 * KS] = kr ? (uint32_t)kr[2 * e2] | (uint32_t)kr[2 * e2 + 1] << 16 : 0u;
            uint16_t *vdst = vp + (t / 2) * NE * 2 + t % 2;
            for (long e = 0; e < NE; e++) vdst[2 * e] = (vr && e < d) ? vr[e] : 0;
        }
    }
    return 0;
}

/* For qg queries at once (o rows NE apart, p rows KB / 2 pairs apart): o = o * alpha + sum over
 * the block's key pairs of p pair x v pair. qg and nev are literals at the call sites: the qg x nev
 * accumulators stay in registers, each v vector loaded once for qg queries, and the qg x nev
 * independent chains hide the dot product's latency. */
static inline __attribute__((always_inline)) void pv_rows(float *o, long NE, const uint32_t *p, long pairs,
                                                          const uint32_t *vp, const float *alpha,
                                                          const int qg, const int nev) {
    __m512 acc[8][16];
    for (int g = 0; g < qg; g++) {
        const __m512 va = _mm512_set1_ps(alpha[g]);
        for (int ev = 0; ev < nev; ev++) acc[g][ev] = _mm512_mul_ps(_mm512_loadu_ps(o + g * NE + ev * 16), va);
    }
    for (long j2 = 0; j2 < pairs; j2++) {
        const uint32_t *vrow = vp + j2 * NE;
        __m512bh vv[16];
        for (int ev = 0; ev < nev; ev++) vv[ev] = (__m512bh)_mm512_loadu_si512(vrow + ev * 16);
        for (int g = 0; g < qg; g++) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)p[g * (KB / 2) + j2]);
            for (int ev = 0; ev < nev; ev++) acc[g][ev] = _mm512_dpbf16_ps(acc[g][ev], vv[ev], pb);
        }
    }
    for (int g = 0; g < qg; g++)
        for (int ev = 0; ev < nev; ev++) _mm512_storeu_ps(o + g * NE + ev * 16, acc[g][ev]);
}

/* All QT queries of a tile, in groups sized to the head dim. */
static void pv_tile(float *O, long NE, const uint32_t *P, long pairs, const uint32_t *vp, const float *alpha, long nev) {
#define PV_GROUPS(QG, NEV) for (int i = 0; i < QT; i += QG) \
        pv_rows(O + i * NE, NE, P + i * (KB / 2), pairs, vp, alpha + i, QG, NEV)
    switch (nev) {
        case 1: PV_GROUPS(8, 1); break;
        case 2: PV_GROUPS(8, 2); break;
        case 3: PV_GROUPS(4, 3); break;
        case 4: PV_GROUPS(4, 4); break;
        case 5: PV_GROUPS(4, 5); break;
        case 6: PV_GROUPS(2, 6); break;
        case 7: PV_GROUPS(2, 7); break;
        case 8: PV_GROUPS(2, 8); break;
        case 9: PV_GROUPS(2, 9); break;
        case 10: PV_GROUPS(2, 10); break;
        default: PV_GROUPS(1, 16); break;  /* d up to 256: padded lanes are zeros */
    }
#undef PV_GROUPS
}

static int attend_items(void *ctx, long i0, long i1) {
    const FA *A = (const FA *)ctx;
    const long d = A->d, d2 = A->d2, NE = A->NE, nqt = (A->N + QT - 1) / QT;
    const size_t bytes = sizeof(float) * (size_t)(QT * KB + QT * 256 + 2 * QT)
                         + sizeof(uint32_t) * (size_t)(QT * KB / 2 + QT * d2);
    float *S = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!S) return -1;
    float *O = S + QT * KB, *mrow = O + QT * 256, *lrow = mrow + QT;
    uint32_t *P = (uint32_t *)(lrow + QT), *qp = P + QT * KB / 2;
    for (long item = i0; item < i1; item++) {
        const long bh = item / nqt, t0 = item % nqt * QT, b = bh / A->H, h = bh % A->H;
        const long rows = A->N - t0 < QT ? A->N - t0 : QT;
        const uint32_t *kp = A->kp + (size_t)bh * A->kp_size, *vp = A->vp + (size_t)bh * A->vp_size;
        for (long i = 0; i < QT; i++) {
            const uint16_t *qr = A->q + b * A->qb + (t0 + i) * A->qn + h * d;
            for (long e2 = 0; e2 < d2; e2++)
                qp[i * d2 + e2] = i < rows ? (uint32_t)qr[2 * e2] | (uint32_t)qr[2 * e2 + 1] << 16 : 0u;
            mrow[i] = -3.0e38f;
            lrow[i] = 0.0f;
        }
        memset(O, 0, sizeof(float) * QT * NE);
        for (long s0 = 0; s0 < A->nks; s0 += KB / KS) {
            const long nsub = A->nks - s0 < KB / KS ? A->nks - s0 : KB / KS;
            for (long s = 0; s < nsub; s++) {  /* scores of 16 queries x 16 keys */
                const uint32_t *kk = kp + (s0 + s) * d2 * KS;
                __m512 acc[QT];
                for (int i = 0; i < QT; i++) acc[i] = _mm512_setzero_ps();
                for (long e2 = 0; e2 < d2; e2++) {
                    const __m512bh kv = (__m512bh)_mm512_loadu_si512(kk + e2 * KS);
                    for (int i = 0; i < QT; i++)
                        acc[i] = _mm512_dpbf16_ps(acc[i], kv, (__m512bh)_mm512_set1_epi32((int)qp[i * d2 + e2]));
                }
                const long valid = A->T - (s0 + s) * KS;
                const __mmask16 live = valid >= KS ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1u);
                const __m512 sc = _mm512_set1_ps(A->scale), dead = _mm512_set1_ps(-3.0e38f);
                for (int i = 0; i < QT; i++)
                    _mm512_storeu_ps(S + i * KB + s * KS, _mm512_mask_mul_ps(dead, live, acc[i], sc));
            }
            float alpha[QT], bsum[QT];
            for (int i = 0; i < QT; i++) {  /* online softmax, per query */
                __m512 mx = _mm512_loadu_ps(S + i * KB);
                for (long s = 1; s < nsub; s++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(S + i * KB + s * KS));
                const float m_new = fmaxf(mrow[i], _mm512_reduce_max_ps(mx));
                alpha[i] = mrow[i] - m_new;  /* exponentiated below, 16 at once */
                mrow[i] = m_new;
                const vf vm = vsplat(m_new);
                vf sum = vsplat(0.0f), pv[KB / KS];
                for (long s = 0; s < nsub; s++) {
                    vf x;
                    memcpy(&x, S + i * KB + s * KS, sizeof x);
                    pv[s] = vexp_nonpositive_bf16(x - vm);  /* rounded to bf16 for the product */
                    sum += pv[s];
                }
                for (long s = nsub; s < KB / KS; s++) pv[s] = vsplat(0.0f);
                bsum[i] = _mm512_reduce_add_ps((__m512)sum);
                for (long s = 0; s < KB / KS; s += 2) {
                    const __m512bh pb = _mm512_cvtne2ps_pbh((__m512)pv[s + 1], (__m512)pv[s]);
                    _mm512_storeu_si512(P + i * KB / 2 + s * KS / 2, (__m512i)pb);
                }
            }
            vf va;
            memcpy(&va, alpha, sizeof va);
            va = vexp_nonpositive(va);
            memcpy(alpha, &va, sizeof va);
            for (int i = 0; i < QT; i++) lrow[i] = lrow[i] * alpha[i] + bsum[i];
            pv_tile(O, NE, P, nsub * KS / 2, vp + s0 * KS / 2 * NE, alpha, A->nev);
        }
        for (long i = 0; i < rows; i++) {
            uint16_t *dst = A->out + b * A->ob + (t0 + i) * A->on + h * d;
            const float inv = 1.0f / lrow[i];
            for (long e = 0; e < d; e++) O[i * NE + e] *= inv;
            row_from_f32(dst, O + i * NE, d, AA_BF16);
        }
    }
    free(S);
    return 0;
}
#endif

/* Returns 0; -1 when memory could not be had; -2 for arguments it does not take; -3 when the
 * library was built for a CPU without AVX-512 BF16. */
int aa_flash_attention(const void *q, long qb, long qn, const void *k, long kb, long kn,
                       const void *v, long vb, long vn, const void *kr, long krn, const void *vr, long vrn,
                       void *out, long ob, long on, long B, long N, long M, long M2, long H, long d,
                       float scale, int threads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (!aa_flash_args_ok(B, N, M, M2, H, d, kr, vr)) return -2;
    FA A = {q, k, v, kr, vr, out, qb, qn, kb, kn, vb, vn, krn, vrn, ob, on, B, N, M, M2, H, d, scale};
    A.T = M + M2;
    A.nks = (A.T + KS - 1) / KS;
    A.nev = (d + 15) / 16;
    A.NE = A.nev * 16;
    A.d2 = d / 2;
    A.kp_size = (size_t)(A.nks * KS * A.d2);
    A.vp_size = (size_t)((A.nks * KS / 2) * A.NE);
    uint32_t *mem = malloc(sizeof(uint32_t) * (A.kp_size + A.vp_size) * (size_t)(B * H));
    if (!mem) return -1;
    A.kp = mem;
    A.vp = mem + A.kp_size * (size_t)(B * H);
    int status = aa_parallel_for(pack_items, &A, B * H, threads);
    if (status == 0) status = aa_parallel_for(attend_items, &A, B * H * ((N + QT - 1) / QT), threads);
    free(mem);
    return status;
#else
    (void)q; (void)qb; (void)qn; (void)k; (void)kb; (void)kn; (void)v; (void)vb; (void)vn; (void)kr;
    (void)krn; (void)vr; (void)vrn; (void)out; (void)ob; (void)on; (void)B; (void)N; (void)M; (void)M2;
    (void)H; (void)d; (void)scale; (void)threads;
    return -3;
#endif
}

/* 1 where aa_flash_attention was compiled in (the build targets AVX-512 BF16), else 0. */
int aa_flash_attention_available(void) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
