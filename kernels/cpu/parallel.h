/* Ranges of independent items over threads: fn(ctx, i0, i1) on [0, items) split evenly in
 * `threads` contiguous parts. The threads are OpenMP's: the library links libgomp.so.1, which in
 * a process that imported torch is the copy torch loaded, so the kernels run on torch's own
 * intra-op pool. (Threads of their own, created per call, measured slower at 2 threads than 1
 * between ATen ops: torch's workers spin-wait after each op and held the cores.) Returns 0, or
 * -1 when a part failed (fn returned non-zero). */
#ifndef AA_TRT_PARALLEL_H
#define AA_TRT_PARALLEL_H

typedef int (*aa_range_fn)(void *ctx, long i0, long i1);

static inline int aa_parallel_for(aa_range_fn fn, void *ctx, long items, int threads) {
    if (items < 1) return 0;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)items;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int i = 0; i < threads; i++)
        failed |= fn(ctx, items * i / threads, items * (i + 1) / threads) != 0;
    return failed ? -1 : 0;
}

#endif
