"""The samplers beyond DDIM: DPM-Solver++(2M/3M) against diffusers'
DPMSolverMultistepScheduler on the same schedule, resumption (start, carry) bit for bit, the
guidance interval (windowed_guidance) on one and several ranks, and the options/CLI/eval that
select them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from aa_trt.cli import build_parser, main
from aa_trt.config import SchedulerConfig
from aa_trt.errors import OptionError
from aa_trt.guidance import make_plan, uniform_windows, windowed_guidance
from aa_trt.options import SampleOptions
from aa_trt.sampling import (SAMPLERS, _dpmpp_coefficients, ddim_schedule, ddim_step, dpm_schedule,
                             sample_dpmpp_3m, solver_alphas)
from helpers import threaded_ranks

MOORE = SchedulerConfig()  # inference_v2: linear 0.00085..0.012, v_prediction, zero-SNR, trailing
CONFIGS = [MOORE,
           SchedulerConfig(beta_schedule="scaled_linear", rescale_betas_zero_snr=False,
                           prediction_type="epsilon", timestep_spacing="leading"),
           SchedulerConfig(timestep_spacing="linspace", prediction_type="v_prediction")]
ORDERS = {"dpmpp_2m": 2, "dpmpp_3m": 3}
# 3M is checked but not registered (it did not earn a name: docs/samplers.md)
SOLVERS = {**SAMPLERS, "dpmpp_3m": sample_dpmpp_3m}
# float32 latents, coefficients in float64 (ours) or float32 (diffusers): the measured max |diff|
# is at most 7e-7 of max |x| (|x| up to 340 where the stand-in model grows it); the bound, relative
# to the largest value, leaves a factor ~7.
REL = 5e-6


def _diffusers(cfg: SchedulerConfig, order: int) -> DPMSolverMultistepScheduler:
    # final_sigmas_type="zero": the last step lands on the clean sample, as Moore's DDIM does
    # with set_alpha_to_one; with rescale_betas_zero_snr diffusers keeps alpha_bar[-1] = 2**-24.
    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr, timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset, solver_order=order, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")


def _fixed_model(seed: int):
    """A deterministic, input- and t-dependent stand-in for the UNet (never zero)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) * 0.5
    b = torch.randn(1, 4, 1, 1, 1, generator=g) * 0.1

    def model(x, t):
        return torch.einsum("ij,bjfhw->bifhw", w, x) * (1 + t / 1000) + b

    return model


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 10, 20, 25])
def test_dpm_timesteps_match_diffusers(cfg, steps):
    ref = _diffusers(cfg, 2)
    ref.set_timesteps(steps)
    assert list(dpm_schedule(cfg, steps).timesteps) == ref.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 3, 4, 20, 30])
def test_moore_dpm_timesteps_are_ddims(steps):
    # The pipeline hands every sampler ddim_schedule(); for trailing spacing (Moore's) that is the
    # very schedule diffusers' DPM-Solver uses, so the solver runs on diffusers' timesteps.
    assert dpm_schedule(MOORE, steps).timesteps == ddim_schedule(MOORE, steps).timesteps


@pytest.mark.parametrize("name", list(ORDERS))
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 10, 20, 25])
def test_dpmpp_matches_diffusers(name, cfg, steps):
    ref = _diffusers(cfg, ORDERS[name])
    ref.set_timesteps(steps)
    model = _fixed_model(steps)
    x0 = torch.randn(1, 4, 5, 6, 6, generator=torch.Generator().manual_seed(100 + steps))
    ours = SOLVERS[name](model, x0.clone(), dpm_schedule(cfg, steps), disable=True)
    x = x0.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, int(t)), t, x).prev_sample
    assert torch.isfinite(ours).all()
    scale = max(1.0, float(x.abs().max()))
    assert float((ours - x).abs().max()) <= REL * scale, (ours - x).abs().max() / scale
    if steps >= 3:  # a real multistep method: not DDIM in disguise
        ddim = SAMPLERS["ddim"](model, x0.clone(), ddim_schedule(cfg, steps), disable=True)
        assert float((ddim - x).abs().max()) > 100 * REL * scale


def test_first_step_at_zero_snr_is_finite_and_ddims():
    """At alpha_bar = 0 (the zero-SNR first step) the data-prediction update is DDIM's step, with
    the terminal kept at diffusers' 2**-24 or at exactly 0; a multistep term across lambda = -inf
    vanishes instead of dividing by zero."""
    s = ddim_schedule(MOORE, 10)
    assert float(s.alphas_cumprod[s.timesteps[0]]) == 0.0
    x, v = torch.randn(50), torch.randn(50)
    for terminal in (2.0**-24, 0.0):
        abs_ = solver_alphas(s, terminal)
        c_x, (c0,) = _dpmpp_coefficients(abs_, 0, 1)
        a0 = abs_[0]
        x0 = a0**0.5 * x - (1 - a0) ** 0.5 * v
        want = ddim_step(x, v, a0, abs_[1], "v_prediction")
        assert torch.allclose(c_x * x + c0 * x0, want, atol=1e-6)
    exact = solver_alphas(s, 0.0)
    c_x, c = _dpmpp_coefficients(exact, 1, 2)
    assert all(math.isfinite(v) for v in (c_x, *c)) and c[1] == 0.0  # no term from the terminal
    c_x, c = _dpmpp_coefficients(exact, 2, 3)
    assert all(math.isfinite(v) for v in (c_x, *c)) and c[2] == 0.0
    # and the last step lands on the data prediction itself
    assert _dpmpp_coefficients(exact, 9, 1) == (0.0, [1.0])


# ------------------------------------------------------------------------------ resumption
@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("steps", [4, 10])
def test_resume_from_any_step_is_bit_identical(name, steps):
    model = _fixed_model(7)
    sched = ddim_schedule(MOORE, steps)
    x0 = torch.randn(1, 4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    seen = []
    full = SOLVERS[name](model, x0.clone(), sched, callback=seen.append, disable=True)
    assert [s["i"] for s in seen] == list(range(steps))
    assert [s["t"] for s in seen] == list(sched.timesteps)
    assert torch.equal(seen[-1]["x"], full)
    for s in seen[:-1]:
        assert all(isinstance(v, torch.Tensor) for v in s["carry"].values())
        again = SOLVERS[name](model, s["x"].clone(), sched, start=s["i"] + 1,
                               carry={k: v.clone() for k, v in s["carry"].items()}, disable=True)
        assert torch.equal(again, full), (name, s["i"])
    if name != "ddim":
        assert set(seen[1]["carry"]) == {f"x0_{j}" for j in range(1, ORDERS[name])}
        with pytest.raises(ValueError, match="carry"):
            SOLVERS[name](model, seen[2]["x"], sched, start=3, carry={}, disable=True)


# ------------------------------------------------------------------------------ options
def test_sample_options_select_a_sampler_and_refuse_unknown_names():
    assert SampleOptions(sampler="dpmpp_2m").sampler == "dpmpp_2m"
    assert set(SAMPLERS) == {"ddim", "dpmpp_2m"}
    with pytest.raises(OptionError) as e:
        SampleOptions(sampler="euler_a")
    with pytest.raises(OptionError):
        SampleOptions(sampler="dpmpp_3m")
    assert e.value.param == "sampler" and "dpmpp_2m" in str(e.value)


@pytest.mark.parametrize("bad", [(5, 1), (-1, 10), (1,), (1, 2, 3), (1.5, 3), "a,b", "7", (True, 5), 3])
def test_guidance_interval_refused(bad):
    with pytest.raises(OptionError) as e:
        SampleOptions(guidance_interval=bad)
    assert e.value.param == "guidance_interval"


def test_guidance_interval_accepted_and_checked_against_the_model():
    from aa_trt.config import PRESETS

    assert SampleOptions(guidance_interval=[200, 999]).guidance_interval == (200, 999)
    assert SampleOptions(guidance_interval=" 0,500").guidance_interval == (0, 500)
    assert SampleOptions.build(guidance_interval=(3, 3)).guidance_interval == (3, 3)
    cfg = PRESETS["tiny"]
    T = cfg.scheduler.num_train_timesteps
    SampleOptions(guidance_interval=(0, T - 1)).resolve(cfg)
    with pytest.raises(OptionError) as e:
        SampleOptions(guidance_interval=(0, T)).resolve(cfg)
    assert e.value.param == "guidance_interval"


def test_cli_flags_reach_the_sample_options(capsys):
    from aa_trt.commands.run import run_options
    from aa_trt.commands.sample_flags import sample_options

    args = build_parser().parse_args(["run", "r.png", "d.mp4", "-o", "o.mp4", "--sampler", "dpmpp_2m",
                                      "--guidance-interval", "300,999"])
    opts = run_options(args)
    assert opts.sample.sampler == "dpmpp_2m" and opts.sample.guidance_interval == (300, 999)
    e = build_parser().parse_args(["eval", "--ckpt", "c", "--data", "d", "--sampler", "dpmpp_2m",
                                   "--guidance-interval", "1,2", "--agreement-steps", "50"])
    assert (e.sampler, e.guidance_interval, e.agreement_steps) == ("dpmpp_2m", "1,2", 50)
    assert sample_options(e).guidance_interval == (1, 2)
    rc = main(["run", "r.png", "d.mp4", "-o", "o.mp4", "--guidance-interval", "9,2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--guidance-interval" in err and "Traceback" not in err
    rc = main(["run", "r.png", "d.mp4", "-o", "o.mp4", "--sampler", "nope"])
    assert rc == 2 and "--sampler nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------ guidance interval
N_FRAMES, WINDOWS = 10, uniform_windows(10, 4, 1)  # 4 windows (closed loop)


def _counting_step(calls):
    def step(x_win, t, wins, branches):
        calls.append((t, branches, len(wins)))
        outs = [x_win * (2.0 if b == "cond" else -1.0) + (t / 1000) + torch.tensor(
            [[float(i) for i in w] for w in wins]).view(len(wins), 1, -1, 1, 1) * (0.3 if b == "cond" else 0.1)
            for b in branches]
        return torch.cat(outs)
    return step


@pytest.mark.parametrize("window_batch", [1, 3])
def test_interval_covering_every_step_is_plain_cfg(window_batch):
    x = torch.randn(1, 2, N_FRAMES, 3, 3)
    plain_calls, calls = [], []
    plain = windowed_guidance(_counting_step(plain_calls), WINDOWS, 3.5, window_batch)
    full = windowed_guidance(_counting_step(calls), WINDOWS, 3.5, window_batch, interval=(0, 999))
    for t in (999, 500, 0):
        assert torch.equal(full(x, t), plain(x, t))
    assert calls == plain_calls and all(b == ("uncond", "cond") for _, b, _ in calls)


def test_interval_outside_is_the_cond_prediction_at_one_branch():
    x = torch.randn(1, 2, N_FRAMES, 3, 3)
    calls = []
    model = windowed_guidance(_counting_step(calls), WINDOWS, 3.5, 1, interval=(100, 600))
    cond_only = windowed_guidance(_counting_step([]), WINDOWS, 1.0, 1)
    guided = windowed_guidance(_counting_step([]), WINDOWS, 3.5, 1)
    for t in (999, 601, 99, 0):
        calls.clear()
        assert torch.equal(model(x, t), cond_only(x, t))
        assert [b for _, b, _ in calls] == [("cond",)] * len(WINDOWS)  # one UNet unit per window
    for t in (100, 600, 333):
        calls.clear()
        assert torch.equal(model(x, t), guided(x, t))
        assert sum(len(b) * k for _, b, k in calls) == 2 * len(WINDOWS)
    assert not torch.equal(guided(x, 999), cond_only(x, 999))  # the test can tell them apart


def _threaded_ranks(world, mode, x, ts, interval):
    """`world` ranks in threads (helpers.threaded_ranks), each with its plan: -> (predictions by
    rank, UNet units by rank)."""
    def work(rank, reduce):
        calls = []
        plan = make_plan(len(WINDOWS), world, rank, True, mode)
        model = windowed_guidance(_counting_step(calls), WINDOWS, 3.5, 1, plan=plan,
                                  reduce=reduce if world > 1 else None, interval=interval)
        return [model(x, t) for t in ts], sum(len(b) * k for _, b, k in calls)

    results = threaded_ranks(world, work, timeout=60)
    return [r[0] for r in results], [r[1] for r in results]


@pytest.mark.parametrize("world,mode", [(2, "guidance"), (3, "guidance"), (2, "window"), (3, "window")])
def test_interval_gives_the_same_prediction_on_every_plan(world, mode):
    x = torch.randn(1, 2, N_FRAMES, 3, 3)
    ts, interval = (999, 700, 300, 0), (250, 800)
    single, units1 = _threaded_ranks(1, "auto", x, ts, interval)
    many, units = _threaded_ranks(world, mode, x, ts, interval)
    for r in range(world):
        for a, b in zip(many[r], single[0]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # two guided steps (both branches), two unguided ones (cond only): 6 units per window
    assert units1[0] == 6 * len(WINDOWS) and sum(units) == units1[0]


# ------------------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from aa_trt.training.synthetic import synthesize
    from helpers import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("samplers_eval")
    synthesize(root / "data", videos=5, size=64, frames=4, seed=3, formats=("npz",), progress=False)
    return save_tiny_checkpoint(root / "tiny.safetensors"), root / "data"


def _eval(tiny_eval, tmp_path, *flags):
    ckpt, data = tiny_eval
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(data), "--frames", "3", "--splits", "test_motions",
                 "--videos", "1", "--no-baselines", "--quiet", "--guidance", "3.5", "-o", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_eval_agreement_with_the_converged_render(tiny_eval, tmp_path):
    same = _eval(tiny_eval, tmp_path, "--steps", "3", "--agreement-steps", "3")
    mean = same["splits"]["test_motions"]["mean"]
    assert set(mean) == {"model", "agreement"}
    assert mean["agreement"]["psnr"] == 100.0 and mean["agreement"]["ssim"] == pytest.approx(1.0)
    assert same["unet_evaluations"] == 3 * 2
    other = _eval(tiny_eval, tmp_path, "--steps", "2", "--sampler", "dpmpp_2m", "--agreement-steps", "3",
                  "--guidance-interval", "0,500")
    assert other["sampler"] == "dpmpp_2m" and other["guidance_interval"] == [0, 500]
    assert other["agreement"] == {"sampler": "ddim", "steps": 3}
    assert other["unet_evaluations"] == 2 + 1  # 2 steps at t = 999, 499: CFG only at the second
    assert other["splits"]["test_motions"]["mean"]["agreement"]["psnr"] < 100.0
    assert np.isfinite(other["splits"]["test_motions"]["mean"]["agreement"]["ssim"])


def test_agreement_frontier_rows(tiny_eval):
    from aa_trt.pipeline import Animator
    from aa_trt.training.evaluate import agreement_frontier

    ckpt, data = tiny_eval
    anim = Animator.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    video = {"name": "v", "ref": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "poses": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "seed": 4,
             "true": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    configs = [SampleOptions(steps=3, guidance=3.5), SampleOptions(steps=2, sampler="dpmpp_2m", guidance=3.5,
                                                                   guidance_interval=(600, 999))]
    rows = agreement_frontier(anim, [video], configs, reference_steps=3, progress=False)
    assert [r.get("reference", False) for r in rows] == [True, False, False]
    assert [r["unet_evaluations"] for r in rows] == [6, 6, 3]
    assert rows[1]["agreement"]["psnr"] == 100.0  # DDIM-3 is the reference itself
    assert rows[2]["agreement"]["psnr"] < 100.0 and "truth" in rows[2]


def test_agreement_frontier_takes_a_pil_reference_of_any_size(tiny_eval):
    # The example's reference image is read as `aa-trt run` reads it: a PIL image of its own size,
    # the output size given beside it. Same rows as the array form at that size.
    from PIL import Image

    from aa_trt.pipeline import Animator
    from aa_trt.training.evaluate import agreement_frontier

    ckpt, _ = tiny_eval
    anim = Animator.from_pretrained(ckpt)
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    configs = [SampleOptions(steps=2, guidance=1.0, timestep_power=2.0)]
    as_array = agreement_frontier(anim, [{"name": "a", "ref": arr, "poses": poses, "seed": 2, "true": None}],
                                  configs, reference_steps=3, progress=False)
    as_pil = agreement_frontier(anim, [{"name": "a", "ref": Image.fromarray(arr), "size": (32, 32),
                                        "poses": poses, "seed": 2, "true": None}],
                                configs, reference_steps=3, progress=False)
    assert as_pil[1]["agreement"]["psnr"] == pytest.approx(as_array[1]["agreement"]["psnr"], abs=1e-6)
    assert as_pil[1]["agreement"]["psnr"] < 100.0
    wide = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    rows = agreement_frontier(anim, [{"name": "w", "ref": wide, "size": (32, 32), "poses": poses, "seed": 2,
                                      "true": None}], configs, reference_steps=3, progress=False)
    assert np.isfinite(rows[1]["agreement"]["psnr"])
