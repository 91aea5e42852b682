"""`aa-trt eval`: the model against ground truth on held-out videos, beside two baselines.

For each video of each test split: the reference is frame 0; the targets are the next `frames`
frames, driven by their exact pose renderings (the synthetic data's ground truth, so extraction
errors do not enter the score). The model runs the full inference path (DDIM, CFG, context
windows) with a fixed seed per video; the copy and skeleton-warp baselines (baselines.py) see the
same reference and the same target keypoints. Every method is scored with the same SSIM, PSNR and
L1 (metrics.py) per video; the mean per split is what the docs' table shows.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aa_trt.errors import InputError, OptionError
from aa_trt.options import SampleOptions
from aa_trt.precision import choose

from aa_trt.training.baselines import copy_reference, skeleton_warp
from aa_trt.training.metrics import frame_metrics

SPLITS = ("test_characters", "test_motions")
METHODS = ("model", "copy", "skeleton_warp", "vae_ceiling")


@dataclass
class EvalOptions:
    ckpt: str
    data: str
    splits: tuple[str, ...] = SPLITS
    videos: int | None = None     # per split (default: all)
    frames: int = 24              # targets per video (one context window by default)
    # How the model samples (guidance None: the checkpoint's own); video i uses seed + i.
    sample: SampleOptions = SampleOptions(seed=0)
    device: str = "cpu"
    dtype: str = "auto"           # aa_trt.precision.choose
    # A build folder of `aa-trt build` for this checkpoint: the model runs on its graphs (the
    # backend `run --engine` would pick: OpenVINO on CPU where installed, else onnxruntime) instead
    # of torch; `dtype` is then unused and the result records the backend.
    engine: str | None = None
    baselines: bool = True
    # Also score the VAE's reconstruction of the true frames: what a perfect denoiser would reach
    # through this VAE (the ceiling of any model built on it).
    ceiling: bool = False
    model: bool = True            # False: the baselines (and ceiling) only, no sampling
    # Also render each video with DDIM at this many steps from the same seed and guidance scale
    # (CFG at every step: the video a user gets with many steps) and score the model's frames
    # against it ("agreement"), beside the ground truth: how close fewer steps, another sampler
    # or a guidance interval come to the converged render of the same noise.
    agreement_steps: int | None = None
    # Render that converged reference with this checkpoint instead (at its own declared guidance):
    # a distilled student is judged against its teacher's many-step render, not its own.
    agreement_ckpt: str | None = None
    agreement_guidance: float | None = None  # with agreement_ckpt; None: that checkpoint's declared scale
    extra: dict = field(default_factory=dict)  # recorded as is (e.g. the training step)


def load_split(root: Path, split: str) -> list[dict]:
    meta = root / f"{split}.json"
    if not meta.is_file():
        raise InputError(f"{meta}: no such split (expected a folder made by `aa-trt data synth`)")
    return load_synth_meta(meta)


def load_synth_meta(meta: Path) -> list[dict]:
    """A meta file's entries, each with the `npz_path` (lossless frames, poses, keypoints) that
    `aa-trt data synth` writes and the evaluations need."""
    entries = json.loads(Path(meta).read_text())
    bad = [e for e in entries if "npz_path" not in e]
    if bad:
        raise InputError(f"{meta}: entries without npz_path (ground-truth keypoints), e.g. {bad[0]}")
    return entries


def evaluate(opts: EvalOptions, progress: bool = True) -> dict:
    from PIL import Image
    from tqdm.auto import tqdm

    from aa_trt.pipeline import Animator

    root = Path(opts.data)
    if not Path(opts.ckpt).is_file():
        raise InputError(f"{opts.ckpt}: no such checkpoint")
    if opts.agreement_ckpt is not None and opts.agreement_steps is None:
        raise OptionError("agreement_ckpt", opts.agreement_ckpt, "needs `agreement_steps`")
    if opts.agreement_guidance is not None and opts.agreement_ckpt is None:
        raise OptionError("agreement_guidance", opts.agreement_guidance,
                          "needs `agreement_ckpt` (otherwise the reference uses the model's own guidance)")
    precision = choose(opts.dtype, opts.device)
    if opts.engine is not None:
        from aa_trt.backends import animator_from_dir

        if opts.ceiling:
            raise OptionError("ceiling", True, "is scored with torch's VAE; leave it off with `engine`")
        animator = animator_from_dir(opts.engine, opts.ckpt)
        run_precision = {"precision": animator.backend_name, "precision_reason": animator.backend_reason,
                         "engine": str(opts.engine)}
    else:
        animator = Animator.from_pretrained(opts.ckpt, device=opts.device, dtype=precision.torch_dtype())
        run_precision = {"precision": precision.name, "precision_reason": precision.reason}
    sample = animator.sample_options(opts.sample)
    result = {"ckpt": str(opts.ckpt), "data": str(root), "frames": opts.frames, "steps": sample.steps,
              "guidance": sample.guidance, "seed": sample.seed, **run_precision, **opts.extra, "splits": {}}
    defaults = SampleOptions.defaults()  # the other sampling options, recorded where not the default
    for name in SampleOptions.fields():
        value = getattr(sample, name)
        if name not in result and value != defaults[name]:
            result[name] = list(value) if isinstance(value, tuple) else value
    converged = None
    if opts.agreement_steps is not None:
        if not opts.model:
            raise OptionError("agreement_steps", opts.agreement_steps, "needs the model to be sampled (model=True)")
        ref_animator = animator
        if opts.agreement_ckpt is not None:
            if not Path(opts.agreement_ckpt).is_file():
                raise InputError(f"{opts.agreement_ckpt}: no such checkpoint")
            ref_animator = Animator.from_pretrained(opts.agreement_ckpt, device=opts.device,
                                                    dtype=precision.torch_dtype())
            converged = ref_animator.sample_options(sample, sampler="ddim", steps=opts.agreement_steps,
                                                    guidance=opts.agreement_guidance, guidance_interval=None,
                                                    timestep_power=None, reuse_every=1, fast=False)
        else:
            converged = animator.sample_options(sample, sampler="ddim", steps=opts.agreement_steps,
                                                guidance_interval=None, timestep_power=None, reuse_every=1,
                                                fast=False)
        result["agreement"] = {"sampler": "ddim", "steps": converged.steps}
        if opts.agreement_ckpt is not None:
            result["agreement"].update(ckpt=str(opts.agreement_ckpt), guidance=converged.guidance)
    result["unet_evaluations"] = unet_evaluations(sample, opts.frames, animator.config.scheduler)
    t0 = time.perf_counter()
    costs = []  # counted UNet FLOPs of each video rendered
    for split in opts.splits:
        entries = load_split(root, split)[: opts.videos]
        rows = []
        for i, e in enumerate(tqdm(entries, desc=f"eval {split}", disable=not progress)):
            with np.load(root / e["npz_path"]) as z:
                frames, poses, kps = z["frames"], z["poses"], z["keypoints"]
            n = min(opts.frames, len(frames) - 1)
            if n < 1:
                raise InputError(f"{e['npz_path']}: a video of {len(frames)} frames has no target frames")
            ref, true = frames[0], frames[1:1 + n]
            h, w = ref.shape[:2]
            pred = {}
            if opts.model:
                out = animator(Image.fromarray(ref), poses[1:1 + n], sample.replace(seed=sample.seed + i),
                               width=w, height=h, progress=False)
                pred["model"] = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
                costs.append(animator.unet_cost.total)
            agree = {}
            if converged is not None:
                ref_out = ref_animator(Image.fromarray(ref), poses[1:1 + n], converged.replace(seed=sample.seed + i),
                                       width=w, height=h, progress=False)
                agree = {"agreement": frame_metrics(pred["model"], to_uint8(ref_out))}
            if opts.baselines:
                pred["copy"] = copy_reference(ref, n)
                pred["skeleton_warp"] = skeleton_warp(ref, kps[0, :18], kps[1:1 + n, :18])
            if opts.ceiling:
                pred["vae_ceiling"] = reconstruct(animator, true)
            rows.append({"video": e["npz_path"], **{m: frame_metrics(p, true) for m, p in pred.items()}, **agree})
        methods = [m for m in METHODS + ("agreement",) if rows and m in rows[0]]
        mean = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("ssim", "psnr", "l1")} for m in methods}
        result["splits"][split] = {"videos": rows, "mean": mean}
    if costs:  # counted, both CFG branches, whole and shallow steps (aa_trt.flop_count.UNetCost)
        result["unet_tflop_per_video"] = round(float(np.mean(costs)) / 1e12, 4)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in [0, 1] -> uint8, rounded as the model's frames are scored."""
    return np.clip(np.round(frames * 255), 0, 255).astype(np.uint8)


def unet_evaluations(sample: SampleOptions, frames: int, scheduler) -> int:
    """UNet evaluations (window x branch) of one video of `frames` frames with resolved options:
    both CFG branches counted at the steps where CFG applies, the cond branch alone elsewhere."""
    from aa_trt.guidance import context_windows
    from aa_trt.sampling import sampling_schedule

    windows = len(context_windows(frames, sample.context_frames, sample.context_overlap, sample.context_schedule))
    total = 0
    for t in sampling_schedule(scheduler, sample.steps, sample.timestep_power).timesteps:
        lo, hi = sample.guidance_interval or (0, scheduler.num_train_timesteps - 1)
        total += windows * (2 if sample.cfg and lo <= t <= hi else 1)
    return total


def reconstruct(animator, frames: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same frames through the model's VAE (posterior mean), uint8."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = animator.models.vae.encode(x.to(animator.device, animator.vae_dtype)).latent_dist.mean
        z = (z * animator.config.latent_scale)[None].permute(0, 2, 1, 3, 4)  # (1, 4, N, h, w)
    return np.clip(np.round(animator.decode(z) * 255), 0, 255).astype(np.uint8)


def table(result: dict) -> str:
    """The means per split and method as a markdown table."""
    lines = ["| split | method | SSIM | PSNR (dB) | L1 | videos |", "|---|---|---|---|---|---|"]
    for split, r in result["splits"].items():
        for m, v in r["mean"].items():
            lines.append(f"| {split} | {m} | {v['ssim']:.4f} | {v['psnr']:.2f} | {v['l1']:.4f} | {len(r['videos'])} |")
    return "\n".join(lines)


def agreement_frontier(animator, videos, configs, reference_steps: int = 100, out=None,
                       progress: bool = True, reference_animator=None) -> list[dict]:
    """Agreement with the converged render for many sampling options at once, each video's
    conditioning and every reference render computed once.

    videos: dicts {"name", "ref" uint8 (H, W, 3) (or a PIL image of any size with "size": the
    output (W, H)), "poses" uint8 (N, H, W, 3) (or PoseFrames), "seed", "true" uint8 (N, H, W, 3)
    or None}; configs: SampleOptions (seed ignored: each video's own). For each
    video and guidance scale the reference is DDIM-`reference_steps` with CFG at every step from
    the same noise. Rows (one per video and config): agreement PSNR/SSIM against it, ground-truth
    metrics where `true` is given, UNet evaluations, seconds. `out`: a JSON-lines file each row is
    appended to as it is made. reference_animator: who renders the references (default: the
    animator itself); e.g. the fp32 torch path when `animator` runs an engine's graphs. Both
    prepare each video's conditioning and draw its noise the same way."""
    import json as _json

    import torch
    from PIL import Image

    rows = []
    for v in videos:
        ref = v["ref"]
        if isinstance(ref, Image.Image):  # any size, as `aa-trt run` reads it (CLIP sees all of it)
            img, (w, h) = ref, v["size"]
        else:
            img, (h, w) = Image.fromarray(ref), ref.shape[:2]
        cond = animator.prepare(img, v["poses"], w, h)
        noise = animator.initial_latents(cond, v["seed"])
        ref_anim = reference_animator or animator
        ref_cond = cond if ref_anim is animator else ref_anim.prepare(img, v["poses"], w, h)
        refs = {}
        for c in configs:
            c = animator.sample_options(c, seed=v["seed"])
            if c.guidance not in refs:
                conv = c.replace(sampler="ddim", steps=reference_steps, guidance_interval=None, timestep_power=None,
                                 reuse_every=1, fast=False)
                refs[c.guidance] = to_uint8(ref_anim.decode(ref_anim.run_denoise(ref_cond, noise.clone(), conv,
                                                                                 progress=progress)))
                row = {"video": v["name"], "sampler": "ddim", "steps": reference_steps, "guidance": c.guidance,
                       "guidance_interval": None, "reference": True,
                       "unet_evaluations": unet_evaluations(conv, len(v["poses"]), animator.config.scheduler),
                       "unet_tflop": ref_anim.unet_cost.as_dict()}
                if v.get("true") is not None:
                    row["truth"] = frame_metrics(refs[c.guidance], v["true"])
                rows.append(row)
                if out is not None:
                    with open(out, "a") as f:
                        f.write(_json.dumps(row) + "\n")
            t0 = time.perf_counter()
            with torch.no_grad():
                frames = to_uint8(animator.decode(animator.run_denoise(cond, noise.clone(), c, progress=progress)))
            row = {"video": v["name"], "sampler": c.sampler, "steps": c.steps, "guidance": c.guidance,
                   "guidance_interval": list(c.guidance_interval) if c.guidance_interval else None,
                   "timestep_power": c.timestep_power, "reuse_every": c.reuse_every, "reuse_depth": c.reuse_depth,
                   "fast": c.fast,
                   "unet_evaluations": unet_evaluations(c, len(v["poses"]), animator.config.scheduler),
                   "unet_tflop": animator.unet_cost.as_dict(),
                   "seconds": round(time.perf_counter() - t0, 2),
                   "agreement": frame_metrics(frames, refs[c.guidance])}
            if v.get("true") is not None:
                row["truth"] = frame_metrics(frames, v["true"])
            rows.append(row)
            if out is not None:
                with open(out, "a") as f:
                    f.write(_json.dumps(row) + "\n")
    return rows
