"""The project's CPU kernels (kernels/cpu/*.c) against the ATen paths they replace, op by op, at
the shapes of one bf16 UNet call at SD1.5's structure at half widths (16 frames, 256x256: 32x32
latents, two CFG rows), round by round in the same run (benchmarks/timing.compare).

- motion attention over 16 frames from the packed q|k|v (with the folded positional bias), per
  level, against `attention._packed_aten` (head-major copy, batched GEMMs, softmax);
- GroupNorm + SiLU on channels-last images, per level, against F.group_norm + F.silu_;
- LayerNorm rows, per width, against ATen's mixed-precision LayerNorm (fp32 affine);
- flash attention (its AVX-512 BF16 build, and its AMX build where the CPU has AMX-BF16), per
  level's spatial self-attention, against the fastest ATen composition measured here (SDPA's flash kernel, chunked or strided GEMMs); `test_cpu_rate.py` has its share of
  the bf16 matmul rate at sd15's own shapes.

    pytest benchmarks/test_cpu_kernels.py --bench-rounds 5

The results file records the CPU (machine.describe, with whether the kernels built there).
"""
import pytest
import torch
import torch.nn.functional as F

from aa_trt import attention as attn_math
from aa_trt.kernels import cpu_native

from .timing import PER_ROUND, compare, timed

if cpu_native.library() is None:
    pytest.skip(f"the CPU kernels did not build here: {cpu_native.why_not()}", allow_module_level=True)

# (channels, tokens per side) of sd15 half widths' levels at 256x256
LEVELS = ((160, 32), (320, 16), (640, 8), (640, 4))
FRAMES, ROWS = 16, 2


def _report(record, benchmark, what, t, **details):
    s = t.summary()
    benchmark.extra_info.update(s)
    record(f"{what} (sd15 half widths, bf16, CPU, {torch.get_num_threads()} threads): C kernel vs ATen",
           s["ours_median_s"], "s", baseline=s["baseline_median_s"], ratio=s["speedup_per_round"],
           ratio_of=PER_ROUND, details=dict(s, **details))


@pytest.mark.parametrize("c,side", LEVELS, ids=lambda v: str(v))
def test_motion_attention(benchmark, rounds, record, c, side):
    from aa_trt.kernels.cpu_motion_attention import motion_attention

    heads = 8
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(ROWS, FRAMES, side * side, 3 * c, generator=g).bfloat16()
    bias = torch.randn(3, heads, FRAMES, c // heads, generator=g).bfloat16()
    t = compare(benchmark, lambda: motion_attention(qkv, heads, bias),
                lambda: attn_math._packed_aten(qkv, heads, bias), rounds)
    _report(record, benchmark, f"motion attention, {FRAMES} frames, {c} ch, {side}x{side}", t)


@pytest.mark.parametrize("c,side", LEVELS, ids=lambda v: str(v))
def test_group_norm_silu(benchmark, rounds, record, c, side):
    from aa_trt.kernels.cpu_group_norm_silu import group_norm_silu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS * FRAMES, c, side, side, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, generator=g).bfloat16(), torch.randn(c, generator=g).bfloat16()
    t = compare(benchmark, lambda: group_norm_silu(x, 32, w, b, 1e-5),
                lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5), inplace=True), rounds)
    _report(record, benchmark, f"GroupNorm + SiLU, {ROWS * FRAMES} images, {c} ch, {side}x{side}", t)


@pytest.mark.parametrize("c,side", LEVELS[:3], ids=lambda v: str(v))
def test_layer_norm(benchmark, rounds, record, c, side):
    from aa_trt.kernels.cpu_layer_norm import layer_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS * FRAMES * side * side, c, generator=g).bfloat16()
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    t = compare(benchmark, lambda: layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (c,), w, b, 1e-5), rounds)
    _report(record, benchmark, f"LayerNorm, {x.shape[0]} rows of {c}", t)


@pytest.mark.parametrize("tiles", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("c,side", LEVELS[:3], ids=lambda v: str(v))
def test_flash_attention(benchmark, rounds, record, c, side, tiles):
    from aa_trt.kernels.cpu_flash_attention import available, flash_attention

    if not available(tiles=tiles):
        pytest.skip("the flash kernel needs AVX-512 BF16" + (" and AMX-BF16 (its AMX build)" if tiles else ""))
    heads, n = 8, side * side
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(ROWS, n, c, generator=g).bfloat16() for _ in range(3))
    timings = {}
    for name, fn in (("sdpa", attn_math.sdpa_attention), ("gemm", attn_math.chunked_attention),
                     ("strided", attn_math.strided_attention)):
        fn(q, k, v, heads)
        timings[name] = min(timed(lambda fn=fn: fn(q, k, v, heads)) for _ in range(3))
    best = min(timings, key=timings.get)
    aten = {"sdpa": attn_math.sdpa_attention, "gemm": attn_math.chunked_attention,
            "strided": attn_math.strided_attention}[best]
    t = compare(benchmark, lambda: flash_attention(q, k, v, heads, tiles=tiles), lambda: aten(q, k, v, heads), rounds)
    _report(record, benchmark, f"self-attention{' (AMX build)' if tiles else ''}, {ROWS}x{n} tokens, "
            f"{heads} heads of {c // heads}, against ATen's fastest here ({best})", t, aten_times=timings)
