/* What the CPU kernels share: dtype codes, bf16 <-> fp32 rows, sixteen-float vectors and a
 * branch-free exponential. Plain C with GCC/Clang vector extensions: the compiler lowers a
 * 16-float vector to one AVX-512 register, two AVX ones or four SSE ones, whichever -march
 * the library is built for (kernels/cpu_native.py builds with -march=native). */
#ifndef AA_TRT_VEC_H
#define AA_TRT_VEC_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

enum { AA_F32 = 0, AA_BF16 = 1 };

static inline void row_to_f32(float *dst, const void *src, long m, int dtype) {
    if (dtype == AA_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (long i = 0; i < m; i++) d[i] = (uint32_t)s[i] << 16;
    } else {
        memcpy(dst, src, (size_t)m * sizeof(float));
    }
}

static inline uint16_t f32_to_bf16_bits(uint32_t u) {
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* to nearest, ties to even */
    uint32_t nan = (u >> 16) | 0x40u;                            /* NaN stays a (quiet) NaN */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}


typedef float vf __attribute__((vector_size(64), aligned(64)));
typedef int32_t vi __attribute__((vector_size(64), aligned(64)));
#define VL 16

static inline vf vsplat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline vf vselect(vi mask, vf a, vf b) {  /* a where mask (-1), b where not (0) */
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

typedef uint16_t vh __attribute__((vector_size(32), aligned(32)));

/* 16 values at p (fp32 or bf16 by `dtype`, unaligned) as fp32, and back (bf16: rounded to
 * nearest even; NaN kept). Called with `dtype` a literal, so the branch folds away. */
static inline __attribute__((always_inline)) vf vload(const void *p, int dtype) {
    vf v;
    if (dtype == AA_BF16) {
        vh h;
        memcpy(&h, p, sizeof h);
        vi u = __builtin_convertvector(h, vi) << 16;
        memcpy(&v, &u, sizeof v);
    } else {
        memcpy(&v, p, sizeof v);
    }
    return v;
}

static inline __attribute__((always_inline)) void vstore(void *p, vf v, int dtype) {
    if (dtype == AA_BF16) {
#ifdef __AVX512BF16__
        __m256bh hb = _mm512_cvtneps_pbh((__m512)v);  /* one instruction: to nearest even, NaN quiet */
        memcpy(p, &hb, sizeof hb);
        return;
#endif
        vi u = (vi)v;
        vi rounded = (vi)(((uint32_t __attribute__((vector_size(64))))u
                           + 0x7fffu + (((uint32_t __attribute__((vector_size(64))))u >> 16) & 1u)) >> 16);
        vi nan = (vi)(((uint32_t __attribute__((vector_size(64))))u >> 16) | 0x40u);
        vi is_nan = (u & 0x7fffffff) > 0x7f800000;
        vh h = __builtin_convertvector((is_nan & nan) | (~is_nan & rounded), vh);
        memcpy(p, &h, sizeof h);
    } else {
        memcpy(p, &v, sizeof v);
    }
}

static inline void row_from_f32(void *dst, const float *src, long m, int dtype) {
    if (dtype == AA_BF16) {
        long i = 0;
        for (; i + VL <= m; i += VL) {
            vf v;
            memcpy(&v, src + i, sizeof v);
            vstore((uint16_t *)dst + i, v, AA_BF16);
        }
        const uint32_t *s = (const uint32_t *)src;
        uint16_t *d = (uint16_t *)dst;
        for (; i < m; i++) d[i] = f32_to_bf16_bits(s[i]);
    } else {
        memcpy(dst, src, (size_t)m * sizeof(float));
    }
}

/* e^x for x <= 0: 2^k * 2^f, k = round(x log2 e), |f| <= 1/2, 2^f by its Taylor series to
 * degree 7 (relative error < 1e-7, below fp32 rounding of a sum). Rounding by the 1.5 * 2^23
 * trick (exact for |t| < 2^22; t >= -126 here); below -87 the result is ~1e-38, not 0. */
static inline __attribute__((always_inline)) vf vexp_nonpositive_to(vf x, const int degree) {
    x = vmax(x, vsplat(-87.0f));
    vf t = x * 1.44269504088896341f;
    vf k = (t + 12582912.0f) - 12582912.0f;
    vf y = (t - k) * 0.693147180559945309f;
    vf p;
    if (degree >= 7)
        p = 1.0f + y * (1.0f + y * (0.5f + y * (1.0f / 6 + y * (1.0f / 24 + y * (1.0f / 120
            + y * (1.0f / 720 + y * (1.0f / 5040)))))));
    else
        p = 1.0f + y * (1.0f + y * (0.5f + y * (1.0f / 6 + y * (1.0f / 24 + y * (1.0f / 120)))));
    vi bits = (vi)p + (__builtin_convertvector(k, vi) << 23);
    return (vf)bits;
}

static inline vf vexp_nonpositive(vf x) { return vexp_nonpositive_to(x, 7); }

/* The same to degree 5 (relative error < 3e-6): for values rounded to bf16 (2^-9) next. */
static inline vf vexp_nonpositive_bf16(vf x) { return vexp_nonpositive_to(x, 5); }

/* x * sigmoid(x) for any x: e^-|x| never overflows. 1 / (1 + e^-|x|), a number in [1/2, 1), by
 * Newton's iteration from a linear first guess on [1, 2] (error 1/17, squared each step: three
 * steps reach fp32 rounding) instead of a division, which is slow on some vector units. */
static inline vf vsilu(vf x) {
    vi neg = x < 0.0f;
    vf z = vexp_nonpositive(vselect(neg, x, -x));  /* e^-|x| */
    vf y = 1.0f + z;
    vf r = 24.0f / 17.0f - (8.0f / 17.0f) * y;  /* 1/y within 1/17 on [1, 2] */
    r = r * (2.0f - y * r);
    r = r * (2.0f - y * r);
    r = r * (2.0f - y * r);
    return x * vselect(neg, z * r, r);
}

#endif
