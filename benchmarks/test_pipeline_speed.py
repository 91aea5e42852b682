"""The whole pipeline on the tiny preset (random weights): reference image and pose frames in,
decoded frames out; aa-trt's Animator stages against the Moore-style pipeline, stage by stage.

Tiny widths make per-call overheads loom large (the VAE decoding one frame at a time above all),
so this ratio says how the pipeline's structure pays off, not what sd15 gains: the step
benchmark at sd15 widths says that. One thread: see conftest.one_thread.
"""
import statistics

import pytest

from .timing import PER_ROUND, compare
from .workloads import pipeline_pair

# One 24-frame window; 10 steps (half of DESIGN's default 20) keep the suite to minutes: the
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
