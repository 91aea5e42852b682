"""`aa-trt run` and `aa-trt pose`: files in, stages timed, an mp4 out.

Stages: read -> pose (extract, align, render) -> load -> animate -> write. Each is timed for the
closing summary; each failure a user can fix is an InputError/CheckpointError with one line.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aa_trt.errors import InputError, OptionError
from aa_trt.options import SampleOptions, check_parallel_mode
from aa_trt.precision import check_name, choose

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default.safetensors"


@dataclass(frozen=True)
class RunOptions:
    """One `aa-trt run`: the files, the frame selection, the backend, and the SampleOptions.
    Checks itself on construction (OptionError naming the field); `create` takes the sampling
    fields by name too (`RunOptions.create(ref=..., driving=..., output=..., steps=4)`)."""

    ref: Path
    driving: Path
    output: Path
    sample: SampleOptions = SampleOptions()
    ckpt: Path | None = None
    engine: Path | None = None
    pose_video: bool = False
    dwpose: Path | None = None
    align: bool = True
    frames: int | None = None
    stride: int = 1
    start: int = 0
    width: int | None = None
    height: int | None = None
    device: str = "cpu"
    dtype: str = "auto"  # precision.choose: the machine's fastest; fp32 is the Moore-exact path
    offload: bool = False
    compile: bool = False
    cuda_graph: bool = False
    parallel: str = "auto"  # under torchrun: guidance.PARALLEL_MODES
    resume: bool = False    # keep each step's latents beside the output, continue from them (aa_trt.resume)
    png: bool = False       # output is a folder of numbered PNG frames
    crf: int | None = None  # video quality (lower: better, larger); None: video.DEFAULT_CRF
    grid: bool = False      # reference | pose | result side by side, as Moore writes
    overwrite: bool = False  # replace a finished output already there (never an input)
    quiet: bool = False

    def __post_init__(self):
        for name in ("ref", "driving", "output", "ckpt", "engine", "dwpose"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))
        if not isinstance(self.sample, SampleOptions):
            raise OptionError("sample", self.sample, "must be a SampleOptions")
        for name, low in (("frames", 1), ("stride", 1), ("start", 0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise OptionError(name, v, f"must be a whole number >= {low}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
                raise OptionError(name, v, "must be a positive multiple of 8")
        check_name(self.dtype)
        check_parallel_mode(self.parallel)
        if self.cuda_graph and not str(self.device).startswith("cuda"):
            raise OptionError("cuda_graph", True, f"needs a CUDA device (CUDA graphs replay GPU work); "
                              f"this run is on {self.device}")
        if self.engine is not None:
            on = [n for n in ("offload", "compile", "cuda_graph") if getattr(self, n)]
            if on:
                raise OptionError(on[0], True, "applies to the torch backend, not to an engine")
        # The output's kind from its name, before any work (an unknown extension is refused).
        from aa_trt.video import CONTAINERS, check_crf, container_for

        if self.png:
            if self.output.suffix.lower() in CONTAINERS:
                raise OptionError("output", str(self.output), "with `png` the output is a folder for "
                                  "the frames, not a video file")
            if self.crf is not None:
                raise OptionError("crf", self.crf, "sets a video's quality; PNG frames are lossless")
        else:
            kind = container_for(self.output)
            if self.crf is not None:
                check_crf(self.crf, kind)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, **kw) -> "RunOptions":
        """RunOptions fields and SampleOptions fields together, by name."""
        sample_kw = {k: kw.pop(k) for k in list(kw) if k in SampleOptions.fields()}
        unknown = set(kw) - set(cls.fields())
        if unknown:
            name = sorted(unknown)[0]
            raise OptionError(name, kw[name], "not an option of aa-trt run")
        sample = SampleOptions.build(kw.pop("sample", None), **sample_kw)
        return cls(sample=sample, **kw)


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
    raise InputError("this build has no embedded default model yet; give a checkpoint (ckpt, `--ckpt "
                     "MODEL.safetensors` on the command line) "
                     "(make one from Moore's weights with `aa-trt convert`)")


def output_size(ref_size: tuple[int, int], short_side: int, width=None, height=None) -> tuple[int, int]:
    """(width, height): given ones must be multiples of 8; missing ones follow the reference's
    aspect ratio with the model's short side, rounded to multiples of 8."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v <= 0 or v % 8):
            raise OptionError(name, v, "must be a positive multiple of 8")
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


def driving_poses(opts: RunOptions, clip, ref_image, width: int, height: int, extractor=None):
    """The pose stage (aa_trt.pose.stage) for a run's options: (pose images, summary facts)."""
    from aa_trt.pose.stage import driving_poses as stage, video_cache_key

    key = None if opts.pose_video else video_cache_key(opts.driving, opts.start, opts.stride, opts.frames)
    return stage(clip, width, height, source=opts.driving, pose_video=opts.pose_video,
                 extractor=extractor, dwpose=opts.dwpose, ref_image=ref_image if opts.align else None,
                 ref_source=opts.ref, cache_key=key, progress=not opts.quiet)


def run(opts: RunOptions, make_animator=None, on_progress=None) -> dict:
    """`make_animator(ckpt, device=, dtype=)` replaces Animator.from_pretrained (torchrun, batch).
    `on_progress(done, total)`: called after each UNet call with the denoising units (steps x
    windows) done so far, instead of the terminal's progress bar (a web page's bar)."""
    import torch

    from aa_trt.checkpoint import read_config
    from aa_trt.files import check_output_folder
    from aa_trt.pipeline import Animator
    from aa_trt.video import DEFAULT_CRF, check_png_folder, open_clip, read_image, write_png_frames, write_video

    timer = Timer()
    ckpt = checkpoint_path(opts.ckpt)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", opts.device, "no CUDA device is available to this torch build")
    # Fail on bad options and a bad output path before minutes of work, not after.
    check_run_output(opts, ckpt)
    config = read_config(ckpt)
    sample = opts.sample.resolve(config)
    check_output_folder(opts.output.parent)
    with timer("read"):
        ref_image = read_image(opts.ref)
        clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)  # decoded as it is read
    with timer("load"):
        width, height = output_size(ref_image.size, min(config.default_size), opts.width, opts.height)
        if opts.engine is not None:
            # The graphs of `aa-trt build`: the backend picks its engine and precision and says
            # why. The checkpoint is still read for its config and to refuse a DIR built from
            # another one.
            from aa_trt.backends import animator_from_dir
            anim = animator_from_dir(opts.engine, ckpt)
            precision = (getattr(anim, "backend_name", type(anim).__name__),
                         getattr(anim, "backend_reason", "the build's graphs"))
        else:
            chosen = choose(opts.dtype, opts.device)
            anim = (make_animator or Animator.from_pretrained)(ckpt, device=opts.device,
                                                              dtype=chosen.torch_dtype())
            anim.set_options(offload=opts.offload, compile=opts.compile, cuda_graph=opts.cuda_graph)
            precision = (chosen.name, chosen.reason)
    sample = anim.sample_options(sample)  # as this backend runs it (`fast` without feature reuse on an engine)
    anim.check_feature_reuse(sample)  # before the pose stage's minutes
    with timer("pose"):
        poses, facts = driving_poses(opts, clip, ref_image, width, height)
    resume, start, latents, carry = None, 0, None, None
    if opts.resume:
        from aa_trt.files import remove_stale_partials

        remove_stale_partials(opts.output)  # a write of the output that a kill interrupted
        # The backend as the numbers depend on it: torch (any Animator class, one rank or many) or
        # the engine runtime that ran the graphs.
        backend = "torch" if opts.engine is None else getattr(anim, "backend_name", type(anim).__name__)
        resume, saved, sample = _resume_state(opts, ckpt, sample, width, height, precision[0], backend)
        if saved is not None:
            start, latents, carry = saved.step + 1, saved.latents, saved.carry
            anim.last_seed = saved.seed
        facts["resumed_from_step"] = start
    with timer("animate"):
        # The final latents are the one whole-video tensor kept (with the pose features).
        final = anim(ref_image, poses, sample, width=width, height=height, output="latent",
                     progress=on_progress if on_progress is not None else not opts.quiet,
                     latents=latents, start=start, carry=carry,
                     callback=resume.save if resume is not None else None)
    with timer("write"):  # decoded a chunk at a time, straight into the encoder as uint8
        n = len(poses)
        video = streamed_frames(anim, final, ref_image, poses if opts.grid else None, not opts.quiet)
        if opts.png:
            write_png_frames(opts.output, video, overwrite=opts.overwrite)
        else:
            write_video(opts.output, video, clip.fps, clip.audio_path, clip.start_time, clip.duration(n),
                        crf=DEFAULT_CRF if opts.crf is None else opts.crf)
    if resume is not None:
        resume.remove()  # the output is complete: nothing left to resume
    return {"output": str(opts.output), "frames": n, "width": width, "height": height,
            "guidance": sample.guidance, "steps": sample.steps, "sampler": sample.sampler,
            "timestep_power": sample.timestep_power, "guidance_interval": sample.guidance_interval,
            "reuse_every": sample.reuse_every, "reuse_depth": sample.reuse_depth, "fast": sample.fast,
            "unet_tflop": anim.unet_cost.as_dict() if anim.unet_cost is not None else None,
            "fps": round(clip.fps, 3), "audio": clip.audio_path is not None, "seed": anim.last_seed,
            "checkpoint": str(ckpt), "backend": type(anim).__name__, "precision": precision[0],
            "precision_reason": precision[1], **facts, "peak_rss_mb": peak_rss_mb(),
            "seconds": {k: round(v, 2) for k, v in timer.stages.items()}}


def run_inputs(opts: RunOptions, ckpt: Path | None = None) -> list[tuple[str, Path | None]]:
    """What a run reads, as files.guard_outputs takes them."""
    return [("reference image", opts.ref), ("driving video", opts.driving),
            ("checkpoint", ckpt if ckpt is not None else opts.ckpt), ("engine folder", opts.engine),
            ("DWPose folder", opts.dwpose)]


def check_run_output(opts: RunOptions, ckpt: Path | None = None) -> None:
    """Before any work: the output is none of the inputs (nor inside or around one), is of the
    kind asked for (a file, or a folder with `png`), and replaces a finished result only with
    `overwrite`."""
    from aa_trt.files import finished_result, guard_outputs
    from aa_trt.video import check_png_folder

    guard_outputs([(opts.output, False)], run_inputs(opts, ckpt))
    if opts.png:
        check_png_folder(opts.output, overwrite=opts.overwrite)
        return
    if opts.output.is_dir():
        raise InputError(f"{opts.output}: is a folder; give a file name such as {opts.output / 'out.mp4'}")
    # A kill between publishing the video and removing the resume state leaves both: the video is
    # then this render's own, and the rerun writes it again (the same bytes) from the kept last step.
    from aa_trt.resume import state_path

    own = opts.resume and state_path(opts.output).is_file()
    guard_outputs([(opts.output, finished_result(opts.output) and not own)], [], opts.overwrite)


def _resume_state(opts: RunOptions, ckpt: Path, sample: SampleOptions, width: int, height: int,
                  precision: str, backend: str):
    """(the ResumeState, what it saved or None, the options to run: the saved seed when none was
    asked for, else a fresh one drawn now, so that the state records it from the first step)."""
    import secrets

    from aa_trt.resume import ResumeState, identity

    def ident(s: SampleOptions) -> dict:
        return identity(checkpoint=ckpt, ref=opts.ref, driving=opts.driving, start=opts.start,
                        stride=opts.stride, frames=opts.frames, pose_video=opts.pose_video,
                        align=opts.align, dwpose=opts.dwpose, width=width, height=height,
                        sample=s.to_dict(), precision=precision, backend=backend)

    state = ResumeState(opts.output, ident(sample))
    saved = state.load()
    if saved is not None:
        sample = sample.replace(seed=saved.seed)
    elif sample.seed is None:
        sample = sample.replace(seed=secrets.randbits(63))
    state.ident = ident(sample)
    return state, saved, sample


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, MB (Linux and macOS; None elsewhere)."""
    try:
        import resource
        import sys
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def streamed_frames(anim, latents, ref_image, grid_poses=None, progress: bool = False):
    """uint8 (H, W, 3) frames of the final latents (1, c, N, h, w), one at a time, decoded chunk
    by chunk; with `grid_poses` (pose.stage.PoseFrames) as reference | pose | result."""
    import torch

    with torch.no_grad():
        poses = grid_poses.chunks(1) if grid_poses is not None else None
        for chunk in anim.decode_chunks(latents, progress=progress):
            video = (chunk * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            if poses is not None:
                video = grid_frames(ref_image, np.concatenate([next(poses) for _ in video]), video)
            yield from video


def grid_frames(ref_image, poses: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(N, H, 3W, 3) uint8: the reference (as the model saw it: resized to the output size), the
    pose image and the result, side by side, as Moore-AnimateAnyone's grid."""
    from PIL import Image

    n, h, w = frames.shape[:3]
    ref = np.asarray(ref_image.convert("RGB").resize((w, h), Image.LANCZOS))
    return np.concatenate([np.broadcast_to(ref, (n, h, w, 3)), poses[:, :h, :w], frames], axis=2)


def pose_preview(driving: Path, output: Path, ref: Path | None = None, dwpose=None, frames=None,
                 stride: int = 1, start: int = 0, quiet: bool = False, overwrite: bool = False) -> dict:
    """`aa-trt pose`: source frames and their (aligned, with ref) skeletons side by side; the
    video is read twice (extraction, then the side-by-side), never held whole."""
    from PIL import Image

    from aa_trt.files import finished_result, guard_outputs
    from aa_trt.pose.stage import driving_poses as stage, video_cache_key
    from aa_trt.video import container_for, open_clip, read_image, write_video

    timer = Timer()
    driving, output = Path(driving), Path(output)
    guard_outputs([(output, False)], [("driving video", driving), ("reference image", ref),
                                      ("DWPose folder", dwpose)])
    container_for(output)
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give a file name such as {output / 'poses.mp4'}")
    guard_outputs([(output, finished_result(output))], [], overwrite)
    with timer("read"):
        clip = open_clip(driving, start, stride, frames)
        ref_image = read_image(ref) if ref is not None else None
    h, w = clip.first_shape[:2]
    size = (w // 2 * 2, h // 2 * 2)
    with timer("pose"):
        poses, facts = stage(clip, size[0], size[1], source=driving, dwpose=dwpose,
                             ref_image=ref_image, ref_source=ref,
                             cache_key=video_cache_key(driving, start, stride, frames),
                             progress=not quiet)

    def side_by_side():
        for f, p in zip(clip.frames(), poses.chunks(1)):
            yield np.concatenate([np.asarray(Image.fromarray(f).resize(size)), p[0]], axis=1)

    with timer("write"):
        write_video(output, side_by_side(), clip.fps, clip.audio_path, clip.start_time, clip.duration(len(poses)))
    return {"output": str(output), "frames": len(poses), **facts,
            "seconds": {k: round(v, 2) for k, v in timer.stages.items()}}


def summary_line(result: dict) -> str:
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    size = f" {result['width']}x{result['height']}" if "width" in result else ""
    how = f" in {result['precision']} ({result['precision_reason']})" if "precision" in result else ""
    return f"wrote {result['output']}: {result['frames']} frames{size}{how}{sampling_line(result)}; {secs}"


def sampling_line(result: dict) -> str:
    """How the video was sampled and what its UNet calls cost (counted), for the summary line."""
    if "steps" not in result:
        return ""
    how = f"{result['sampler']} {result['steps']} steps"
    if result.get("timestep_power") is not None:
        how += f" power {result['timestep_power']:g}"
    how += f", CFG {result['guidance']:g}"
    if result.get("guidance_interval"):
        lo, hi = result["guidance_interval"]
        how += f" at t {lo}..{hi}"
    if result.get("reuse_every", 1) > 1:
        how += f", whole UNet every {result['reuse_every']} steps (depth {result['reuse_depth']} between)"
    cost = result.get("unet_tflop")
    if cost:
        how += f"; UNet {cost['total']:.3g} TFLOP"
        if cost["shallow"]:
            how += f" (whole steps {cost['full']:.3g}, shallow {cost['shallow']:.3g})"
    return f" [{'--fast: ' if result.get('fast') else ''}{how}]"


def as_json(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
