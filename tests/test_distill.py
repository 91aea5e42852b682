"""`aa-trt train --stage distill` (training/distill.py): the target, the loss, what trains, resume,
the exported student and the CLI. The tiny preset at 32x32 (latents 4x4) on a few synthetic videos,
random weights (never zeros), as tests/test_training.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aa_trt.checkpoint import load_checkpoint, read_config, read_metadata
from aa_trt.cli import main as cli
from aa_trt.config import SchedulerConfig
from aa_trt.errors import OptionError
from aa_trt.options import SampleOptions
from aa_trt.sampling import DDIMSchedule, ddim_schedule, sample_ddim
from aa_trt.training.data import LatentBatch, VideoSet, sample_batch
from aa_trt.training.distill import (DistillOptions, DistillSchedule, DistillTrainer, distill_loss, guided,
                                     student_states, student_target, teacher_steps)
from aa_trt.training.loop import StepInputs
from aa_trt.training.synthetic import synthesize
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, stick_frames

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    synthesize(root / "data", videos=6, size=SIZE, frames=6, seed=1, formats=("npz",), progress=False)
    return {"root": root, "data": root / "data", "teacher": save_tiny_checkpoint(root / "teacher.safetensors", 3)}


def _opts(files, out, **kw) -> DistillOptions:
    base = dict(data=str(files["data"]), out=str(out), init=str(files["teacher"]), student_steps=4, frames=2,
                batch=2, steps=4, lr=1e-5, guidance=1.0, log_every=1000, save_every=1000, device="cpu")
    base.update(kw)
    return DistillOptions(**base)


def _snapshot(tr: DistillTrainer) -> dict[str, torch.Tensor]:
    """Every weight a run could touch: the five components (the student is the denoising UNet)
    and the teacher's own UNet."""
    out = {f"{c}.{k}": v.detach().clone() for c, m in tr.models.components().items()
           for k, v in m.state_dict().items()}
    out.update({f"teacher.{k}": v.detach().clone() for k, v in tr.teacher.denoising_unet.state_dict().items()})
    return out


# ------------------------------------------------------------------------------------ the target
class Linear(torch.nn.Module):
    """A toy model with TrainModel's call signature: a fixed random linear map of x, t and the
    conditioning (uncond rows see a zero CLIP vector), so every quantity is exactly computable."""

    def __init__(self, c: int = 4, d: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(c, c, generator=g) * 0.3
        self.b = torch.randn(c, generator=g)
        self.e = torch.randn(c, d, generator=g) * 0.2

    def reference_banks(self, ref_latent, context):
        return None

    def forward(self, x, t, ref_latent, clip, pose, use_ref, banks=None):
        f = x.shape[0] // t.shape[0]
        cond = torch.where(use_ref[:, None], clip, torch.zeros_like(clip)) @ self.e.T  # (B, c)
        bias = (self.b[None] * t[:, None] / 1000.0 + cond).repeat_interleave(f, 0)[:, :, None, None]
        return torch.einsum("dc,rchw->rdhw", self.a, x) + bias


def _toy_inputs(b=3, f=2, c=4, seed=1) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    batch = LatentBatch(torch.randn(b, c, f, 3, 3, generator=g), torch.randn(b, c, 3, 3, generator=g),
                        torch.randn(b, 6, generator=g), torch.rand(b * f, 3, 24, 24, generator=g))
    return StepInputs(batch, torch.randn(b, c, f, 3, 3, generator=g), torch.zeros(b, dtype=torch.long),
                      torch.ones(b, dtype=torch.bool))


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_the_target_lands_where_the_teacher_lands(guidance):
    """On a linear toy model: the teacher's k steps are its own DDIM sampler's, and one DDIM step
    of the student predicting the target from x_t lands on them (every student step, the first at
    alpha_bar = 0 included)."""
    cfg = SchedulerConfig()  # Moore's: zero terminal SNR, v-prediction, trailing
    sched = DistillSchedule.build(cfg, 5, 10)
    teacher, student_steps = ddim_schedule(cfg, 10), ddim_schedule(cfg, 5)
    assert float(sched.a_from[0]) == 0.0 and sched.k == 2
    model = Linear()
    inp = _toy_inputs()
    b, c, f, h, w = inp.batch.latents.shape
    for i in range(5):
        idx = torch.full((b,), i)
        x_t = torch.randn(b * f, c, h, w, generator=torch.Generator().manual_seed(i))
        got = teacher_steps(model, x_t, idx, sched, inp.batch, guidance, None)
        # The same two steps by sample_ddim on the slice of the teacher's schedule.
        part = DDIMSchedule(teacher.timesteps[2 * i:2 * i + 2], teacher.prev_timesteps[2 * i:2 * i + 2],
                            teacher.alphas_cumprod, teacher.final_alpha_cumprod, teacher.prediction_type)
        t_of = lambda t: torch.full((b,), t)  # noqa: E731
        want = sample_ddim(lambda x, t: guided(model, x, t_of(t), inp.batch, guidance, None), x_t, part, disable=True)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), i
        # One student step from x_t with the target as its x0 (as a v prediction) gives the same.
        a0, a1 = student_steps.alpha(student_steps.timesteps[i]), student_steps.alpha(student_steps.prev_timesteps[i])
        x0 = student_target(x_t, got, torch.tensor(a0), torch.tensor(a1))
        assert torch.isfinite(x0).all()
        v = (a0**0.5 * x_t - x0) / (1 - a0) ** 0.5
        one = sample_ddim(lambda x, t: v, x_t, DDIMSchedule(student_steps.timesteps[i:i + 1],
                          student_steps.prev_timesteps[i:i + 1], teacher.alphas_cumprod, 1.0, "v_prediction"),
                          disable=True)
        assert (one - got).abs().max() <= 1e-5 * got.abs().max(), i
    # One step of the toy is not two of it: the student starting as its teacher has something to learn.
    inp.timesteps = sched.t[torch.tensor([0, 2, 4])]
    assert distill_loss(model, model, inp, sched, guidance).item() > 1e-4


def test_student_states_are_its_own_ddim_sampler_stopped_at_each_step():
    """Per sample, the state before student step i is sample_ddim's first i steps on the student's
    schedule from the same noise (i = 0: the noise itself), samples of different i in one batch."""
    cfg = SchedulerConfig()
    sched, student = DistillSchedule.build(cfg, 5, 10), ddim_schedule(cfg, 5)
    model, inp = Linear(seed=2), _toy_inputs(b=3)
    b, c, f, h, w = inp.batch.latents.shape
    noise = torch.randn(b * f, c, h, w, generator=torch.Generator().manual_seed(7))
    idx = torch.tensor([0, 3, 4])
    got = student_states(model, noise, idx, sched, inp.batch, None)
    t_of = lambda t: torch.full((b,), t)  # noqa: E731
    for s, i in enumerate(idx.tolist()):
        part = DDIMSchedule(student.timesteps[:i], student.prev_timesteps[:i], student.alphas_cumprod,
                            student.final_alpha_cumprod, student.prediction_type)
        want = sample_ddim(lambda x, t: guided(model, x, t_of(t), inp.batch, 1.0, None), noise, part,
                           disable=True)[s * f:(s + 1) * f]
        assert (got[s * f:(s + 1) * f] - want).abs().max() <= 1e-5 * want.abs().max(), i
    assert torch.equal(got[:f], noise[:f])  # step 0 starts at the noise (alpha_bar = 0)
    # In the loss: marked samples start there, the others at noised latents (a different loss).
    inp.timesteps = sched.t[idx]
    plain = distill_loss(model, model, inp, sched, 1.0).item()
    inp.on_trajectory = torch.tensor([False, True, True])
    assert abs(distill_loss(model, model, inp, sched, 1.0).item() - plain) > 1e-3 * plain
    inp.on_trajectory = torch.zeros(3, dtype=torch.bool)
    assert distill_loss(model, model, inp, sched, 1.0).item() == plain


def test_the_trainer_marks_on_trajectory_samples_only_when_asked(files, tmp_path):
    plain = DistillTrainer(_opts(files, tmp_path / "a", batch=4))
    own = DistillTrainer(_opts(files, tmp_path / "b", batch=4, on_trajectory=1.0))
    a, b = plain.draw(3), own.draw(3)
    assert a.on_trajectory is None and bool(b.on_trajectory.all())
    # Nothing else of the draw moves: same latents, noise and timesteps.
    assert torch.equal(a.batch.latents, b.batch.latents) and torch.equal(a.noise, b.noise)
    assert torch.equal(a.timesteps, b.timesteps)
    loss = own.train_step(b)
    assert math.isfinite(float(loss))


def test_one_teacher_step_per_student_step_gives_zero_loss(files, tmp_path):
    """The degenerate case: teacher steps = student steps, student = teacher: the target is the
    student's own x0 and the loss is float rounding, at every student timestep."""
    tr = DistillTrainer(_opts(files, tmp_path, student_steps=4, teacher_steps=4, batch=4))
    inp = tr.draw(0)
    inp.timesteps = tr.sched.t.clone()  # all four: 999 (alpha_bar 0), 749, 499, 249
    with torch.no_grad():
        assert tr.loss(inp).item() < 1e-10
    # Two teacher steps per student step: a real, finite gap.
    tr2 = DistillTrainer(_opts(files, tmp_path, student_steps=4, batch=4))
    with torch.no_grad():
        assert 1e-5 < tr2.loss(inp).item() < 1e3


def test_schedules_nest_or_are_refused():
    cfg = SchedulerConfig()
    s = DistillSchedule.build(cfg, 10, 20)
    assert s.t.tolist() == list(range(999, 0, -100)) and s.teacher_t[0].tolist() == [999, 949]
    assert s.teacher_to[-1, -1].item() == 1.0 and s.a_to[-1].item() == 1.0  # both end on the clean sample
    with pytest.raises(OptionError, match="^teacher_steps=20: its DDIM timesteps do not nest"):
        DistillSchedule.build(SchedulerConfig(timestep_spacing="leading"), 10, 20)
    with pytest.raises(ValueError, match="not the student's"):
        s.steps_of(torch.tensor([949]))


@pytest.mark.parametrize("kw,says", [
    (dict(student_steps=0), "^student_steps=0: must be >= 1"),
    (dict(student_steps=10, teacher_steps=15), "^teacher_steps=15: must be a multiple of `student_steps`"),
    (dict(guidance=-1.0), "^guidance=-1.0: must be >= 0"),
    (dict(lr=0.0), "^lr=0.0: must be > 0"),
    (dict(frames=0), "^frames=0: must be >= 1"),
    (dict(lr_decay="linear"), "^lr_decay='linear': expected constant or cosine"),
    (dict(cross_ref=1.5), "^cross_ref=1.5: must be >= 0.0 and <= 1.0"),
    (dict(on_trajectory=-0.1), "^on_trajectory=-0.1: must be >= 0.0 and <= 1.0"),
])
def test_options_check_themselves(kw, says):
    with pytest.raises(OptionError, match=says):
        DistillOptions(data="d", out="o", init="t.safetensors", **kw)
    o = DistillOptions(data="d", out="o", init="t.safetensors", student_steps=5)
    assert (o.teacher_steps, o.k, o.stage, o.uncond_ratio) == (10, 2, "distill", 0.0)
    with pytest.raises(Exception):
        o.steps = 3  # frozen


# ------------------------------------------------------------------------------------ the data
def _owner(videos, frame) -> int:
    """The index of the one video holding this frame."""
    owners = [i for i in range(len(videos)) if any(np.array_equal(frame, f) for f in videos.video(i).frames)]
    assert len(owners) == 1
    return owners[0]


def test_cross_ref_takes_the_reference_from_another_video(files):
    videos = VideoSet(files["data"])
    # 0 (every stage's default): the generator is drawn as before the option, ref and clip one video's.
    same = sample_batch(videos, np.random.default_rng(5), 6, 2, cross_ref=0.0)
    old = sample_batch(videos, np.random.default_rng(5), 6, 2)
    assert np.array_equal(same.ref, old.ref) and np.array_equal(same.frames, old.frames)
    assert all(_owner(videos, r) == _owner(videos, c[0]) for r, c in zip(same.ref, same.frames))
    # 1: every reference shows another video's character; the clips and poses are unchanged in kind.
    cross = sample_batch(videos, np.random.default_rng(5), 6, 2, cross_ref=1.0)
    assert all(_owner(videos, r) != _owner(videos, c[0]) for r, c in zip(cross.ref, cross.frames))
    assert cross.frames.shape == same.frames.shape and cross.poses.shape == same.poses.shape


def test_the_trainer_draws_cross_references_only_when_asked(files, tmp_path):
    plain = DistillTrainer(_opts(files, tmp_path / "a"))
    cross = DistillTrainer(_opts(files, tmp_path / "b", cross_ref=1.0, batch=4))
    assert plain.cross_ref == 0.0 and cross.cross_ref == 1.0
    inp = cross.draw(0)
    assert inp.batch.latents.shape[0] == 4 and torch.isfinite(cross.loss(inp)).item()


# ------------------------------------------------------------------------------------ training
def test_steps_reduce_the_loss_on_a_fixed_batch(files, tmp_path):
    """CFG folded in (the teacher at guidance 3.5, the student on one branch): six steps on one
    batch and noise cut the loss by more than half."""
    tr = DistillTrainer(_opts(files, tmp_path, guidance=3.5, lr=3e-4))
    inp = tr.draw(0)
    with torch.no_grad():
        before = tr.loss(inp).item()
    for _ in range(6):
        tr.train_step(inp)
    with torch.no_grad():
        after = tr.loss(inp).item()
    assert after < 0.5 * before, (before, after)


def test_only_the_student_changes(files, tmp_path):
    tr = DistillTrainer(_opts(files, tmp_path))
    inp = tr.draw(0)
    before = _snapshot(tr)
    with torch.no_grad():
        l0 = tr.loss(inp).item()
    for _ in range(3):
        tr.train_step(inp)
    with torch.no_grad():
        assert tr.loss(inp).item() < 0.8 * l0
    after = _snapshot(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    student = {f"denoising_unet.{n}" for n, _ in tr.models.denoising_unet.named_parameters()}
    assert changed <= student and len(changed) > 0.8 * len(student)
    assert any("motion_modules." in k for k in changed)  # the motion modules are distilled too
    assert {n for n, _ in tr.params} == {"denoising_unet." + k.split(".", 1)[1] for k in student}
    # The teacher's UNet, ReferenceNet, PoseGuider, VAE and CLIP: bit-identical.
    assert not any(k.startswith(("teacher.", "reference_unet.", "pose_guider.", "vae.", "image_encoder."))
                   for k in changed)


def test_resume_reproduces_an_uninterrupted_run(files, tmp_path):
    first = DistillTrainer(_opts(files, tmp_path, steps=2))
    first.run(progress=False)  # 2 steps, state saved, exported
    first.train_step(first.draw(first.step))  # the uninterrupted run's step 3
    resumed = DistillTrainer(_opts(files, tmp_path, steps=3, resume=True))
    assert resumed.load_state() and resumed.step == 2
    resumed.train_step(resumed.draw(resumed.step))
    for (n, p), (_, q) in zip(first.params, resumed.params):
        assert torch.equal(p, q), n
    # A resume that would distil for other steps or guidance is refused.
    with pytest.raises(Exception, match="student-steps"):
        DistillTrainer(_opts(files, tmp_path, student_steps=2, steps=3, resume=True)).load_state()


# ------------------------------------------------------------------------------------ the student
def test_the_exported_student_declares_its_steps_and_run_uses_them(files, tmp_path, capsys):
    from aa_trt import attention

    out = tmp_path / "student"
    backend = attention.get_backend()
    assert cli(["train", "--stage", "distill", "--init", str(files["teacher"]), "--data", str(files["data"]),
                "--out", str(out), "--student-steps", "3", "--guidance", "2.5", "--steps", "1", "--batch", "1",
                "--frames", "2", "--device", "cpu", "--quiet"]) == 0
    assert attention.get_backend() == backend  # training's plain path ends with it: the run below renders as run does
    ckpt = out / "model.safetensors"
    m = load_checkpoint(ckpt)
    teacher = load_checkpoint(files["teacher"])
    assert (m.config.steps, m.config.guidance) == (3, 1.0)  # CFG 2.5 folded into the one branch
    assert m.config.replace(steps=20, guidance=teacher.config.guidance) == teacher.config
    prov = json.loads(read_metadata(ckpt)["provenance"])
    assert prov["stage"] == "distill" and prov["distilled"]["teacher_steps"] == 6
    assert prov["distilled"]["guidance"] == 2.5 and prov["distilled"]["guidance_folded"]
    for comp in ("reference_unet", "pose_guider", "vae", "image_encoder"):
        a, b = getattr(m, comp).state_dict(), getattr(teacher, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    # Older checkpoints keep 20 steps; the student's are its own, and `aa-trt run` uses them.
    assert SampleOptions().resolve(read_config(files["teacher"])).steps == 20
    ref = make_reference(tmp_path / "ref.png", (SIZE, SIZE))
    dance = make_video(tmp_path / "dance.mp4", stick_frames(2, (SIZE, SIZE)), fps=10, audio=False)
    capsys.readouterr()
    assert cli(["run", str(ref), str(dance), "-o", str(tmp_path / "out.mp4"), "--ckpt", str(ckpt),
                "--pose-video", "--quiet", "--json", "--dtype", "fp32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["steps"], summary["guidance"]) == (3, 1.0)


def _refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    return err


@pytest.mark.parametrize("argv,says", [
    (["--stage", "1", "--preset", "tiny", "--student-steps", "5"], "--student-steps belongs to --stage distill, not --stage 1"),
    (["--stage", "0", "--preset", "tiny", "--guidance", "2"], "--guidance belongs to --stage distill, not --stage 0"),
    (["--stage", "distill", "--preset", "tiny"], "--stage distill starts from its teacher: give --init"),
    (["--stage", "distill", "--init", "T", "--uncond-ratio", "0.2"], "--uncond-ratio belongs to stages 1 and 2"),
    (["--stage", "distill", "--init", "T", "--crop", "16"], "--crop belongs to stage 0 (the VAE), not --stage distill"),
    (["--stage", "distill", "--init", "T", "--student-steps", "10", "--teacher-steps", "15"],
     "--teacher-steps 15: must be a multiple of --student-steps (10)"),
    (["--stage", "distill", "--init", "T", "--student-steps", "0"], "--student-steps 0: must be >= 1"),
    (["--stage", "2", "--preset", "tiny", "--cross-ref", "0.5"], "--cross-ref belongs to --stage distill, not --stage 2"),
    (["--stage", "1", "--preset", "tiny", "--on-trajectory", "1"], "--on-trajectory belongs to --stage distill, not --stage 1"),
    (["--stage", "distill", "--init", "T", "--cross-ref", "2"], "--cross-ref 2.0: must be >= 0.0 and <= 1.0"),
])
def test_cli_refusals_are_one_line(argv, says, capsys, tmp_path):
    err = _refused(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv)
    assert err.splitlines() == [f"aa-trt: error: {says}" + err.split(says, 1)[-1]], err


def test_cli_stage_names(capsys, tmp_path, files):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(["train", "--stage", "3", "--preset", "tiny", "--data", "d", "--out", "o"])
    assert e.value.code == 2 and "expected 0, 1, 2 or distill" in capsys.readouterr().err
    # A teacher that is not there: one line naming the file.
    err = _refused(capsys, "train", "--stage", "distill", "--init", str(tmp_path / "none.safetensors"),
                   "--data", str(files["data"]), "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet")
    assert len(err.splitlines()) == 1 and "none.safetensors: no such checkpoint file" in err


def test_eval_scores_a_student_against_its_teachers_converged_render(files, tmp_path, capsys):
    """`aa-trt eval --agreement-ckpt`: the reference is rendered by that checkpoint, at its declared
    guidance; a model against itself at its own steps agrees exactly, another model does not."""
    student = tmp_path / "student.safetensors"
    tr = DistillTrainer(_opts(files, tmp_path / "run", steps=2, lr=1e-3))
    tr.run(progress=False)
    tr.export(student)

    def ev(ckpt, *flags):
        out = tmp_path / "eval.json"
        assert cli(["eval", "--ckpt", str(ckpt), "--data", str(files["data"]), "--frames", "2", "--splits",
                    "test_motions", "--videos", "1", "--no-baselines", "--quiet", "--dtype", "fp32", "-o", str(out),
                    *flags]) == 0
        return json.loads(out.read_text())

    same = ev(files["teacher"], "--steps", "4", "--agreement-steps", "4", "--agreement-ckpt", str(files["teacher"]),
              "--agreement-guidance", "1.0", "--guidance", "1.0")
    assert same["splits"]["test_motions"]["mean"]["agreement"]["psnr"] == 100.0
    assert same["agreement"] == {"sampler": "ddim", "steps": 4, "ckpt": str(files["teacher"]), "guidance": 1.0}
    other = ev(student, "--agreement-steps", "4", "--agreement-ckpt", str(files["teacher"]),
               "--agreement-guidance", "1.0")
    assert other["steps"] == 4 and other["guidance"] == 1.0  # the student's declared ones
    assert other["splits"]["test_motions"]["mean"]["agreement"]["psnr"] < 100.0
    capsys.readouterr()
    assert cli(["eval", "--ckpt", str(student), "--data", str(files["data"]), "--agreement-ckpt", str(student)]) == 2
    assert capsys.readouterr().err.strip() == (f"aa-trt: error: --agreement-ckpt {student}: needs --agreement-steps")
