"""On a CUDA GPU: each Triton attention kernel against the plain path (SDPA) at SD1.5's shapes for a
512x768 output and one 24-frame window with CFG (24 uncond + 24 cond rows), in TFLOP/s and as a
fraction of this GPU's measured fp16 matmul rate. Skipped, with the reason, without CUDA.

    pytest benchmarks/test_kernels_bench.py
"""
from __future__ import annotations

import pytest
import torch

from aa_trt import attention as attn_math

from .machine import matmul_rate
from .timing import compare

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")

DTYPE, HEADS, FRAMES = torch.float16, 8, 24
# (head dim, latent tokens at that UNet level) for a 512x768 output: latent 64x96, /2 per level
LEVELS = [(40, 64 * 96), (80, 32 * 48), (160, 16 * 24)]


@pytest.fixture(scope="module")
def fp16_rate(ledger) -> dict:
    rate = matmul_rate("cuda", DTYPE, n=8192, reps=10)
    ledger.machine["cuda_fp16_matmul"] = rate
    return rate


@pytest.fixture
def backend():
    previous = attn_math.get_backend()
    yield attn_math.set_backend
    attn_math.set_backend(previous)


def _report(benchmark, record, name, flops, timings, rate):
    s = timings.summary()
    ours, base = flops / s["ours_median_s"], flops / s["baseline_median_s"]
    info = dict(s, flops=flops, tflops=ours / 1e12, sdpa_tflops=base / 1e12,
                fraction_of_fp16_matmul=ours / rate["median_flops_per_s"],
                device=torch.cuda.get_device_name(0))
    benchmark.extra_info.update(info)
    record(f"{name} (CUDA fp16)", ours / 1e12, "TFLOP/s", baseline=base / 1e12, ratio=s["speedup"],
           ratio_of="SDPA time / kernel time: x faster", details=info)


def _run(backend, name, fn):
    def call():
        backend(name)
        return fn()
    return call


@pytest.mark.benchmark(group="kernels-reference-attention")
@pytest.mark.parametrize("d, n", LEVELS)
def test_reference_attention_kernel(benchmark, backend, record, rounds, fp16_rate, d, n):
    """48 rows (uncond then cond) of n tokens; cond rows also attend to the n reference tokens."""
    c = HEADS * d
    q, k, v = (torch.randn(2 * FRAMES, n, c, device="cuda", dtype=DTYPE) for _ in range(3))
    k_ref, v_ref = (torch.randn(1, n, c, device="cuda", dtype=DTYPE) for _ in range(2))
    flags = torch.tensor([0] * FRAMES + [1] * FRAMES, device="cuda", dtype=torch.int32)
    fn = lambda: attn_math.reference_attention(q, k, v, k_ref, v_ref, HEADS, flags)  # noqa: E731
    # score + PV dots: uncond rows n x n keys, cond rows n x 2n keys
    flops = 4 * HEADS * d * n * (FRAMES * n + FRAMES * 2 * n)
    t = compare(benchmark, _run(backend, "triton", fn), _run(backend, "sdpa", fn), max(rounds, 10),
                warmup=2, device="cuda")
    _report(benchmark, record, f"reference attention, d={d}, {n} tokens, 24+24 rows", flops, t, fp16_rate)


@pytest.mark.benchmark(group="kernels-temporal-attention")
@pytest.mark.parametrize("d, n", LEVELS)
def test_temporal_attention_kernel(benchmark, backend, record, rounds, fp16_rate, d, n):
    """2 x n positions (CFG) of 24 frames; pe folded into per-frame biases for the kernel, added to
    q/k/v before SDPA on the plain path (what the kernel replaces)."""
    c = HEADS * d
    q, k, v = (torch.randn(2 * n, FRAMES, c, device="cuda", dtype=DTYPE) for _ in range(3))
    bq, bk, bv = (torch.randn(FRAMES, c, device="cuda", dtype=DTYPE) for _ in range(3))
    fn = lambda: attn_math.temporal_attention(q, k, v, HEADS, bq, bk, bv)  # noqa: E731
    flops = 4 * HEADS * d * 2 * n * FRAMES * FRAMES
    t = compare(benchmark, _run(backend, "triton", fn), _run(backend, "sdpa", fn), max(rounds, 10),
                warmup=2, device="cuda")
    _report(benchmark, record, f"temporal attention, d={d}, {2 * n} positions x 24 frames", flops, t,
            fp16_rate)
