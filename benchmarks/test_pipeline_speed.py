"""The whole pipeline on the tiny preset (random weights): reference image and pose frames in,
decoded frames out; aa-trt's Animator stages against the Moore-style pipeline, stage by stage.

Tiny widths make per-call overheads loom large (the VAE decoding one frame at a time above all),
so this ratio says how the pipeline's structure pays off, not what sd15 gains: the step
benchmark at sd15 widths says that. One thread: see conftest.one_thread.
"""
import statistics

import pytest

from aa_trt.pipeline import Animator
from aa_trt.run import DEFAULT_MODEL

from .timing import PER_ROUND, compare
from .workloads import pipeline_pair

# One 24-frame window; 10 steps (half of the default 20) keep the suite to minutes: the
# stage breakdown shows what more steps would add (denoising scales with them, the rest does not).
SIZE = dict(frames=24, height=64, width=64, steps=10)


@pytest.mark.benchmark(group="pipeline-tiny-cpu")
def test_whole_pipeline(benchmark, tiny_animator, one_thread, rounds, record):
    pair = pipeline_pair(tiny_animator, **SIZE)
    s = compare(benchmark, pair.ours, pair.moore, rounds).summary()
    # The clocks also saw the warm-up call: keep the timed rounds only.
    clocks = {side: {name: ts[-rounds:] for name, ts in clock.items()}
              for side, clock in pair.params["stages"].items()}
    info = dict(s, **{k: v for k, v in pair.params.items() if k != "stages"}, stage_s=clocks)
    benchmark.extra_info.update(info)
    label = "tiny, {width}x{height}, {frames} frames, {steps} steps, CPU fp32, 1 thread".format(**SIZE)
    record(f"whole pipeline ({label}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND,
           details=info)
    for name, ours in clocks["ours"].items():
        base = clocks["baseline"][name]
        ratio = statistics.median(b / o for b, o in zip(base, ours))
        record(f"pipeline stage: {name} ({label})", statistics.median(ours), "s",
               baseline=statistics.median(base), ratio=ratio, ratio_of=PER_ROUND)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} is not in this checkout")
@pytest.mark.benchmark(group="pipeline-default-cpu")
def test_whole_pipeline_default_model(benchmark, rounds, record):
    """The embedded default model (preset small, trained weights) at its own size, the README's
    example length (24 frames, one window) and all 20 steps, on the machine's threads."""
    animator = Animator.from_pretrained(DEFAULT_MODEL)
    size = dict(frames=24, height=128, width=128, steps=20)
    pair = pipeline_pair(animator, **size)
    s = compare(benchmark, pair.ours, pair.moore, rounds).summary()
    benchmark.extra_info.update(s)
    label = "embedded default, {width}x{height}, {frames} frames, {steps} steps, CPU fp32".format(**size)
    record(f"whole pipeline ({label}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND, details=s)
