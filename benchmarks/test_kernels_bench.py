"""On a CUDA GPU: each Triton attention kernel against the plain path (SDPA) at SD1.5's shapes for a
512x768 output and one 24-frame window with CFG (24 uncond + 24 cond rows), in TFLOP/s and as a
fraction of this GPU's measured fp16 matmul rate; the fused GroupNorm + SiLU against F.group_norm +
F.silu at the resnets' shapes, in bytes moved per second. Skipped, with the reason, without CUDA.

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


# (channels, latent positions) of the resnets' norms per UNet level, 512x768 output (latent 64x96)
NORM_LEVELS = [(320, 64 * 96), (640, 32 * 48), (1280, 16 * 24), (1280, 8 * 12)]
NORM_CALLS = 20  # per timed round: one call is ~0.1 ms, below the timer's resolution


@pytest.mark.benchmark(group="kernels-groupnorm-silu")
@pytest.mark.parametrize("c, n", NORM_LEVELS)
def test_group_norm_silu_kernel(benchmark, backend, record, rounds, c, n):
    """silu(group_norm(x)), 32 groups, on 48 rows (CFG x 24 frames) of a level's activation.
    Bytes moved = one read and one write of x, the least any implementation moves (the kernel
    reads x twice, GroupNorm + SiLU three times and writes twice): GB/s = that / time."""
    x = torch.randn(2 * FRAMES, c, n, device="cuda", dtype=DTYPE).view(2 * FRAMES, c, *_hw(n))
    w = torch.randn(c, device="cuda", dtype=DTYPE)
    b = torch.randn(c, device="cuda", dtype=DTYPE)

    def fn():
        for _ in range(NORM_CALLS):
            attn_math.group_norm_silu(x, 32, w, b, 1e-5)

    backend("triton")
    fused = attn_math.group_norm_silu(x, 32, w, b, 1e-5).float()
    backend("sdpa")
    plain = attn_math.group_norm_silu(x, 32, w, b, 1e-5).float()
    torch.testing.assert_close(fused, plain, atol=2e-2, rtol=2e-2)
    t = compare(benchmark, _run(backend, "triton", fn), _run(backend, "sdpa", fn), max(rounds, 10),
                warmup=2, device="cuda")
    s = t.summary()
    moved = 2 * x.numel() * x.element_size() * NORM_CALLS
    ours, base = moved / s["ours_median_s"], moved / s["baseline_median_s"]
    info = dict(s, bytes_per_call=moved // NORM_CALLS, gb_per_s=ours / 1e9, plain_gb_per_s=base / 1e9,
                shape=tuple(x.shape), device=torch.cuda.get_device_name(0))
    benchmark.extra_info.update(info)
    record(f"GroupNorm + SiLU, {tuple(x.shape)} (CUDA fp16), 1 read + 1 write of x per call", ours / 1e9,
           "GB/s", baseline=base / 1e9, ratio=s["speedup"],
           ratio_of="F.group_norm + F.silu time / fused kernel time: x faster", details=info)


def _hw(n: int) -> tuple[int, int]:
    """The level's (h, w) from its position count (2:3 aspect, as 512x768)."""
    h = int(round((n * 2 / 3) ** 0.5))
    return h, n // h
