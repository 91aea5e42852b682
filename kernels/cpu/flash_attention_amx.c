/* Attention for bf16 tokens in one pass over the keys (flash attention), both products on the
 * AMX tile units (AMX-BF16), the softmax on AVX-512.
 *
 * The same job and layouts as flash_attention.c (aa_flash_attention's arguments, read the same
 * way). Where a CPU has AMX, ATen's flash SDPA also runs its products on the tiles, and its time
 * goes to the softmax between them: at the UNet's head dims (20..160) a score costs 4d FLOPs of
 * tile work, a fraction of a cycle, against a dozen vector instructions of scaling, maximum,
 * exponential, sum and rounding. So this kernel spends its effort there:
 *   1. per (row, head), k and v are packed once, in a thread's own buffer (it stays in L2 for
 *      every query tile of that head), into the tile layouts: k as [16-key tile][32-dim chunk]
 *      16 x 16 dim pairs (the "B" operand of q k^T), v as [32-key chunk][16-dim tile] 16 x 16
 *      key pairs (the "B" operand of p v); d zero-padded to 32s, keys to 64s;
 *   2. per (row, head), the queries in groups of 8 tiles of 16, and for each group the keys in
 *      blocks of 128 (the block's packed k and v stay in L1 while every tile of the group takes
 *      its turn): a tile's 16 x 128 raw scores from the tiles into L1; per query the block's
 *      maximum, then one fused pass: exponent by one FMA (scale and maximum folded), 2^x by
 *      vreduceps, a degree-3 polynomial and vscalefps (exact range reduction, underflow to 0
 *      without a clamp), the rounding to bf16 (as ATen's paths round probabilities before their
 *      second product); then p v on the tiles, up to four 16-dim output tiles per p load, and
 *      the running output rescaled in fp32 when the maximum grows (online softmax); divided by
 *      the sum and rounded once at the end. The sums come from the tile product itself where d
 *      leaves padding (a column of ones in v), else from the softmax pass.
 * Built only where the compiler targets AMX-BF16 and AVX-512 BF16; the process asks the kernel
 * for the tile state once (arch_prctl, as every AMX user on Linux must). Elsewhere, or if the
 * kernel refuses, aa_flash_attention_amx returns -3 and the caller keeps its other paths. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flash_common.h"
#include "parallel.h"
#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define AA_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { QT = 16, KT = 16, DC = 32, KB = 128, QS = 8, KPAD = 64 };  /* see attend_heads */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes: 16 x 16 fp32 accumulators, 16 x 32 bf16 "A" operands and
 * 16 x (16 pairs) "B" operands alike. The configuration is per thread. */
static void tiles_configure(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* Linux hands out the (8 KiB) tile state only to a process that asks: 0 when granted. */
static int tiles_permitted(void) {
    static int state = 0;  /* 0 unknown, 1 granted, -1 refused */
    if (state == 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    }
    return state == 1 ? 0 : -1;
}

typedef struct {
    const uint16_t *q, *k, *v, *kr, *vr;
    uint16_t *out;
    long qb, qn, kb, kn, vb, vn, krn, vrn, ob, on;
    long B, N, M, M2, H, d;
    float scale;
    long T, TP, ndc, ndt;  /* keys, keys padded to 64s, 32-dim chunks of d, 16-dim tiles of d */
} FA;

static inline const uint16_t *key_row(const FA *A, const uint16_t *own, long ob_, long on_,
                                      const uint16_t *shared, long sn, long b, long h, long t) {
    return aa_flash_key_row(own, ob_, on_, shared, sn, A->M, A->T, A->d, b, h, t);
}

/* k into [key tile][dim chunk] blocks of 16 rows (dim pairs) x 16 keys, each a uint32 pair;
 * v into [32-key chunk][dim tile] blocks of 16 rows (key pairs) x 16 dims. */
static void pack_head(const FA *A, long b, long h, uint32_t *kp, uint32_t *vp) {
    const long d = A->d, ndc = A->ndc, ndt = A->ndt;
    memset(kp, 0, sizeof(uint32_t) * (size_t)(A->TP / KT * ndc * 256));
    memset(vp, 0, sizeof(uint32_t) * (size_t)(A->TP / 32 * ndt * 256));
    for (long t = 0; t < A->T; t++) {  /* a key's dim pairs are one uint32 each */
        const uint16_t *kr = key_row(A, A->k, A->kb, A->kn, A->kr, A->krn, b, h, t);
        uint32_t *kdst = kp + (t / KT) * ndc * 256 + t % KT;
        uint32_t pair;
        for (long e2 = 0; e2 < d / 2; e2++) {
            memcpy(&pair, kr + 2 * e2, sizeof pair);
            kdst[(e2 / 16) * 256 + (e2 % 16) * 16] = pair;
        }
    }
    /* Two keys' values interleaved 16 bits at a time, 16 dims (one output row) per step. Where d
     * leaves padding in its last 16-dim tile, column d of every real key is 1: the product then
     * sums each query's (rounded) probabilities in its output's column d, rescaled with it. */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (long t = 0; t < A->T; t += 2) {
        const uint16_t *v0 = key_row(A, A->v, A->vb, A->vn, A->vr, A->vrn, b, h, t);
        const uint16_t *v1 = key_row(A, A->v, A->vb, A->vn, A->vr, A->vrn, b, h, t + 1);
        uint32_t *vdst = vp + (t / 32) * ndt * 256 + ((t % 32) / 2) * 16;
        for (long e = 0; e < d; e += 16) {
            const __mmask32 m = e + 16 <= d ? 0xffff : (__mmask32)((1u << (d - e)) - 1u);
            const __m512i a = _mm512_maskz_loadu_epi16(m, v0 + e);
            const __m512i c = v1 ? _mm512_maskz_loadu_epi16(m, v1 + e) : _mm512_setzero_si512();
            _mm256_storeu_si256((__m256i *)(vdst + (e / 16) * 256) + 0,
                                _mm512_castsi512_si256(_mm512_permutex2var_epi16(a, lo, c)));
            _mm256_storeu_si256((__m256i *)(vdst + (e / 16) * 256) + 1,
                                _mm512_extracti64x4_epi64(_mm512_permutex2var_epi16(a, lo, c), 1));
        }
        if (d % 16) {
            uint16_t *ones = (uint16_t *)(vdst + (d / 16) * 256 + d % 16);
            ones[0] = 0x3f80;                     /* key t */
            if (t + 1 < A->T) ones[1] = 0x3f80;   /* key t + 1 */
        }
    }
}

/* 2^t for t <= 0 (t may be -1e30: the result is then 0), relative error < 8e-5: enough for a
 * value rounded to bf16 (2^-9) next. vreduceps gives f = t - floor(t) in [0, 1) in one step and
 * vscalefps multiplies by 2^floor(t) itself, so the range reduction costs two instructions; 2^f
 * by a degree-3 polynomial fitted (relative error) on [0, 1). */
static inline __m512 exp2_for_bf16(__m512 t) {
    const __m512 f = _mm512_reduce_ps(t, 0x09);  /* t - floor(t), no precision exception */
    __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.07802444f), _mm512_set1_ps(0.22606727f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69583350f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992520f));
    return _mm512_scalef_ps(p, t);
}

/* 2^t for t <= 0 to fp32 accuracy (relative error < 2e-7): the factor that rescales the running
 * sums and outputs when a query's maximum grows. */
static inline __m512 exp2_accurate(__m512 t) {
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.5252733804e-5f), _mm512_set1_ps(1.5403530393e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* Scores of the 16 queries (q chunks into tile 4) against the NT (1..4) 16-key tiles from key
 * s0 + j0: S (16 x kb floats) at column j0. Tiles 0-3 accumulate, 4 holds q, 5 k. */
#define S_TILES(NT)                                                              \
    do {                                                                         \
        _tile_zero(0);                                                           \
        if (NT > 1) _tile_zero(1);                                               \
        if (NT > 2) _tile_zero(2);                                               \
        if (NT > 3) _tile_zero(3);                                               \
        for (long c = 0; c < ndc; c++) {                                         \
            _tile_loadd(4, qp + c * QT * DC, DC * 2);                            \
            const uint32_t *kk = kp + ((s0 + j0) / KT) * ndc * 256 + c * 256;    \
            _tile_loadd(5, kk, 64);                                              \
            _tile_dpbf16ps(0, 4, 5);                                             \
            if (NT > 1) { _tile_loadd(5, kk + ndc * 256, 64); _tile_dpbf16ps(1, 4, 5); } \
            if (NT > 2) { _tile_loadd(5, kk + 2 * ndc * 256, 64); _tile_dpbf16ps(2, 4, 5); } \
            if (NT > 3) { _tile_loadd(5, kk + 3 * ndc * 256, 64); _tile_dpbf16ps(3, 4, 5); } \
        }                                                                        \
        _tile_stored(0, S + j0, kb * 4);                                         \
        if (NT > 1) _tile_stored(1, S + j0 + 16, kb * 4);                        \
        if (NT > 2) _tile_stored(2, S + j0 + 32, kb * 4);                        \
        if (NT > 3) _tile_stored(3, S + j0 + 48, kb * 4);                        \
    } while (0)

/* tmp (16 x 64 floats) = p (16 x kb bf16, tile 4 per 32 keys) times v for `NT` (1..4) 16-dim
 * tiles from dim tile e0: tiles 0-3 accumulate, 5 holds v. */
#define PV_TILES(NT)                                                             \
    do {                                                                         \
        _tile_zero(0);                                                           \
        if (NT > 1) _tile_zero(1);                                               \
        if (NT > 2) _tile_zero(2);                                               \
        if (NT > 3) _tile_zero(3);                                               \
        for (long kc = 0; kc < kb / 32; kc++) {                                  \
            _tile_loadd(4, P + kc * 32, kb * 2);                                 \
            const uint32_t *vv = vblock + kc * ndt * 256 + e0 * 256;             \
            _tile_loadd(5, vv, 64);                                              \
            _tile_dpbf16ps(0, 4, 5);                                             \
            if (NT > 1) { _tile_loadd(5, vv + 256, 64); _tile_dpbf16ps(1, 4, 5); } \
            if (NT > 2) { _tile_loadd(5, vv + 512, 64); _tile_dpbf16ps(2, 4, 5); } \
            if (NT > 3) { _tile_loadd(5, vv + 768, 64); _tile_dpbf16ps(3, 4, 5); } \
        }                                                                        \
        _tile_stored(0, tmp, 64 * 4);                                            \
        if (NT > 1) _tile_stored(1, tmp + 16, 64 * 4);                           \
        if (NT > 2) _tile_stored(2, tmp + 32, 64 * 4);                           \
        if (NT > 3) _tile_stored(3, tmp + 48, 64 * 4);                           \
    } while (0)

/* The same for NT (1..2) tiles when d is small: the even 32-key chunks accumulate in tiles 0-1,
 * the odd ones in 2-3 (tmp's columns 32..63), so that consecutive products do not wait on one
 * accumulator (a tile product's latency is several times its issue interval). */
#define PV_TILES_SPLIT(NT)                                                       \
    do {                                                                         \
        _tile_zero(0);                                                           \
        _tile_zero(2);                                                           \
        if (NT > 1) { _tile_zero(1); _tile_zero(3); }                            \
        for (long kc = 0; kc < kb / 32; kc += 2) {                               \
            const uint32_t *vv = vblock + kc * ndt * 256 + e0 * 256;             \
            _tile_loadd(4, P + kc * 32, kb * 2);                                 \
            _tile_loadd(5, vv, 64);                                              \
            _tile_dpbf16ps(0, 4, 5);                                             \
            if (NT > 1) { _tile_loadd(5, vv + 256, 64); _tile_dpbf16ps(1, 4, 5); } \
            _tile_loadd(6, P + kc * 32 + 32, kb * 2);                            \
            _tile_loadd(7, vv + ndt * 256, 64);                                  \
            _tile_dpbf16ps(2, 6, 7);                                             \
            if (NT > 1) { _tile_loadd(7, vv + ndt * 256 + 256, 64); _tile_dpbf16ps(3, 6, 7); } \
        }                                                                        \
        _tile_stored(0, tmp, 64 * 4);                                            \
        _tile_stored(2, tmp + 32, 64 * 4);                                       \
        if (NT > 1) { _tile_stored(1, tmp + 16, 64 * 4); _tile_stored(3, tmp + 48, 64 * 4); } \
    } while (0)

/* One query tile's softmax over a block of kb keys (S: 16 x kb raw scores): its running maxima
 * m (16), per-lane running sums l (16 x 16: reduced once at the end; only if `sums`) and the
 * factor alpha (16) that rescales its earlier output; P (16 x kb) the probabilities rounded to
 * bf16. c turns a raw score into a base-2 exponent (scale * log2 e). */
static inline void softmax_block(const float *S, uint16_t *P, long kb, float c, float *m, float *l,
                                 float *alpha, const int sums) {
    float m_new[QT];
    for (int i = 0; i < QT; i++) {
        const float *s = S + i * kb;
        __m512 mx = _mm512_loadu_ps(s);
        for (long j = 16; j < kb; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
        m_new[i] = fmaxf(m[i], _mm512_reduce_max_ps(mx));
    }
    const __m512 mo = _mm512_loadu_ps(m), mn = _mm512_loadu_ps(m_new), vc = _mm512_set1_ps(c);
    _mm512_storeu_ps(alpha, exp2_accurate(_mm512_mul_ps(_mm512_sub_ps(mo, mn), vc)));
    _mm512_storeu_ps(m, mn);
    for (int i = 0; i < QT; i++) {
        const float *s = S + i * kb;
        const __m512 shift = _mm512_set1_ps(-m_new[i] * c);
        __m512 sum = _mm512_setzero_ps();
        for (long j = 0; j < kb; j += 32) {
            const __m512 p0 = exp2_for_bf16(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vc, shift));
            const __m512 p1 = exp2_for_bf16(_mm512_fmadd_ps(_mm512_loadu_ps(s + j + 16), vc, shift));
            _mm512_storeu_si512(P + i * kb + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            if (sums) sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        }
        if (sums)
            _mm512_storeu_ps(l + i * 16, _mm512_fmadd_ps(_mm512_loadu_ps(l + i * 16), _mm512_set1_ps(alpha[i]), sum));
    }
}

/* Per (row, head): k and v packed once; then the queries in groups of QS tiles of 16, and for
 * each group the keys in blocks of KB: every query tile of the group takes its turn on the block
 * while its packed keys and values are hot in L1 (fetched from L2 once per group instead of once
 * per tile), each tile keeping its own running maxima, sums and fp32 output. */
static int attend_heads(void *ctx, long i0, long i1) {
    const FA *A = (const FA *)ctx;
    const long d = A->d, ndc = A->ndc, ndt = A->ndt, NE = ndt * 16;
    const size_t kp_n = (size_t)(A->TP / KT * ndc * 256), vp_n = (size_t)(A->TP / 32 * ndt * 256);
    const size_t floats = (size_t)(QT * KB + QT * 64 + QS * (QT * NE + QT * 16 + QT));
    const size_t bytes = sizeof(uint32_t) * (kp_n + vp_n) + sizeof(float) * floats
                         + sizeof(uint16_t) * (size_t)(QT * KB + QS * QT * ndc * DC);
    char *mem = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64 * 8);
    if (!mem) return -1;
    uint32_t *kp = (uint32_t *)mem, *vp = kp + kp_n;
    float *S = (float *)(vp + vp_n), *tmp = S + QT * KB, *Og = tmp + QT * 64, *lg = Og + QS * QT * NE,
          *mg = lg + QS * QT * 16;
    uint16_t *P = (uint16_t *)(mg + QS * QT), *qg = P + QT * KB;
    const float c = A->scale * 1.44269504088896341f;  /* scores to base-2 exponents */
    const long nqt = (A->N + QT - 1) / QT;
    /* The thread's tile configuration is left as found (oneDNN's kernels configure lazily). */
    TileConfig found;
    _tile_storeconfig(&found);
    tiles_configure();
    for (long item = i0; item < i1; item++) {
        const long b = item / A->H, h = item % A->H;
        pack_head(A, b, h, kp, vp);
        for (long g0 = 0; g0 < nqt; g0 += QS) {
            const long ng = nqt - g0 < QS ? nqt - g0 : QS;
            /* q as [tile][dim chunk][16 queries][32 dims], zero-padded */
            memset(qg, 0, sizeof(uint16_t) * (size_t)(ng * QT * ndc * DC));
            for (long i = 0; i < ng * QT && (g0 * QT + i) < A->N; i++) {
                const uint16_t *qr = A->q + b * A->qb + (g0 * QT + i) * A->qn + h * d;
                uint16_t *dst = qg + (i / QT) * QT * ndc * DC + (i % QT) * DC;
                for (long e = 0; e < d; e += DC)
                    memcpy(dst + (e / DC) * QT * DC, qr + e, sizeof(uint16_t) * (size_t)(d - e < DC ? d - e : DC));
            }
            for (long i = 0; i < ng * QT; i++) mg[i] = -1e30f;
            memset(lg, 0, sizeof(float) * (size_t)(ng * QT * 16));
            memset(Og, 0, sizeof(float) * (size_t)(ng * QT * NE));
            for (long s0 = 0; s0 < A->TP; s0 += KB) {
                const long kb = A->TP - s0 < KB ? A->TP - s0 : KB;  /* a multiple of 64 */
                const long valid = A->T - s0;                      /* keys past T: padding */
                const uint32_t *vblock = vp + (s0 / 32) * ndt * 256;
                for (long g = 0; g < ng; g++) {
                    const uint16_t *qp = qg + g * QT * ndc * DC;
                    float *O = Og + g * QT * NE, alpha[QT];
                    for (long j0 = 0; j0 < kb; j0 += 64) S_TILES(4);
                    if (valid < kb)
                        for (int i = 0; i < QT; i++)
                            for (long j = valid; j < kb; j++) S[i * kb + j] = -1e30f;
                    softmax_block(S, P, kb, c, mg + g * QT, lg + g * QT * 16, alpha, !(d % 16));
                    for (long e0 = 0; e0 < ndt; e0 += 4) {
                        const long nt = ndt - e0 < 4 ? ndt - e0 : 4;
                        const int split = ndt <= 2;  /* kb is a multiple of 64: chunks come in pairs */
                        switch (split ? -nt : nt) {
                            case -1: PV_TILES_SPLIT(1); break;
                            case -2: PV_TILES_SPLIT(2); break;
                            case 1: PV_TILES(1); break;
                            case 2: PV_TILES(2); break;
                            case 3: PV_TILES(3); break;
                            default: PV_TILES(4); break;
                        }
                        for (int i = 0; i < QT; i++) {
                            const __m512 a = _mm512_set1_ps(alpha[i]);
                            float *o = O + i * NE + e0 * 16;
                            const float *t = tmp + i * 64;
                            for (long e = 0; e < nt * 16; e += 16) {
                                __m512 add = _mm512_loadu_ps(t + e);
                                if (split) add = _mm512_add_ps(add, _mm512_loadu_ps(t + 32 + e));
                                _mm512_storeu_ps(o + e, _mm512_fmadd_ps(_mm512_loadu_ps(o + e), a, add));
                            }
                        }
                    }
                }
            }
            for (long i = 0; i < ng * QT && (g0 * QT + i) < A->N; i++) {
                uint16_t *dst = A->out + b * A->ob + (g0 * QT + i) * A->on + h * d;
                float *o = Og + i * NE;
                const float inv = 1.0f / (d % 16 ? o[d] : _mm512_reduce_add_ps(_mm512_loadu_ps(lg + i * 16)));
                for (long e = 0; e < d; e++) o[e] *= inv;
                row_from_f32(dst, o, d, AA_BF16);
            }
        }
    }
    if (found.palette) _tile_loadconfig(&found);
    else _tile_release();
    free(mem);
    return 0;
}
#endif

/* Returns 0; -1 when memory could not be had; -2 for arguments it does not take; -3 when the
 * library was built for a CPU without AMX-BF16 or the kernel refused the tile state. */
int aa_flash_attention_amx(const void *q, long qb, long qn, const void *k, long kb, long kn,
                           const void *v, long vb, long vn, const void *kr, long krn, const void *vr, long vrn,
                           void *out, long ob, long on, long B, long N, long M, long M2, long H, long d,
                           float scale, int threads) {
#ifdef AA_HAVE_AMX
    if (!aa_flash_args_ok(B, N, M, M2, H, d, kr, vr)) return -2;
    if (tiles_permitted() != 0) return -3;
    FA A = {q, k, v, kr, vr, out, qb, qn, kb, kn, vb, vn, krn, vrn, ob, on, B, N, M, M2, H, d, scale};
    A.T = M + M2;
    A.TP = (A.T + KPAD - 1) / KPAD * KPAD;
    A.ndc = (d + DC - 1) / DC;
    A.ndt = (d + 15) / 16;
    return aa_parallel_for(attend_heads, &A, B * H, threads);
#else
    (void)q; (void)qb; (void)qn; (void)k; (void)kb; (void)kn; (void)v; (void)vb; (void)vn; (void)kr;
    (void)krn; (void)vr; (void)vrn; (void)out; (void)ob; (void)on; (void)B; (void)N; (void)M; (void)M2;
    (void)H; (void)d; (void)scale; (void)threads;
    return -3;
#endif
}

/* 1 where aa_flash_attention_amx was compiled in and the kernel grants the tile state, else 0. */
int aa_flash_attention_amx_available(void) {
#ifdef AA_HAVE_AMX
    return tiles_permitted() == 0;
#else
    return 0;
#endif
}
