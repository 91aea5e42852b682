"""`aa-trt train`: the training loop, single process or under `torchrun` with DDP.

Each process draws its batch, noise and timesteps from generators seeded by (seed, step, rank), so
a step is a pure function of the weights, the optimiser state and those three numbers: resuming
from `train_state.pt` replays exactly the steps an uninterrupted run would take. The state file
holds the trainable weights, the optimiser and LR-schedule state, the step, every rank's RNG states
and a fingerprint of the initial weights (a resume on other initial weights is refused); it is
written atomically by rank 0. The result is exported as an aa-trt checkpoint (`model.safetensors`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from aa_trt import process_group as D
from aa_trt.checkpoint import Models, build_models, load_checkpoint, save_models
from aa_trt.config import preset as get_preset
from aa_trt.errors import InputError, OptionError
from aa_trt.files import atomic_output

from aa_trt.training import grad_ckpt
from aa_trt.training.data import LatentBatch, VideoSet, encode, sample_batch
from aa_trt.training.losses import NoiseSchedule, min_snr_weight, offset_noise, weighted_mse
from aa_trt.training.stage import TrainModel

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"
STATE_VERSION = 1


def lr_factor(opts: "TrainOptions", step: int) -> float:
    """The LR multiplier after `step` optimiser steps: linear warm-up, then constant or cosine
    (over everything after the warm-up, or with `decay_steps` only over the last that many steps:
    warm-up, hold, decay)."""
    warm = max(1, opts.warmup)
    if step + 1 < warm:
        return (step + 1) / warm
    if opts.lr_decay == "constant":
        return 1.0
    start = max(warm, opts.steps - opts.decay_steps) if opts.decay_steps else warm
    span = max(1, opts.steps - start)
    progress = min(1.0, max(0, step + 1 - start) / span)
    return opts.lr_floor + (1 - opts.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainOptions:
    stage: int
    data: str
    out: str
    init: str | None = None          # an aa-trt checkpoint, or:
    preset: str | None = None        # a preset built from scratch (seeded by `seed`)
    steps: int = 1000                # total, counted from the start of training (not this run)
    batch: int = 4                   # per process
    lr: float = 1e-5
    frames: int | None = None        # clip length; default 1 (stage 1) or 16 (stage 2)
    stride: int = 1                  # frame step within a stage-2 clip
    size: int | None = None          # train at size x size (default: the data's own size)
    seed: int = 0
    uncond_ratio: float = 0.1
    snr_gamma: float = 5.0
    noise_offset: float = 0.05
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup: int = 0
    # After warm-up: "constant", or "cosine" down to lr_floor x lr at `steps` (a run that must
    # stop at a known step ends on small, averaged-out updates instead of full-size noisy ones).
    lr_decay: str = "constant"
    lr_floor: float = 0.1
    # With cosine: hold the peak LR and decay only over the last `decay_steps` (0 = all of it).
    # The metrics of the default model rose while the LR was high and stopped as it decayed;
    # holding it keeps the steps productive, and a resume with a new --steps moves the decay.
    decay_steps: int = 0
    precision: str = "no"            # "bf16" / "fp16": autocast on CUDA
    grad_checkpointing: bool = False
    save_every: int = 500
    snapshot_every: int = 0          # also export model.safetensors copies to snapshots/ (0 = never)
    log_every: int = 10
    resume: bool = False
    device: str = "auto"

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise OptionError("stage", self.stage, "must be 1 or 2")
        if (self.init is None) == (self.preset is None):
            raise OptionError("init", self.init, "give exactly one of `init` (a checkpoint) and `preset` (a name)")
        if self.frames is None:
            self.frames = 1 if self.stage == 1 else 16
        if self.stage == 1 and self.frames != 1:
            raise OptionError("frames", self.frames, "stage 1 trains on single frames (1)")
        if self.lr_decay not in ("constant", "cosine"):
            raise OptionError("lr_decay", self.lr_decay, "expected constant or cosine")
        if self.decay_steps < 0 or (self.decay_steps and self.lr_decay != "cosine"):
            raise OptionError("decay_steps", self.decay_steps, "needs the cosine LR decay and a count >= 0")
        if self.precision not in ("no", "bf16", "fp16"):
            raise OptionError("precision", self.precision, "expected no, bf16 or fp16")
        if not 0 <= self.uncond_ratio <= 1:
            raise OptionError("uncond_ratio", self.uncond_ratio, "must be in [0, 1]")


@dataclass
class StepInputs:
    """Everything one step consumes, drawn before the forward (so a step can be replayed)."""

    batch: LatentBatch
    noise: torch.Tensor      # (B, c, F, h, w)
    timesteps: torch.Tensor  # (B,) long
    use_ref: torch.Tensor    # (B,) bool; False = an unconditional sample
    # (B,) bool or None: distillation's samples whose x_t is the student's own state (distill.py)
    on_trajectory: torch.Tensor | None = None


# ---------------------------------------------------------------------------------- processes
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) outside torchrun."""
    return D.rank(), D.world_size(), int(os.environ.get("LOCAL_RANK", 0)) if D.active() else 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(name)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank)
    return d


# ---------------------------------------------------------------------------------- init
def initial_models(opts: TrainOptions, device) -> Models:
    """From a checkpoint (fp32 master weights), or a preset from scratch with the zero-initialised
    output layers of the paper (PoseGuider conv_out, motion-module proj_out)."""
    if opts.init:
        models = load_checkpoint(opts.init, device=device, dtype=torch.float32)
    else:
        torch.manual_seed(opts.seed)
        models = build_models(get_preset(opts.preset), device)
        models.pose_guider.zero_init()
        for m in models.denoising_unet.motion_modules():
            m.zero_init()
    for m in models.components().values():
        m.requires_grad_(False).eval()
    return models


def fingerprint(models: Models) -> list[float]:
    """A cheap checksum per component (float64 sums): tells a resume it starts from other weights."""
    sums = []
    for m in models.components().values():
        sums.append(float(torch.stack([t.double().sum() for t in m.state_dict().values()
                                       if t.is_floating_point()]).sum()))
    return sums


def _digest(params) -> str:
    h = hashlib.sha256()
    for _, p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.rank, self.world, local = dist_info()
        self.device = _device(opts.device, local)
        if opts.precision != "no" and self.device.type != "cuda":
            raise OptionError("precision", opts.precision, f"is for CUDA; this run is on {self.device}")
        self.out = Path(opts.out)
        self.models = initial_models(opts, self.device)
        self.init_fingerprint = fingerprint(self.models)
        cfg = self.models.config
        self.schedule = NoiseSchedule(cfg.scheduler, self.device)
        self.model = self.build_model()
        self.params = self.model.trainable()
        if self.world > 1:
            # Stage 1: a step whose samples are all unconditional never runs the ReferenceNet.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=opts.stage == 1)
        else:
            self.ddp = self.model
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=opts.lr,
                                           weight_decay=opts.weight_decay, foreach=True)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(opts, s))
        self.scaler = torch.amp.GradScaler("cuda") if opts.precision == "fp16" else None
        self.step = 0
        self.resume_changes: dict = {}
        self._videos: VideoSet | None = None

    # -------------------------------------------------------------- hooks (training/distill.py overrides them)
    # Options a resume must share with the state it continues.
    RESUME_KEYS = ("stage", "init", "preset", "seed", "frames", "size")

    def build_model(self) -> TrainModel:
        """What trains (and what DDP wraps), built on self.models."""
        model = TrainModel(self.models, self.opts.stage)
        if self.opts.grad_checkpointing:
            grad_ckpt.enable(model.denoising_unet)
            if self.opts.stage == 1:
                grad_ckpt.enable(model.reference_unet, reference=True)
        return model

    def sample_timesteps(self, b: int, gen: torch.Generator) -> torch.Tensor:
        """(b,) long training timesteps, uniform over the schedule's."""
        return torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen)

    def export_models(self) -> Models:
        """The Models the exported checkpoint holds."""
        return self.model.export(self.models)

    def provenance(self) -> dict:
        return {"trained_by": "aa-trt train", "stage": self.opts.stage, "step": self.step,
                "options": dataclasses.asdict(self.opts), "world_size": self.world}

    def autocast(self):
        o = self.opts
        return (torch.autocast("cuda", dtype=torch.bfloat16 if o.precision == "bf16" else torch.float16)
                if o.precision != "no" else nullcontext())

    # -------------------------------------------------------------- data
    # The probability of a reference frame from another video (sample_batch): 0 for the stages that
    # learn to reconstruct the clip, where the reference must show the clip's own character.
    cross_ref: float = 0.0

    @property
    def videos(self) -> VideoSet:
        if self._videos is None:
            size = (self.opts.size, self.opts.size) if self.opts.size else None
            self._videos = VideoSet(self.opts.data, size)
        return self._videos

    def draw(self, step: int) -> StepInputs:
        """The inputs of `step` on this rank, a pure function of (seed, step, rank)."""
        o = self.opts
        rng = np.random.default_rng([o.seed, step, self.rank])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        px = sample_batch(self.videos, rng, o.batch, o.frames, o.stride, self.cross_ref)
        lb = encode(self.models.vae, self.models.image_encoder, px, self.models.config.latent_scale,
                    self.device, gen)
        b = lb.latents.shape[0]
        noise = offset_noise(tuple(lb.latents.shape), o.noise_offset, gen).to(self.device)
        t = self.sample_timesteps(b, gen).to(self.device)
        use_ref = torch.from_numpy(rng.random(b) >= o.uncond_ratio).to(self.device)
        return StepInputs(lb, noise, t, use_ref)

    # -------------------------------------------------------------- one step
    def loss(self, inp: StepInputs) -> torch.Tensor:
        """The min-SNR-weighted v (or epsilon) MSE of one batch, a scalar."""
        x0 = inp.batch.latents
        b, c, f, h, w = x0.shape
        rows = lambda x: x.transpose(1, 2).reshape(b * f, c, h, w)  # noqa: E731  (B,C,F,h,w) -> (B*F,C,h,w)
        noisy = rows(self.schedule.add_noise(x0, inp.noise, inp.timesteps))
        target = rows(self.schedule.target(x0, inp.noise, inp.timesteps))
        with self.autocast():
            b_ = inp.batch
            pred = self.ddp(noisy, inp.timesteps, b_.ref_latent, b_.clip, b_.pose, inp.use_ref)
        weight = min_snr_weight(self.schedule.snr(inp.timesteps), self.opts.snr_gamma,
                                self.schedule.prediction_type)
        return weighted_mse(pred.view(b, f, c, h, w), target.view(b, f, c, h, w), weight)

    def train_step(self, inp: StepInputs) -> float:
        loss = self.loss(inp)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.opts.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        self.step += 1
        return loss.item()

    # -------------------------------------------------------------- state
    def _rng_state(self) -> dict:
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": random.getstate()}

    def _set_rng_state(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        if s["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        n = s["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        random.setstate(s["python"])

    def save_state(self) -> Path | None:
        """Rank 0 writes out/train_state.pt atomically; every rank returns after it is complete."""
        rngs = D.all_gather_object(self._rng_state())
        path = self.out / STATE_FILE
        if self.rank == 0:
            state = {"version": STATE_VERSION, "step": self.step, "stage": self.opts.stage,
                     "options": dataclasses.asdict(self.opts), "world_size": self.world,
                     "init_fingerprint": self.init_fingerprint,
                     "model": {n: p.detach().cpu() for n, p in self.params},
                     "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rngs}
            with atomic_output(path, fsync=True, make_parent=True) as tmp, open(tmp, "wb") as fh:
                torch.save(state, fh)
        if self.world > 1:
            dist.barrier()
        return path

    def load_state(self) -> bool:
        """Resume from out/train_state.pt if it exists. False when there is none."""
        path = self.out / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise InputError(f"{path}: training state version {state.get('version')} is not {STATE_VERSION}")
        old = state["options"]
        for key in self.RESUME_KEYS:
            if old.get(key) != getattr(self.opts, key):
                raise InputError(f"{path}: was trained with --{key.replace('_', '-')} {old.get(key)}, "
                                 f"not {getattr(self.opts, key)}; use another --out to start afresh")
        if not np.allclose(state["init_fingerprint"], self.init_fingerprint, rtol=0, atol=0):
            raise InputError(f"{path}: the initial weights differ from those this state was trained from")
        names = [n for n, _ in self.params]
        if sorted(names) != sorted(state["model"]):
            raise InputError(f"{path}: its trainable parameters do not match this model's")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["model"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        # Both state dicts carry the old run's hyperparameters (the scheduler its base LR, the
        # optimiser its LR and weight decay): a resume that changes --lr or --weight-decay must
        # get the new values, with the schedule's factor at this step (the moments stay).
        self.lr_schedule.base_lrs = [self.opts.lr] * len(self.optimizer.param_groups)
        factor = lr_factor(self.opts, self.lr_schedule.last_epoch)
        for g in self.optimizer.param_groups:
            g["initial_lr"], g["lr"], g["weight_decay"] = self.opts.lr, self.opts.lr * factor, self.opts.weight_decay
        self.lr_schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] == self.world:
            self._set_rng_state(state["rng"][self.rank])
        self.step = state["step"]
        # Options a resume may change (a longer --steps, new --data, another LR): said aloud and
        # logged, so the run's record shows where its schedule or data changed.
        self.resume_changes = {k: [old[k], v] for k, v in dataclasses.asdict(self.opts).items()
                               if k not in ("resume", "device") and k in old and old[k] != v}
        return True

    # -------------------------------------------------------------- checks and export
    def replica_digests(self) -> list[str]:
        """sha256 of this stage's trainable weights on every rank (all equal unless DDP diverged)."""
        return D.all_gather_object(_digest(self.params))

    def export(self, path: Path | None = None) -> Path | None:
        """Rank 0 writes out/model.safetensors (or `path`): every component, this stage's weights
        in place."""
        if self.rank == 0:
            path = save_models(path or self.out / MODEL_FILE, self.export_models(), provenance=self.provenance())
        if self.world > 1:
            dist.barrier()
        return path

    def log(self, record: dict) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def check_replicas(self) -> None:
        digests = self.replica_digests()
        same = len(set(digests)) == 1
        self.log({"event": "replicas", "step": self.step, "digests": digests, "identical": same})
        if not same:
            raise RuntimeError(f"replicas diverged at step {self.step}: {digests}")

    # -------------------------------------------------------------- the loop
    def run(self, progress: bool = True) -> Path | None:
        o = self.opts
        if o.resume and self.load_state():
            self.log({"event": "resumed", "step": self.step, "changed": self.resume_changes})
            if self.rank == 0 and progress:
                print(f"resumed {self.out / STATE_FILE} at step {self.step}")
                for key, (was, now) in self.resume_changes.items():
                    print(f"  --{key.replace('_', '-')}: {was} -> {now}")
        t_last, losses = time.perf_counter(), []
        while self.step < o.steps:
            loss = self.train_step(self.draw(self.step))
            losses.append(loss)
            if self.step % o.log_every == 0 or self.step == o.steps:
                mean = torch.tensor(float(np.mean(losses)), device=self.device)
                if self.world > 1:
                    dist.all_reduce(mean)
                    mean /= self.world
                dt = (time.perf_counter() - t_last) / len(losses)
                rec = {"step": self.step, "loss": round(float(mean), 6), "lr": self.lr_schedule.get_last_lr()[0],
                       "s_per_step": round(dt, 4)}
                self.log(rec)
                if self.rank == 0 and progress:
                    print(f"step {self.step}/{o.steps} loss {rec['loss']:.5f} {dt:.2f} s/step", flush=True)
                t_last, losses = time.perf_counter(), []
            if o.snapshot_every and self.step % o.snapshot_every == 0 and self.step < o.steps:
                self.export(self.out / "snapshots" / f"step_{self.step:06d}.safetensors")
            if self.step % o.save_every == 0 and self.step < o.steps:
                self.save_state()
                if self.world > 1:
                    self.check_replicas()
        self.save_state()
        self.check_replicas()
        return self.export()


def train(opts: TrainOptions, progress: bool = True, trainer: type[Trainer] = Trainer) -> Path | None:
    """Train (under torchrun: one process of it) and export; rank 0 returns the checkpoint path.
    `trainer`: the Trainer class for these options (training.distill.DistillTrainer for its own)."""
    from aa_trt import attention

    # Training hands reference attention one K/V row per frame row (each sample has its own
    # reference); the fused kernels read one shared (1, m, c) reference, and would be picked for
    # blocks whose inputs need no gradient (stage 2, before the first motion module). Plain path.
    # Restored afterwards: a program that trains and then renders (the tests do) renders with its own.
    previous = attention.set_backend("sdpa")
    # The process group of every torchrun job (aa_trt.process_group): gloo on CPU, NCCL on CUDA.
    started = D.init_process_group(str(_device(opts.device, int(os.environ.get("LOCAL_RANK", 0)))))
    try:
        return trainer(opts).run(progress)
    finally:
        attention.set_backend(previous)
        D.shutdown(started)
