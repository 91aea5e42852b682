/* Ranges of independent items over POSIX threads: fn(ctx, i0, i1) on [0, items) split evenly in
 * `threads` contiguous parts, the calling thread running the first. The caller passes torch's
 * intra-op thread count; threads are created per call (tens of microseconds against kernels
 * of milliseconds). Returns 0, or -1 when a part failed (fn returned non-zero) or a thread could
 * not be started (its part then ran on the calling thread). */
#ifndef AA_TRT_PARALLEL_H
#define AA_TRT_PARALLEL_H

#include <pthread.h>

typedef int (*aa_range_fn)(void *ctx, long i0, long i1);

typedef struct {
    aa_range_fn fn;
    void *ctx;
    long i0, i1;
    int status;
} AaPart;

static void *aa_part_main(void *arg) {
    AaPart *p = (AaPart *)arg;
    p->status = p->fn(p->ctx, p->i0, p->i1);
    return NULL;
}

static inline int aa_parallel_for(aa_range_fn fn, void *ctx, long items, int threads) {
    enum { MAX_THREADS = 256 };
    if (items < 1) return 0;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)items;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    AaPart parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++)
        parts[i] = (AaPart){fn, ctx, items * i / threads, items * (i + 1) / threads, 0};
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, aa_part_main, &parts[i]) == 0;
    aa_part_main(&parts[0]);
    int status = 0;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        else aa_part_main(&parts[i]);  /* no thread to be had: run it here */
    }
    for (int i = 0; i < threads; i++)
        if (parts[i].status) status = -1;
    return status;
}

#endif
