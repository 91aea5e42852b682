"""`aa-trt run` and `aa-trt pose`: files in, stages timed, an mp4 out.

Stages: read -> pose (extract, align, render) -> load -> animate -> write. Each is timed for the
closing summary; each failure a user can fix is an InputError/CheckpointError with one line.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default.safetensors"


@dataclass
class RunOptions:
    ref: Path
    driving: Path
    output: Path
    ckpt: Path | None = None
    engine: Path | None = None
    pose_video: bool = False
    dwpose: Path | None = None
    align: bool = True
    frames: int | None = None
    stride: int = 1
    start: int = 0
    seed: int | None = None
    steps: int = 20
    guidance: float | None = None  # None: the checkpoint's own (config.guidance)
    context_frames: int = 24
    context_overlap: int = 4
    context_schedule: str = "uniform"
    width: int | None = None
    height: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    offload: bool = False
    compile: bool = False
    cuda_graph: bool = False
    quiet: bool = False


@dataclass
class Timer:
    stages: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, name):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t


def checkpoint_path(ckpt) -> Path:
    if ckpt is not None:
        return Path(ckpt)
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    raise InputError("this build has no embedded default model yet; pass --ckpt MODEL.safetensors "
                     "(make one from Moore's weights with `aa-trt convert`)")


def output_size(ref_size: tuple[int, int], short_side: int, width=None, height=None) -> tuple[int, int]:
    """(width, height): given ones must be multiples of 8; missing ones follow the reference's
    aspect ratio with the model's short side, rounded to multiples of 8."""
    for name, v in (("--width", width), ("--height", height)):
        if v is not None and (v <= 0 or v % 8):
            raise InputError(f"{name} {v}: must be a positive multiple of 8")
    rw, rh = ref_size
    if width and height:
        return width, height
    if width:
        return width, max(8, round(width * rh / rw / 8) * 8)
    if height:
        return max(8, round(height * rw / rh / 8) * 8), height
    if rw <= rh:
        return short_side, max(8, round(short_side * rh / rw / 8) * 8)
    return max(8, round(short_side * rw / rh / 8) * 8), short_side


def _hold_missing(poses):
    """A frame where nobody was found keeps the last pose seen (the first ones take the first found)."""
    first = next((p for p in poses if p is not None), None)
    out, last = [], first
    for p in poses:
        last = p if p is not None else last
        out.append(last)
    return out


def driving_poses(opts: RunOptions, clip, ref_image, width: int, height: int, timer: Timer,
                  extractor=None) -> tuple[np.ndarray, dict]:
    """Rendered pose images uint8 (N, height, width, 3) and facts for the summary."""
    from PIL import Image

    if opts.pose_video:
        frames = [np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS))
                  if f.shape[:2] != (height, width) else f for f in clip.frames]
        return np.stack(frames), {"pose_source": "pose video"}
    from .pose.align import align_sequence
    from .pose.draw import render
    from .pose.extract import extract_video, file_digest, make_extractor

    with timer("pose"):
        extractor = extractor or make_extractor(opts.dwpose)
        key = f"{file_digest(opts.driving)}:{opts.start}:{opts.stride}:{len(clip.frames)}"
        poses = extract_video(extractor, clip.frames, key, progress=not opts.quiet)
        found = sum(p is not None for p in poses)
        if found == 0:
            raise InputError(f"{opts.driving}: no person found in any of its {len(poses)} frames")
        poses = _hold_missing(poses)
        if opts.align:
            ref_pose = extractor(np.asarray(ref_image))
            if ref_pose is None:
                raise InputError(f"{opts.ref}: no person found in the reference image "
                                 f"(use --no-align to drive it without alignment)")
            try:
                poses = align_sequence(ref_pose, poses)
            except ValueError as e:
                raise InputError(f"{opts.driving}: cannot align to the reference ({e})") from None
        images = np.stack([render(p, width, height) for p in poses])
    return images, {"pose_source": type(extractor).__name__, "frames_with_person": found}


def run(opts: RunOptions, progress_print=print, make_animator=None) -> dict:
    """`make_animator(ckpt, device=, dtype=)` replaces Animator.from_pretrained (torchrun, batch)."""
    import torch

    from .pipeline import Animator
    from .video import read_clip, read_image, write_video

    timer = Timer()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if opts.dtype not in dtypes:
        raise InputError(f"--dtype {opts.dtype}: expected one of {', '.join(dtypes)}")
    if opts.cuda_graph and not opts.device.startswith("cuda"):
        raise InputError(f"--cuda-graph needs --device cuda (CUDA graphs replay GPU work); "
                         f"drop it for --device {opts.device}")
    torch_options = dict(offload=opts.offload, compile=opts.compile, cuda_graph=opts.cuda_graph)
    if opts.engine is not None and any(torch_options.values()):
        raise InputError("--offload, --compile and --cuda-graph apply to the torch backend; "
                         "drop them with --engine")
    ckpt = checkpoint_path(opts.ckpt)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {opts.device}: no CUDA device is available to this torch build")
    # Fail on a bad output path before minutes of work, not after.
    if opts.output.is_dir():
        raise InputError(f"{opts.output}: is a folder; give a file name such as {opts.output / 'out.mp4'}")
    out_dir = opts.output.parent
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: output folder does not exist")
    import os
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"{out_dir}: output folder is not writable")
    with timer("read"):
        ref_image = read_image(opts.ref)
        clip = read_clip(opts.driving, opts.start, opts.stride, opts.frames)
    with timer("load"):
        from .checkpoint import read_config
        config = read_config(ckpt)
        width, height = output_size(ref_image.size, min(config.default_size), opts.width, opts.height)
        if opts.engine is not None:
            # The graphs of `aa-trt build`: TensorRT where available, else onnxruntime. The
            # checkpoint is still read for its config and to refuse a DIR built from another one.
            from .backends import animator_from_dir
            anim = animator_from_dir(opts.engine, ckpt)
        else:
            anim = (make_animator or Animator.from_pretrained)(ckpt, device=opts.device, dtype=dtypes[opts.dtype])
            anim.set_options(**torch_options)
    poses, facts = driving_poses(opts, clip, ref_image, width, height, timer)
    guidance = config.guidance if opts.guidance is None else opts.guidance
    with timer("animate"):
        frames = anim(ref_image, poses, steps=opts.steps, guidance=guidance,
                      context_frames=min(opts.context_frames, config.motion.max_len),
                      context_overlap=opts.context_overlap, seed=opts.seed, width=width, height=height,
                      context_schedule=opts.context_schedule, progress=not opts.quiet)
    with timer("write"):
        video = (frames * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        write_video(opts.output, video, clip.fps, clip.audio_path, clip.start_time, clip.duration)
    return {"output": str(opts.output), "frames": len(video), "width": width, "height": height,
            "guidance": guidance,
            "fps": round(clip.fps, 3), "audio": clip.audio_path is not None, "seed": anim.last_seed,
            "checkpoint": str(ckpt), "backend": type(anim).__name__, **facts,
            "seconds": {k: round(v, 2) for k, v in timer.stages.items()}}


def pose_preview(driving: Path, output: Path, ref: Path | None = None, dwpose=None, frames=None,
                 stride: int = 1, start: int = 0, quiet: bool = False) -> dict:
    """`aa-trt pose`: source frames and their (aligned, with --ref) skeletons side by side."""
    from .video import read_clip, read_image, write_video

    timer = Timer()
    with timer("read"):
        clip = read_clip(driving, start, stride, frames)
        ref_image = read_image(ref) if ref is not None else None
    h, w = clip.frames[0].shape[:2]
    opts = RunOptions(ref=ref, driving=driving, output=output, dwpose=dwpose, align=ref is not None,
                      frames=frames, stride=stride, start=start, quiet=quiet)
    size = (w // 2 * 2, h // 2 * 2)
    poses, facts = driving_poses(opts, clip, ref_image, size[0], size[1], timer)
    with timer("write"):
        from PIL import Image
        side = [np.concatenate([np.asarray(Image.fromarray(f).resize(size)), p], axis=1)
                for f, p in zip(clip.frames, poses)]
        write_video(output, side, clip.fps, clip.audio_path, clip.start_time, clip.duration)
    return {"output": str(output), "frames": len(side), **facts,
            "seconds": {k: round(v, 2) for k, v in timer.stages.items()}}


def summary_line(result: dict) -> str:
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    size = f" {result['width']}x{result['height']}" if "width" in result else ""
    return f"wrote {result['output']}: {result['frames']} frames{size}; {secs}"


def as_json(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
