"""Attention shapes of the step, SDPA against matmul + softmax + matmul (`aa_trt.attention.short_attention`),
2 threads, median of 7, with each one's error against float64:
- the motion modules' (positions, heads, 16 frames, d): few queries and keys;
- cross-attention shapes: one key, and 16/32 keys under many queries (where materialised scores lose)."""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def bench(f, *a, n=7):
    f(*a)
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(*a); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def manual(q, k, v):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v


def err(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


temporal = [((b, 8, 16, d), (b, 8, 16, d)) for b, d in ((2048, 20), (512, 40), (128, 80), (32, 80))]
cross = [((32, 8, 1024, 20), (32, 8, 1, 20)), ((32, 8, 256, 40), (32, 8, 1, 40)), ((48, 2, 256, 32), (48, 2, 1, 32)),
         ((48, 2, 256, 32), (48, 2, 16, 32)), ((32, 8, 1024, 20), (32, 8, 32, 20))]
for qs, ks in temporal + cross:
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(qs, dtype=dt), torch.randn(ks, dtype=dt), torch.randn(ks, dtype=dt)
        r = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        print(qs, "keys", ks[2], str(dt)[6:],
              "sdpa %.1f ms (err %.1e), manual %.1f ms (err %.1e)"
              % (bench(F.scaled_dot_product_attention, q, k, v), err(F.scaled_dot_product_attention(q, k, v), r),
                 bench(manual, q, k, v), err(manual(q, k, v), r)))
