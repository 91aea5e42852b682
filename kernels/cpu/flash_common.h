/* What both builds of the flash attention (flash_attention.c, flash_attention_amx.c) read the
 * same way: the arguments they take, and where key t of row b, head h lies (the row's own M keys,
 * then the M2 keys every row shares, T = M + M2; past T none: padding). */
#ifndef AA_TRT_FLASH_COMMON_H
#define AA_TRT_FLASH_COMMON_H

#include <stddef.h>
#include <stdint.h>

static inline int aa_flash_args_ok(long B, long N, long M, long M2, long H, long d, const void *kr, const void *vr) {
    return !(B < 1 || N < 1 || M < 1 || M2 < 0 || H < 1 || d < 2 || d % 2 || d > 256 || (M2 && (!kr || !vr)));
}

static inline const uint16_t *aa_flash_key_row(const uint16_t *own, long ob, long on, const uint16_t *shared,
                                               long sn, long M, long T, long d, long b, long h, long t) {
    if (t < M) return own + b * ob + t * on + h * d;
    if (t < T) return shared + (t - M) * sn + h * d;
    return NULL;
}

#endif
