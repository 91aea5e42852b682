"""The CPU run against the machine's own rates: where a bf16 denoising step spends its time
(GEMM-class ops and attention against copies, layout changes and elementwise work, compared with
another checkout of the code), the whole pipeline's achieved FLOP/s as a share of this machine's
bf16 matmul rate, attention on SD1.5's shapes, and the VAE decode against the machine's best bf16
convolution rate and against diffusers' per-frame decode (Moore's).

Every rate is measured in the same run as the work it divides (machine.describe records the CPU
model and flags): on a Xeon with AMX the same code reaches rates several times an AMD EPYC's.

    pytest benchmarks/test_cpu_rate.py
    AA_TRT_BASELINE_TREE=../old pytest benchmarks/test_cpu_rate.py -k baseline_tree
      (../old: a checkout of the code to compare with, e.g. `git worktree add ../old <commit>`)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aa_trt import autotune, fused
from aa_trt import attention as attn_math

from . import op_profile
from .flops import count_flops
from .timing import timed

HERE = Path(__file__).resolve().parent
WORKLOAD = dict(frames=16, size=256, steps=4, guidance=3.5)
LABEL = "sd15 half widths, 256x256, 16 frames, 4 DDIM steps, CFG 3.5"


def _best(fn, reps: int = 3) -> float:
    fn()
    return min(timed(fn) for _ in range(reps))


def bf16_matmul_rate(n: int = 4096) -> float:
    a = torch.randn(n, n).bfloat16()
    b = torch.randn(n, n).bfloat16()
    return 2 * n ** 3 / _best(lambda: torch.mm(a, b))


def best_conv_rate(dtype=torch.bfloat16) -> dict:
    """3x3 convolution, 256 channels, 128x128, batch 8, in both layouts: FLOP/s of each."""
    x = torch.randn(8, 256, 128, 128).to(dtype)
    w = (torch.randn(256, 256, 3, 3) * 0.02).to(dtype)
    flops = 2 * 8 * 256 * 256 * 9 * 128 * 128
    out = {}
    for name, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
        xx, ww = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        out[name] = flops / _best(lambda: F.conv2d(xx, ww, padding=1), reps=2)
    return out


# ---------------------------------------------------------------------------- the step's op profile
def _profile_in(tree: Path, what: str = "steps") -> dict:
    """op_profile run on the code of `tree` (its aa_trt first on the path), in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(HERE / "op_profile.py"), "--what", what, "--json"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.environ.get("AA_TRT_BASELINE_TREE"),
                    reason="set AA_TRT_BASELINE_TREE to a checkout of the code to compare with")
def test_step_profile_against_baseline_tree(record, rounds):
    """Conditioning + two bf16 CFG steps (16 frames, 256x256, sd15 half widths), this checkout
    against AA_TRT_BASELINE_TREE, alternating, in fresh processes: time outside GEMM-class ops and
    attention, copy_ calls and bytes, elementwise kernel calls."""
    base_tree = Path(os.environ["AA_TRT_BASELINE_TREE"]).resolve()
    ours_tree = HERE.parent
    runs = {"ours": [], "baseline": []}
    for _ in range(max(1, min(rounds, 2))):
        runs["baseline"].append(_profile_in(base_tree))
        runs["ours"].append(_profile_in(ours_tree))
    best = {k: min(v, key=lambda r: r["total_self_s"]) for k, v in runs.items()}
    o, b = best["ours"], best["baseline"]
    label = "conditioning + 2 bf16 CFG steps, sd15 half widths, 256x256, 16 frames"
    details = dict(ours=o, baseline=b, baseline_tree=str(base_tree))
    record(f"time outside GEMM-class ops and attention ({label})", o["outside_s"], "s",
           baseline=b["outside_s"], ratio=o["outside_s"] / b["outside_s"], ratio_of="aa-trt / baseline tree",
           details=details)
    record(f"aten::copy_ calls ({label})", o["copy_calls"], "calls", baseline=b["copy_calls"],
           ratio=o["copy_calls"] / b["copy_calls"], ratio_of="aa-trt / baseline tree")
    record(f"bytes written by aten::copy_ ({label})", o["copy_bytes"], "B", baseline=b["copy_bytes"],
           ratio=o["copy_bytes"] / b["copy_bytes"], ratio_of="aa-trt / baseline tree")
    record(f"elementwise kernel calls ({label})", o["elementwise_calls"], "calls",
           baseline=b["elementwise_calls"], ratio=o["elementwise_calls"] / b["elementwise_calls"],
           ratio_of="aa-trt / baseline tree")
    record(f"share of op time in GEMM-class ops ({label})", o["gemm_share"], "fraction",
           baseline=b["gemm_share"])
    record(f"wall time ({label})", o["wall_s"], "s", baseline=b["wall_s"], ratio=b["wall_s"] / o["wall_s"],
           ratio_of="baseline tree / aa-trt: x faster")


# ---------------------------------------------------------------------------- whole pipeline
@pytest.fixture(scope="module")
def bf16_animator():
    return op_profile.animator(torch.bfloat16)


def _stage_flops(anim) -> dict:
    """FLOPs of each stage, counted once on the plain computation (the fused oneDNN ops are not
    in FlopCounterMode's registry; the arithmetic is the same)."""
    ref, poses, latents = op_profile.inputs(WORKLOAD["frames"], WORKLOAD["size"])
    with fused.plain(), torch.no_grad():
        cond_flops, _ = count_flops(lambda: anim.prepare(ref, poses))
        cond = anim.prepare(ref, poses)
        step_flops, _ = count_flops(lambda: anim.denoise(cond, latents, steps=1, guidance=WORKLOAD["guidance"],
                                                         progress=False))
        decode_flops, _ = count_flops(lambda: anim.decode(latents))
    return dict(conditioning=cond_flops, denoising=step_flops * WORKLOAD["steps"], decoding=decode_flops)


def test_whole_pipeline_utilisation(bf16_animator, record, rounds):
    """The default run's work (conditioning, denoising, decode) at its achieved FLOP/s, as a share
    of this machine's bf16 matmul rate measured between its rounds."""
    anim = bf16_animator
    ref, poses, latents = op_profile.inputs(WORKLOAD["frames"], WORKLOAD["size"])
    flops = _stage_flops(anim)
    times = {k: [] for k in flops}
    rates = []

    def run():
        with torch.no_grad():
            t = {}
            t["conditioning"] = timed(lambda: t.__setitem__("cond", anim.prepare(ref, poses)))
            t["denoising"] = timed(lambda: t.__setitem__("out", anim.denoise(
                t["cond"], latents, steps=WORKLOAD["steps"], guidance=WORKLOAD["guidance"], progress=False)))
            t["decoding"] = timed(lambda: anim.decode(t["out"]))
            return t

    run()  # warm-up: oneDNN primitives and this machine's measured choices
    for _ in range(max(1, rounds)):
        t = run()
        for k in times:
            times[k].append(t[k])
        rates.append(bf16_matmul_rate())
    rate = max(rates)
    best = {k: min(v) for k, v in times.items()}
    total_flops, total_s = sum(flops.values()), sum(best.values())
    details = dict(flops=flops, times=times, bf16_matmul_rates=rates, choices=autotune.chosen())
    record(f"bf16 matmul rate of this machine (4096^3 torch.mm, best between rounds)", rate, "FLOP/s")
    for k in flops:
        record(f"{k}: achieved FLOP/s ({LABEL}, bf16)", flops[k] / best[k], "FLOP/s",
               ratio=flops[k] / best[k] / rate, ratio_of="share of the bf16 matmul rate", details=dict(
                   flops=flops[k], best_s=best[k]))
    record(f"whole pipeline, conditioning + denoising + decode ({LABEL}, bf16)", total_s, "s",
           ratio=total_flops / total_s / rate, ratio_of="share of the bf16 matmul rate", details=details)


# ---------------------------------------------------------------------------- attention
def _sd15_attention_shapes():
    """(name, rows, queries, keys, heads, head dim) of sd15's spatial attention at 512x512 (64x64
    latents; reference attention reads twice the keys), and half width's head dim 20."""
    shapes = []
    for level, (tokens, d) in enumerate(((4096, 40), (1024, 80), (256, 160))):
        shapes.append((f"sd15 self d{d}", 2, tokens, tokens, 8, d))
        shapes.append((f"sd15 reference d{d}", 2, tokens, 2 * tokens, 8, d))
    shapes.append(("sd15-half reference d20", 4, 1024, 2048, 8, 20))
    return shapes


@pytest.mark.parametrize("shape", _sd15_attention_shapes(), ids=lambda s: s[0].replace(" ", "-"))
def test_attention_rate(shape, record):
    name, rows, n, m, heads, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, n, heads * d, generator=g).bfloat16()
    k = torch.randn(rows, m, heads * d, generator=g).bfloat16()
    v = torch.randn(rows, m, heads * d, generator=g).bfloat16()
    flops = 4 * rows * heads * n * m * d
    rate = bf16_matmul_rate()
    with torch.no_grad():
        sdpa_s = _best(lambda: attn_math.sdpa_attention(q, k, v, heads), reps=2)
        ours_s = _best(lambda: attn_math.attention(q, k, v, heads), reps=2)
        exact = attn_math.sdpa_attention(q.float(), k.float(), v.float(), heads)
        err = ((attn_math.attention(q, k, v, heads).float() - exact).norm() / exact.norm()).item()
    key = autotune.chosen().get(attn_math.cpu_attention_key(q.dtype, n, m, heads, d), "?")
    record(f"attention {name} ({rows}x{n} queries, {m} keys, bf16): share of the bf16 matmul rate, "
           f"chosen = {key}", flops / ours_s / rate, "fraction", baseline=flops / sdpa_s / rate,
           ratio=sdpa_s / ours_s, ratio_of="SDPA flash / aa-trt: x faster",
           details=dict(rate=rate, ours_s=ours_s, sdpa_s=sdpa_s, relative_error_vs_fp32=err))


# ---------------------------------------------------------------------------- VAE decode
def test_vae_decode_rates(record):
    """The SD VAE's decoder (random weights), 8 frames of 256x256: bf16 at its share of the best
    bf16 conv rate measured here; fp32 against diffusers' AutoencoderKL decoding one frame at a time
    (Moore's decode), same weights, same run."""
    from aa_trt.config import PRESETS
    from aa_trt.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig.from_dict(PRESETS["sd15"].vae)
    vae = AutoencoderKL(cfg).eval().requires_grad_(False)
    op_profile._randomize(vae, 0)
    z = torch.randn(8, 4, 32, 32)
    with fused.plain(), torch.no_grad():
        flops, _ = count_flops(lambda: vae.decode(z))
    conv = best_conv_rate()
    best_rate = max(conv.values())
    with torch.no_grad():
        fp32_s = _best(lambda: vae.decode(z), reps=2)
        out32 = vae.decode(z).sample
        diffusers_s, max_diff = None, None
        try:
            from diffusers import AutoencoderKL as DiffusersVAE
        except ImportError:
            DiffusersVAE = None
        if DiffusersVAE is not None:
            ref = DiffusersVAE.from_config(PRESETS["sd15"].vae).eval()
            ref.load_state_dict(vae.state_dict())
            diffusers_s = _best(lambda: [ref.decode(z[i:i + 1]) for i in range(len(z))], reps=1)
            max_diff = (torch.cat([ref.decode(z[i:i + 1]).sample for i in range(len(z))]) - out32).abs().max().item()
        vae16 = vae.bfloat16()
        zb = z.bfloat16()
        bf16_s = _best(lambda: vae16.decode(zb), reps=2)
    record("best bf16 3x3 conv rate of this machine (256 ch, 128x128, batch 8; both layouts)", best_rate,
           "FLOP/s", details=conv)
    record("VAE decode, 8 frames 256x256, bf16: achieved FLOP/s", flops / bf16_s, "FLOP/s",
           ratio=flops / bf16_s / best_rate, ratio_of="share of the best bf16 conv rate",
           details=dict(flops=flops, bf16_s=bf16_s, choices=autotune.chosen()))
    if diffusers_s is not None:
        record("VAE decode, 8 frames 256x256, fp32, against diffusers' per-frame decode", fp32_s, "s",
               baseline=diffusers_s, ratio=diffusers_s / fp32_s, ratio_of="diffusers / aa-trt: x faster",
               details=dict(max_abs_difference=max_diff))
    assert max_diff is None or max_diff < 1e-3
