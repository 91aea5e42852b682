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

import math
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


def _check_steps(cfg: SchedulerConfig, steps: int) -> int:
    """The training timesteps T, once steps is known to lie in 1..T."""
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise OptionError("steps", steps, f"must be in 1..{T} (the model's training timesteps)")
    return T


def _trailing(T: int, steps: int) -> np.ndarray:
    """diffusers' "trailing" spacing (DDIM's and DPM-Solver's alike): the last step at T - 1."""
    return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1


def ddim_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """Timesteps as diffusers' DDIMScheduler.set_timesteps spaces them, and its prev-step rule."""
    T = _check_steps(cfg, steps)
    if cfg.timestep_spacing == "trailing":
        ts = _trailing(T, steps)
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


def power_timesteps(T: int, steps: int, power: float) -> tuple[int, ...]:
    """`steps` timesteps t_i = round(T (1 - i / steps)^power) - 1, i = 0..steps - 1: the first at
    T - 1 (where sampling starts), power 1 trailing's spacing (a .5 may round the other way), power > 1 smaller steps at low
    noise. Where rounding would repeat a timestep (crowded at the clean end for power > 1, at T - 1
    for power < 1), they are pushed apart, up from the end, then down from the start, so that they
    stay whole, distinct, decreasing and within 0..T - 1."""
    ts = [int(round(T * (1 - i / steps) ** power)) - 1 for i in range(steps)]
    ts[-1] = max(ts[-1], 0)
    for i in range(steps - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    ts[0] = T - 1
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return tuple(ts)


def sampling_schedule(cfg: SchedulerConfig, steps: int, power: float | None = None) -> DDIMSchedule:
    """The schedule the samplers run. power None: the checkpoint's spacing with diffusers'
    DDIMScheduler rules (ddim_schedule; Moore-exact). A number: power_timesteps, each step from
    one timestep to the next and the last to the clean sample (alpha_bar 1). Why: with trailing
    spacing almost all of a 10-step render's distance from the converged one is made by its last
    step (t 99 -> clean; docs/samplers.md, "Power-spaced timesteps"); power 2 shrinks it to 9."""
    if power is None:
        return ddim_schedule(cfg, steps)
    T = _check_steps(cfg, steps)
    ts = power_timesteps(T, steps, power)
    final = 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod(cfg)[0])
    return DDIMSchedule(ts, ts[1:] + (-1,), alphas_cumprod(cfg), final, cfg.prediction_type)


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


# ---------------------------------------------------------------------------------- DPM-Solver++
# diffusers' DPMSolverMultistepScheduler keeps the zero-SNR terminal alpha_bar at 2**-24 (the
# smallest fp16 subnormal) instead of 0, so that its first lambda is finite; the samplers below
# do the same by default, so that they match it. Their update is written in ratios that stay
# finite at alpha_bar = 0 too (lambda = -inf there: the step from it is DDIM's, and a multistep
# correction across it vanishes), which `terminal_alpha_bar=0.0` in `solver_alphas` gives.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def dpm_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """Timesteps as diffusers' DPMSolverMultistepScheduler.set_timesteps spaces them (its default
    lambda_min_clipped = -inf). For trailing spacing (Moore's) they are DDIM's own; leading and
    linspace space steps + 1 points and drop the last. prev_timesteps: the next timestep, -1 (the
    clean end, alpha_bar = 1, diffusers' final_sigmas_type="zero") after the last."""
    T = _check_steps(cfg, steps)
    if cfg.timestep_spacing == "trailing":
        ts = _trailing(T, steps)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r}: expected trailing/leading/linspace")
    ts = tuple(int(t) for t in ts)
    return DDIMSchedule(ts, ts[1:] + (-1,), alphas_cumprod(cfg), 1.0, cfg.prediction_type)


def solver_alphas(schedule: DDIMSchedule, terminal_alpha_bar: float = ZERO_SNR_ALPHA_BAR) -> list[float]:
    """alpha_bar at each step's timestep, then 1.0 (the clean end): len(schedule) + 1 values. A
    multistep solver steps from each timestep to the next one, whatever `prev_timesteps` says
    (DDIM's rule t - T // steps is DDIM's alone); alpha_bar = 0 becomes `terminal_alpha_bar`."""
    return [max(float(schedule.alphas_cumprod[t]), terminal_alpha_bar) for t in schedule.timesteps] + [1.0]


def _lambda(ab: float) -> float:
    """log(alpha / sigma) = log-SNR / 2 at alpha_bar = ab (-inf at 0, +inf at 1)."""
    if ab <= 0.0:
        return -math.inf
    if ab >= 1.0:
        return math.inf
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def _dpmpp_coefficients(abs_: list[float], i: int, order: int) -> tuple[float, list[float]]:
    """DPM-Solver++ (data prediction, Lu et al. 2022, arXiv 2211.01095) multistep update from
    step i's point to step i + 1's: x_next = c_x * x + sum_j c[j] * x0_j, x0_0 the newest data
    prediction, x0_1, x0_2 the earlier ones (order 1, 2, 3). Order 2 is the midpoint form, order
    3 the form of Lu et al. 2022's Algorithm (diffusers' solver_type="midpoint" for 2M, its one
    3M). Written with ratios that stay finite where alpha_bar is 0 (lambda = -inf) or 1."""
    a_t, s_t = math.sqrt(abs_[i + 1]), math.sqrt(1.0 - abs_[i + 1])
    a_0, s_0 = math.sqrt(abs_[i]), math.sqrt(1.0 - abs_[i])
    c_x = s_t / s_0
    phi1 = a_t - c_x * a_0                # alpha_t (1 - e^-h), h = lambda_t - lambda_s0
    if order == 1:
        return c_x, [phi1]
    lam_t, lam_0, lam_1 = _lambda(abs_[i + 1]), _lambda(abs_[i]), _lambda(abs_[i - 1])
    h, h0 = lam_t - lam_0, lam_0 - lam_1
    inv_r0 = h / h0                       # 0 where the earlier point is at lambda = -inf
    if order == 2:
        # x = c_x x + phi1 D0 + phi1 / 2 D1, D1 = (x0_0 - x0_1) / r0
        d1 = 0.5 * phi1 * inv_r0
        return c_x, [phi1 + d1, -d1]
    lam_2 = _lambda(abs_[i - 2])
    h1 = lam_1 - lam_2
    r0, r1 = h0 / h, h1 / h
    em = math.expm1(-h)                   # e^-h - 1
    phi2 = a_t * (em / h + 1.0)
    phi3 = a_t * ((em + h) / h**2 - 0.5)
    # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
    # D2 = (D1_0 - D1_1) / (r0 + r1); x = c_x x + phi1 D0 + phi2 D1 - phi3 D2
    inv_r1 = 1.0 / r1
    w = r0 / (r0 + r1) if math.isfinite(r1) else 0.0
    inv_s = 1.0 / (r0 + r1)
    k0 = phi2 * (1 + w) - phi3 * inv_s    # coefficient of D1_0
    k1 = -phi2 * w + phi3 * inv_s         # coefficient of D1_1
    c0 = phi1 + k0 * inv_r0
    c1 = -k0 * inv_r0 + k1 * inv_r1
    c2 = -k1 * inv_r1
    return c_x, [c0, c1, c2]


def _multistep_order(i: int, n: int, order: int) -> int:
    """The order of step i of n: as diffusers with lower_order_final and final_sigmas_type "zero",
    first order on the first step and on the last (to alpha_bar = 1), at most second order on
    the one before the last when there are fewer than 15 steps, and never more history than
    there is."""
    if i == n - 1:
        return 1
    k = min(order, i + 1)
    if i == n - 2 and n < 15:
        k = min(k, 2)
    return k


def _sample_dpmpp(order: int, model, x, schedule, extra_args, callback, disable, start, carry):
    extra_args = extra_args or {}
    abs_ = solver_alphas(schedule)
    n = len(schedule)
    # carry: the earlier data predictions a multistep step needs, newest first
    history = [carry[f"x0_{j}"] for j in range(1, order) if carry and f"x0_{j}" in carry]
    need = min(start, order - 1)
    if len(history) < need:
        raise ValueError(f"resuming at step {start} needs carry x0_1..x0_{need} (the earlier data predictions)")
    history = history[:need]
    for i in tqdm(range(start, n), desc="denoise", unit="step", disable=disable):
        t = schedule.timesteps[i]
        pred = model(x, t, **extra_args)
        x0, _ = predict_x0_eps(x, pred, abs_[i], schedule.prediction_type)
        k = _multistep_order(i, n, order)
        c_x, c = _dpmpp_coefficients(abs_, i, k)
        terms = [x0] + history[:k - 1]
        x_next = c_x * x
        for cj, xj in zip(c, terms):
            x_next = x_next + cj * xj
        x = x_next
        history = ([x0] + history)[:order - 1]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred": pred,
                      "carry": {f"x0_{j + 1}": h for j, h in enumerate(history)}})
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, schedule: DDIMSchedule, extra_args=None,
                    callback: Callable | None = None, disable: bool | None = None, *, start: int = 0,
                    carry: dict | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (data prediction, midpoint form): one model call a step,
    stepping between the schedule's timesteps and from the last to the clean end. carry:
    {"x0_1": the previous step's data prediction} (none before the first step)."""
    return _sample_dpmpp(2, model, x, schedule, extra_args, callback, disable, start, carry)


@torch.no_grad()
def sample_dpmpp_3m(model: Callable, x: torch.Tensor, schedule: DDIMSchedule, extra_args=None,
                    callback: Callable | None = None, disable: bool | None = None, *, start: int = 0,
                    carry: dict | None = None) -> torch.Tensor:
    """DPM-Solver++(3M), Lu et al. 2022: as 2M with the two previous data predictions (carry
    "x0_1", "x0_2")."""
    return _sample_dpmpp(3, model, x, schedule, extra_args, callback, disable, start, carry)


# The samplers by name (SampleOptions.sampler), each with the signature above. sample_dpmpp_3m is
# not among them: measured on the embedded model (docs/samplers.md) it is within 0.03 dB of 2M at
# CFG 1.0 and far worse at CFG 3.5, so it has not earned a name users can pick.
SAMPLERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}
