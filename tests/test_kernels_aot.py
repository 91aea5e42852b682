"""The Triton kernels compiled for A100 (sm_80) and H100 (sm_90) without a GPU (aa_trt.kernels.aot).

A representative subset of SD1.5's launches (every head dim of the reference attention, the three
widths and both frame tiles of the temporal attention, one GroupNorm + SiLU; fp16 and bf16) is
compiled with the launchers' own tile choice for each architecture; a compile error, a register
spill, shared memory above the architecture's limit, or above the estimate the launchers prune
with, fails. About 30 s on 2 cores with a cold Triton cache (a few with a warm one). The full table is
`python -m aa_trt.kernels.aot` (docs/performance.md). Also here: the ptxas report parser, the
pruning, Triton's argument specialisation, and the SD1.5 shape list.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from aa_trt.kernels import aot, resources  # noqa: E402
from aa_trt.kernels import groupnorm_silu as gn  # noqa: E402
from aa_trt.kernels import reference_attention as ra  # noqa: E402
from aa_trt.kernels import temporal_attention as ta  # noqa: E402
from aa_trt.kernels.resources import Tiles  # noqa: E402
from aa_trt.kernels.sd15_shapes import resnet_norm_sites, sd15_shapes  # noqa: E402

ARCHS = (80, 90)


def _missing_ptxas() -> str | None:
    for cc in ARCHS:
        tool = aot.ptxas_for(cc)
        if not Path(tool).is_file():
            return f"{tool} (the ptxas Triton uses for sm_{cc}) is missing"
    return None


needs_ptxas = pytest.mark.skipif(_missing_ptxas() is not None, reason=_missing_ptxas() or "")

# ------------------------------------------------------------------------------ ptxas report
REPORT = """\
ptxas info    : 28 bytes gmem, 16 bytes cmem[4]
ptxas info    : Compiling entry function '_reference_attention_kernel' for 'sm_90a'
ptxas info    : Function properties for _reference_attention_kernel
    24 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size, 512 bytes smem, 532 bytes cmem[0]
ptxas info    : Compile time = 812.5 ms
"""


def test_parse_ptxas_report():
    r = aot.parse_ptxas(REPORT)
    assert r == {"entry": "_reference_attention_kernel", "registers": 255, "stack_bytes": 24,
                 "spill_store_bytes": 24, "spill_load_bytes": 20, "static_shared_bytes": 512}


def test_parse_ptxas_report_without_spills_or_smem_and_several_functions():
    text = ("ptxas-blackwell info    : Compiling entry function 'a' for 'sm_80'\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas-blackwell info    : Used 78 registers, used 1 barriers, 416 bytes cmem[0]\n"
            "ptxas info    : Function properties for b\n"
            "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 40 registers\n")
    r = aot.parse_ptxas(text)
    assert (r["registers"], r["spill_store_bytes"], r["spill_load_bytes"], r["static_shared_bytes"]) == (78, 8, 4, 0)


def test_parse_ptxas_refuses_a_report_without_registers():
    with pytest.raises(ValueError, match="Used N registers"):
        aot.parse_ptxas("ptxas fatal   : Unsupported .version 9.4; current version is '8.8'\n")


def test_parse_archs():
    assert aot.parse_archs("sm_80,sm_90a, 89") == [80, 90, 89]


# ---------------------------------------------------------------------------------- pruning
def test_prune_keeps_order_and_the_limit_is_inclusive():
    est = {"a": 232448, "b": 167937, "c": 167936, "d": 49152}.__getitem__
    assert resources.prune("abcd", est, 90) == list("abcd")
    assert resources.prune("abcd", est, 80) == ["c", "d"]
    assert resources.prune("abcd", est, 89) == ["d"]
    assert resources.prune("abcd", est, 999) == ["d"]        # unknown arch: the static 48 KiB
    assert resources.prune("abcd", est, None) == list("abcd")  # the interpreter: no limit
    assert resources.choose("abcd", est, 80) == "c"
    with pytest.raises(ValueError, match="no tile configuration fits sm_75"):
        resources.choose("abc", est, 75)


def test_tiles_replace_and_label():
    t = Tiles.of(8, 3, BLOCK_M=128, BLOCK_N=64)
    assert t.replace(BLOCK_M=None) == t
    assert t.replace(BLOCK_N=16)["BLOCK_N"] == 16 and t["BLOCK_N"] == 64
    assert t.label() == "block_m=128 block_n=64 w=8 s=3"


def test_launchers_prune_the_first_choice_where_it_does_not_fit():
    # reference attention at d = 160: 2-stage 64x64 tiles on A100/H100, single-buffered on 99 KiB
    # cards (sm_89), the 48 KiB last resort on an unknown one
    first, single, small = ra.tile_candidates(160, 4096)
    assert ra.shared_estimate(160, torch.float16, first) > resources.SHARED_LIMIT[89]
    assert ra.choose_tiles(160, 4096, torch.float16, 80) == first
    assert ra.choose_tiles(160, 4096, torch.float16, 90) == first
    assert ra.choose_tiles(160, 4096, torch.float16, 89) == single
    assert ra.choose_tiles(160, 4096, torch.float16, 999) == small
    assert ra.choose_tiles(160, 4096, torch.float16, None) == first


@pytest.mark.parametrize("cc", sorted(resources.SHARED_LIMIT) + [999])
def test_every_sd15_launch_has_a_tile_choice_that_fits(cc):
    limit = resources.shared_limit(cc)
    for shape in sd15_shapes():
        for dtype in (torch.float16, torch.bfloat16):
            mod, launch = aot.plan_shape(shape, dtype, cc)
            _, estimate = aot.candidates(mod, shape, dtype, cc)
            assert estimate(launch.meta["tiles"]) <= limit, (shape.label, cc)


def test_plan_matches_the_launchers_arguments_on_meta_tensors():
    q = torch.empty(4, 100, 320, dtype=torch.float16, device="meta")
    launch = ra.plan(q, q, q, q[:1], q[:1], 8, None, block_m=32, cc=80)
    assert launch.grid == (4, 32) and launch.constexprs["BLOCK_M"] == 32
    assert launch.constexprs["D"] == 40 and (launch.constexprs["D0"], launch.constexprs["D1"]) == (32, 16)
    n_runtime = sum(not p.is_constexpr for p in aot.compilable_module("reference_attention")
                    ._reference_attention_kernel.params)
    assert len(launch.args) == n_runtime
    t = ta.plan(*(torch.empty(50, 24, 640, dtype=torch.bfloat16, device="meta"),) * 3, 8, cc=90)
    assert t.constexprs["BLOCK_F"] == 32 and t.out.shape == (50, 24, 640)
    g = gn.plan(torch.empty(2, 640, 8, 8, device="meta"), 32, cc=89)
    assert g.grid == (64,) and g.constexprs["BLOCK"] == 2048


# ------------------------------------------------------------------------ specialisation
def test_specialize_follows_triton():
    native = pytest.importorskip("triton._C.libtriton").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend
    for arg in (0, 1, 16, 17, 48, 2 ** 33, 1.5, True):
        assert aot.specialize(arg) == native(BaseBackend, arg, False, True, True), arg
    x = torch.empty(8, dtype=torch.bfloat16)
    assert aot.specialize(x) == native(BaseBackend, x, False, True, True)


def test_signature_of_a_launch():
    x = torch.empty(32, 320, 64, 64, dtype=torch.float16, device="meta")
    launch = aot.compilable_module("groupnorm_silu").plan(x, 32, x[0, :, 0, 0], x[0, :, 0, 0], cc=80)
    signature, constexprs, attrs = aot.signature_of(launch)
    assert signature["x_ptr"] == "*fp16" and signature["eps"] == "fp32" and signature["cpg"] == "i32"
    assert signature["BLOCK"] == "constexpr" and constexprs["BLOCK"] == 4096
    names = list(signature)
    assert (names.index("S"),) in attrs             # 4096: divisible by 16
    assert (names.index("cpg"),) not in attrs       # 10: not


def test_check_flags_each_problem():
    good = {"compiled": True, "registers": 200, "spill_bytes": 0, "shared_bytes": 1000,
            "shared_limit": 2000, "shared_estimate": 1500}
    assert aot.check(good) == []
    assert "spills 8 bytes" in aot.check(dict(good, spill_bytes=8))
    assert any("> 2000" in p for p in aot.check(dict(good, shared_bytes=3000, shared_estimate=4000)))
    assert any("estimate" in p for p in aot.check(dict(good, shared_estimate=999)))
    assert aot.check({"compiled": False, "error": "boom"}) == ["compile error: boom"]


# ------------------------------------------------------------------------------ shape list
def test_sd15_shapes():
    sites = resnet_norm_sites(64, 64)
    assert len(sites) == 2 * (2 * 4 + 2 + 3 * 4) + 1                  # norm1 + norm2 per resnet, conv_norm_out
    assert ("up0.resnet0.norm1", 2560, 8, 8) in sites and ("up3.resnet0.norm1", 960, 64, 64) in sites
    assert sites[-1] == ("conv_norm_out", 320, 64, 64)
    shapes = sd15_shapes()
    ref = {(s.sizes["channels"] // s.sizes["heads"], s.sizes["tokens"]) for s in shapes
           if s.kernel == "reference_attention"}
    assert ref == {(40, 4096), (80, 1024), (160, 256), (160, 64), (40, 6144), (80, 1536), (160, 384), (160, 96)}
    frames = {(s.sizes["channels"], s.sizes["frames"]) for s in shapes if s.kernel == "temporal_attention"}
    assert frames == {(c, f) for c in (320, 640, 1280) for f in (8, 16, 24, 32)}


# ------------------------------------------------------------------------ compile for GPUs
def _subset():
    """Every head dim of the reference attention (the other resolution and the mid block only
    change token counts, not what compiles), each width of the temporal attention (both frame
    tiles: 16 and 32), one GroupNorm + SiLU (every sd15 norm compiles the same 4096-wide tile)."""
    pick = []
    seen = set()
    for s in sd15_shapes():
        z = s.sizes
        if s.kernel == "reference_attention":
            key = (s.kernel, z["channels"])
        elif s.kernel == "temporal_attention":
            if (z["channels"], z["frames"]) not in ((320, 24), (640, 16), (1280, 24)):
                continue
            key = (s.kernel, z["channels"])
        else:
            key = (s.kernel,)
        if key not in seen:
            seen.add(key)
            pick.append(s)
    return pick


@needs_ptxas
def test_sd15_launches_compile_for_sm80_and_sm90_without_spills():
    shapes = _subset()
    records = aot.run(aot.targets(shapes, ARCHS, (torch.float16, torch.bfloat16)), all_candidates=False)
    assert len(records) == len(shapes) * 2 * len(ARCHS)
    assert {r["kernel"] for r in records} == set(aot.KERNELS)
    bad = [(r["kernel"], r["shape"], r["arch"], r["dtype"], r["config"], r["problems"])
           for r in records if not r["ok"]]
    assert not bad, bad
    for r in records:
        assert 0 < r["registers"] <= resources.MAX_REGISTERS and r["spill_bytes"] == 0
        assert r["shared_bytes"] <= r["shared_limit"]
        assert f"w={r['num_warps']} " in r["config"]
    # the reference attention really uses shared memory (a parse that read 0 would pass otherwise)
    assert min(r["shared_bytes"] for r in records if r["kernel"] == "reference_attention") >= 8192


@needs_ptxas
def test_compile_error_is_reported_not_raised():
    """A configuration Triton refuses (8-key tiles: tl.dot needs every dimension >= 16) comes back
    as a failed record that `check` flags."""
    shape = next(s for s in sd15_shapes() if s.kernel == "reference_attention")
    (rec,) = aot.run([aot.Target(shape, torch.float16, 80)], only=Tiles.of(4, 1, BLOCK_M=64, BLOCK_N=8))
    assert not rec["compiled"] and ">= 16" in rec["error"].split(" | ")[0], rec["error"][:300]
    assert not rec["ok"] and rec["problems"][0].startswith("compile error")
