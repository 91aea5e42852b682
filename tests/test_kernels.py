"""The Triton kernels (aa_trt.kernels) against their torch references.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before the
kernel modules are imported: triton reads it when a kernel is decorated and again at launch, so it
stays set for the process), ~150-500x slower than torch,
so the default cases are small; the full sweeps are @pytest.mark.slow. With CUDA the same cases
run compiled on the GPU, plus the CUDA-only checks at the end.

Tolerances (max |kernel - fp32 reference|, per element, atol + rtol * |ref|), keyed by input dtype:
fp32 1e-5 (fp32 accumulation, IEEE dots), fp16 4e-3 (fp16 operands, fp32 accumulation; the output
rounding alone is up to 1e-3 at |x| ~ 2), bf16 3e-2 (8-bit mantissa: output rounding up to 8e-3;
the interpreter truncates fp32 -> bf16, up to twice that). GroupNorm + SiLU uses the same table:
its fp32 statistics are exact to ~1e-7, so the half-precision error is the output rounding.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # read when the kernels are decorated *and* at launch: stays set for this process
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from aa_trt import attention as attn_math  # noqa: E402
from aa_trt.kernels import groupnorm_silu as gn  # noqa: E402
from aa_trt.kernels import reference_attention as ra  # noqa: E402
from aa_trt.kernels import temporal_attention as ta  # noqa: E402
from aa_trt.kernels._common import head_dim_chunks, is_interpreted  # noqa: E402

if not CUDA and not is_interpreted(ra._reference_attention_kernel):
    pytest.skip("the kernel modules were imported before TRITON_INTERPRET=1 was set "
                "(no CUDA: they cannot run)", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _rand(*shape, dtype, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _check(out, ref, dtype, what=""):
    atol, rtol = TOL[dtype]
    out, ref = out.float().cpu(), ref.float().cpu()
    err = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    assert torch.isfinite(out).all(), what
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (atol {atol}, rtol {rtol})"
    return err.max().item()


# ---------------------------------------------------------------------------------- head dims
@pytest.mark.parametrize("d, chunks", [(40, (32, 16)), (80, (64, 16)), (160, (128, 32)), (64, (64, 0)),
                                       (16, (16, 0)), (24, (16, 16)), (256, (256, 0))])
def test_head_dim_chunks(d, chunks):
    assert head_dim_chunks(d) == chunks
    d0, d1 = chunks
    assert d0 + d1 >= d and d0 + d1 - d < 16  # never more than one masked 16-wide tail


def test_head_dim_out_of_range():
    with pytest.raises(ValueError):
        head_dim_chunks(8)


# ------------------------------------------------------------------------ reference attention
def _ref_case(d, dtype, b, heads, n, m, flags, block_m=None, block_n=None, per_row_ref=False,
              fused_qkv=False, ref_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    if fused_qkv:  # q/k/v as slices of one (b, n, 3c) projection: strided, not copied
        qkv = _rand(b, n, 3 * c, dtype=dtype, g=g)
        q, k, v = qkv.split(c, dim=-1)
    else:
        q, k, v = (_rand(b, n, c, dtype=dtype, g=g) for _ in range(3))
    if m:
        rb = b if per_row_ref else 1
        k_ref, v_ref = (_rand(rb, m, c, dtype=ref_dtype or dtype, g=g) for _ in range(2))
    else:
        k_ref = v_ref = None
    t = time.perf_counter()
    out = ra.reference_attention(q, k, v, k_ref, v_ref, heads, flags, block_m=block_m, block_n=block_n)
    elapsed = time.perf_counter() - t
    ref = ra.reference_attention_torch(q, k, v, k_ref, v_ref, heads, flags)
    assert out.shape == q.shape and out.dtype == dtype
    return _check(out, ref, dtype, f"d={d} {dtype} n={n} m={m} flags={flags}"), elapsed


# Default run: every head dim, every dtype, partial tiles, flag mixes, strided inputs (~15 s).
REF_CASES = [
    # d, dtype, b, heads, n, m, flags, block_m, block_n
    (40, F16, 3, 2, 37, 21, [1, 0, 1], 16, 16),     # partial q and k tiles, uncond row in the middle
    (80, F32, 2, 1, 50, 19, None, None, None),      # default blocks, every row uses the reference
    (160, F16, 2, 1, 23, 40, [0, 1], 16, 32),
    (64, BF16, 2, 2, 17, 9, [1, 1], 16, 16),        # power-of-two head (no tail), bf16 (fp32 dots)
    (40, F32, 2, 2, 1, 5, [1, 0], 16, 16),          # a single token per frame
    (80, F16, 2, 1, 20, 0, None, 16, 16),           # no reference at all: plain attention
]


@pytest.mark.parametrize("d, dtype, b, heads, n, m, flags, bm, bn", REF_CASES)
def test_reference_attention(d, dtype, b, heads, n, m, flags, bm, bn):
    _ref_case(d, dtype, b, heads, n, m, flags, bm, bn)


def test_reference_attention_strided_and_mixed_dtype():
    # q/k/v slices of a fused projection; an fp32 reference cache read by fp16 frames (cast in-kernel)
    _ref_case(80, F16, 2, 1, 19, 13, [1, 0], 16, 16, fused_qkv=True, ref_dtype=F32)


def test_reference_attention_per_row_reference():
    _ref_case(40, F16, 2, 1, 9, 11, [1, 1], 16, 16, per_row_ref=True)


def test_reference_attention_all_uncond_equals_plain_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (_rand(2, 21, 80, dtype=F32, g=g) for _ in range(3))
    k_ref, v_ref = (_rand(1, 7, 80, dtype=F32, g=g) for _ in range(2))
    out = ra.reference_attention(q, k, v, k_ref, v_ref, 2, torch.zeros(2, dtype=torch.bool),
                                 block_m=16, block_n=16)
    _check(out, attn_math.attention(q, k, v, 2), F32, "uncond rows")


@pytest.mark.slow
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("n, m", [(1, 1), (16, 16), (33, 65), (77, 50)])
def test_reference_attention_sweep(d, dtype, n, m):
    _ref_case(d, dtype, 3, 2, n, m, [1, 0, 1], 16, 32, seed=n * 1000 + m)


# ------------------------------------------------------------------------- temporal attention
def _temporal_case(d, dtype, positions, f, heads, bias, block_p=None, fused_qkv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    if fused_qkv:
        q, k, v = _rand(positions, f, 3 * c, dtype=dtype, g=g).split(c, dim=-1)
    else:
        q, k, v = (_rand(positions, f, c, dtype=dtype, g=g) for _ in range(3))
    biases = [_rand(f, c, dtype=dtype, scale=0.5, g=g) for _ in range(3)] if bias else [None] * 3
    out = ta.temporal_attention(q, k, v, heads, *biases, block_p=block_p)
    ref = ta.temporal_attention_torch(q, k, v, heads, *biases)
    assert out.shape == q.shape and out.dtype == dtype
    return _check(out, ref, dtype, f"d={d} {dtype} f={f} positions={positions} bias={bias}")


TEMPORAL_CASES = [
    # d, dtype, positions, f, heads, bias, block_p
    (40, F16, 13, 24, 2, True, 4),      # Moore's 24-frame window, partial position block
    (80, F32, 5, 1, 1, True, None),     # a single frame: softmax over one key
    (160, F16, 6, 32, 1, False, 4),     # the maximum window
    (40, BF16, 9, 7, 2, True, None),    # frames not a power of two, bf16 (fp32 dots)
    (80, F16, 3, 16, 2, False, 2),
    (64, F32, 7, 13, 1, True, None),    # power-of-two head: no tail chunk
]


@pytest.mark.parametrize("d, dtype, positions, f, heads, bias, bp", TEMPORAL_CASES)
def test_temporal_attention(d, dtype, positions, f, heads, bias, bp):
    _temporal_case(d, dtype, positions, f, heads, bias, bp)


def test_temporal_attention_strided():
    _temporal_case(40, F16, 5, 9, 2, True, 2, fused_qkv=True)


@pytest.mark.slow
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("f", [1, 2, 5, 8, 12, 16, 17, 24, 31, 32])
def test_temporal_attention_sweep(d, dtype, f):
    _temporal_case(d, dtype, 11, f, 2, f % 2 == 0, None, seed=f)


def test_fold_positional_encoding_is_exact():
    """(x + pe) W^T == x W^T + pe W^T: the module's output with pe folded into per-frame biases."""
    from aa_trt.models.motion import TemporalAttention
    torch.manual_seed(0)
    mod = TemporalAttention(80, 2, 32).to(DEVICE)
    x = torch.randn(6, 24, 80, device=DEVICE)
    with torch.no_grad():
        expected = mod(x)
        bq, bk, bv = ta.fold_positional_encoding(mod.pos_encoder.pe, (mod.to_q.weight, mod.to_k.weight,
                                                                      mod.to_v.weight), 24)
        q, k, v = mod.to_q(x), mod.to_k(x), mod.to_v(x)
        plain = mod.to_out[0](attn_math.temporal_attention(q, k, v, 2, bq, bk, bv))  # torch path
        fused = mod.to_out[0](ta.temporal_attention(q, k, v, 2, bq, bk, bv))          # kernel
    assert (plain - expected).abs().max().item() < 1e-5
    assert (fused - expected).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- groupnorm + silu
def _gn_case(n, c, spatial, groups, dtype, silu, block=None, offset=3.0, seed=0):
    """Inputs with a non-zero mean per group (offset) and non-trivial affine parameters, against
    F.group_norm + F.silu run in fp32 on the same (rounded) values."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *spatial, generator=g) * 2.0 + offset).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(DEVICE, dtype)
    b = (0.3 * torch.randn(c, generator=g)).to(DEVICE, dtype)
    out = gn.group_norm_silu(x, groups, w, b, 1e-5, silu, block=block)
    ref = gn.group_norm_silu_torch(x.float(), groups, w.float(), b.float(), 1e-5, silu)
    assert out.shape == x.shape and out.dtype == dtype
    return _check(out, ref, dtype, f"{dtype} c={c} groups={groups} spatial={spatial} silu={silu}")


GN_CASES = [
    # n, c, spatial, groups (channels per group = c / groups), dtype, silu, block
    (2, 8, (7, 9), 8, F32, True, None),         # 1 channel per group
    (2, 16, (13, 17), 8, F32, False, 64),       # 2 per group, 221-element rows in 64-wide tiles
    (1, 128, (1, 1), 32, F32, True, None),      # 4 per group, 1x1: a 4-element group
    (2, 1280, (7, 9), 32, F32, True, 512),      # 40 per group (SD1.5's 1280 / 32), partial tiles
    (2, 320, (13, 17), 8, F32, False, None),    # 40 per group, whole group in one tile
    (2, 64, (13, 17), 32, F16, True, 128),
    (1, 1280, (7, 9), 32, F16, False, None),
    (2, 320, (13, 17), 8, BF16, True, 512),
    (3, 32, (1, 1), 32, BF16, True, None),      # one element per group: y = bias
    (2, 96, (3, 5, 7), 32, F32, True, 128),     # (N, C, F, H, W): any trailing spatial size
    (2, 64, (), 8, F16, True, None),            # (N, C): no spatial axis
]


@pytest.mark.parametrize("n, c, spatial, groups, dtype, silu, block", GN_CASES)
def test_group_norm_silu(n, c, spatial, groups, dtype, silu, block):
    _gn_case(n, c, spatial, groups, dtype, silu, block)


def test_group_norm_silu_large_mean_fp32():
    """Chan's merge of per-tile statistics: a mean 1e3 x the spread loses nothing (the one-pass
    E[x^2] - E[x]^2 would lose ~6 digits in fp32). Checked against float64."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 64, 11, 13, generator=g) + 1000.0).to(DEVICE)
    w, b = 1 + 0.2 * torch.randn(64, generator=g), 0.3 * torch.randn(64, generator=g)
    out = gn.group_norm_silu(x, 8, w.to(DEVICE), b.to(DEVICE), 1e-6, True, block=64)
    ref = gn.group_norm_silu_torch(x.double(), 8, w.double(), b.double(), 1e-6, True)
    assert (out.double().cpu() - ref.cpu()).abs().max().item() < 1e-3  # fp32 x itself: ulp 6e-5 at 1e3


def test_group_norm_silu_no_affine_and_bad_inputs():
    x = _rand(2, 12, 5, 6, dtype=F32)
    _check(gn.group_norm_silu(x, 4), gn.group_norm_silu_torch(x, 4), F32, "no affine")
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        gn.group_norm_silu(x, 5)
    with pytest.raises(ValueError, match="contiguous"):
        gn.group_norm_silu(x.transpose(2, 3), 4)
    with pytest.raises(ValueError, match="weight must be"):
        gn.group_norm_silu(x, 4, torch.ones(6, device=DEVICE))


# --------------------------------------------------------------------------------- dispatch
@pytest.fixture
def backend():
    previous = attn_math.get_backend()
    yield attn_math.set_backend
    attn_math.set_backend(previous)


def test_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="auto, sdpa, triton"):
        backend("cuda")


@pytest.mark.skipif(CUDA, reason="checks the CPU path")
def test_auto_backend_leaves_cpu_untouched(backend, monkeypatch):
    backend("auto")
    calls = []
    monkeypatch.setattr(ra, "reference_attention", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(ta, "temporal_attention", lambda *a, **k: calls.append(a))
    q, k, v = (torch.randn(2, 16, 80, dtype=F16) for _ in range(3))
    kr, vr = (torch.randn(1, 8, 80, dtype=F16) for _ in range(2))
    attn_math.reference_attention(q, k, v, kr, vr, 2)
    attn_math.attention(q, k, v, 2)
    assert not calls


def test_auto_backend_survives_a_kernel_that_fails_to_compile(backend, monkeypatch):
    """Under "auto" on a GPU (simulated: `_on_gpu` patched; fp16 CPU tensors), a kernel that raises
    (a Triton compile or launch error) is switched off with one RuntimeWarning and the plain path
    gives the answer, now and on later calls, without calling the kernel again; the other kernels
    stay on. Explicit "triton" raises the error instead."""
    monkeypatch.setattr(attn_math, "_failed", {})
    monkeypatch.setattr(attn_math, "_on_gpu", lambda x: True)
    calls = {"reference": 0, "temporal": 0}

    def broken(*a, **k):
        calls["reference"] += 1
        raise RuntimeError("PTX assembly failed: too many resources requested\n(long log)")

    def counted(*a, **k):
        calls["temporal"] += 1
        return ta.temporal_attention_torch(*a, **k).to(a[0].dtype)

    monkeypatch.setattr(ra, "reference_attention", broken)
    monkeypatch.setattr(ta, "temporal_attention", counted)
    g = torch.Generator().manual_seed(3)
    # 40 tokens: more than the temporal kernel takes, so the plain path is SDPA throughout
    q, k, v = (torch.randn(2, 40, 80, generator=g).half() for _ in range(3))
    kr, vr = (torch.randn(1, 8, 80, generator=g).half() for _ in range(2))
    backend("sdpa")
    want = attn_math.reference_attention(q, k, v, kr, vr, 2, [True, False])
    backend("auto")
    with pytest.warns(RuntimeWarning, match="reference kernel failed.*PTX assembly failed"):
        got = attn_math.reference_attention(q, k, v, kr, vr, 2, [True, False])
    assert torch.equal(got, want)
    assert set(attn_math.failed_kernels()) == {"reference"}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(attn_math.reference_attention(q, k, v, kr, vr, 2, [True, False]), want)
    assert calls["reference"] == 1
    short = q[:, :16]
    attn_math.attention(short, short, short, 2)  # 16 frames: the temporal kernel, still on
    assert calls["temporal"] == 1
    backend("triton")
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        attn_math.reference_attention(q, k, v, kr, vr, 2, [True, False])


def test_use_reference_flags_in_the_plain_path(backend):
    backend("sdpa")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 10, 64, generator=g) for _ in range(3))
    kr, vr = (torch.randn(1, 7, 64, generator=g) for _ in range(2))
    flags = [True, False, False, True]
    out = attn_math.reference_attention(q, k, v, kr, vr, 2, flags)
    ref = ra.reference_attention_torch(q, k, v, kr, vr, 2, flags)
    assert (out - ref).abs().max().item() < 1e-5


def _tiny_blocks(dim, heads):
    from aa_trt.models.layers import TransformerBlock
    from aa_trt.models.motion import TemporalTransformerBlock
    torch.manual_seed(0)
    spatial = TransformerBlock(dim, heads, context_dim=32, index=0).to(DEVICE).eval()
    temporal = TemporalTransformerBlock(dim, heads, n_attn=2, max_len=32).to(DEVICE).eval()
    return spatial, temporal


@pytest.mark.parametrize("d", [40, 80])
def test_blocks_through_kernels_equal_sdpa(backend, monkeypatch, d):
    """A spatial transformer block with the reference K/V (cond and uncond rows) and a temporal
    block, run with backend 'triton' (interpreter on CPU) and with SDPA, fp32."""
    from aa_trt.models.layers import ReferenceState
    heads, f = 2, 3
    spatial, temporal = _tiny_blocks(heads * d, heads)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * f, 20, heads * d, generator=g).to(DEVICE)          # 2 rows x 3 frames, 4x5 tokens
    ctx = torch.randn(2 * f, 4, 32, generator=g).to(DEVICE)
    kv = [tuple(torch.randn(1, 12, heads * d, generator=g).to(DEVICE) for _ in range(2))]
    state = ReferenceState(kv=kv, runs=ReferenceState.row_runs([False, True], f))
    xt = torch.randn(9, 24, heads * d, generator=g).to(DEVICE)              # (positions, frames, c)
    launches = []
    for mod, fn in ((ra, "reference_attention"), (ta, "temporal_attention")):
        original = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _f=original, _n=fn, **k: launches.append(_n) or _f(*a, **k))
    outs = {}
    with torch.no_grad():
        for name in ("sdpa", "triton"):
            backend(name)
            outs[name] = spatial(x, ctx, state), temporal(xt)
    # cond and uncond rows: one launch of the fused kernel (uncond rows skip the reference by
    # their flag); the two temporal attentions: the temporal kernel
    assert sorted(launches) == ["reference_attention"] + ["temporal_attention"] * 2
    for a, b in zip(outs["triton"], outs["sdpa"]):
        assert (a - b).abs().max().item() < 2e-5


# ------------------------------------------------------------------------------- CUDA only
@needs_cuda
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_reference_attention_cuda_sd15_shapes(d, dtype):
    # 512x768 latent at the block's resolution: 64x96 / 2**level tokens; 16 frames, cond + uncond
    n = {40: 64 * 96, 80: 32 * 48, 160: 16 * 24}[d]
    _ref_case(d, dtype, 4, 8, n, n, [0, 0, 1, 1], seed=d)


@needs_cuda
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_temporal_attention_cuda_sd15_shapes(d, dtype):
    positions = {40: 64 * 96, 80: 32 * 48, 160: 16 * 24}[d]
    _temporal_case(d, dtype, positions, 24, 8, True, seed=d)


@needs_cuda
def test_denoising_step_kernels_equal_plain_cuda_fp16(backend):
    """The whole denoising UNet call (sd15 widths, 8 frames, 256x256, uncond + cond rows, reference
    K/V) with the kernels against the plain SDPA path, both fp16: relative L2 error < 1e-2."""
    from helpers import randomize_

    from aa_trt.config import PRESETS
    from aa_trt.models import UNet
    from aa_trt.models.layers import ReferenceState
    from aa_trt.models.reference_kv import compute_reference_kv
    cfg, f, hw = PRESETS["sd15"], 8, 32
    with torch.device("cuda"):
        den = UNet(cfg.unet, cfg.motion)
        refnet = UNet(cfg.unet, with_output=False)
    randomize_(den, 0)
    randomize_(refnet, 1)
    den, refnet = den.half().eval().requires_grad_(False), refnet.half().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 1, cfg.unet.cross_attention_dim, generator=g).cuda().half()
    ref_latent = torch.randn(1, 4, hw, hw, generator=g).cuda().half()
    x = torch.randn(2 * f, 4, hw, hw, generator=g).cuda().half()
    ctx = torch.cat([torch.zeros_like(clip), clip])
    outs = {}
    with torch.no_grad():
        backend("sdpa")
        kv = compute_reference_kv(refnet, den, ref_latent, clip, cfg.bank_dtype)
        state = ReferenceState(kv=kv.pairs, runs=ReferenceState.row_runs([False, True], f))
        for name in ("sdpa", "triton"):
            backend(name)
            outs[name] = den(x, 500, ctx, frames=f, ref=state).float()
    rel = ((outs["triton"] - outs["sdpa"]).norm() / outs["sdpa"].norm()).item()
    assert rel < 1e-2, rel


def _count_group_norm_launches(monkeypatch) -> list:
    launches = []
    original = gn.group_norm_silu
    monkeypatch.setattr(gn, "group_norm_silu",
                        lambda *a, **k: launches.append(a[0].shape) or original(*a, **k))
    return launches


def test_resnet_block_through_group_norm_kernel_equals_plain(backend, monkeypatch):
    """A resnet block (channel change, so the shortcut conv too) with backend 'triton' (fused
    GroupNorm + SiLU twice, interpreter on CPU) against the plain path, fp32: < 1e-5."""
    from aa_trt.models.layers import ResnetBlock
    torch.manual_seed(0)
    block = ResnetBlock(64, 96, 48, groups=32, eps=1e-5).to(DEVICE).eval()
    with torch.no_grad():
        for p in block.parameters():  # norms with non-trivial affine parameters
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    x, temb = _rand(3, 64, 7, 9, dtype=F32, g=g), _rand(3, 48, dtype=F32, g=g)
    launches = _count_group_norm_launches(monkeypatch)
    outs = {}
    with torch.no_grad():
        for name in ("sdpa", "triton"):
            backend(name)
            outs[name] = block(x, temb)
    assert launches == [(3, 64, 7, 9), (3, 96, 7, 9)]  # norm1 and norm2, triton run only
    assert (outs["triton"] - outs["sdpa"]).abs().max().item() < 1e-5
    # state-dict names unchanged: Moore's checkpoints load as before
    assert sorted(k for k in block.state_dict() if "norm" in k) == [
        "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]


# Whole-call tolerance: fp32 max |diff| < 1e-4; half precision relative L2 error (both paths round
# every layer's output, so elementwise bounds would be set by the worst of thousands of roundings).
UNET_REL_L2 = {F16: 1e-2, BF16: 4e-2}


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_tiny_unet_through_kernels_equals_plain(backend, monkeypatch, dtype):
    """The tiny preset's denoising UNet (resnets, conv_norm_out, motion modules; uncond + cond
    rows with the reference K/V), backend 'triton' against 'sdpa' in the same dtype: fp32 max
    |diff| < 1e-4; fp16 / bf16 relative L2 < 1e-2 / 4e-2 (on CPU the kernels run interpreted)."""
    from helpers import randomize_

    from aa_trt.config import PRESETS
    from aa_trt.models import UNet
    from aa_trt.models.layers import ReferenceState
    cfg, f = PRESETS["tiny"], 2
    den = randomize_(UNet(cfg.unet, cfg.motion), 0).to(DEVICE, dtype).eval()
    g = torch.Generator().manual_seed(6)
    x = _rand(2 * f, 4, 8, 8, dtype=dtype, g=g)
    ctx = _rand(2 * f, 1, cfg.unet.cross_attention_dim, dtype=dtype, g=g)
    widths = [blk.attn1.to_k.out_features for blk in den.transformer_blocks()]
    kv = [(_rand(1, 10, c, dtype=dtype, g=g), _rand(1, 10, c, dtype=dtype, g=g)) for c in widths]
    state = ReferenceState(kv=kv, runs=ReferenceState.row_runs([False, True], f))
    launches = _count_group_norm_launches(monkeypatch)
    outs = {}
    with torch.no_grad():
        for name in ("sdpa", "triton"):
            backend(name)
            outs[name] = den(x, 500, ctx, frames=f, ref=state)
    n_resnets = sum(1 for m in den.modules() if type(m).__name__ == "ResnetBlock")
    assert len(launches) == 2 * n_resnets + 1  # + conv_norm_out
    got, want = outs["triton"].float(), outs["sdpa"].float()
    assert torch.isfinite(got).all() and want.abs().mean() > 0.05
    if dtype == F32:
        assert (got - want).abs().max().item() < 1e-4
    else:
        rel = ((got - want).norm() / want.norm()).item()
        print(f"{dtype}: relative L2 {rel:.2e}")
        assert rel < UNET_REL_L2[dtype], rel


@pytest.mark.skipif(CUDA, reason="checks the CPU path")
def test_auto_backend_and_autograd_keep_plain_group_norm(backend, monkeypatch):
    from aa_trt.models.layers import ResnetBlock
    block = ResnetBlock(16, 16, 8, groups=8, eps=1e-5)
    x, temb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    launches = _count_group_norm_launches(monkeypatch)
    backend("auto")
    with torch.no_grad():
        block(x, temb)
        attn_math.group_norm_silu(x.half(), 8, None, None, 1e-5)  # CPU fp16 under "auto": plain
    backend("triton")
    block(x, temb).sum().backward()  # parameters need grad: the kernel is forward-only
    assert not launches and block.norm1.weight.grad is not None


def test_motion_attention_folds_pe_into_kernel_biases(backend, monkeypatch):
    """On the kernel path a motion module's attention hands pe W^T to the kernel as per-frame biases
    (no separate `x + pe` pass) and still equals the plain path; the folded biases are cached."""
    from aa_trt.models.motion import TemporalAttention

    torch.manual_seed(1)
    attn = TemporalAttention(80, heads=2, max_len=32).to(DEVICE).eval()
    x = torch.randn(6, 13, 80).to(DEVICE)  # (positions, frames, c)
    seen = []
    original = ta.temporal_attention
    monkeypatch.setattr(ta, "temporal_attention",
                        lambda q, k, v, h, *biases, **kw: seen.append(len([b for b in biases if b is not None]))
                        or original(q, k, v, h, *biases, **kw))
    with torch.no_grad():
        backend("sdpa")
        plain = attn(x)
        backend("triton")
        fused = attn(x)
        cache = attn._pe_cache
        attn(x)
        assert attn._pe_cache is cache  # same weights, same frames: no refold
    assert seen == [3, 3]
    assert (fused - plain).abs().max().item() < 2e-5
