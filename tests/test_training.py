"""The training companion: synthetic data, stage 1/2 steps, resume, DDP, the training forward.

Everything runs the tiny preset at 32x32 (latents 4x4) on a few synthetic videos.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aa_trt.checkpoint import build_models, load_checkpoint
from aa_trt.config import preset
from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import compute_reference_kv
from aa_trt.pose.draw import render
from aa_trt.pose.keypoints import Pose
from aa_trt.training import grad_ckpt
from aa_trt.training.loop import StepInputs, Trainer, TrainOptions, lr_factor
from aa_trt.training.stage import TrainModel, bank_parameters, is_motion_key
from aa_trt.training.synthetic import make_video, synthesize
from helpers import max_abs, randomize_

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, videos=6, size=SIZE, frames=6, seed=1, formats=("npz",), progress=False)
    return root


def _opts(data, out, **kw) -> TrainOptions:
    base = dict(stage=1, data=str(data), out=str(out), preset="tiny", steps=4, batch=2, lr=2e-3,
                log_every=1000, save_every=1000, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every weight the run could touch: all five components plus the stage-1 2D UNet."""
    out = {}
    for comp, m in trainer.models.components().items():
        if comp == "denoising_unet" and trainer.opts.stage == 1:
            continue  # on the meta device during stage 1; its motion weights live in motion_state
        out.update({f"{comp}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    if trainer.opts.stage == 1:
        out.update({f"stage1_unet.{k}": v.detach().clone()
                    for k, v in trainer.model.denoising_unet.state_dict().items()})
        out.update({f"motion.{k}": v.clone() for k, v in trainer.model.motion_state.items()})
    return out


def _fixed(trainer: Trainer, timesteps, use_ref) -> StepInputs:
    inp = trainer.draw(0)
    inp.timesteps = torch.tensor(timesteps)
    inp.use_ref = torch.tensor(use_ref)
    return inp


def _steps_reduce_loss(trainer: Trainer, inp: StepInputs, steps: int = 6) -> tuple[float, float]:
    with torch.no_grad():
        before = trainer.loss(inp).item()
    for _ in range(steps):
        trainer.train_step(inp)
    with torch.no_grad():
        after = trainer.loss(inp).item()
    return before, after


# ------------------------------------------------------------------------------------ synthetic data
def test_synthetic_is_deterministic_and_poses_are_exact(tmp_path):
    a = make_video(7, 3, 5, (64, 48), 4)
    b = make_video(7, 3, 5, (64, 48), 4)
    for x, y in ((a.frames, b.frames), (a.poses, b.poses), (a.keypoints, b.keypoints)):
        np.testing.assert_array_equal(x, y)
    assert a.frames.shape == (4, 48, 64, 3) and a.frames.dtype == np.uint8
    assert not np.array_equal(a.frames, make_video(8, 3, 5, (64, 48), 4).frames)
    assert not np.array_equal(a.frames[0], a.frames[3])  # it dances
    for kps, pose_img in zip(a.keypoints, a.poses):
        np.testing.assert_array_equal(pose_img, render(Pose.from_array(kps, 64, 48), 64, 48))

    meta = synthesize(tmp_path, videos=4, size=SIZE, frames=3, seed=2, progress=False)
    train = json.loads((tmp_path / "train.json").read_text())
    assert train == meta["train"] and {"video_path", "kps_path", "npz_path"} <= set(train[0])
    for split in ("test_characters", "test_motions"):
        assert len(json.loads((tmp_path / f"{split}.json").read_text())) == 1
    chars, motions = {e["character"] for e in train}, {e["motion"] for e in train}
    assert meta["test_characters"][0]["character"] not in chars
    assert meta["test_characters"][0]["motion"] in motions
    assert meta["test_motions"][0]["motion"] not in motions
    e = train[0]
    with np.load(tmp_path / e["npz_path"]) as z:
        again = make_video(2, e["character"], e["motion"], (SIZE, SIZE), 3)
        np.testing.assert_array_equal(z["frames"], again.frames)
        np.testing.assert_array_equal(z["poses"], again.poses)
    assert (tmp_path / e["video_path"]).stat().st_size > 0 and (tmp_path / e["kps_path"]).stat().st_size > 0


# ------------------------------------------------------------------------------------ the forward
def test_training_forward_is_the_inference_path():
    """A batch mixing conditional and unconditional samples (per-row reference K/V, cond rows
    moved first) gives, sample by sample, what the inference path computes."""
    torch.manual_seed(0)
    models = build_models(preset("tiny"))
    for m in (models.denoising_unet, models.reference_unet, models.pose_guider):
        randomize_(m, seed=1, scale=0.5)
    tm = TrainModel(models, stage=2).eval()
    b, f, h = 3, 2, SIZE // 8
    noisy = torch.randn(b * f, 4, h, h)
    t = torch.tensor([10, 500, 900])
    ref = torch.randn(b, 4, h, h)
    clip = torch.randn(b, 32)
    pose = torch.rand(b * f, 3, SIZE, SIZE)
    use_ref = torch.tensor([False, True, True])
    with torch.no_grad():
        got = tm(noisy, t, ref, clip, pose, use_ref)
        for i in range(b):
            rows = slice(i * f, (i + 1) * f)
            feats = models.pose_guider(pose[rows])
            if use_ref[i]:
                kv = compute_reference_kv(models.reference_unet, models.denoising_unet, ref[i:i + 1],
                                          clip[i:i + 1, None], "float32")
                state, ctx = ReferenceState(kv=kv.pairs), clip[i:i + 1, None]
            else:
                state, ctx = None, torch.zeros(1, 1, 32)
            want = models.denoising_unet(noisy[rows], t[i:i + 1], ctx, frames=f, pose=feats, ref=state)
            assert max_abs(got[rows], want) < 1e-5, i


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    models = build_models(preset("tiny"))
    randomize_(models.denoising_unet, seed=2, scale=0.5)
    tm = TrainModel(models, stage=1)
    args = (torch.randn(2, 4, 4, 4), torch.tensor([100, 700]), torch.randn(2, 4, 4, 4), torch.randn(2, 32),
            torch.rand(2, 3, SIZE, SIZE), torch.tensor([True, True]))

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(*args).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.trainable()}

    plain = grads(tm)
    ckpt = copy.deepcopy(tm)
    assert grad_ckpt.enable(ckpt.denoising_unet) > 0 and grad_ckpt.enable(ckpt.reference_unet, reference=True) > 0
    for n, g in grads(ckpt).items():
        assert max_abs(g, plain[n]) < 1e-6, n


# ------------------------------------------------------------------------------------ stages
def test_stage1_step_reduces_loss_and_trains_only_its_parameters(data, tmp_path):
    tr = Trainer(_opts(data, tmp_path, stage=1, batch=3))
    # Mixed batch: the unconditional sample sits first, so the cond rows are reordered.
    inp = _fixed(tr, [200, 500, 700], [False, True, True])
    before = _snapshot(tr)
    l0, l1 = _steps_reduce_loss(tr, inp)
    assert l1 < 0.9 * l0, (l0, l1)
    after = _snapshot(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {n for n, _ in tr.model.trainable()}
    expected = {f"stage1_unet.{n.split('.', 1)[1]}" if n.startswith("denoising_unet.") else n for n in trainable}
    assert changed <= expected
    # Cross-attention over a single CLIP token does not depend on its query (softmax over one key
    # is 1), so attn2.to_q and norm2 get zero gradients: only weight decay moves the non-zero ones.
    assert all(".norm2.bias" in n for n in expected - changed), expected - changed
    # All of the 2D UNet and the PoseGuider; of the ReferenceNet, what reaches its banks: not the
    # tail after the last bank (the last block's attentions, feed-forward and what follows).
    refnet = tr.model.reference_unet
    used = bank_parameters(refnet)
    assert trainable == ({f"denoising_unet.{n}" for n, _ in tr.model.denoising_unet.named_parameters()}
                         | {f"pose_guider.{n}" for n, _ in tr.model.pose_guider.named_parameters()}
                         | {f"reference_unet.{n}" for n in used})
    unused = {n for n, _ in refnet.named_parameters()} - used
    assert unused and all(n.startswith("up_blocks.") for n in unused)
    assert "up_blocks.1.attentions.1.transformer_blocks.0.norm1.weight" in used
    assert not any(k.startswith(("vae.", "image_encoder.", "motion.")) for k in changed)


def test_stage2_step_reduces_loss_and_trains_only_motion_modules(data, tmp_path):
    tr = Trainer(_opts(data, tmp_path, stage=2, frames=3, batch=2, lr=3e-3))
    inp = _fixed(tr, [300, 600], [True, False])
    before = _snapshot(tr)
    l0, l1 = _steps_reduce_loss(tr, inp)
    assert l1 < 0.9 * l0, (l0, l1)
    after = _snapshot(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    motion = {f"denoising_unet.{n}" for n, _ in tr.models.denoising_unet.named_parameters() if is_motion_key(n)}
    assert changed == motion


# ------------------------------------------------------------------------------------ the loop
def test_resume_gives_the_same_next_step(data, tmp_path):
    opts = _opts(data, tmp_path, stage=1, steps=2, batch=2)
    first = Trainer(opts)
    ckpt = first.run(progress=False)  # 2 steps, state saved, model exported
    exported = first.model.denoising_unet.conv_in.weight.detach().clone()
    first.train_step(first.draw(first.step))  # the uninterrupted run's step 3
    resumed = Trainer(_opts(data, tmp_path, stage=1, steps=3, batch=2, resume=True))
    assert resumed.load_state() and resumed.step == 2
    resumed.train_step(resumed.draw(resumed.step))
    for (n, p), (_, q) in zip(first.params, resumed.params):
        assert torch.equal(p, q), n
    assert first.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    # The export is an aa-trt checkpoint whose 2D weights are the trained ones.
    m = load_checkpoint(ckpt)
    sd = m.denoising_unet.state_dict()
    assert m.config.name == "tiny" and any(is_motion_key(k) for k in sd)
    assert torch.equal(sd["conv_in.weight"], exported)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["identical"]
    # What the resume changed (here the longer --steps) is named, and logged once it runs.
    assert resumed.resume_changes == {"steps": [2, 3]}
    resumed2 = Trainer(_opts(data, tmp_path, stage=1, steps=3, batch=2, resume=True))
    resumed2.run(progress=False)
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 2, "changed": {"steps": [2, 3]}} in events


def test_resume_applies_a_changed_learning_rate(data, tmp_path):
    # The saved optimiser and scheduler hold the old LR; a resume with another --lr (or
    # --weight-decay) must train with the new one, at the schedule's factor for this step.
    Trainer(_opts(data, tmp_path, steps=2, warmup=1, lr=2e-3, lr_decay="cosine")).run(progress=False)
    opts = _opts(data, tmp_path, steps=6, warmup=1, lr=5e-3, lr_decay="cosine", weight_decay=0.05, resume=True)
    resumed = Trainer(opts)
    assert resumed.load_state() and resumed.step == 2
    assert resumed.resume_changes["lr"] == [2e-3, 5e-3]
    want = 5e-3 * lr_factor(opts, 2)
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(want) and group["weight_decay"] == 0.05
    assert resumed.lr_schedule.get_last_lr()[0] == pytest.approx(want)
    resumed.train_step(resumed.draw(resumed.step))
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * lr_factor(opts, 3))


def test_resume_refuses_other_initial_weights(data, tmp_path):
    Trainer(_opts(data, tmp_path, steps=1)).run(progress=False)
    other = Trainer(_opts(data, tmp_path, steps=2, resume=True, seed=5))
    with pytest.raises(Exception, match="seed"):
        other.load_state()


def test_ddp_two_processes_keep_replicas_identical(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aa_trt", "train", "--stage", "1", "--preset", "tiny", "--data", str(data),
           "--out", str(tmp_path), "--steps", "2", "--batch", "1", "--lr", "1e-3", "--save-every", "1",
           "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    checks = [c for c in checks if c.get("event") == "replicas"]
    assert len(checks) == 2 and all(c["identical"] and len(c["digests"]) == 2 for c in checks)
    assert load_checkpoint(tmp_path / "model.safetensors").config.name == "tiny"


def test_min_snr_weight_is_moores_for_v():
    import torch

    from aa_trt.training.losses import min_snr_weight

    snr = torch.tensor([0.0, 1.0, 4.0, 10.0])
    w = min_snr_weight(snr, 5.0, "v_prediction")
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 1.0, 5.0 / 11.0]))  # min(SNR+1, 5) / (SNR+1)
    assert torch.equal(min_snr_weight(snr, 0.0), torch.ones(4))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from aa_trt.training.loop import TrainOptions, lr_factor

    const = TrainOptions(stage=1, data="d", out="o", preset="tiny", steps=100, warmup=10)
    assert [round(lr_factor(const, s), 6) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = TrainOptions(stage=1, data="d", out="o", preset="tiny", steps=100, warmup=10,
                       lr_decay="cosine", lr_floor=0.2)
    f = [lr_factor(cos, s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # never rises after warm-up
    assert f[54] == pytest.approx(0.6, abs=0.02) and f[99] == pytest.approx(0.2)
    with pytest.raises(Exception, match="^lr_decay='linear': expected constant or cosine"):
        TrainOptions(stage=1, data="d", out="o", preset="tiny", lr_decay="linear")


def test_lr_schedule_holds_then_decays_over_the_last_decay_steps():
    from aa_trt.training.loop import TrainOptions, lr_factor

    wsd = TrainOptions(stage=1, data="d", out="o", preset="tiny", steps=100, warmup=10,
                       lr_decay="cosine", lr_floor=0.1, decay_steps=40)
    f = [lr_factor(wsd, s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and all(v == 1.0 for v in f[9:60])  # warm-up, then hold
    assert all(a > b for a, b in zip(f[60:], f[61:]))  # strictly down over the last 40
    assert f[79] == pytest.approx(0.55, abs=0.02) and f[99] == pytest.approx(0.1)
    # A decay longer than the run after warm-up is the plain cosine.
    full = TrainOptions(stage=1, data="d", out="o", preset="tiny", steps=100, warmup=10, lr_decay="cosine")
    assert [lr_factor(full, s) for s in range(100)] == [
        lr_factor(TrainOptions(stage=1, data="d", out="o", preset="tiny", steps=100, warmup=10,
                               lr_decay="cosine", decay_steps=500), s) for s in range(100)]
    with pytest.raises(Exception, match="^decay_steps=10: needs the cosine LR decay"):
        TrainOptions(stage=1, data="d", out="o", preset="tiny", decay_steps=10)
