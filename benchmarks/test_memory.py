"""Peak memory against video length, tiny preset, 64x64, 48 and 480 frames, one DDIM step (the
peak does not depend on the step count: every step runs the same windows).

Each run is a fresh process (benchmarks/peak_memory.py: peak RSS via VmHWM after clear_refs,
glibc's mmap threshold pinned so that RSS follows the live tensors).
Some buffers must grow with the video: the decoded frames, the pose features and the latents.
The rest, the activations of a window, a PoseGuider chunk or a decode chunk, must not.
"""
import json
import os
import subprocess
import sys

from aa_trt.config import PRESETS

from .workloads import ROOT

FRAMES = (48, 480)
SIZE = 64


def measure(impl: str, frames: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--impl", impl,
                           "--frames", str(frames), "--size", str(SIZE), "--steps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def video_sized_bytes(frames: int) -> int:
    """An allowance for the buffers that must scale with the video: the output frames and the
    pose features, each held at most twice (chunks, then their concatenation), and eight
    latent-sized tensors (noise, prediction, the two per-branch sums, DDIM's temporaries)."""
    h = w = SIZE // 8
    output = frames * SIZE * SIZE * 3 * 4
    pose = frames * PRESETS["tiny"].pose_guider.embedding_channels * h * w * 4
    latent = frames * 4 * h * w * 4
    return 2 * (output + pose) + 8 * latent


def test_activation_memory_flat_in_video_length(record):
    runs = {(impl, n): measure(impl, n) for impl in ("aa-trt", "moore") for n in FRAMES}
    activation = {k: r["run_peak"] - video_sized_bytes(k[1]) for k, r in runs.items()}
    short, long = FRAMES
    info = dict(runs=list(runs.values()),
                activation_bytes={f"{i} {n}": a for (i, n), a in activation.items()},
                allowance_bytes={n: video_sized_bytes(n) for n in FRAMES},
                method=runs["aa-trt", short]["method"], allocator=runs["aa-trt", short]["allocator"])
    for n in FRAMES:
        ours, base = runs["aa-trt", n]["run_peak"], runs["moore", n]["run_peak"]
        record(f"peak memory of a run (peak RSS - RSS before), tiny, 64x64, {n} frames", ours, "bytes",
               baseline=base, ratio=base / ours, ratio_of="baseline / aa-trt: x less",
               details=info if n == short else {})
    growth = {i: activation[i, long] / activation[i, short] for i in ("aa-trt", "moore")}
    record(f"activation memory (run peak - video-sized buffers) at {long} / at {short} frames",
           growth["aa-trt"], "x", baseline=growth["moore"],
           details=dict(activation_bytes=info["activation_bytes"]))
    # Flat: 10x the frames, at most 15% (+2 MiB of page and allocator granularity) more memory
    # beyond the video-sized buffers. Moore's PoseGuider call on all frames fails this.
    assert activation["aa-trt", long] <= 1.15 * activation["aa-trt", short] + 2 * 2**20, activation
