"""The denoise loop, kept apart from preparation: the noise schedule and the samplers.

Samplers have one signature (k-diffusion's): `sample_xxx(model, x, schedule, extra_args, callback,
disable, *, start=0, carry=None)`, where `model(x, t, **extra_args)` returns the guided prediction
for the whole video (aa_trt.guidance.windowed_guidance builds it from a per-window UNet step).
Resumable: after step i the callback gets {"i", "t", "x", "pred", "carry"}, where `carry` holds
every tensor besides x that the sampler needs to go on (a multistep method's earlier outputs;
nothing for DDIM); `sample_xxx(model, x, schedule, start=i + 1, carry=carry)` then continues
exactly where the interrupted run was, bit for bit on the same machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from aa_trt.config import SchedulerConfig
from aa_trt.errors import OptionError


# ---------------------------------------------------------------------------------- schedule
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(alpha_bar) so that the last step has zero SNR."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float32, computed as diffusers computes it)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r}: expected 'linear' or 'scaled_linear'")
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class DDIMSchedule:
    timesteps: tuple[int, ...]       # what the UNet sees, one per step
    prev_timesteps: tuple[int, ...]  # what DDIM steps to (diffusers: t - T // steps; may be < 0)
    alphas_cumprod: torch.Tensor     # (T,) float32
    final_alpha_cumprod: float
    prediction_type: str

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def __len__(self):
        return len(self.timesteps)


def ddim_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """Timesteps as diffusers' DDIMScheduler.set_timesteps spaces them, and its prev-step rule."""
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise OptionError("steps", steps, f"must be in 1..{T} (the model's training timesteps)")
    if cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r}: expected trailing/leading/linspace")
    ac = alphas_cumprod(cfg)
    # diffusers steps from t to t - T // steps, which with trailing spacing is not always the next
    # timestep (3 steps: the UNet runs at 332 after stepping to 333). Reproduced on purpose.
    prev = tuple(int(t) - T // steps for t in ts)
    final = 1.0 if cfg.set_alpha_to_one else float(ac[0])
    return DDIMSchedule(tuple(int(t) for t in ts), prev, ac, final, cfg.prediction_type)


def predict_x0_eps(x: torch.Tensor, pred: torch.Tensor, alpha: float, prediction_type: str):
    """The model output as (x0, eps) for a sample x at alpha_bar = alpha."""
    a, s = alpha**0.5, (1 - alpha) ** 0.5
    if prediction_type == "v_prediction":
        return a * x - s * pred, a * pred + s * x
    if prediction_type == "epsilon":
        return (x - s * pred) / a, pred
    if prediction_type == "sample":
        return pred, (x - a * pred) / s
    raise ValueError(f"prediction_type {prediction_type!r}")


def ddim_step(x: torch.Tensor, pred: torch.Tensor, alpha_t: float, alpha_prev: float,
              prediction_type: str) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), Song et al. 2020 eq. 12."""
    x0, eps = predict_x0_eps(x, pred, alpha_t, prediction_type)
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, schedule: DDIMSchedule, extra_args=None,
                callback: Callable | None = None, disable: bool | None = None, *, start: int = 0,
                carry: dict | None = None) -> torch.Tensor:
    """DDIM sampling, Song et al. 2020 (eta = 0). x: initial noise (any shape), or with `start` the
    latents after step start - 1 (DDIM carries nothing else between steps: `carry` is unused)."""
    extra_args = extra_args or {}
    steps = list(zip(schedule.timesteps, schedule.prev_timesteps))
    for i in tqdm(range(start, len(steps)), desc="denoise", unit="step", disable=disable):
        t, t_prev = steps[i]
        pred = model(x, t, **extra_args)
        x = ddim_step(x, pred, schedule.alpha(t), schedule.alpha(t_prev), schedule.prediction_type)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred": pred, "carry": {}})
    return x


# The samplers by name (SampleOptions.sampler), each with the signature above.
SAMPLERS = {"ddim": sample_ddim}
