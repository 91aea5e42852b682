"""The sampling flags, declared once: one entry per SampleOptions field, the flag being `--` and
the field's name with dashes. `add_sample_flags` puts them on a command's parser with
SampleOptions' own defaults (help texts show them through %(default)s), and `sample_options`
turns the parsed flags back into a SampleOptions by field name. `run` and `eval` use both; the
page (aa_trt.ui) and `batch` jobs name the same fields.

A new SampleOptions field needs one entry here (tests/test_options.py checks that every field has
one); nothing else in the command line changes."""
from __future__ import annotations

import argparse

from aa_trt.options import CONTEXT_SCHEDULES, SampleOptions

# Field name -> argparse keywords (all but the flag and its default). In the order of `--help`.
SAMPLE_FLAGS: dict[str, dict] = {
    "seed": dict(type=int, help="noise seed: the same seed gives the same video"),
    "steps": dict(type=int, help="sampler steps (default: the checkpoint's; 20, as the paper, unless it is a "
                  "distilled student)"),
    "sampler": dict(metavar="ddim|dpmpp_2m",
                    help="sampling method: ddim (default; Moore's), dpmpp_2m (DPM-Solver++(2M): a little "
                    "closer to the many-step render at few steps without CFG, not with it; docs/samplers.md)"),
    "timestep_power": dict(type=float, metavar="P",
                           help="space the steps as round(1000 (1 - i/steps)^P) - 1: P > 1 takes smaller steps "
                           "at low noise; 2 makes 10 steps closer to the converged render than 20 default ones "
                           "(default: the checkpoint's spacing, Moore's; docs/samplers.md)"),
    "guidance": dict(type=float, help="classifier-free guidance scale (default: the checkpoint's; 3.5 for Moore's)"),
    "guidance_interval": dict(metavar="LO,HI",
                              help="apply CFG only at UNet timesteps LO..HI (0..999); other steps run the cond "
                              "branch alone, one UNet evaluation instead of two (default: CFG at every step)"),
    "context_frames": dict(type=int, help="frames per context window (default %(default)s, at most 32)"),
    "context_overlap": dict(type=int, help="frames shared by neighbouring windows (default %(default)s)"),
    "context_schedule": dict(metavar="|".join(CONTEXT_SCHEDULES),
                             help="uniform: Moore's closed-loop windows (wrap the end onto the start, for "
                             "looping dances); sliding: windows that never wrap (default %(default)s)"),
    "reuse_every": dict(type=int, metavar="N",
                        help="feature reuse: run the whole UNet every N steps and, between them, only its "
                        "outer levels on the deep features kept from the last whole step (default %(default)s: "
                        "off; docs/samplers.md)"),
    "reuse_depth": dict(type=int, metavar="D",
                        help="feature reuse: how many outer resolution levels the steps between whole ones "
                        "run (default %(default)s; deeper saves less)"),
    "fast": dict(action="store_true",
                 help="the measured fastest setting that keeps the default's agreement with a 100-step "
                 "render (sampler, spacing, steps, feature reuse; by the guidance scale; flags given "
                 "explicitly win; docs/samplers.md)"),
    "window_batch": dict(type=int, metavar="N",
                         help="context windows per UNet call (default %(default)s; more can be faster on a GPU)"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_sample_flags(parser: argparse.ArgumentParser, defaults: dict | None = None,
                     helps: dict | None = None) -> None:
    """One flag per SampleOptions field, defaulting to the field's default (or to `defaults[name]`
    where a command samples differently, e.g. `eval`'s first seed); `helps[name]` replaces a flag's
    help where the command gives the value another meaning."""
    values = {**SampleOptions.defaults(), **(defaults or {})}
    for name, kw in SAMPLE_FLAGS.items():
        kw = {**kw, "help": (helps or {}).get(name, kw["help"])}
        parser.add_argument(flag(name), dest=name, default=values[name], **kw)


def sample_options(args: argparse.Namespace, base: SampleOptions | None = None) -> SampleOptions:
    """The SampleOptions of parsed flags: every field the namespace holds, by name (OptionError,
    naming the field, for a bad value)."""
    return SampleOptions.build(base, **{n: getattr(args, n) for n in SampleOptions.fields() if hasattr(args, n)})
