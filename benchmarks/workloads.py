"""What the benchmarks run: random-weight models and, for each comparison, an aa-trt callable and
its Moore-style twin over the same weights and inputs.

Everything builds on a device argument; on "meta" nothing is allocated or computed, which is how
the FLOPs of full-size steps are counted on a CPU (same code path, same shapes).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from aa_trt.checkpoint import Models, build_models
from aa_trt.config import ModelConfig
from aa_trt.models import UNet
from aa_trt.models.reference_kv import compute_reference_kv
from aa_trt.pipeline import Animator, Conditioning
from aa_trt.guidance import context_windows, windowed_guidance
from aa_trt.sampling import ddim_schedule, ddim_step

from .moore_baseline import (MooreConditioning, moore_banks, moore_denoise, moore_prepare,
                             moore_unet_step)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# The test suite's helpers: random never-zero weights, the golden fixture's path, max |a - b|.
from helpers import FIXTURE, max_abs, randomize_  # noqa: E402,F401


def _random(shape, g: torch.Generator, device, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    return (torch.randn(shape, generator=g) * scale).to(device, dtype)


@contextlib.contextmanager
def skip_default_init():
    """Constructors' random initialisation is wasted when randomize_ overwrites every parameter
    next: at sd15 widths it is ~16 s per UNet on 2 cores. Buffers (the motion modules' sinusoidal
    tables) are still computed by their constructors."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def unet_models(config: ModelConfig, device="cpu", seed: int = 0) -> Models:
    """The two UNets only (what a denoising step needs), random weights; other parts None."""
    with torch.device(device), skip_default_init():
        den = UNet(config.unet, config.motion)
        ref = UNet(config.unet, with_output=False)
    if torch.device(device).type != "meta":
        randomize_(den, seed)
        randomize_(ref, seed + 1)
    return Models(config, den.eval().requires_grad_(False), ref.eval().requires_grad_(False),
                  None, None, None)


def full_models(config: ModelConfig, seed: int = 0) -> Models:
    """All five submodels with random weights (CPU)."""
    models = build_models(config, "cpu")
    for i, module in enumerate(models.components().values()):
        randomize_(module, seed + i).eval().requires_grad_(False)
    return models


@dataclass
class Pair:
    """One unit of work, done by aa-trt and by the Moore-style baseline."""

    ours: Callable[[], object]
    moore: Callable[[], object]
    params: dict


def step_pair(animator: Animator, frames: int, height: int, width: int, guidance: float = 3.5,
              steps: int = 20, step_index: int = 1, seed: int = 0) -> Pair:
    """One DDIM step over a whole clip (windows, CFG, DDIM update): the reference K/V cache and the
    Moore banks are computed here, once, as both pipelines do once per video."""
    cfg, dev, dt = animator.config, animator.device, animator.dtype
    g = torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    clip = _random((1, cfg.unet.cross_attention_dim), g, dev, dt)
    ref_latent = _random((1, cfg.unet.in_channels, h, w), g, dev, dt)
    pose = _random((frames, cfg.unet.block_out_channels[0], h, w), g, dev, dt, scale=0.3)
    x = _random((1, cfg.unet.in_channels, frames, h, w), g, dev)
    models = animator.models
    kv = compute_reference_kv(models.reference_unet, models.denoising_unet, ref_latent, clip[:, None],
                              cfg.bank_dtype)
    banks = moore_banks(animator, ref_latent, clip, guidance)
    ours_cond = Conditioning(clip, ref_latent, kv, pose, width, height)
    moore_cond = MooreConditioning(clip, ref_latent, banks, pose, width, height)
    windows = context_windows(frames, 24, 4, "uniform")
    schedule = ddim_schedule(cfg.scheduler, steps)
    t, t_prev = schedule.timesteps[step_index], schedule.prev_timesteps[step_index]

    def one_step(model):
        return ddim_step(x, model(x, t), schedule.alpha(t), schedule.alpha(t_prev), schedule.prediction_type)

    ours = windowed_guidance(animator.unet_step(ours_cond), windows, guidance)
    moore = windowed_guidance(moore_unet_step(animator, moore_cond), windows, guidance)
    return Pair(lambda: one_step(ours), lambda: one_step(moore),
                dict(frames=frames, height=height, width=width, guidance=guidance, timestep=t,
                     windows=len(windows)))


def reference_pair(animator: Animator, height: int, width: int, guidance: float = 3.5, seed: int = 0) -> Pair:
    """The once-per-video reference pass: our K/V cache (batch 1, early stop, projection) against
    Moore's banks (whole ReferenceNet at batch 2)."""
    cfg, dev, dt = animator.config, animator.device, animator.dtype
    g = torch.Generator().manual_seed(seed)
    clip = _random((1, cfg.unet.cross_attention_dim), g, dev, dt)
    ref_latent = _random((1, cfg.unet.in_channels, height // 8, width // 8), g, dev, dt)
    m = animator.models
    return Pair(lambda: compute_reference_kv(m.reference_unet, m.denoising_unet, ref_latent,
                                             clip[:, None], cfg.bank_dtype),
                lambda: moore_banks(animator, ref_latent, clip, guidance),
                dict(height=height, width=width))


def video_inputs(frames: int, height: int, width: int, seed: int = 0):
    """A random reference image, random uint8 pose frames (N, H, W, 3) and initial noise."""
    rng = np.random.default_rng(seed)
    ref = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    latents = torch.randn((1, 4, frames, height // 8, width // 8),
                          generator=torch.Generator().manual_seed(seed))
    return ref, poses, latents


class StageClock:
    """Times named stages of a run: clock("denoising", fn) runs fn and keeps its duration."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def __call__(self, name: str, fn: Callable):
        start = time.perf_counter()
        value = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        return value


def pipeline_pair(animator: Animator, frames: int, height: int, width: int, steps: int = 20,
                  guidance: float = 3.5, output: str = "np", seed: int = 0) -> Pair:
    """The whole pipeline, image and poses in, frames (or final latents) out, as the stages of
    `Animator.__call__` and of `moore_animate`; params["stages"] holds each stage's times."""
    ref, poses, latents = video_inputs(frames, height, width, seed)
    clocks = {"ours": StageClock(), "baseline": StageClock()}

    def ours():
        clock = clocks["ours"]
        cond = clock("conditioning", lambda: animator.prepare(ref, poses))
        out = clock("denoising", lambda: animator.denoise(cond, latents, steps=steps, guidance=guidance, progress=False))
        return out if output == "latent" else clock("decoding", lambda: animator.decode(out))

    def moore():
        clock = clocks["baseline"]
        cond = clock("conditioning", lambda: moore_prepare(animator, ref, poses, guidance))
        out = clock("denoising", lambda: moore_denoise(animator, cond, latents, steps, guidance))
        return out if output == "latent" else clock("decoding", lambda: animator.decode(out, chunk=1))

    return Pair(ours, moore, dict(frames=frames, height=height, width=width, steps=steps,
                                  guidance=guidance, stages={k: c.times for k, c in clocks.items()}))
