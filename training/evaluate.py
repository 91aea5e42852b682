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

from aa_trt.errors import InputError

from .baselines import copy_reference, skeleton_warp
from .metrics import frame_metrics

SPLITS = ("test_characters", "test_motions")
METHODS = ("model", "copy", "skeleton_warp")


@dataclass
class EvalOptions:
    ckpt: str
    data: str
    splits: tuple[str, ...] = SPLITS
    videos: int | None = None     # per split (default: all)
    frames: int = 24              # targets per video (one context window by default)
    steps: int = 20
    guidance: float = 3.5
    seed: int = 0
    device: str = "cpu"
    baselines: bool = True
    extra: dict = field(default_factory=dict)  # recorded as is (e.g. the training step)


def load_split(root: Path, split: str) -> list[dict]:
    meta = root / f"{split}.json"
    if not meta.is_file():
        raise InputError(f"{meta}: no such split (expected a folder made by `aa-trt data synth`)")
    entries = json.loads(meta.read_text())
    bad = [e for e in entries if "npz_path" not in e]
    if bad:
        raise InputError(f"{meta}: entries without npz_path (ground-truth keypoints), e.g. {bad[0]}")
    return entries


def evaluate(opts: EvalOptions, progress: bool = True) -> dict:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from aa_trt.pipeline import Animator

    root = Path(opts.data)
    if not Path(opts.ckpt).is_file():
        raise InputError(f"{opts.ckpt}: no such checkpoint")
    animator = Animator.from_pretrained(opts.ckpt, device=opts.device, dtype=torch.float32)
    result = {"ckpt": str(opts.ckpt), "data": str(root), "frames": opts.frames, "steps": opts.steps,
              "guidance": opts.guidance, "seed": opts.seed, **opts.extra, "splits": {}}
    t0 = time.perf_counter()
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
            out = animator(Image.fromarray(ref), poses[1:1 + n], steps=opts.steps, guidance=opts.guidance,
                           seed=opts.seed + i, width=w, height=h, progress=False)
            pred = {"model": np.clip(np.round(out * 255), 0, 255).astype(np.uint8)}
            if opts.baselines:
                pred["copy"] = copy_reference(ref, n)
                pred["skeleton_warp"] = skeleton_warp(ref, kps[0, :18], kps[1:1 + n, :18])
            rows.append({"video": e["npz_path"], **{m: frame_metrics(p, true) for m, p in pred.items()}})
        methods = [m for m in METHODS if rows and m in rows[0]]
        mean = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("ssim", "psnr", "l1")} for m in methods}
        result["splits"][split] = {"videos": rows, "mean": mean}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(result: dict) -> str:
    """The means per split and method as a markdown table."""
    lines = ["| split | method | SSIM | PSNR (dB) | L1 | videos |", "|---|---|---|---|---|---|"]
    for split, r in result["splits"].items():
        for m, v in r["mean"].items():
            lines.append(f"| {split} | {m} | {v['ssim']:.4f} | {v['psnr']:.2f} | {v['l1']:.4f} | {len(r['videos'])} |")
    return "\n".join(lines)
