"""The project's CPU C kernels (kernels/cpu/*.c, loaded by aa_trt.kernels.cpu_native) against
their plain torch references computed in float64, on random inputs.

Tolerances (max abs error on outputs of order 1): fp32 2e-5 (fp32 rounding of sums over at most a
few thousand terms); bf16 one rounding of the output, 2^-8 relative, with inputs read exactly
(the kernels compute in fp32 from the bf16 values and round once).
"""
import pytest
import torch

from aa_trt.kernels import cpu_native
from aa_trt.kernels.cpu_group_norm_silu import group_norm_silu, group_norm_silu_reference
from aa_trt.kernels.cpu_group_norm_silu import supported as gn_supported
from aa_trt.kernels.cpu_motion_attention import motion_attention, motion_attention_reference
from aa_trt.kernels.cpu_motion_attention import supported as ma_supported

CL = torch.channels_last

needs_library = pytest.mark.skipif(cpu_native.library() is None,
                                   reason=f"the CPU kernels did not build here: {cpu_native.why_not()}")


def _check(got, want, dtype):
    err = (got.double() - want).abs()
    if dtype == torch.float32:
        assert err.max().item() < 2e-5
    else:  # one bf16 rounding of the exact result
        assert (err <= want.abs() * 2 ** -8 + 1e-6).all(), err.max().item()


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,heads", [((2, 16, 9, 3 * 40), 2), ((5, 24, 3 * 64), 4), ((3, 7, 4, 3 * 24), 3),
                                         ((2, 32, 3, 3 * 16), 1), ((4, 17, 3 * 32), 2), ((1, 1, 2, 3 * 8), 2),
                                         # c a multiple of 16 (the AVX-512 build's rows): head dims 20
                                         # and 80 (a partial 16-column chunk), 16 and 24 frames, 5
                                         ((2, 16, 5, 3 * 160), 8), ((1, 24, 3, 3 * 160), 2), ((3, 5, 2, 3 * 48), 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_motion_attention_matches_float64(dtype, shape, heads, with_bias):
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    n, c = shape[1], shape[-1] // 3
    bias = (torch.randn(3, heads, n, c // heads, generator=g) * 0.5).to(dtype) if with_bias else None
    assert ma_supported(qkv, heads, bias)
    got = motion_attention(qkv, heads, bias)
    want = motion_attention_reference(qkv, heads, bias, compute=torch.float64)
    assert got.shape == want.shape == (*shape[:-1], c) and got.dtype == dtype and got.is_contiguous()
    # the reference rounds to dtype at its end; compare with the float64 values before that
    exact = motion_attention_reference(qkv.double(), heads, None if bias is None else bias.double())
    _check(got, exact, dtype)


@needs_library
def test_motion_attention_reads_strided_rows():
    """Rows given as a transposed view (frames not adjacent, positions strided) read in place."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 6, 16, 3 * 32, generator=g)  # (b, p, n, 3c) in memory
    view = base.transpose(1, 2)  # (b, n, p, 3c), not contiguous
    got = motion_attention(view, 4)
    want = motion_attention_reference(view.double(), 4)
    assert (got.double() - want).abs().max().item() < 2e-5


def test_motion_attention_declines_what_it_cannot_take():
    x = torch.randn(2, 40, 3, 48)  # 40 frames: more than the positional table holds
    assert not ma_supported(x, 2)
    assert not ma_supported(torch.randn(2, 16, 3, 50), 2)  # 3c not divisible
    assert not ma_supported(torch.randn(2, 16, 3, 48).half(), 2)
    assert not ma_supported(torch.randn(2, 16, 3, 48), 2, torch.randn(3, 2, 15, 8))  # bias shape


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((3, 64, 9, 7), 32), ((2, 48, 5, 5), 3), ((4, 32, 2, 1), 8), ((1, 160, 16, 16), 32),
                                          ((2, 32, 47, 61), 8)])  # the last: statistics over 7 uneven pixel chunks
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_matches_float64(dtype, shape, groups, silu, affine):
    g = torch.Generator().manual_seed(3)
    # a mean well away from 0 per channel: sums of squares would cancel without the shift
    x = (torch.randn(shape, generator=g) * 2 + torch.randn(1, shape[1], 1, 1, generator=g) * 20).to(dtype)
    x = x.contiguous(memory_format=CL)
    w = torch.randn(shape[1], generator=g).to(dtype) if affine else None
    b = torch.randn(shape[1], generator=g).to(dtype) if affine else None
    assert gn_supported(x, groups, w, b)
    got = group_norm_silu(x, groups, w, b, 1e-6, silu)
    exact = group_norm_silu_reference(x.double(), groups, None if w is None else w.double(),
                                      None if b is None else b.double(), 1e-6, silu)
    assert got.is_contiguous(memory_format=CL) and got.dtype == dtype
    _check(got, exact, dtype)


def test_group_norm_silu_declines_what_it_cannot_take():
    x = torch.randn(2, 48, 4, 4)
    assert not gn_supported(x, 8, None, None)  # NCHW
    assert not gn_supported(torch.randn(2, 40, 4, 4).contiguous(memory_format=CL), 8, None, None)  # 40 % 16
    assert not gn_supported(x.contiguous(memory_format=CL), 5, None, None)  # groups do not divide


@needs_library
def test_kernels_show_in_profiles_under_their_names():
    """The op profile (benchmarks/op_profile.py) classifies time by op name."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        motion_attention(torch.randn(2, 8, 3, 48), 2)
        group_norm_silu(x, 8, None, None, 1e-5)
    names = {e.name for e in prof.events()}
    assert {"aa_trt::motion_attention", "aa_trt::group_norm_silu"} <= names


def test_no_compiler_or_switched_off_means_no_library(monkeypatch, tmp_path):
    """Without a working compiler (or with AA_TRT_NATIVE=0) nothing is loaded, the reason is kept,
    and the kernels report themselves unsupported, so every caller keeps ATen's path."""
    monkeypatch.setenv("AA_TRT_CACHE", str(tmp_path))
    cpu_native.library.cache_clear()
    try:
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails
        monkeypatch.setattr(cpu_native.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
        assert cpu_native.library() is None
        assert "did not build" in cpu_native.why_not()
        assert not ma_supported(torch.randn(2, 8, 3, 48), 2)
        assert not list(tmp_path.glob("native/*.so")) and not list(tmp_path.glob("native/.*"))  # no half file
        cpu_native.library.cache_clear()
        monkeypatch.setenv("AA_TRT_NATIVE", "0")
        assert cpu_native.library() is None and cpu_native.why_not() == "AA_TRT_NATIVE=0"
    finally:
        cpu_native.library.cache_clear()


@needs_library
def test_the_library_is_built_once_per_machine_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("AA_TRT_CACHE", str(tmp_path))
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is not None
        built = list(tmp_path.glob("native/*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_native.library.cache_clear()
        assert cpu_native.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu_native.library.cache_clear()


# ---------------------------------------------------------------------------- flash attention
needs_flash = pytest.mark.skipif(
    cpu_native.library() is None or not __import__("aa_trt.kernels.cpu_flash_attention", fromlist=["x"]).available(),
    reason="the CPU flash kernel needs a C compiler and a CPU with AVX-512 BF16")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiles_or_skip(tiles: bool) -> None:
    from aa_trt.kernels.cpu_flash_attention import available

    if tiles and not available(tiles=True):
        pytest.skip("the AMX build of the flash kernel needs a CPU with AMX-BF16 (amx_bf16 in /proc/cpuinfo), "
                    "a compiler that targets it and a Linux kernel that grants the tile state")


@needs_flash
@pytest.mark.parametrize("b,n,m,m2,heads,d", [(2, 37, 50, 0, 2, 20), (1, 64, 64, 0, 8, 40), (2, 33, 17, 29, 3, 80),
                                              (1, 16, 16, 0, 1, 160), (1, 5, 3, 0, 2, 6), (2, 70, 90, 40, 1, 256),
                                              (3, 1, 1, 0, 4, 2), (1, 300, 200, 140, 2, 48)])
@pytest.mark.parametrize("scale", [1.0, 6.0])
@pytest.mark.parametrize("tiles", [False, True], ids=["avx512", "amx"])
def test_flash_attention_matches_float64(b, n, m, m2, heads, d, scale, tiles):
    """Against SDPA in float64 on the same bf16 values: within twice the error bf16 SDPA itself
    makes (the probabilities are rounded to bf16 before the second product, as ATen's GEMM paths
    do); scale 6 makes scores of +-50 and more, so the running maximum moves between key blocks.
    Both builds: AVX-512 BF16 dot products and AMX tiles (query groups past 128 rows, keys past
    one 128-key block, padding of d and of the keys all met by the shapes above)."""
    from aa_trt.kernels.cpu_flash_attention import flash_attention, flash_attention_reference

    _tiles_or_skip(tiles)

    g = torch.Generator().manual_seed(b * 1000 + n + m)
    c = heads * d
    packed = (torch.randn(b, n, 3 * c, generator=g) * scale).bfloat16()  # q, k, v: column slices
    q, k, v = packed[:, :, :c], packed[:, :m, c:2 * c] if m <= n else None, None
    k = (torch.randn(b, m, c, generator=g) * scale).bfloat16() if k is None else k
    v = torch.randn(b, m, c, generator=g).bfloat16()
    k_ref = (torch.randn(1, m2, c, generator=g) * scale).bfloat16() if m2 else None
    v_ref = torch.randn(1, m2, c, generator=g).bfloat16() if m2 else None
    got = flash_attention(q, k, v, heads, k_ref, v_ref, tiles=tiles)
    exact = flash_attention_reference(*(t if t is None else t.double() for t in (q, k, v)), heads,
                                      None if k_ref is None else k_ref.double(),
                                      None if v_ref is None else v_ref.double())
    sdpa_bf16 = flash_attention_reference(q, k, v, heads, k_ref, v_ref, compute=torch.bfloat16)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert _rel(got, exact) <= 2 * _rel(sdpa_bf16, exact) + 1e-4


@pytest.mark.parametrize("tiles", [False, True], ids=["avx512", "amx"])
def test_flash_attention_declines_what_it_cannot_take(tiles):
    from aa_trt.kernels.cpu_flash_attention import supported as supported_any

    def supported(*args):
        return supported_any(*args, tiles=tiles)

    q = torch.randn(1, 8, 40).bfloat16()
    assert not supported(q.float(), q.float(), q.float(), 2)  # fp32
    assert not supported(torch.randn(1, 8, 30).bfloat16(), torch.randn(1, 8, 30).bfloat16(),
                         torch.randn(1, 8, 30).bfloat16(), 2)  # head dim 15: odd
    big = torch.randn(1, 4, 2 * 258).bfloat16()
    assert not supported(big, big, big, 2)  # head dim 258 > 256
    assert not supported(q, q, q, 2, torch.randn(1, 3, 40).bfloat16(), None)  # k_ref without v_ref
    assert not supported(q, q.transpose(1, 2).contiguous().transpose(1, 2), q, 2)  # columns strided


# ---------------------------------------------------------------------------- layer norm
@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 160), (2, 3, 5, 320), (1, 16), (40, 1280)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64(dtype, shape, affine):
    from aa_trt.kernels.cpu_layer_norm import layer_norm, layer_norm_reference, supported

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 3 + torch.randn(shape[-1], generator=g) * 10).to(dtype)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g) if affine else None
    b = torch.randn(shape[-1], generator=g) if affine else None
    assert supported(x, w, b)
    got = layer_norm(x, w, b, 1e-5)
    exact = layer_norm_reference(x.double(), w, b, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    _check(got, exact, dtype)


def test_layer_norm_declines_what_it_cannot_take():
    from aa_trt.kernels.cpu_layer_norm import supported

    assert not supported(torch.randn(4, 40), None, None)  # 40 % 16
    assert not supported(torch.randn(40, 4).t(), None, None)  # not contiguous
    assert not supported(torch.randn(4, 32), torch.randn(32).bfloat16(), None)  # weight not fp32
