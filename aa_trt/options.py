"""`SampleOptions`: every setting of the denoise loop, in one frozen value that checks itself.

The CLI (`run`, `batch` jobs), the Python API (`Animator.denoise` / `__call__`), the torchrun
broadcast and the engine backends all carry this one object; nothing downstream re-checks its
values. What can be checked without a model is checked on construction; what depends on the
model (steps <= its training timesteps, a window within its motion modules' table, the guidance
scale it declares) is checked by `resolve(config)`, which returns the copy the loop runs.
Every bad value raises `OptionError` naming the parameter.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from aa_trt.errors import OptionError

CONTEXT_SCHEDULES = ("uniform", "sliding")
MAX_SEED = 2**63 - 1
# How torchrun ranks share a denoise step (aa_trt.guidance.make_plan). Here, not in guidance.py,
# so that checking a flag never imports torch (`aa-trt pose` and `--help` stay light).
PARALLEL_MODES = ("auto", "window", "guidance", "both")


def check_parallel_mode(mode: str) -> str:
    if mode not in PARALLEL_MODES:
        raise OptionError("parallel", mode, f"expected one of {', '.join(PARALLEL_MODES)}")
    return mode


def _int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(name, value, "must be a whole number")
    if value < low or (high is not None and value > high):
        raise OptionError(name, value, f"must be in {low}..{high}" if high is not None else f"must be >= {low}")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(name, value, f"expected one of {', '.join(choices)}")


def _interval(value) -> tuple[int, int]:
    """(lo, hi) whole timesteps, 0 <= lo <= hi; a "LO,HI" string or any pair is accepted."""
    pair = value
    if isinstance(value, str):
        pair = value.replace(" ", "").split(",")
        try:
            pair = [int(v) for v in pair]
        except ValueError:
            raise OptionError("guidance_interval", value, "expected two whole timesteps LO,HI") from None
    try:
        lo, hi = pair
    except (TypeError, ValueError):
        raise OptionError("guidance_interval", value, "expected two whole timesteps (lo, hi)") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise OptionError("guidance_interval", value, "expected two whole timesteps (lo, hi)")
    if lo < 0 or hi < lo:
        raise OptionError("guidance_interval", value, "expected 0 <= lo <= hi")
    return int(lo), int(hi)


# `fast`: the sampling options that measured best per kind of checkpoint: the fewest counted UNet
# FLOPs with at least DDIM-20's agreement with the converged render (DDIM-100; docs/samplers.md,
# "Feature reuse and --fast", has the frontier and the commands that measured it): 0.22x DDIM-20's
# FLOPs without CFG, 0.23x with CFG 3.5, where the uncond branch is skipped at the two noisiest
# steps (the guidance interval: CFG from t = 600 down; on the example 40.44 dB against 40.71 with CFG
# at every step, DDIM-20 39.41; above DDIM-20 on each held-out video measured).
# Keyed by whether CFG runs (guidance > 1): with two branches multistep extrapolation is unstable.
FAST_PRESETS = {
    "no_cfg": dict(sampler="dpmpp_2m", steps=6, timestep_power=3.0, reuse_every=2, reuse_depth=1),
    "cfg": dict(sampler="ddim", steps=7, timestep_power=2.0, reuse_every=2, reuse_depth=1,
                guidance_interval=(0, 600)),
}
# The training timesteps the presets' guidance intervals are written for; fast_preset scales them
# to a model's own (0.6 T).
PRESET_TIMESTEPS = 1000
# The steps a checkpoint declares when it is not a distilled student (ModelConfig.steps' default).
UNDISTILLED_STEPS = 20


def fast_preset(config, guidance: float) -> dict:
    """The `fast` settings for a model (aa_trt.config.ModelConfig) at a guidance scale."""
    if config.steps != UNDISTILLED_STEPS:  # a distilled student: its own steps and sampler
        return {}
    preset = dict(FAST_PRESETS["cfg" if guidance > 1.0 else "no_cfg"])
    T = config.scheduler.num_train_timesteps
    if "guidance_interval" in preset and T != PRESET_TIMESTEPS:
        preset["guidance_interval"] = tuple(min(T - 1, round(v * T / PRESET_TIMESTEPS))
                                            for v in preset["guidance_interval"])
    return preset


@dataclass(frozen=True)
class SampleOptions:
    """How a video is denoised.

    steps: sampler steps (the UNet runs `steps` times per window and branch); None takes the
      checkpoint's declared steps (20 unless it is a distilled student).
    guidance: classifier-free guidance scale; None takes the checkpoint's declared one; <= 1 runs
      the cond branch only (no CFG, as Moore).
    sampler: the sampling method, a name in `aa_trt.sampling.SAMPLERS`.
    context_frames / context_overlap / context_schedule: the context windows (Moore's uniform
      closed loop, or sliding windows that never wrap).
    window_batch: context windows per UNet call.
    seed: seed of the initial noise (drawn on the CPU); None draws one.
    guidance_interval: (lo, hi) UNet timesteps, both included, where CFG applies (Kynkaanniemi et
      al. 2024, "Applying Guidance in a Limited Interval"); at the other steps only the cond branch
      runs (one UNet evaluation per window instead of two). None: CFG at every step.
    timestep_power: None spaces the steps by the checkpoint's rule (diffusers' DDIMScheduler:
      Moore-exact); a number p > 0 puts step i at round(T (1 - i / steps)^p) - 1, so p > 1 takes
      smaller steps at low noise, where a few-step render makes most of its error (2: DDIM-10
      closer to the converged render than DDIM-20; docs/samplers.md).
    reuse_every / reuse_depth: feature reuse across steps (DeepCache, Ma et al. 2024): the UNet
      runs whole at steps 0, N, 2N, ... (N = reuse_every) and at the steps between runs only its
      outermost `reuse_depth` resolution levels, on the deep features kept from the last whole
      step (per window and CFG branch). 1 (the default): every step whole. The depth is checked
      against the model (at most its levels - 1); a deeper branch saves less and changes less.
    fast: the measured fastest setting that keeps the default's agreement with the converged
      render (FAST_PRESETS, docs/samplers.md "--fast"), chosen by the run's guidance scale; it
      fills the fields left at their defaults when the options are resolved against a model
      (a field given explicitly wins). A distilled student (a model declaring its own steps)
      keeps its steps and sampler: nothing else was measured on one.
    """

    steps: int | None = None
    guidance: float | None = None
    sampler: str = "ddim"
    context_frames: int = 24
    context_overlap: int = 4
    context_schedule: str = "uniform"
    window_batch: int = 1
    seed: int | None = None
    guidance_interval: tuple[int, int] | None = None
    timestep_power: float | None = None
    reuse_every: int = 1
    reuse_depth: int = 1
    fast: bool = False

    def __post_init__(self):
        if self.steps is not None:
            _int("steps", self.steps, 1)
        if self.guidance is not None:
            g = self.guidance
            if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(g) or g < 0:
                raise OptionError("guidance", g, "must be a finite number >= 0")
            object.__setattr__(self, "guidance", float(self.guidance))
        from aa_trt.sampling import SAMPLERS  # torch, imported when first needed

        _choice("sampler", self.sampler, tuple(SAMPLERS))
        _int("context_frames", self.context_frames, 1)
        _int("context_overlap", self.context_overlap, 0)
        if self.context_overlap >= self.context_frames:
            raise OptionError("context_overlap", self.context_overlap,
                              f"must be smaller than `context_frames` ({self.context_frames})")
        _choice("context_schedule", self.context_schedule, CONTEXT_SCHEDULES)
        _int("window_batch", self.window_batch, 1)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", _interval(self.guidance_interval))
        if self.timestep_power is not None:
            p = self.timestep_power
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0 < p <= 10:
                raise OptionError("timestep_power", p, "must be a number in (0, 10]")
            object.__setattr__(self, "timestep_power", float(p))
        _int("reuse_every", self.reuse_every, 1)
        _int("reuse_depth", self.reuse_depth, 1)
        if not isinstance(self.fast, bool):
            raise OptionError("fast", self.fast, "must be true or false")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        """Each field's default by name, read off the class (no instance: checking a value imports
        torch for the sampler names, reading the defaults does not). The command line's flags and
        the page's fields start from these."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, base: "SampleOptions | None" = None, **overrides) -> "SampleOptions":
        """`base` (or the defaults) with the given fields replaced; unknown names are refused."""
        unknown = set(overrides) - set(cls.fields())
        if unknown:
            name = sorted(unknown)[0]
            raise OptionError(name, overrides[name], f"not a sampling option (those are: {', '.join(cls.fields())})")
        base = base if base is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def replace(self, **kw) -> "SampleOptions":
        return self.build(self, **kw)

    def resolve(self, config) -> "SampleOptions":
        """Checked against a model's config (aa_trt.config.ModelConfig); steps and guidance
        filled in from it where None."""
        T = config.scheduler.num_train_timesteps
        if self.fast:
            preset = fast_preset(config, self.guidance if self.guidance is not None else config.guidance)
            defaults = self.defaults()
            fill = {k: v for k, v in preset.items() if getattr(self, k) == defaults[k] and v != defaults[k]}
            if fill:
                return dataclasses.replace(self, **fill).resolve(config)
        if self.steps is None:
            return dataclasses.replace(self, steps=int(config.steps)).resolve(config)
        if self.steps > T:
            raise OptionError("steps", self.steps, f"must be in 1..{T} (the model's training timesteps)")
        if self.guidance_interval is not None and self.guidance_interval[1] > T - 1:
            raise OptionError("guidance_interval", self.guidance_interval,
                              f"timesteps must be in 0..{T - 1} (the model's training timesteps)")
        levels = len(config.unet.block_out_channels)
        if self.reuse_depth > levels - 1:
            raise OptionError("reuse_depth", self.reuse_depth,
                              f"must be in 1..{levels - 1} (the model's UNet has {levels} resolution levels; "
                              f"the innermost is the part reused)")
        limit = config.motion.max_len
        if self.context_frames > limit:
            raise OptionError("context_frames", self.context_frames,
                              f"exceeds the motion modules' maximum window of {limit} frames")
        return self if self.guidance is not None else dataclasses.replace(self, guidance=float(config.guidance))

    @property
    def reuses_features(self) -> bool:
        return self.reuse_every > 1

    def full_step(self, i: int) -> bool:
        """Whether step i runs the whole UNet (always, without feature reuse)."""
        return i % self.reuse_every == 0

    @property
    def cfg(self) -> bool:
        """Whether both guidance branches run (only meaningful once resolved)."""
        return self.guidance is not None and self.guidance > 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
