"""Feature reuse across steps (aa_trt.feature_reuse, UNet `deep=`): a shallow call is the whole
network with the deep features substituted (the oracle: a hook on the full network); with every
step whole the reuse path equals the plain one exactly; windows, CFG, the guidance interval, resume
and 2 ranks give what the single-process reuse gives; engines refuse it in one line; the UNet
FLOPs counted on the meta device equal those counted on the real call; `--fast` and the summary."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from aa_trt import fused
from aa_trt.config import PRESETS, UNetConfig
from aa_trt.errors import OptionError
from aa_trt.flop_count import UNetCost, count_flops
from aa_trt.models.layers import ReferenceState
from aa_trt.models.unet import DeepFeatures, UNet
from aa_trt.options import FAST_PRESETS, SampleOptions
from aa_trt.pipeline import Animator
from helpers import randomize_, save_tiny_checkpoint, threaded_ranks

# Three levels (so that depths 1 and 2 both exist), motion modules, attention at the outer two.
THREE = UNetConfig(block_out_channels=(16, 32, 32), down_block_attention=(True, True, False),
                   layers_per_block=1, num_heads=2, cross_attention_dim=16, norm_num_groups=8)
MOTION = dataclasses.replace(PRESETS["tiny"].motion, norm_num_groups=8)
FRAMES = 3


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return randomize_(UNet(THREE, MOTION), seed=4).eval().requires_grad_(False)


def _inputs(seed: int, rows: int = 2 * FRAMES, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, size, size, generator=g)
    ctx = torch.randn(rows // FRAMES, 1, 16, generator=g)
    pose = torch.randn(rows, 16, size, size, generator=g) * 0.1
    return x, ctx, pose


def _call(unet, x, ctx, pose, t=321, deep=None):
    with torch.no_grad():
        return unet(x, t, ctx, frames=FRAMES, pose=pose, deep=deep)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_whole_call_records_the_input_of_the_first_reused_up_block_and_changes_nothing(unet, depth):
    x, ctx, pose = _inputs(1)
    seen = {}
    hook = unet.up_blocks[len(unet.up_blocks) - depth].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("h", args[0].clone()))
    try:
        deep = DeepFeatures(depth)
        out = _call(unet, x, ctx, pose, deep=deep)
    finally:
        hook.remove()
    assert torch.equal(out, _call(unet, x, ctx, pose))
    assert torch.equal(deep.features, seen["h"]) and deep.features.shape[0] == x.shape[0]


@pytest.mark.parametrize("depth", [1, 2])
def test_a_shallow_call_is_the_whole_network_with_the_deep_features_substituted(unet, depth):
    # the oracle: the plain whole network, its first reused up block fed the given features
    x, ctx, pose = _inputs(2)
    old = DeepFeatures(depth)
    _call(unet, *_inputs(3), t=654, deep=old)  # features of another step's input
    features = old.features
    first = unet.up_blocks[len(unet.up_blocks) - depth]
    hook = first.register_forward_pre_hook(lambda m, args: (features,) + tuple(args[1:]))
    try:
        expected = _call(unet, x, ctx, pose)
    finally:
        hook.remove()
    shallow = _call(unet, x, ctx, pose, deep=DeepFeatures(depth, features))
    assert torch.allclose(shallow, expected, atol=1e-6, rtol=0), (shallow - expected).abs().max()
    assert not torch.allclose(shallow, _call(unet, x, ctx, pose), atol=1e-3)  # the features matter


def test_depth_outside_the_network_is_refused(unet):
    with pytest.raises(ValueError, match="depth 3"):
        _call(unet, *_inputs(1), deep=DeepFeatures(3))


@pytest.mark.parametrize("shallow", [False, True])
def test_flops_counted_on_the_meta_device_equal_the_real_call(unet, shallow):
    x, ctx, pose = _inputs(5)
    depth = 1
    deep = DeepFeatures(depth)
    _call(unet, x, ctx, pose, deep=deep)
    given = DeepFeatures(depth, deep.features) if shallow else DeepFeatures(depth)
    with fused.plain():
        real, _ = count_flops(lambda: _call(unet, x, ctx, pose, deep=given))
    cost = UNetCost(SimpleNamespace(unet=THREE, motion=MOTION))
    cost.add(x, ctx, pose, ReferenceState(), FRAMES, given, shallow)
    assert real > 0 and (cost.shallow if shallow else cost.full) == real
    assert (cost.full, cost.shallow)[not shallow] == 0


# ------------------------------------------------------------------------------ the denoise path
N_FRAMES = 10
BASE = dict(steps=5, guidance=3.5, context_frames=8, context_overlap=2, seed=0)


@pytest.fixture(scope="module")
def anim(tmp_path_factory):
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("reuse") / "tiny.safetensors", 300)
    a = Animator.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cond = a.prepare(ref, rng.integers(0, 255, (N_FRAMES, 64, 64, 3), dtype=np.uint8))
    return a, cond, a.initial_latents(cond, 0)


def _denoise(a, cond, latents, **kw):
    return a.run_denoise(cond, latents, a.sample_options(**{**BASE, **kw}), progress=False)


def test_every_step_whole_equals_the_plain_path(anim, monkeypatch):
    a, cond, lat = anim
    plain = _denoise(a, cond, lat, steps=3)
    plain_cost = a.unet_cost.full
    monkeypatch.setattr(SampleOptions, "full_step", lambda self, i: True)
    reused = _denoise(a, cond, lat, steps=3, reuse_every=2)
    assert torch.equal(reused, plain)
    assert a.unet_cost.full == plain_cost and a.unet_cost.shallow == 0


def test_reuse_runs_shallow_steps_between_whole_ones(anim):
    a, cond, lat = anim
    plain = _denoise(a, cond, lat)
    plain_cost, plain_calls = a.unet_cost.total, a.unet_cost.full_calls
    out = _denoise(a, cond, lat, reuse_every=2)
    c = a.unet_cost
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    # steps 0, 2, 4 whole, 1 and 3 shallow; 2 windows, both branches in one call each
    assert (c.full_calls, c.shallow_calls) == (3 * 2, 2 * 2) and c.full_calls + c.shallow_calls == plain_calls
    assert 0 < c.shallow < c.full and c.total < plain_cost


def _threaded(anim, world, mode, sample):
    """`world` ranks in threads (helpers.threaded_ranks), each an Animator on the same models with
    its plan."""
    a, cond, lat = anim

    def work(rank, reduce):
        mine = Animator(a.models, a.device, a.dtype)
        return mine.run_denoise(cond, lat, sample, progress=False, world=world, rank=rank, parallel=mode,
                                reduce=reduce)

    return threaded_ranks(world, work)


@pytest.mark.parametrize("mode", ["guidance", "window"])
def test_two_ranks_give_the_single_process_reuse(anim, mode):
    a, cond, lat = anim
    sample = a.sample_options(**BASE, reuse_every=2, guidance_interval=(200, 700))
    single = a.run_denoise(cond, lat, sample, progress=False)
    for out in _threaded(anim, 2, mode, sample):
        assert torch.allclose(out, single, atol=1e-5, rtol=0), (out - single).abs().max()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_resumed_after_any_step_equals_the_uninterrupted_run(anim, sampler):
    # 4 steps, whole at 0 and 3: resumed at a shallow step right after a whole one (1), at one
    # after another shallow step (2), and at a whole step (3)
    a, cond, lat = anim
    sample = a.sample_options(**{**BASE, "steps": 4}, sampler=sampler, reuse_every=3, guidance_interval=(100, 800))
    states = []
    whole = a.run_denoise(cond, lat, sample, progress=False, callback=states.append)
    for s in states[:-1]:
        assert {"reuse_x", "reuse_step"} <= set(s["carry"])
        out = a.run_denoise(cond, s["x"], sample, progress=False, start=s["i"] + 1, carry=dict(s["carry"]))
        assert torch.equal(out, whole), s["i"]
    with pytest.raises(ValueError, match="reuse_x"):  # a state without them cannot resume at a shallow step
        a.run_denoise(cond, states[0]["x"], sample, progress=False, start=1, carry={})


def test_a_backend_that_runs_whole_graphs_refuses_reuse_in_one_line(anim):
    a, cond, lat = anim
    engine_like = Animator(dataclasses.replace(a.models, denoising_unet=lambda *args, **kw: None), a.device, a.dtype)
    with pytest.raises(OptionError, match="reuse_every.*one whole graph"):
        engine_like.run_denoise(cond, lat, a.sample_options(**BASE, reuse_every=2), progress=False)
    # --fast there keeps its sampler and steps and drops only the feature reuse
    fast = engine_like.sample_options(guidance=3.5, fast=True)
    assert fast.reuse_every == 1 and fast.steps == FAST_PRESETS["cfg"]["steps"]
    assert fast.guidance_interval == FAST_PRESETS["cfg"]["guidance_interval"]  # whole calls: kept


# ------------------------------------------------------------------------------ options and --fast
def test_reuse_options_are_checked():
    with pytest.raises(OptionError, match="reuse_every"):
        SampleOptions(reuse_every=0)
    with pytest.raises(OptionError, match="reuse_depth"):
        SampleOptions(reuse_depth=0)
    with pytest.raises(OptionError, match="reuse_depth.*1..1"):
        SampleOptions(reuse_depth=2).resolve(PRESETS["tiny"])
    assert SampleOptions(reuse_depth=3).resolve(PRESETS["sd15"]).reuse_depth == 3


def test_fast_fills_the_defaults_by_guidance_and_explicit_fields_win():
    cfg = PRESETS["sd15"]  # declares CFG 3.5
    fast = SampleOptions(fast=True).resolve(cfg)
    assert {k: getattr(fast, k) for k in FAST_PRESETS["cfg"]} == FAST_PRESETS["cfg"] and fast.guidance == 3.5
    no_cfg = SampleOptions(fast=True, guidance=1.0).resolve(cfg)
    assert {k: getattr(no_cfg, k) for k in FAST_PRESETS["no_cfg"]} == FAST_PRESETS["no_cfg"]
    mine = SampleOptions(fast=True, steps=9, reuse_every=4).resolve(cfg)
    assert (mine.steps, mine.reuse_every, mine.timestep_power) == (9, 4, FAST_PRESETS["cfg"]["timestep_power"])
    assert fast.resolve(cfg) == fast  # resolving again changes nothing
    student = SampleOptions(fast=True).resolve(dataclasses.replace(cfg, steps=6))  # declares its own steps
    assert (student.steps, student.sampler, student.timestep_power, student.reuse_every) == (6, "ddim", None, 1)
    assert student.guidance_interval is None
    # the CFG preset's interval (written for 1000 training timesteps) follows the model's own
    short = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, num_train_timesteps=500))
    assert SampleOptions(fast=True).resolve(short).guidance_interval == (0, 300)
    assert SampleOptions(fast=True, guidance_interval=(0, 999)).resolve(cfg).guidance_interval == (0, 999)


def test_fast_cuts_the_counted_unet_flops(anim):
    # what docs/samplers.md measured on the embedded model: 0.22x DDIM-20 without CFG, 0.23x with
    # CFG 3.5; on the tiny model's proportions within a few percent of that
    a, cond, lat = anim
    for g, bound in ((1.0, 0.25), (3.5, 0.25)):
        _denoise(a, cond, lat, steps=1, guidance=g)
        default = 20 * a.unet_cost.total  # DDIM-20: 20 steps of the same whole calls
        _denoise(a, cond, lat, steps=None, guidance=g, fast=True)
        assert a.unet_cost.shallow > 0 and a.unet_cost.total <= default * bound, (g, a.unet_cost.as_dict(), default)


def test_run_summary_reports_fast_and_the_unet_tflop(tmp_path, capsys):
    from aa_trt.cli import main
    from media import make_reference, make_video, stick_frames

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors", 7)
    ref = make_reference(tmp_path / "ref.png", (64, 64))
    dance = make_video(tmp_path / "dance.mp4", stick_frames(6, (64, 64)), fps=10)
    out = tmp_path / "out.mp4"
    argv = ["run", str(ref), str(dance), "-o", str(out), "--ckpt", str(ckpt), "--pose-video", "--fast",
            "--guidance", "3.5", "--dtype", "fp32", "--seed", "1"]
    assert main(argv + ["--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fast = FAST_PRESETS["cfg"]
    lo, hi = fast["guidance_interval"]
    assert (f"--fast: {fast['sampler']} {fast['steps']} steps power {fast['timestep_power']:g}, CFG 3.5 at t "
            f"{lo}..{hi}, whole UNet every {fast['reuse_every']} steps") in line and "shallow" in line
    assert main(argv + ["--json", "--overwrite"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fast"] is True and (result["steps"], result["reuse_every"]) == (fast["steps"], fast["reuse_every"])
    t = result["unet_tflop"]
    assert t["shallow"] > 0 and t["total"] == pytest.approx(t["full"] + t["shallow"], abs=2e-4)
    # a batch: --fast for the jobs that do not say otherwise
    jobs = tmp_path / "jobs.jsonl"
    base = {"ref": str(ref), "driving": str(dance), "pose_video": True, "guidance": 3.5, "dtype": "fp32"}
    jobs.write_text(json.dumps({**base, "output": "a.mp4"}) + "\n" + json.dumps({**base, "output": "b.mp4",
                                                                                 "fast": False, "steps": 2}) + "\n")
    assert main(["batch", str(jobs), "--ckpt", str(ckpt), "--fast", "--quiet"]) == 0
    done = {json.loads(p.read_text())["result"]["output"]: json.loads(p.read_text())["result"]
            for p in (tmp_path / "jobs.jsonl.status").glob("*.json")}
    a, b = done[str(tmp_path / "a.mp4")], done[str(tmp_path / "b.mp4")]
    assert (a["fast"], a["steps"], a["reuse_every"]) == (True, fast["steps"], fast["reuse_every"])
    assert (b["fast"], b["steps"], b["reuse_every"], b["unet_tflop"]["shallow"]) == (False, 2, 1, 0)
