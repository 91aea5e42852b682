"""The denoising step at SD1.5 widths on CPU: aa-trt against the Moore-style step, plus the
step's achieved FLOP/s as a fraction of this machine's fp32 matmul rate, and the once-per-video
reference pass. Random weights (PRESETS["sd15"]); a small spatial size keeps a step to seconds.

The two sd15 UNets hold ~8.7 GB (1.31 G + 0.86 G fp32 parameters) for this module only.
"""
import gc
import statistics

import pytest
import torch

from aa_trt.config import PRESETS
from aa_trt.pipeline import Animator

from . import machine
from .flops import count_flops
from .timing import PER_ROUND, compare
from .workloads import max_abs, reference_pair, step_pair, unet_models

SIZE = dict(frames=8, height=128, width=128)  # 16x16 latents, one window, CFG
LABEL = "sd15 widths, 128x128, 8 frames, CFG, CPU fp32"


@pytest.fixture(scope="module")
def sd15():
    animator = Animator(unet_models(PRESETS["sd15"], "cpu", seed=0))
    yield animator
    del animator
    gc.collect()


@pytest.fixture(scope="module")
def step_flops():
    """FLOPs of both steps, counted on the meta device (same code and shapes, nothing computed;
    test_baseline_equivalence checks that meta and CPU counts agree)."""
    meta = Animator(unet_models(PRESETS["sd15"], "meta"), device="meta")
    pair = step_pair(meta, **SIZE)
    return count_flops(pair.ours), count_flops(pair.moore)


@pytest.mark.benchmark(group="step-sd15-cpu")
def test_denoising_step(benchmark, sd15, step_flops, rounds, record):
    pair = step_pair(sd15, **SIZE)
    outs = {}
    mm, mm_flops = machine.matmul("cpu", torch.float32, n=4096)
    # No warm-up round: a step takes tens of seconds here, and first-call costs (oneDNN primitive
    # creation) are far below the round-to-round noise of a shared machine, and only the best round counts.
    t = compare(benchmark, lambda: outs.__setitem__("ours", pair.ours()),
                lambda: outs.__setitem__("moore", pair.moore()), rounds, warmup=0, probe=mm)
    # Same computation on both sides (sd15 activations reach ~1e1: relative fp32 tolerance).
    scale = outs["moore"].abs().max().item()
    assert max_abs(outs["ours"], outs["moore"]) < 1e-4 * max(1.0, scale)

    s = t.summary()
    mm_rate = machine.rate(t.probe, mm_flops, n=4096, dtype="float32", device="cpu",
                           note="timed inside the step's rounds, under the same load")
    # Least-disturbed estimates throughout (see timing.Timings.summary): best step, best matmul.
    rate = mm_rate["best_flops_per_s"]
    (flops, ops), (moore_flops, moore_ops) = step_flops
    achieved, moore_achieved = flops / s["ours_min_s"], moore_flops / s["baseline_min_s"]
    info = dict(s, **pair.params, flops=flops, baseline_flops=moore_flops, flop_ratio=moore_flops / flops,
                flops_by_op=ops, baseline_flops_by_op=moore_ops, achieved_flops_per_s=achieved,
                baseline_achieved_flops_per_s=moore_achieved, fp32_matmul=mm_rate,
                utilisation=achieved / rate, baseline_utilisation=moore_achieved / rate)
    benchmark.extra_info.update(info)
    record(f"denoising step time ({LABEL}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND,
           details=info)
    record("the same step in process CPU seconds (both threads; a neighbour's job does not count)",
           statistics.median(s["ours_cpu_s"]), "s", baseline=statistics.median(s["baseline_cpu_s"]),
           ratio=s["cpu_speedup_per_round"], ratio_of=PER_ROUND)
    record("FLOPs of that step (FlopCounterMode)", flops, "FLOP", baseline=moore_flops,
           ratio=moore_flops / flops, ratio_of="baseline / aa-trt: x less work")
    record("fp32 matmul rate of this machine (torch.mm 4096^3 between the step's rounds, best)", rate,
           "FLOP/s", details=mm_rate)
    record("achieved FLOP/s of that step (best round)", achieved, "FLOP/s", baseline=moore_achieved,
           ratio=achieved / moore_achieved, ratio_of="aa-trt / baseline")
    record("utilisation of that step (best round's FLOP/s / best fp32 torch.mm rate)", achieved / rate,
           "fraction",
           baseline=moore_achieved / rate, ratio=achieved / moore_achieved, ratio_of="aa-trt / baseline")


# The counted FLOP ratio (1.19x) is per frame at 512x784: the saving is the reference K/V projection
# and the uncond half's reference attention, both proportional to the frames in the window. Two
# frames keep that ratio (1.188x counted, the same as 24 frames) at 1/12 of a window's work, ~1.5
# min a side here; one frame would make the temporal layers degenerate. A warm-up round: the first
# call at a new shape creates oneDNN primitives (a first round measured 1.53x, the next 1.18x, 1.06x).
DESIGN_SIZE = dict(frames=2, height=784, width=512)
DESIGN_SIZE_LABEL = "sd15, 512x784, 2 frames, CFG, CPU fp32"


@pytest.mark.benchmark(group="step-sd15-512x784-cpu")
def test_denoising_step_at_design_size(benchmark, sd15, rounds, record):
    """The step at the design size (512x784), timed: what the FLOP ratio predicts, measured."""
    pair = step_pair(sd15, **DESIGN_SIZE)
    meta = Animator(unet_models(PRESETS["sd15"], "meta"), device="meta")
    meta_pair = step_pair(meta, **DESIGN_SIZE)
    (flops, _), (moore_flops, _) = count_flops(meta_pair.ours), count_flops(meta_pair.moore)
    outs = {}
    t = compare(benchmark, lambda: outs.__setitem__("ours", pair.ours()),
                lambda: outs.__setitem__("moore", pair.moore()), min(rounds, 3), warmup=1)
    scale = outs["moore"].abs().max().item()
    assert max_abs(outs["ours"], outs["moore"]) < 1e-4 * max(1.0, scale)
    s = t.summary()
    info = dict(s, **pair.params, flops=flops, baseline_flops=moore_flops, flop_ratio=moore_flops / flops,
                achieved_flops_per_s=flops / s["ours_min_s"],
                baseline_achieved_flops_per_s=moore_flops / s["baseline_min_s"])
    benchmark.extra_info.update(info)
    record(f"denoising step time ({DESIGN_SIZE_LABEL}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND,
           details=info)
    record(f"the same step ({DESIGN_SIZE_LABEL}) in process CPU seconds", statistics.median(s["ours_cpu_s"]), "s",
           baseline=statistics.median(s["baseline_cpu_s"]), ratio=s["cpu_speedup_per_round"],
           ratio_of=PER_ROUND)
    record(f"FLOPs of that step ({DESIGN_SIZE_LABEL})", flops, "FLOP", baseline=moore_flops,
           ratio=moore_flops / flops, ratio_of="baseline / aa-trt: x less work")


@pytest.mark.benchmark(group="reference-pass-sd15-cpu")
def test_reference_pass(benchmark, sd15, rounds, record):
    """Once per video: our ReferenceNet (batch 1, stops after the last bank) plus the K/V
    projection, against Moore's whole ReferenceNet at batch 2. A pass takes seconds: more rounds."""
    pair = reference_pair(sd15, SIZE["height"], SIZE["width"])
    s = compare(benchmark, pair.ours, pair.moore, max(rounds, 5)).summary()
    info = dict(s, **pair.params)
    benchmark.extra_info.update(info)
    record(f"reference pass, once per video (sd15 widths, 128x128, CPU fp32), median of {s['rounds']}",
           s["ours_median_s"], "s", baseline=s["baseline_median_s"], ratio=s["speedup_per_round"],
           ratio_of=PER_ROUND, details=info)
