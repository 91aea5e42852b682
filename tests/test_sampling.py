"""DDIM against diffusers' DDIMScheduler (Moore's config), and the context-window schedules."""
import json

import pytest
import torch
from diffusers import DDIMScheduler

from aa_trt.config import SchedulerConfig
from aa_trt.guidance import (WindowIndexCache, sliding_windows, uniform_windows, window_counts,
                             windowed_guidance)
from aa_trt.sampling import alphas_cumprod, ddim_schedule, ddim_step, sample_ddim
from helpers import FIXTURE, needs_fixture

MOORE = SchedulerConfig()  # inference_v2: linear, v_prediction, zero-SNR, trailing


def _diffusers(cfg: SchedulerConfig, **kw) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                         timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset,
                         clip_sample=False, set_alpha_to_one=cfg.set_alpha_to_one, **kw)


CONFIGS = [MOORE,
           SchedulerConfig(beta_schedule="scaled_linear", rescale_betas_zero_snr=False,
                           prediction_type="epsilon", timestep_spacing="leading"),
           SchedulerConfig(timestep_spacing="linspace", prediction_type="v_prediction")]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 3, 20, 25, 30, 50])
def test_timesteps_and_alphas_match_diffusers(cfg, steps):
    ref = _diffusers(cfg)
    ref.set_timesteps(steps)
    ours = ddim_schedule(cfg, steps)
    assert list(ours.timesteps) == ref.timesteps.tolist()
    assert torch.allclose(alphas_cumprod(cfg), ref.alphas_cumprod, atol=1e-6, rtol=0)


def test_zero_terminal_snr():
    assert alphas_cumprod(MOORE)[-1].item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [3, 20])
def test_ddim_loop_matches_diffusers(cfg, steps):
    ref = _diffusers(cfg)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(1, 4, 5, 6, 6, generator=g)
    w = torch.randn(4, 4, generator=g) * 0.5

    def model(x, t):  # a deterministic, input-dependent stand-in for the UNet
        return torch.einsum("ij,bjfhw->bifhw", w, x) * (1 + t / 1000)

    ours = sample_ddim(model, x0.clone(), ddim_schedule(cfg, steps), disable=True)
    x = x0.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, int(t)), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5), (ours - x).abs().max()


@needs_fixture
def test_fixture_step_rule():
    # diffusers steps from t to t - T // steps: 3 steps run the UNet at 332 after stepping to 333.
    info = json.loads((FIXTURE / "timesteps.json").read_text())
    s = ddim_schedule(MOORE, 3)
    assert list(s.timesteps) == info["timesteps"]
    assert list(s.prev_timesteps) == [st["prev_t"] for st in info["steps"]]
    for st in info["steps"]:
        assert s.alpha(st["t"]) == pytest.approx(st["alpha_cumprod_t"], abs=1e-6)
        assert s.alpha(st["prev_t"]) == pytest.approx(st["alpha_cumprod_prev"], abs=1e-6)


def test_ddim_step_v_prediction_formula():
    x, v = torch.randn(10), torch.randn(10)
    a_t, a_p = 0.3, 0.7
    x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * v
    eps = a_t**0.5 * v + (1 - a_t) ** 0.5 * x
    assert torch.allclose(ddim_step(x, v, a_t, a_p, "v_prediction"), a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps)


# ------------------------------------------------------------------------------ windows
@needs_fixture
def test_uniform_windows_match_moore_fixture():
    w = json.loads((FIXTURE / "windows.json").read_text())
    assert uniform_windows(30, 24, 4) == [list(range(24)), list(range(20, 30)) + list(range(14))]
    assert uniform_windows(30, 24, 4) == w["windows"]


@pytest.mark.parametrize("n", [1, 5, 24, 25, 30, 48, 100, 481])
@pytest.mark.parametrize("size,overlap", [(24, 4), (16, 8), (12, 0)])
def test_window_schedules_cover_every_frame(n, size, overlap):
    for windows in (uniform_windows(n, size, overlap), sliding_windows(n, size, overlap)):
        covered = sorted({i for w in windows for i in w})
        assert covered == list(range(n))
        assert all(len(w) == min(n, size) for w in windows)
    sl = sliding_windows(n, size, overlap)
    assert all(w == list(range(w[0], w[0] + len(w))) for w in sl)  # never wraps
    assert sl[-1][-1] == n - 1
    if n > size:  # consecutive windows overlap by at least `overlap` frames
        assert all(a[-1] - b[0] + 1 >= overlap for a, b in zip(sl, sl[1:]))


def test_uniform_windows_moore_formula():
    # Moore: start every size - overlap frames, indices mod n, closed loop.
    assert [w[0] for w in uniform_windows(48, 24, 4)] == [0, 20, 40]
    assert uniform_windows(48, 24, 4)[-1] == [i % 48 for i in range(40, 64)]
    assert [w[0] for w in uniform_windows(48, 24, 4, closed_loop=False)] == [0, 20, 40]
    assert [w[0] for w in uniform_windows(44, 24, 4, closed_loop=False)] == [0, 20]


@pytest.mark.parametrize("guidance", [1.0, 3.5])
@pytest.mark.parametrize("window_batch", [1, 2, 3])
def test_windowed_guidance_averages_then_guides(guidance, window_batch):
    n, windows = 30, uniform_windows(30, 12, 4)
    x = torch.randn(1, 2, n, 3, 3)
    calls = []

    def step(x_win, t, wins, branches):
        calls.append(branches)
        # distinct per branch and per window position, so any mix-up shows
        outs = [x_win * (2.0 if b == "cond" else -1.0) + torch.tensor(
            [[float(i) for i in w] for w in wins]).view(len(wins), 1, -1, 1, 1) for b in branches]
        return torch.cat(outs)

    got = windowed_guidance(step, windows, guidance, window_batch)(x, 999)
    counts = torch.zeros(n)
    sums = {b: torch.zeros_like(x) for b in ("uncond", "cond")}
    for w in windows:
        idx = torch.tensor(w)
        counts[idx] += 1
        for b, s in (("uncond", -1.0), ("cond", 2.0)):
            sums[b][:, :, idx] += x[:, :, idx] * s + idx.float().view(1, 1, -1, 1, 1)
    avg = {b: v / counts.view(1, 1, -1, 1, 1) for b, v in sums.items()}
    want = avg["cond"] if guidance <= 1 else avg["uncond"] + guidance * (avg["cond"] - avg["uncond"])
    assert torch.allclose(got, want, atol=1e-6)
    assert all(c == (("cond",) if guidance <= 1 else ("uncond", "cond")) for c in calls)
    assert len(calls) == -(-len(windows) // window_batch)


def test_window_index_cache_copies_once_per_device_and_dtype():
    """The window indices and counts are converted once per (device, dtype) and then reused: the
    same tensor objects come back, equal to the host ones (on CUDA this spares a blocking copy from
    pageable memory per window and step)."""
    idx, counts = window_counts(uniform_windows(30, 12, 4))
    cache = WindowIndexCache(idx, counts)
    x32, x64 = torch.randn(1, 2, 30, 3, 3), torch.randn(1, 2, 30, 3, 3, dtype=torch.float64)
    dev_idx, dev_counts = cache(x32)
    again_idx, again_counts = cache(x32.clone())
    assert again_counts is dev_counts and all(a is b for a, b in zip(again_idx, dev_idx))
    assert dev_counts.dtype == torch.float32 and torch.equal(dev_counts.double(), counts.double())
    assert all(torch.equal(a, b) for a, b in zip(dev_idx, idx))
    assert cache(x64)[1].dtype == torch.float64 and cache(x64)[1] is not dev_counts
