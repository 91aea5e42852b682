"""The denoise loop, kept apart from preparation: schedule, DDIM, context windows, guidance.

Samplers have one signature (k-diffusion's): `sample_xxx(model, x, schedule, extra_args, callback,
disable)`, where `model(x, t, **extra_args)` returns the guided prediction for the whole video.
`windowed_guidance` builds such a model from a per-window UNet step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SchedulerConfig


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
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
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
                callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DDIM sampling, Song et al. 2020 (eta = 0). x: initial noise (any shape)."""
    extra_args = extra_args or {}
    for i, (t, t_prev) in enumerate(tqdm(list(zip(schedule.timesteps, schedule.prev_timesteps)),
                                         desc="denoise", unit="step", disable=disable)):
        pred = model(x, t, **extra_args)
        x = ddim_step(x, pred, schedule.alpha(t), schedule.alpha(t_prev), schedule.prediction_type)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred": pred})
    return x


# ---------------------------------------------------------------------------------- windows
def uniform_windows(n: int, size: int = 24, overlap: int = 4, closed_loop: bool = True) -> list[list[int]]:
    """Moore's `uniform` context schedule at step 0 (the only way its pipeline calls it): windows
    start every size - overlap frames and wrap around the end (frame indices mod n)."""
    if n <= size:
        return [list(range(n))]
    stride = size - overlap
    if stride <= 0:
        raise ValueError(f"context overlap {overlap} must be smaller than the window {size}")
    stop = n if closed_loop else n - overlap
    return [[j % n for j in range(start, start + size)] for start in range(0, stop, stride)]


def sliding_windows(n: int, size: int = 24, overlap: int = 4) -> list[list[int]]:
    """Non-wrapping windows for clips that do not loop: the last window is shifted back so it ends
    on the last frame; every window has `size` frames, and the first and last frames never mix."""
    if n <= size:
        return [list(range(n))]
    stride = size - overlap
    if stride <= 0:
        raise ValueError(f"context overlap {overlap} must be smaller than the window {size}")
    starts = list(range(0, n - size, stride)) + [n - size]
    return [list(range(s, s + size)) for s in starts]


def context_windows(n: int, size: int, overlap: int, schedule: str = "uniform") -> list[list[int]]:
    if schedule == "uniform":
        return uniform_windows(n, size, overlap, closed_loop=True)
    if schedule == "sliding":
        return sliding_windows(n, size, overlap)
    raise ValueError(f"context schedule {schedule!r}: expected 'uniform' or 'sliding'")


# ---------------------------------------------------------------------------------- guidance
def window_counts(windows: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The windows as index tensors, and how many windows cover each frame (N,)."""
    idx = [torch.as_tensor(w, dtype=torch.long) for w in windows]
    counts = torch.zeros(max(max(w) for w in windows) + 1)
    for w in idx:
        counts.index_add_(0, w, torch.ones(len(w)))
    if (counts == 0).any():
        raise ValueError("context windows leave frames uncovered")
    return idx, counts


class WindowIndexCache:
    """The window indices (host int64 tensors) and per-frame window counts, copied to a device
    once per (device, dtype) and kept: a copy from pageable host memory per window and step makes
    the host wait for the GPU's queue to drain each time."""

    def __init__(self, idx: Sequence[torch.Tensor], counts: torch.Tensor):
        self.idx, self.counts = list(idx), counts
        self._copies: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._copies:
            self._copies[key] = ([w.to(x.device) for w in self.idx], self.counts.to(x.device, x.dtype))
        return self._copies[key]


def windowed_guidance(unet_step: Callable, windows: Sequence[Sequence[int]], guidance: float,
                      window_batch: int = 1, on_windows: Callable[[int], None] | None = None) -> Callable:
    """A whole-video model from a per-window UNet step, Moore's aggregation:

    `unet_step(x_win, t, windows, branches)`: x_win (k, c, F, h, w) the latents of k windows,
    `windows` their k frame-index tensors (F,) in host memory (a step that indexes device data
    moves them; one that indexes host data, e.g. offloaded pose features, needs no device read),
    `branches` ("uncond", "cond") or ("cond",) -> predictions (len(branches) * k, c, F, h, w),
    rows [branch 0: k windows, branch 1: k windows]. Predictions are summed per frame over the
    windows and divided by the per-frame count, then combined: uncond + g * (cond - uncond).
    With guidance <= 1 only the cond branch runs (as Moore: no CFG). `on_windows(k)` is called
    after each UNet call with the number of windows it ran (progress reporting).
    """
    branches = ("uncond", "cond") if guidance > 1.0 else ("cond",)
    idx, counts = window_counts(windows)
    on_device = WindowIndexCache(idx, counts)

    def model(x: torch.Tensor, t: int) -> torch.Tensor:
        # x (1, c, N, h, w) -> guided prediction (1, c, N, h, w)
        sums = torch.zeros((len(branches),) + x.shape[1:], dtype=x.dtype, device=x.device)
        dev_idx, dev_counts = on_device(x)
        for s in range(0, len(idx), window_batch):
            host = idx[s:s + window_batch]
            group = dev_idx[s:s + window_batch]
            x_win = torch.cat([x[:, :, w] for w in group])
            pred = unet_step(x_win, t, host, branches)
            pred = pred.view(len(branches), len(group), *pred.shape[1:])
            for j, w in enumerate(group):
                sums.index_add_(2, w, pred[:, j])
            if on_windows is not None:
                on_windows(len(group))
        sums = sums / dev_counts.view(1, 1, -1, 1, 1)
        if len(branches) == 1:
            return sums[0:1]
        uncond, cond = sums[0:1], sums[1:2]
        return uncond + guidance * (cond - uncond)

    return model
