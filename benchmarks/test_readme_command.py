"""The README's command as a user runs it, whole process (start-up, model load, poses, denoising,
video encode): today's defaults (DDIM, 20 steps, the embedded model's CFG 1.0: 20 UNet evaluations
a window) against the few-step presets of docs/samplers.md ("Power-spaced timesteps"): DPM-Solver++
(2M) at 5 steps with timestep power 3 (a quarter of the evaluations, closer to the converged render
than DDIM-20 on the example and held-out) and DDIM at 10 steps with power 2 (half), and `--fast`
(the measured preset: sampler, spacing, steps and feature reuse; at most a quarter of DDIM-20's
counted UNet FLOPs). The aims: the README command at least 2x faster with the quarter preset, and
at least 2.5x with `--fast` on the 4-second clip; the stage split says where the rest of the time
goes.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from aa_trt.run import DEFAULT_MODEL

from .timing import PER_ROUND, compare
from .workloads import ROOT

REF, DANCE = ROOT / "examples" / "ref.png", ROOT / "examples" / "dance.mp4"
PRESETS = {"quarter": ("--sampler", "dpmpp_2m", "--steps", "5", "--timestep-power", "3"),
           "half": ("--sampler", "ddim", "--steps", "10", "--timestep-power", "2"),
           "fast": ("--fast",)}


CLIP_4S = 60  # frames: a 4-second dance at the example's 15 fps (Moore's users' "4-second clip")


def _command(out, extra=(), dance=DANCE) -> list[str]:
    return [sys.executable, "-m", "aa_trt", "run", str(REF), str(dance), "-o", str(out), "--json", "--quiet", "--overwrite",
            "--seed", "0", *extra]


@pytest.fixture(scope="module")
def dance_4s(tmp_path_factory):
    """The example's 24-frame dance played forward and back (ping-pong) to CLIP_4S frames: the same
    command on a clip of the length users animate (3 context windows instead of 1). A timing
    workload only: the motion repeats, nothing here is scored."""
    from aa_trt.video import read_clip, write_video

    clip = read_clip(DANCE)
    frames = list(clip.frames)
    while len(frames) < CLIP_4S:
        frames += frames[::-1][1:]
    path = tmp_path_factory.mktemp("dance") / "dance_4s.mp4"
    write_video(path, frames[:CLIP_4S], clip.fps)
    return path


@pytest.mark.skipif(not (DEFAULT_MODEL.is_file() and REF.is_file() and DANCE.is_file()),
                    reason="needs the embedded model and examples/ref.png, examples/dance.mp4")
@pytest.mark.benchmark(group="readme-command")
@pytest.mark.parametrize("preset,clip", [(p, "example") for p in PRESETS] + [("quarter", "4s"), ("fast", "4s")])
def test_readme_command_at_fewer_evaluations(benchmark, rounds, record, tmp_path, request, preset, clip):
    flags = PRESETS[preset]
    dance = DANCE if clip == "example" else request.getfixturevalue("dance_4s")
    summaries: dict[str, list[dict]] = {"defaults": [], "preset": []}

    def run(side, extra):
        def go():
            r = subprocess.run(_command(tmp_path / f"{side}.mp4", extra, dance), capture_output=True, text=True,
                               env=dict(os.environ), timeout=600)
            if r.returncode:
                raise RuntimeError(f"aa-trt run {' '.join(extra)} failed ({r.returncode}): {r.stderr[-2000:]}")
            summaries[side].append(json.loads(r.stdout))
        return go

    s = compare(benchmark, run("preset", flags), run("defaults", ()), rounds).summary()
    stages = {side: {k: statistics.median(x["seconds"][k] for x in runs[-rounds:]) for k in runs[-1]["seconds"]}
              for side, runs in summaries.items()}
    facts = {side: {k: runs[-1].get(k) for k in ("sampler", "steps", "guidance", "timestep_power", "reuse_every",
                                                  "reuse_depth", "unet_tflop", "precision", "frames", "width", "height")}
             for side, runs in summaries.items()}
    info = dict(s, stage_s=stages, runs=facts, half_flags=" ".join(flags))
    benchmark.extra_info.update(info)
    what = "examples/dance.mp4" if clip == "example" else f"a {CLIP_4S}-frame (4 s) ping-pong of examples/dance.mp4"
    label = f"aa-trt run examples/ref.png {what}, whole process, {' '.join(flags)} vs defaults (DDIM 20)"
    record(f"README command ({label}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND, details=info)
    for name in stages["preset"]:
        a, b = stages["preset"][name], stages["defaults"][name]
        record(f"README command stage: {name} ({' '.join(flags)} vs defaults, {clip})", a, "s", baseline=b,
               ratio=b / a if a else None, ratio_of="defaults / preset, medians")
