"""The CPU fast paths against their plain references: oneDNN-fused epilogues (aa_trt.fused),
channels-last activations (aa_trt.layout), attention by chunked GEMMs, and the measured choices
between them (aa_trt.autotune), on random inputs in both precisions and both layouts.

Tolerances: fp32 paths agree with the plain computation to rounding (relative 1e-5); bf16 paths
are held to the error the plain bf16 computation itself makes against fp32, with a margin
(fusion rounds once instead of twice, so it is usually closer).
"""
import json

import pytest
import torch
import torch.nn.functional as F

from aa_trt import attention as attn_math
from aa_trt import autotune, fused, layout
from aa_trt.config import PRESETS
from aa_trt.models import UNet
from aa_trt.models.layers import ReferenceState
from aa_trt.models.motion import MotionModule
from aa_trt.models.vae import AutoencoderKL, VAEConfig

from helpers import randomize_

CL = torch.channels_last


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("AA_TRT_CACHE", str(tmp_path))
    monkeypatch.setenv("AA_TRT_AUTOTUNE", "1")  # the suite turns measuring off (conftest)
    autotune.forget()
    yield
    autotune.forget()


# ---------------------------------------------------------------------------- fused epilogues
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fused_linear_epilogues_match_references(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 48, generator=g)
    w = torch.randn(80, 48, generator=g) / 48 ** 0.5
    b = torch.randn(80, generator=g)
    other = torch.randn(3, 37, 80, generator=g)
    exact = {  # float64 truths
        "none": F.linear(x.double(), w.double(), b.double()),
        "gelu": F.gelu(F.linear(x.double(), w.double(), b.double())),
        "add": F.linear(x.double(), w.double(), b.double()) + other.double(),
        "mul": F.linear(x.double(), w.double(), b.double()) * other.double(),
    }
    xd, wd, bd, od = x.to(dtype), w.to(dtype), b.to(dtype), other.to(dtype)
    with torch.no_grad():
        got = {"none": fused.linear(xd, wd, bd), "gelu": fused.linear(xd, wd, bd, "gelu"),
               "add": fused.linear_add(xd, wd, bd, od), "mul": fused.linear_mul(xd, wd, bd, od)}
        ref = {"none": fused.linear_reference(xd, wd, bd), "gelu": fused.linear_reference(xd, wd, bd, "gelu"),
               "add": fused.linear_add_reference(xd, wd, bd, od), "mul": fused.linear_mul_reference(xd, wd, bd, od)}
    assert fused.active(xd), "oneDNN's fused ops should be available in the CPU wheel"
    from torch.profiler import profile
    with profile() as prof, torch.no_grad():
        fused.linear_add(xd, wd, bd, od)
    assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}  # the fused path ran
    for name in exact:
        if dtype == torch.float32:
            assert _rel(got[name], ref[name]) < 1e-6, name
        else:  # no worse than the unfused bf16 computation, against the float64 truth
            assert _rel(got[name], exact[name]) <= 1.25 * _rel(ref[name], exact[name]) + 1e-4, name


@pytest.mark.parametrize("choice", fused.LAYER_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_layer_norm_either_kernel_equals_the_module(choice, dtype):
    """The bf16 LayerNorm with its affine handed over in fp32 (ATen's mixed kernel) gives the
    module's own values bit for bit; the C kernel the same arithmetic summed in another order (at
    most one bf16 rounding step apart, against the float64 truth no worse); fp32 and autograd
    keep the module."""
    if choice == "native":
        _native_or_skip(choice)
    g = torch.Generator().manual_seed(16)
    norm = torch.nn.LayerNorm(160)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(160, generator=g))
        norm.bias.copy_(0.1 * torch.randn(160, generator=g))
    norm = norm.to(dtype)
    x = (3 * torch.randn(2, 37, 160, generator=g) + 1).to(dtype)
    with autotune.override({"layer_norm:": choice}):
        got = fused.layer_norm(x, norm)
    if choice == "native" and dtype == torch.bfloat16:
        exact = F.layer_norm(x.double(), (160,), norm.weight.double(), norm.bias.double(), norm.eps)
        module = norm(x)
        assert got.dtype == dtype and ((got.double() - module.double()).abs() <= module.double().abs() * 2 ** -7).all()
        assert (got.double() - exact).norm() <= (module.double() - exact).norm() * 1.05
    else:
        assert got.dtype == dtype and torch.equal(got, norm(x))
    with torch.enable_grad():  # training: the module itself
        assert torch.equal(fused.layer_norm(x, norm.requires_grad_(True)), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@torch.no_grad()
def test_fused_conv_add_and_bias_match_references(dtype, fmt):
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(24, 16, 3, padding=1)
    randomize_(conv, 2)
    conv = conv.to(dtype).requires_grad_(False)
    conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
    x = torch.randn(2, 24, 9, 11, generator=g).to(dtype).contiguous(memory_format=fmt)
    other = torch.randn(2, 16, 9, 11, generator=g).to(dtype).contiguous(memory_format=fmt)
    extra = torch.randn(16, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    from torch.profiler import profile
    with profile() as prof:
        got = fused.conv_add(x, conv, other)
    assert "mkldnn::_convolution_pointwise" in {e.name for e in prof.events()}  # the fused path ran
    assert _rel(got, fused.conv_add_reference(x, conv, other)) < tol
    assert got.is_contiguous(memory_format=fmt)
    assert _rel(fused.conv_bias(x, conv, extra), fused.conv_bias_reference(x, conv, extra)) < tol


def test_fused_paths_step_aside_for_autograd_and_plain():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    assert not fused.active(x, w)
    fused.linear_add(x, w, None, torch.randn(4, 6)).sum().backward()  # the reference: gradients flow
    assert w.grad is not None and w.grad.abs().sum() > 0
    with torch.no_grad():
        assert fused.active(x)
        with fused.plain():
            assert not fused.active(x)
        assert fused.active(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training's autocast keeps the plain ops
            assert not fused.active(x)
    assert not fused.active(x.detach())  # grad mode on: training, whatever requires grad


# ---------------------------------------------------------------------------- measured choices
def test_autotune_picks_the_faster_candidate_and_remembers_it(tmp_path):
    calls = []
    work = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    # Two machines: on one "b" is faster, on the other "a".
    assert autotune.choose("k1", ("a", "b"), lambda: work, timer=lambda name, fn: 1.0 if name == "a" else 0.5) == "b"
    assert autotune.choose("k2", ("a", "b"), lambda: work, timer=lambda name, fn: 0.1 if name == "a" else 0.5) == "a"
    # A tie within the margin keeps the default (the first, plain candidate).
    assert autotune.choose("k4", ("a", "b"), lambda: work, timer=lambda name, fn: 1.0 if name == "a" else 0.97) == "a"
    # A measured choice is kept in the process; with the real timer it is also written to disk.
    assert autotune.chosen()["k1"] == "b"
    assert autotune.choose("k3", ("a", "b"), lambda: work) in ("a", "b")
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert saved[autotune.fingerprint()]["k3"] == autotune.chosen()["k3"]
    # A later process loads it instead of measuring again.
    autotune.forget()
    never = {"a": lambda: pytest.fail("measured again"), "b": lambda: pytest.fail("measured again")}
    assert autotune.choose("k3", ("a", "b"), lambda: never) == saved[autotune.fingerprint()]["k3"]


def test_autotune_off_takes_the_first_candidate_and_override_forces(monkeypatch):
    monkeypatch.setenv("AA_TRT_AUTOTUNE", "0")
    boom = lambda: pytest.fail("measured with measuring off")  # noqa: E731
    assert autotune.choose("x:1", ("plain", "fast"), boom) == "plain"
    with autotune.override({"x:": "fast"}):
        assert autotune.choose("x:1", ("plain", "fast"), boom) == "fast"
    assert autotune.choose("x:1", ("plain", "fast"), boom) == "plain"


def test_a_corrupt_cache_file_is_measured_over(tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    assert autotune.choose("k", ("a", "b"), lambda: {"a": lambda: None, "b": lambda: None}) in ("a", "b")
    assert "k" in json.loads((tmp_path / "tuning.json").read_text())[autotune.fingerprint()]


@pytest.mark.parametrize("winner", ["nchw", "nhwc"])
def test_layout_follows_the_measurement(monkeypatch, winner):
    """Two kinds of machine, played by the timer: the layout is whichever measured faster."""
    monkeypatch.setattr(autotune, "best_time", lambda name, fn: 0.1 if name == winner else 1.0)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert layout.choose_format(x, (16, 8), 4) == (CL if winner == "nhwc" else torch.contiguous_format)
    with torch.enable_grad():  # training: NCHW whatever was measured
        assert layout.choose_format(x, (16, 8), 4) == torch.contiguous_format


# ---------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_attention_matches_sdpa_and_float64(dtype, tol):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, n, 64, generator=g) for n in (50, 70, 70))
    exact = attn_math.sdpa_attention(q.double(), k.double(), v.double(), 4)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    item = qd.element_size()
    # budgets: 5 heads' scores a group (3 groups for 12), and 7 query rows of one head a chunk
    for budget in (5 * 50 * 70 * item, 7 * 70 * item):
        got = attn_math.chunked_attention(qd, kd, vd, 4, score_bytes=budget)
        assert _rel(got, exact) < tol, budget
    assert _rel(attn_math.chunked_attention(qd, kd, vd, 4), exact) < tol


@pytest.mark.parametrize("choice", ["sdpa", "gemm", "strided"])
def test_cpu_attention_runs_what_was_chosen(choice):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 32, generator=g) for n in (40, 60, 60))
    with autotune.override({"attention:": choice}), torch.no_grad():
        got = attn_math.attention(q, k, v, 2)
    want = {"gemm": attn_math.chunked_attention, "sdpa": attn_math.sdpa_attention,
            "strided": attn_math.strided_attention}[choice](q, k, v, 2)
    assert torch.equal(got, want)


def _flash_or_skip(tiles: bool = False):
    from aa_trt.kernels import cpu_flash_attention

    if not cpu_flash_attention.available():
        pytest.skip("the CPU flash kernel needs AVX-512 BF16 and a C compiler")
    if tiles and not cpu_flash_attention.available(tiles=True):
        pytest.skip("the flash kernel's AMX build needs a CPU with AMX-BF16 and a kernel granting the tile state")


@pytest.mark.parametrize("choice", ["flash", "amx"])
def test_cpu_attention_runs_the_flash_kernel_when_chosen(choice):
    """bf16 on a CPU with AVX-512 BF16: "flash" runs kernels/cpu/flash_attention.c ("amx": its AMX
    build, flash_attention_amx.c); where it cannot (fp32), a forced choice falls back to SDPA."""
    from aa_trt.kernels.cpu_flash_attention import flash_attention

    tiles = choice == "amx"
    _flash_or_skip(tiles)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 32, generator=g).bfloat16() for n in (40, 60, 60))
    k_ref, v_ref = (torch.randn(1, 20, 32, generator=g).bfloat16() for _ in range(2))
    with autotune.override({"attention:": choice}), torch.no_grad():
        got = attn_math.attention(q, k, v, 2)
        got_ref = attn_math.reference_attention(q, k, v, k_ref, v_ref, 2, (False, True))
        fp32 = attn_math.attention(q.float(), k.float(), v.float(), 2)
    assert torch.equal(got, flash_attention(q, k, v, 2, tiles=tiles))
    assert torch.equal(got_ref[1:], flash_attention(q[1:], k[1:], v[1:], 2, k_ref, v_ref, tiles=tiles))
    assert torch.equal(got_ref[:1], flash_attention(q[:1], k[:1], v[:1], 2, tiles=tiles))
    assert torch.equal(fp32, attn_math.sdpa_attention(q.float(), k.float(), v.float(), 2))


@pytest.mark.parametrize("fn", ["strided", "chunked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_gemm_attention_reads_packed_views_and_shared_keys(fn, dtype, tol):
    """q, k, v as column slices of one packed projection, and the reference K/V shared by every
    row: the same result as SDPA over the concatenated keys (float64 truth). `strided_attention`
    copies nothing; `chunked_attention` lays q, k, v out head-major by one copy (self-attention)
    or q, the rows' own k and v, and the shared K/V by one each (no concatenation), and writes
    the output token-major in place."""
    from torch.profiler import profile

    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(3, 50, 3 * 64, generator=g).to(dtype)
    q, k, v = qkv.split(64, dim=-1)
    k_ref, v_ref = (torch.randn(1, 30, 64, generator=g).to(dtype) for _ in range(2))
    k_all = torch.cat([k, k_ref.expand(3, -1, -1)], dim=1).double()
    v_all = torch.cat([v, v_ref.expand(3, -1, -1)], dim=1).double()
    exact = attn_math.sdpa_attention(q.double(), k_all, v_all, 4)
    exact_self = attn_math.sdpa_attention(q.double(), k.double(), v.double(), 4)
    run = attn_math.strided_attention if fn == "strided" else attn_math.chunked_attention
    item = q.element_size()
    # budgets: whole heads; 3 heads' scores a group; 7 queries of one head a chunk
    for budget in (attn_math.CHUNK_SCORE_BYTES, 3 * 50 * 80 * item, 7 * 80 * item):
        with profile() as prof:
            got = run(q, k, v, 4, k_ref=k_ref, v_ref=v_ref, score_bytes=budget)
        assert _rel(got, exact) < tol, budget
        ops = [e.name for e in prof.events()]
        assert ops.count("aten::copy_") == (0 if fn == "strided" else 4) and "aten::cat" not in ops
        with profile() as prof:
            got = run(q, k, v, 4, score_bytes=budget)
        assert _rel(got, exact_self) < tol, budget
        assert [e.name for e in prof.events()].count("aten::copy_") == (0 if fn == "strided" else 1)
        contiguous = run(q.contiguous(), k.contiguous(), v.contiguous(), 4, score_bytes=budget)
        assert torch.equal(got, contiguous)


def test_softmax_in_place_is_softmax():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 33, generator=torch.Generator().manual_seed(9)).to(dtype)
        assert torch.equal(attn_math.softmax_(x.clone()), x.softmax(-1))


@pytest.mark.parametrize("choice", ["sdpa", "gemm", "strided"])
@torch.no_grad()
def test_reference_attention_on_the_cpu_matches_the_concatenation(choice):
    """Each measured choice of the CPU's reference attention (cond rows read the reference K/V,
    uncond rows do not) against the plain SDPA over concatenated keys."""
    g = torch.Generator().manual_seed(10)
    qkv = torch.randn(4, 40, 3 * 32, generator=g)
    q, k, v = qkv.split(32, dim=-1)
    k_ref, v_ref = (torch.randn(1, 24, 32, generator=g) for _ in range(2))
    flags = (False, False, True, True)
    with autotune.override({"attention:": choice}):
        got = attn_math.reference_attention(q, k, v, k_ref, v_ref, 2, flags)
    with fused.plain():
        want = attn_math.reference_attention(q, k, v, k_ref, v_ref, 2, flags)
    assert _rel(got, want) < 1e-5


# ---------------------------------------------------------------------------- whole networks
# Force the CPU C kernels (kernels/cpu/) or ATen's composition where a choice between them exists.
NATIVE = {"motion_attention:": "native", "group_norm_silu:": "native"}
ATEN = {"motion_attention:": "aten", "group_norm_silu:": "aten"}


def _native_or_skip(choice):
    from aa_trt.kernels import cpu_native

    if choice == "native" and cpu_native.library() is None:
        pytest.skip(f"the CPU kernels did not load: {cpu_native.why_not()}")


def _tiny_unets():
    cfg = PRESETS["tiny"]
    den = randomize_(UNet(cfg.unet, cfg.motion), seed=5).eval().requires_grad_(False)
    ref = randomize_(UNet(cfg.unet, with_output=False), seed=6).eval().requires_grad_(False)
    return cfg, den, ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_denoising_unet_fast_paths_match_the_plain_computation(dtype, tol, fmt):
    """The whole denoising UNet (reference K/V, CFG rows, motion modules) in each layout, with
    the fused epilogues and the attention choice, against fused.plain() in fp32."""
    from aa_trt.models.reference_kv import compute_reference_kv

    cfg, den, refnet = _tiny_unets()
    g = torch.Generator().manual_seed(7)
    frames, n = 4, 8
    x = torch.randn(n, 4, 8, 8, generator=g)
    pose = torch.randn(n, cfg.unet.block_out_channels[0], 8, 8, generator=g) * 0.3
    clip = torch.randn(1, 1, cfg.unet.cross_attention_dim, generator=g)
    ctx = torch.cat([torch.zeros_like(clip), clip]).repeat_interleave(frames, 0)
    ref_latent = torch.randn(1, 4, 8, 8, generator=g)

    def run(den, refnet, dt, x=x):
        kv = compute_reference_kv(refnet, den, ref_latent.to(dt), clip.to(dt), "float32")
        state = ReferenceState(kv=kv.pairs, runs=ReferenceState.row_runs([False, True], frames))
        return den(x.to(dt), 500, ctx.to(dt), frames=frames, pose=pose.to(dt), ref=state).float()

    with torch.no_grad():
        with fused.plain():
            want = run(den, refnet, torch.float32)
        den_d, ref_d = den.to(dtype), refnet.to(dtype)
        # The project's C kernels (motion attention, GroupNorm + SiLU) in one run, ATen's in the other.
        with autotune.override({"layout:": fmt, "attention:": "gemm", **NATIVE}):
            got = run(den_d, ref_d, dtype)
        with autotune.override({"layout:": fmt, "attention:": "sdpa", **ATEN}):
            got_sdpa = run(den_d, ref_d, dtype)
        if dtype == torch.bfloat16:
            with fused.plain():
                plain_bf16 = run(den_d, ref_d, dtype)
    assert _rel(got, want) < tol and _rel(got_sdpa, want) < tol
    if dtype == torch.bfloat16:  # the fast bf16 path is not worse than the plain bf16 one (margin 1.5x)
        assert _rel(got, want) < 1.5 * _rel(plain_bf16, want) + 1e-3
    assert got.is_contiguous()  # the caller's views need NCHW out, whatever ran inside


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_motion_module_in_either_layout(fmt):
    mm = MotionModule(32, heads=2, groups=8)
    randomize_(mm, 8).eval().requires_grad_(False)
    x = torch.randn(2 * 5, 32, 3, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with fused.plain():
            want = mm(x, 5)
        got = mm(x.contiguous(memory_format=fmt), 5)
    assert _rel(got, want) < 1e-5
    assert layout.is_channels_last(got) == (fmt == CL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_vae_decoder_fast_paths_match_the_plain_computation(dtype, tol, fmt):
    cfg = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4)
    vae = randomize_(AutoencoderKL(cfg), 10).eval().requires_grad_(False)
    z = torch.randn(3, 4, 6, 7, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        with fused.plain():
            want = vae.decode(z).sample
        vae = vae.to(dtype)
        with autotune.override({"layout:": fmt, **NATIVE}):
            got = vae.decode(z.to(dtype)).sample
        with autotune.override({"layout:": fmt, **ATEN}):
            got_aten = vae.decode(z.to(dtype)).sample
    assert _rel(got_aten.float(), want) < tol
    assert _rel(got.float(), want) < tol
    assert got.is_contiguous() or fmt == "nchw"  # channels-last inside is not the caller's business


@pytest.mark.parametrize("choice", ["aten", "native"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_short_attention_matches_short_attention(dtype, tol, choice):
    """The motion modules' CPU path: q, k, v from one packed projection, per-frame biases added on
    the way, in both token layouts, against attention over (x + bias) computed in float64; ATen's
    composition and the C kernel."""
    _native_or_skip(choice)
    g = torch.Generator().manual_seed(12)
    b, f, heads, d = 6, 9, 4, 8
    c = heads * d
    q, k, v = (torch.randn(b, f, c, generator=g) for _ in range(3))
    bias = torch.randn(3, heads, f, d, generator=g)
    flat = bias.transpose(1, 2).reshape(3, f, c)  # (3, f, c): the same biases token-major
    exact = attn_math.short_attention((q + flat[0]).double(), (k + flat[1]).double(), (v + flat[2]).double(), heads)
    qkv = torch.cat([q, k, v], dim=-1).to(dtype)
    with torch.no_grad(), autotune.override({"motion_attention:": choice}):
        got = attn_math.packed_short_attention(qkv, heads, bias.to(dtype))
        grid = attn_math.packed_short_attention(qkv.view(2, 3, f, 3 * c).transpose(1, 2), heads, bias.to(dtype))
        plain = attn_math.short_attention(q.double(), k.double(), v.double(), heads)
        unbiased = attn_math.packed_short_attention(qkv, heads)
    assert got.shape == (b, f, c) and _rel(got, exact) < tol
    assert _rel(grid.transpose(1, 2).reshape(b, f, c), exact) < tol
    assert _rel(unbiased, plain) < tol


def test_packed_short_attention_over_many_rows_is_a_few_batched_gemms():
    """The NCHW motion modules hand thousands of rows (batch x positions): their attention must be
    a fixed number of batched GEMMs, not one per row (a per-row loop was 10x slower)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm):
                self.gemms += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(14)
    rows, f, heads, d = 300, 6, 2, 4
    qkv = torch.randn(rows, f, 3 * heads * d, generator=g)
    with Count() as count, autotune.override({"motion_attention:": "aten"}):
        attn_math.packed_short_attention(qkv, heads, torch.randn(3, heads, f, d, generator=g))
    assert count.gemms <= 2


@pytest.mark.parametrize("choice", ["aten", "native"])
def test_packed_short_attention_over_axis_1_of_token_grids(choice):
    """(b, f, p, 3c): frames along axis 1 attend per (b, p), as if transposed to (b*p, f, 3c)."""
    _native_or_skip(choice)
    g = torch.Generator().manual_seed(13)
    b, f, p, heads, d = 2, 5, 7, 2, 8
    qkv = torch.randn(b, f, p, 3 * heads * d, generator=g)
    bias = torch.randn(3, heads, f, d, generator=g)
    flat = qkv.transpose(1, 2).reshape(b * p, f, -1)
    with autotune.override({"motion_attention:": choice}):
        got = attn_math.packed_short_attention(qkv, heads, bias)
        want = attn_math.packed_short_attention(flat, heads, bias).view(b, p, f, -1).transpose(1, 2)
    assert got.shape == (b, f, p, heads * d) and _rel(got, want) < 1e-6


def test_the_unet_times_its_first_call_in_both_layouts_and_keeps_the_winner():
    """No choice forced: the first call at a shape runs whole in both layouts (its own attention
    choices made inside, on the same thread) and returns the winner's output; the next call at that
    shape reads the choice back."""
    from aa_trt.models.reference_kv import compute_reference_kv

    cfg, den, refnet = _tiny_unets()
    g = torch.Generator().manual_seed(14)
    frames = 4
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    clip = torch.randn(1, 1, cfg.unet.cross_attention_dim, generator=g)
    ctx = torch.cat([torch.zeros_like(clip), clip]).repeat_interleave(frames, 0)
    ref_latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        kv = compute_reference_kv(refnet, den, ref_latent, clip, "float32")

        def call():
            state = ReferenceState(kv=kv.pairs, runs=ReferenceState.row_runs([False, True], frames))
            return den(x, 500, ctx, frames=frames, ref=state)

        with fused.plain():
            want = call()
        first = call()
        keys = [k for k in autotune.chosen() if k.startswith("layout:unet-call:")]
        assert len(keys) == 1 and autotune.chosen()[keys[0]] in ("nchw", "nhwc")
        second = call()
    assert _rel(first, want) < 2e-5 and _rel(second, want) < 2e-5


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_clip_fast_paths_match_the_plain_computation(act, dtype):
    """CLIP's image tower with q, k, v from one GEMM and the biases in the GEMMs' epilogues:
    in bf16 bit-equal to fused.plain() (and so to transformers', whose oracle test holds it),
    with no addmm left (each copied its bias first); fp32 keeps the plain tower."""
    from torch.profiler import profile

    from aa_trt.models.clip import CLIPConfig, CLIPVisionModelWithProjection

    cfg = CLIPConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                     image_size=64, patch_size=16, hidden_act=act)
    model = randomize_(CLIPVisionModelWithProjection(cfg), seed=11).eval().to(dtype)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12)).to(dtype)
    with fused.plain():
        plain = model(x).image_embeds
    with profile() as prof:
        got = model(x).image_embeds
    assert torch.equal(got, plain)
    ops = {e.name for e in prof.events()}
    if dtype == torch.bfloat16:
        assert "aten::addmm" not in ops and "mkldnn::_linear_pointwise" in ops
