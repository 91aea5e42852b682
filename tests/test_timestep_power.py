"""`SampleOptions.timestep_power` / `--timestep-power`: power-spaced timesteps, the
schedule every sampler runs on them, checked against diffusers' DPMSolverMultistepScheduler given
the same timesteps, and the options, CLI, pipeline and eval that carry the option."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from aa_trt.cli import build_parser, main
from aa_trt.config import SchedulerConfig
from aa_trt.errors import OptionError
from aa_trt.options import SampleOptions
from aa_trt.sampling import SAMPLERS, _trailing, ddim_schedule, power_timesteps, sampling_schedule

MOORE = SchedulerConfig()
NO_ZERO_SNR = SchedulerConfig(beta_schedule="scaled_linear", rescale_betas_zero_snr=False,
                              prediction_type="epsilon", timestep_spacing="leading")
REL = 5e-6  # as tests/test_samplers.py: float64 coefficients here, float32 in diffusers


@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 20, 50, 100, 333, 999, 1000])
def test_power_timesteps_are_whole_distinct_and_decreasing(power, steps):
    ts = power_timesteps(1000, steps, power)
    assert len(ts) == steps and ts[0] == 999 and ts[-1] >= 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps == 1000:
        assert ts == tuple(range(999, -1, -1))


def test_power_one_is_trailing_and_power_two_is_on_the_ddim_100_grid():
    for steps in range(1, 101):  # the same points; trailing's arange may round a .5 the other way
        ours, trailing = np.array(power_timesteps(1000, steps, 1.0)), _trailing(1000, steps)
        if len(trailing) != steps:  # diffusers' float arange gives 61 steps 62 timesteps: kept in ddim
            continue
        assert np.abs(ours - trailing).max() <= 1, steps
        if 1000 % steps == 0:
            assert tuple(ours) == tuple(int(t) for t in trailing), steps
    ts = power_timesteps(1000, 10, 2.0)
    assert ts == (999, 809, 639, 489, 359, 249, 159, 89, 39, 9)
    assert set(ts) <= set(ddim_schedule(MOORE, 100).timesteps)


def test_schedule_without_a_power_is_ddims_and_with_one_steps_to_the_next():
    for steps in (1, 3, 10, 20):
        a, b = sampling_schedule(MOORE, steps), ddim_schedule(MOORE, steps)
        assert (a.timesteps, a.prev_timesteps, a.final_alpha_cumprod) == (b.timesteps, b.prev_timesteps, b.final_alpha_cumprod)
    s = sampling_schedule(MOORE, 4, 2.0)
    assert s.timesteps == (999, 561, 249, 61)
    assert s.prev_timesteps == (561, 249, 61, -1) and s.alpha(-1) == 1.0
    s = sampling_schedule(SchedulerConfig(set_alpha_to_one=False), 4, 2.0)
    assert s.alpha(-1) == pytest.approx(float(s.alphas_cumprod[0]))
    with pytest.raises(OptionError):
        sampling_schedule(MOORE, 1001, 2.0)


def _diffusers(cfg: SchedulerConfig, order: int) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr, timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset, solver_order=order, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")


def _model(seed: int):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 4, generator=g) * 0.5, torch.randn(1, 4, 1, 1, 1, generator=g) * 0.1
    return lambda x, t: torch.einsum("ij,bjfhw->bifhw", w, x) * (1 + t / 1000) + b


def _against_diffusers(sampler, cfg, order, steps, power):
    ts = power_timesteps(cfg.num_train_timesteps, steps, power)
    ref = _diffusers(cfg, order)
    ref.set_timesteps(timesteps=list(ts))
    assert ref.timesteps.tolist() == list(ts)
    model = _model(steps)
    x0 = torch.randn(1, 4, 3, 5, 5, generator=torch.Generator().manual_seed(7 + steps))
    ours = SAMPLERS[sampler](model, x0.clone(), sampling_schedule(cfg, steps, power), disable=True)
    x = x0.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, int(t)), t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert torch.isfinite(ours).all()
    assert float((ours - x).abs().max()) <= REL * scale, (ours - x).abs().max() / scale
    return ours


@pytest.mark.parametrize("cfg", [MOORE, NO_ZERO_SNR])
@pytest.mark.parametrize("steps,power", [(4, 2.0), (10, 2.0), (10, 3.0), (7, 1.5), (20, 2.0)])
def test_dpmpp_2m_on_power_timesteps_matches_diffusers(cfg, steps, power):
    ours = _against_diffusers("dpmpp_2m", cfg, 2, steps, power)
    uniform = SAMPLERS["dpmpp_2m"](_model(steps), torch.randn(1, 4, 3, 5, 5, generator=torch.Generator().manual_seed(
        7 + steps)), sampling_schedule(cfg, steps), disable=True)
    assert float((ours - uniform).abs().max()) > 1e-3  # the spacing changed the result


@pytest.mark.parametrize("steps,power", [(4, 2.0), (10, 2.0), (10, 3.0), (20, 2.0)])
def test_ddim_on_power_timesteps_is_first_order_dpm_solver(steps, power):
    # DPM-Solver++ of order 1 is DDIM (Lu et al. 2022); without zero terminal SNR diffusers'
    # 2**-24 terminal does not enter, so its order-1 solver on the same timesteps is the oracle.
    _against_diffusers("ddim", NO_ZERO_SNR, 1, steps, power)


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf"), 10.5, True, "2"])
def test_timestep_power_refused(bad):
    with pytest.raises(OptionError) as e:
        SampleOptions(timestep_power=bad)
    assert e.value.param == "timestep_power"


def test_cli_flag_reaches_the_options_and_bad_values_are_one_line(capsys):
    from aa_trt.commands.run import run_options

    args = build_parser().parse_args(["run", "r.png", "d.mp4", "-o", "o.mp4", "--timestep-power", "2"])
    opts = run_options(args)
    assert opts.sample.timestep_power == 2.0
    assert build_parser().parse_args(["eval", "--ckpt", "c", "--data", "d", "--timestep-power", "3"]).timestep_power == 3.0
    rc = main(["run", "r.png", "d.mp4", "-o", "o.mp4", "--timestep-power", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--timestep-power" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from aa_trt.training.synthetic import synthesize
    from helpers import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("timestep_power")
    synthesize(root / "data", videos=5, size=64, frames=4, seed=3, formats=("npz",), progress=False)
    return save_tiny_checkpoint(root / "tiny.safetensors"), root / "data"


def test_pipeline_runs_the_power_timesteps(tiny):
    from aa_trt.pipeline import Animator

    anim = Animator.from_pretrained(tiny[0])
    rng = np.random.default_rng(1)
    from PIL import Image

    ref = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cond = anim.prepare(ref, poses, 32, 32)
    noise = anim.initial_latents(cond, 0)
    seen = {}
    out = {}
    for power in (None, 2.0):
        seen[power] = []
        with torch.no_grad():
            out[power] = anim.denoise(cond, noise.clone(), steps=4, guidance=1.0, timestep_power=power,
                                      callback=lambda d: seen[power].append(d["t"]), progress=False)
    T = anim.config.scheduler.num_train_timesteps
    assert tuple(seen[None]) == ddim_schedule(anim.config.scheduler, 4).timesteps
    assert tuple(seen[2.0]) == power_timesteps(T, 4, 2.0)
    assert float((out[None] - out[2.0]).abs().max()) > 0


def test_eval_reports_the_power_and_scores_against_the_default_spacing(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "eval.json"
    common = ["eval", "--ckpt", str(ckpt), "--data", str(data), "--frames", "3", "--splits", "test_motions",
              "--videos", "1", "--no-baselines", "--quiet", "--guidance", "3.5", "-o", str(out)]
    assert main(common + ["--steps", "3", "--agreement-steps", "3"]) == 0
    assert "timestep_power" not in json.loads(out.read_text())
    assert main(common + ["--steps", "3", "--timestep-power", "2", "--agreement-steps", "3",
                          "--guidance-interval", "0,500"]) == 0
    r = json.loads(out.read_text())
    assert r["timestep_power"] == 2.0 and r["agreement"] == {"sampler": "ddim", "steps": 3}
    assert r["unet_evaluations"] == 1 + 2 + 2  # 999, 443, 110: CFG at the last two
    assert r["splits"]["test_motions"]["mean"]["agreement"]["psnr"] < 100.0
