"""Peak host memory of `aa-trt run` against video length: the embedded default model,
128x128, 1 step, a pose video as the driving input, 96 / 960 / 4800 frames; each run a fresh
process, whose --json summary reports its own peak RSS (getrusage's ru_maxrss: the kernel's
high-water mark of the whole process, model loading included).

What may grow with the video: the final latents (and the sampler's latent-sized temporaries) and
the PoseGuider features, kept in the run's precision (bf16 under --dtype auto on a CPU with native
bf16). Everything else is streamed: the driving video is decoded as it is read (twice: once to
count its frames, once through the PoseGuider in chunks), the pose images are made per chunk and
dropped, the output is decoded a chunk at a time straight into the encoder as uint8.
"""
import json
import os
import subprocess
import sys

import pytest

from .workloads import ROOT

FRAMES = (96, 960, 4800)
SIZE = 128


def _pose_video(path, n: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from media import make_video, stick_frames

    frames = stick_frames(48, (SIZE, SIZE))  # a 48-frame dance, looped to n frames
    return make_video(path, [frames[i % len(frames)] for i in range(n)], fps=24, audio=True)


def _run(argv) -> dict:
    """One `aa-trt run` in a fresh process; its --json summary (which carries its peak RSS)."""
    proc = subprocess.run([sys.executable, "-m", "aa_trt", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="memory-vs-length")
def test_peak_rss_against_length(tmp_path, record):
    ref = ROOT / "examples" / "ref.png"
    peaks = {}
    for n in FRAMES:
        dance = _pose_video(tmp_path / f"pose{n}.mp4", n)
        out = tmp_path / f"out{n}.mp4"
        argv = ["run", str(ref), str(dance), "-o", str(out), "--pose-video", "--steps", "1", "--quiet", "--json",
                "--seed", "0"]
        result = _run(argv)
        assert result["frames"] == n
        peaks[n] = result["peak_rss_mb"]
        os.unlink(out)
    per_frame = (peaks[FRAMES[-1]] - peaks[FRAMES[0]]) / (FRAMES[-1] - FRAMES[0])
    for n in FRAMES:
        record(f"aa-trt run peak RSS, embedded model, {SIZE}x{SIZE}, {n} frames, 1 step, pose video",
               peaks[n], "MB", details={"peaks_mb": peaks})
    record(f"aa-trt run peak RSS growth per frame ({FRAMES[0]} -> {FRAMES[-1]} frames, {SIZE}x{SIZE})",
           per_frame, "MB/frame", details={"peaks_mb": peaks})
