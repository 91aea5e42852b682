"""`aa-trt train --stage distill`: progressive distillation of the denoising UNet.

Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models", arXiv
2202.00512): a student that takes one DDIM step where its teacher took k (2 by default), on the
teacher checkpoint's own schedule (Moore's: zero terminal SNR, v-prediction, trailing spacing).
The teacher is any aa-trt checkpoint, frozen (its own copy of the denoising UNet, eval mode, no
gradients); the student is the denoising UNet with its motion modules, initialised from it. The
ReferenceNet, PoseGuider, VAE and CLIP are shared and frozen, so the exported checkpoint is the
teacher's but for the UNet, and declares the steps it was distilled for (and guidance 1.0 when the
teacher's CFG was folded into it), which `aa-trt run` then uses by default.

One training sample: data latents x0 noised to the student's timestep t (one of its N DDIM
timesteps, uniformly); the teacher runs k DDIM steps from there (with CFG when guidance > 1, the
student then learning the guided result with one branch); the target is the x0 from which one
student DDIM step from t lands exactly where the teacher landed; the loss is the x0 MSE weighted by
truncated SNR, max(snr(t), 1). The loop, state, resume, logging, LR schedule and DDP are
training/loop.py's Trainer: DistillTrainer only replaces what trains, the timesteps and the loss.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aa_trt.checkpoint import Models, read_metadata
from aa_trt.config import SchedulerConfig
from aa_trt.errors import AATrtError, OptionError
from aa_trt.options import _int
from aa_trt.sampling import ddim_schedule, ddim_step, predict_x0_eps

from aa_trt.training import grad_ckpt
from aa_trt.training.loop import StepInputs, Trainer, train
from aa_trt.training.losses import weighted_mse
from aa_trt.training.stage import TrainModel


def _real(name: str, value, low: float, high: float | None = None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise OptionError(name, value, "must be a finite number")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        rng = f"> {low}" if open_low else f">= {low}"
        raise OptionError(name, value, f"must be {rng}" + (f" and <= {high}" if high is not None else ""))


@dataclass(frozen=True)
class DistillOptions:
    """One distillation run. Field names are TrainOptions' where they mean the same (the Trainer
    reads them); `init` is the teacher checkpoint."""

    data: str
    out: str
    init: str                          # the teacher: any aa-trt checkpoint (converted Moore weights too)
    student_steps: int = 10            # the student's DDIM steps
    teacher_steps: int | None = None   # the teacher's, a multiple of student_steps (default 2x)
    guidance: float | None = None      # the teacher's CFG scale (None: its checkpoint's declared one)
    steps: int = 1000                  # optimiser steps, counted from the start of training
    batch: int = 2                     # samples per process and step
    lr: float = 1e-5
    frames: int = 16                   # clip length: the motion modules are distilled too
    # The probability that a sample's reference frame comes from another video (another character),
    # as in use; the target is the teacher's output, so the pair need not match.
    cross_ref: float = 0.0
    # The probability that a sample's x_t is where the student's own DDIM steps from pure noise
    # reach (the states it meets in use), instead of the clip's latents noised to t.
    on_trajectory: float = 0.0
    stride: int = 1
    size: int | None = None
    seed: int = 0
    # Sampling starts from plain Gaussian noise; the student learns the steps it will take.
    noise_offset: float = 0.0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup: int = 0
    lr_decay: str = "constant"
    lr_floor: float = 0.1
    decay_steps: int = 0
    precision: str = "no"
    grad_checkpointing: bool = False
    save_every: int = 500
    snapshot_every: int = 0
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    # Fixed, for the Trainer: the stage's name, no preset (a student starts from its teacher), and
    # conditional samples only (the student folds the teacher's guidance into its cond branch).
    stage: str = field(default="distill", init=False)
    preset: None = field(default=None, init=False)
    uncond_ratio: float = field(default=0.0, init=False)

    def __post_init__(self):
        for name in ("data", "out", "init"):
            v = getattr(self, name)
            if not isinstance(v, (str, Path)) or not str(v):
                raise OptionError(name, v, "must be a path")
            object.__setattr__(self, name, str(v))
        _int("student_steps", self.student_steps, 1)
        if self.teacher_steps is None:
            object.__setattr__(self, "teacher_steps", 2 * self.student_steps)
        _int("teacher_steps", self.teacher_steps, 1)
        if self.teacher_steps % self.student_steps:
            raise OptionError("teacher_steps", self.teacher_steps,
                              f"must be a multiple of `student_steps` ({self.student_steps}): "
                              "k teacher steps per student step")
        if self.guidance is not None:
            _real("guidance", self.guidance, 0.0)
            object.__setattr__(self, "guidance", float(self.guidance))
        for name, low in (("steps", 1), ("batch", 1), ("frames", 1), ("stride", 1), ("seed", 0),
                          ("warmup", 0), ("decay_steps", 0), ("save_every", 1), ("snapshot_every", 0),
                          ("log_every", 1)):
            _int(name, getattr(self, name), low)
        if self.size is not None:
            _int("size", self.size, 8)
        _real("lr", self.lr, 0.0, open_low=True)
        _real("noise_offset", self.noise_offset, 0.0)
        for name in ("cross_ref", "on_trajectory"):
            _real(name, getattr(self, name), 0.0, 1.0)
            object.__setattr__(self, name, float(getattr(self, name)))
        _real("weight_decay", self.weight_decay, 0.0)
        _real("max_grad_norm", self.max_grad_norm, 0.0)
        _real("lr_floor", self.lr_floor, 0.0, 1.0)
        if self.lr_decay not in ("constant", "cosine"):
            raise OptionError("lr_decay", self.lr_decay, "expected constant or cosine")
        if self.decay_steps and self.lr_decay != "cosine":
            raise OptionError("decay_steps", self.decay_steps, "needs the cosine LR decay")
        if self.precision not in ("no", "bf16", "fp16"):
            raise OptionError("precision", self.precision, "expected no, bf16 or fp16")

    @property
    def k(self) -> int:
        """Teacher DDIM steps per student step."""
        return self.teacher_steps // self.student_steps


# ---------------------------------------------------------------------------------- the schedules
@dataclass(frozen=True)
class DistillSchedule:
    """The student's N DDIM steps and, for each, the teacher's k steps it replaces, as tensors.

    t (N,) long: the student's UNet timesteps; a_from (N,), a_to (N,): alpha_bar where its step
    starts and lands (DDIM's alpha(t), alpha(prev)); teacher_t, teacher_from, teacher_to (N, k):
    the same for the teacher's steps k*i .. k*i + k - 1; index (T,) long: t -> i, -1 elsewhere.
    """

    t: torch.Tensor
    a_from: torch.Tensor
    a_to: torch.Tensor
    teacher_t: torch.Tensor
    teacher_from: torch.Tensor
    teacher_to: torch.Tensor
    index: torch.Tensor
    prediction_type: str

    @classmethod
    def build(cls, cfg: SchedulerConfig, student_steps: int, teacher_steps: int, device="cpu") -> "DistillSchedule":
        T = cfg.num_train_timesteps
        if teacher_steps > T:
            raise OptionError("teacher_steps", teacher_steps, f"must be in 1..{T} (the model's training timesteps)")
        s, te = ddim_schedule(cfg, student_steps), ddim_schedule(cfg, teacher_steps)
        k = teacher_steps // student_steps
        # The student's step i must start where the teacher's step k*i starts. Trailing spacing
        # (Moore's) always nests; leading spacing does not (it shifts the first step with the count).
        starts = [te.timesteps[k * i] for i in range(student_steps)]
        if list(s.timesteps) != starts:
            raise OptionError("teacher_steps", teacher_steps,
                              f"its DDIM timesteps do not nest the student's with the checkpoint's "
                              f"{cfg.timestep_spacing!r} spacing (student {s.timesteps[:3]}..., teacher "
                              f"{tuple(starts[:3])}...)")
        f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        index = torch.full((T,), -1, dtype=torch.long)
        index[list(s.timesteps)] = torch.arange(student_steps)
        rows = [range(k * i, k * i + k) for i in range(student_steps)]
        return cls(
            t=torch.tensor(s.timesteps, device=device),
            a_from=f32([s.alpha(t) for t in s.timesteps]),
            a_to=f32([s.alpha(t) for t in s.prev_timesteps]),
            teacher_t=torch.tensor([[te.timesteps[j] for j in r] for r in rows], device=device),
            teacher_from=f32([[te.alpha(te.timesteps[j]) for j in r] for r in rows]),
            teacher_to=f32([[te.alpha(te.prev_timesteps[j]) for j in r] for r in rows]),
            index=index.to(device), prediction_type=cfg.prediction_type)

    @property
    def k(self) -> int:
        return self.teacher_t.shape[1]

    def steps_of(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) student timesteps -> (B,) their step indices; anything else is refused."""
        idx = self.index[t]
        if (idx < 0).any():
            bad = t[idx < 0].tolist()
            raise ValueError(f"timesteps {bad} are not the student's ({self.t.tolist()})")
        return idx


# ---------------------------------------------------------------------------------- the target
def student_target(x_t: torch.Tensor, x_teacher: torch.Tensor, a_from: torch.Tensor,
                   a_to: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM step from x_t (at alpha_bar a_from) to a_to lands on x_teacher.

    DDIM: x' = sqrt(a_to) x0 + sigma_to (x_t - sqrt(a_from) x0) / sigma_from, solved for x0:
    x0 = (x' - r x_t) / (sqrt(a_to) - r sqrt(a_from)), r = sigma_to / sigma_from. sigma_from > 0 at
    every training timestep, and at a_from = 0 (the zero-SNR first step) this is (x' - sigma_to x_t)
    / sqrt(a_to): finite, no division by zero. x_t, x_teacher (R, c, h, w); a_from, a_to
    broadcasting against them (R, 1, 1, 1) -> (R, c, h, w).
    """
    r = ((1 - a_to) / (1 - a_from)).sqrt()
    return (x_teacher - r * x_t) / (a_to.sqrt() - r * a_from.sqrt())


def guided(model, x, t, batch, guidance: float, banks) -> torch.Tensor:
    """The prediction the sampler uses: cond alone where guidance <= 1 (as aa_trt.guidance does),
    else uncond + g (cond - uncond), the uncond branch without reference and with a zero CLIP
    context. x (B*F, c, h, w), t (B,) -> (B*F, c, h, w)."""
    b = t.shape[0]
    on = torch.ones(b, dtype=torch.bool, device=t.device)
    cond = model(x, t, batch.ref_latent, batch.clip, batch.pose, on, banks)
    if guidance <= 1.0:
        return cond
    uncond = model(x, t, batch.ref_latent, batch.clip, batch.pose, ~on)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def teacher_steps(teacher, x_t: torch.Tensor, idx: torch.Tensor, sched: DistillSchedule, batch,
                  guidance: float, banks) -> torch.Tensor:
    """The teacher's k DDIM steps replacing student step idx, from x_t: what the teacher's own
    DDIM sampler computes there. x_t (B*F, c, h, w), idx (B,) -> (B*F, c, h, w)."""
    frames = x_t.shape[0] // idx.shape[0]
    per_row = lambda a: a.repeat_interleave(frames).view(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B*F,1,1,1)
    x = x_t
    for j in range(sched.k):
        pred = guided(teacher, x, sched.teacher_t[idx, j], batch, guidance, banks)
        x = ddim_step(x.float(), pred.float(), per_row(sched.teacher_from[idx, j]),
                      per_row(sched.teacher_to[idx, j]), sched.prediction_type)
    return x


@torch.no_grad()
def student_states(student, noise: torch.Tensor, idx: torch.Tensor, sched: DistillSchedule, batch,
                   banks) -> torch.Tensor:
    """Where the student's own DDIM sampler stands before its step idx, from `noise` at the first
    step (alpha_bar = 0, so the state there is the noise itself): its steps 0 .. idx - 1, one
    branch (the student is cond-only in use, its teacher's guidance folded in when > 1). These are
    the states it meets when it samples, which noised data latents only approximate. noise
    (B*F, c, h, w), idx (B,) -> (B*F, c, h, w)."""
    frames = noise.shape[0] // idx.shape[0]
    per_row = lambda a: a.repeat_interleave(frames).view(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B*F,1,1,1)
    x = noise.float()
    for j in range(int(idx.max())):
        j_ = torch.full_like(idx, j)
        pred = guided(student, x, sched.t[j_], batch, 1.0, banks)
        stepped = ddim_step(x, pred.float(), per_row(sched.a_from[j_]), per_row(sched.a_to[j_]),
                            sched.prediction_type)
        x = torch.where(per_row(idx > j), stepped, x)  # a sample stops at its own step
    return x


def distill_loss(teacher, student, inp: StepInputs, sched: DistillSchedule, guidance: float,
                 rollout=None) -> torch.Tensor:
    """The distillation loss of one batch, a scalar: the student's x0 (from its one-branch
    prediction at x_t) against student_target, weighted by max(snr(t), 1) (Salimans & Ho's
    "truncated SNR": the x0 error where the signal is weak, like an epsilon error where it is
    strong). A pure function of the two models and the drawn inputs (latents, noise, the student's
    timesteps); teacher and student are TrainModels (or anything with their call signature).

    x_t is the clip's latents noised to t, or, for the samples inp.on_trajectory marks, the
    student's own state at t (student_states, run by `rollout`: the student without its DDP
    wrapper; default `student`)."""
    x0 = inp.batch.latents
    b, c, f, h, w = x0.shape
    rows = lambda x: x.transpose(1, 2).reshape(b * f, c, h, w)  # noqa: E731  (B,C,F,h,w) -> (B*F,C,h,w)
    per_row = lambda a: a.repeat_interleave(f).view(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B*F,1,1,1)
    idx = sched.steps_of(inp.timesteps)
    a_from, a_to = sched.a_from[idx], sched.a_to[idx]
    x_t = rows(a_from.sqrt().view(-1, 1, 1, 1, 1) * x0 + (1 - a_from).sqrt().view(-1, 1, 1, 1, 1) * inp.noise)
    # The ReferenceNet is frozen and shared: its banks are computed once for every forward below.
    with torch.no_grad():
        banks = teacher.reference_banks(inp.batch.ref_latent, inp.batch.clip[:, None])
        own = inp.on_trajectory
        if own is not None and bool(own.any()):
            # Unmarked samples stop at step 0, so the rollout runs only as far as a marked one needs.
            states = student_states(student if rollout is None else rollout, rows(inp.noise),
                                    torch.where(own, idx, torch.zeros_like(idx)), sched, inp.batch, banks)
            x_t = torch.where(per_row(own), states.to(x_t.dtype), x_t)
        x_teacher = teacher_steps(teacher, x_t, idx, sched, inp.batch, guidance, banks)
        target = student_target(x_t, x_teacher, per_row(a_from), per_row(a_to))
    on = torch.ones(b, dtype=torch.bool, device=x0.device)
    pred = student(x_t, inp.timesteps, inp.batch.ref_latent, inp.batch.clip, inp.batch.pose, on, banks)
    x0_student, _ = predict_x0_eps(x_t, pred.float(), per_row(a_from), sched.prediction_type)
    weight = (a_from / (1 - a_from)).clamp(min=1.0)
    return weighted_mse(x0_student.view(b, f, c, h, w), target.view(b, f, c, h, w), weight)


# ---------------------------------------------------------------------------------- the trainer
class DistillTrainer(Trainer):
    """training/loop.py's Trainer with a frozen teacher beside the student (the trainable model)."""

    RESUME_KEYS = Trainer.RESUME_KEYS + ("student_steps", "teacher_steps", "guidance")

    @property
    def cross_ref(self) -> float:
        return self.opts.cross_ref

    def build_model(self) -> TrainModel:
        o, cfg = self.opts, self.models.config
        if o.frames > cfg.motion.max_len:
            raise OptionError("frames", o.frames, f"exceeds the motion modules' maximum window of {cfg.motion.max_len} frames")
        self.guidance = float(cfg.guidance if o.guidance is None else o.guidance)
        self.sched = DistillSchedule.build(cfg.scheduler, o.student_steps, o.teacher_steps, self.device)
        # The teacher's own copy of the UNet; ReferenceNet and PoseGuider are the same modules.
        teacher = dataclasses.replace(self.models, denoising_unet=copy.deepcopy(self.models.denoising_unet))
        self.teacher = TrainModel(teacher, "distill").requires_grad_(False).eval()
        student = TrainModel(self.models, "distill")
        if o.grad_checkpointing:
            grad_ckpt.enable(student.denoising_unet)
        return student

    def sample_timesteps(self, b: int, gen: torch.Generator) -> torch.Tensor:
        """(b,) long: the student's own DDIM timesteps, uniformly (the only ones it will see)."""
        return self.sched.t.cpu()[torch.randint(0, len(self.sched.t), (b,), generator=gen)]

    def draw(self, step: int) -> StepInputs:
        """The Trainer's draw, plus which samples start on the student's own trajectory, from a
        generator of their own (so at on_trajectory 0 every other draw is as before)."""
        inp = super().draw(step)
        if self.opts.on_trajectory > 0:
            rng = np.random.default_rng([self.opts.seed, step, self.rank, 1])
            b = inp.timesteps.shape[0]
            inp = dataclasses.replace(inp, on_trajectory=torch.from_numpy(
                rng.random(b) < self.opts.on_trajectory).to(self.device))
        return inp

    def loss(self, inp: StepInputs) -> torch.Tensor:
        with self.autocast():
            return distill_loss(self.teacher, self.ddp, inp, self.sched, self.guidance, rollout=self.model)

    @property
    def folded(self) -> bool:
        """Whether the teacher ran CFG, now folded into the student's one branch."""
        return self.guidance > 1.0

    def export_models(self) -> Models:
        models = self.model.export(self.models)
        config = models.config.replace(steps=self.opts.student_steps,
                                       guidance=1.0 if self.folded else self.guidance)
        return dataclasses.replace(models, config=config)

    def provenance(self) -> dict:
        o = self.opts
        try:
            teacher_prov = json.loads(read_metadata(o.init).get("provenance", "{}"))
        except (AATrtError, ValueError):  # the teacher file moved since: the record still names it
            teacher_prov = None
        return {**super().provenance(),
                "distilled": {"method": "progressive distillation (Salimans & Ho 2022)", "teacher": o.init,
                              "teacher_steps": o.teacher_steps, "student_steps": o.student_steps,
                              "guidance": self.guidance, "guidance_folded": self.folded,
                              "cross_ref": o.cross_ref, "on_trajectory": o.on_trajectory,
                              "teacher_provenance": teacher_prov}}


def distill(opts: DistillOptions, progress: bool = True) -> Path | None:
    """Distil (under torchrun: one process of it) and export; rank 0 returns the checkpoint path."""
    return train(opts, progress, trainer=DistillTrainer)
