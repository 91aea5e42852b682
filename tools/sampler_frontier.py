"""Agreement with the converged render for few-step sampling options: DDIM and DPM-Solver++(2M) with
and without power-spaced timesteps, each scored against DDIM-100 of the same noise and guidance
scale (the tables of docs/samplers.md).

    python tools/sampler_frontier.py example OUT.jsonl
    python tools/sampler_frontier.py heldout OUT.jsonl --data DATA
    python tools/sampler_frontier.py guard OUT.jsonl --data DATA
    python tools/sampler_frontier.py example OUT.jsonl --plan few

example: examples/ref.png + examples/dance.mp4, 24 frames, poses from `aa-trt run`'s own pose stage.
heldout: the first video of each held-out split of DATA (`aa-trt data synth --out DATA --videos 40
--size 128 --frames 24 --format npz --seed 0`), frames 1-12 driven by their exact poses, frame 0 the
reference; guard: every held-out video. One JSON row per video and option, appended as it is made.
"""
import argparse
import json
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", choices=("example", "heldout", "guard"), help="which videos (above)")
    p.add_argument("out", help="JSON-lines file the rows are appended to")
    p.add_argument("--plan", choices=("frontier", "guard", "few", "reuse", "fast", "interval"), default=None,
                   help="options to score: the whole frontier (default; 'guard' for the guard videos), the "
                        "candidates only, DPM-Solver++(2M) at 3-4 steps with large powers, feature reuse "
                        "('reuse': DDIM-20 and the best sampler settings with and without it), or "
                        "'fast': the defaults, --fast and the 100-step render's own truth scores; "
                        "'interval': CFG 3.5 at 7 steps with feature reuse, CFG at every step or from "
                        "t = 600 down")
    p.add_argument("--guidance", type=float, default=None, help="keep only the options at this CFG scale")
    p.add_argument("--data", type=Path, default=None, help="synthetic data set (heldout, guard)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--engine", type=Path, default=None,
                   help="run the options on this build's graphs (`aa-trt build`); the references stay the "
                        "fp32 torch path's")
    p.add_argument("--reference-steps", type=int, default=100, help="DDIM steps of the reference render")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N videos (continue a run that was cut, appending to OUT)")
    return p


def plan(name: str, S) -> list:
    """The sampling options of each plan (S: SampleOptions)."""
    def c(sampler, steps, g, power=None, every=1, depth=1, interval=None):
        return S(sampler=sampler, steps=steps, guidance=g, timestep_power=power, reuse_every=every,
                 reuse_depth=depth, guidance_interval=interval)

    if name == "interval":  # the uncond branch skipped at the first steps (t > 600) of --fast's CFG setting
        return [c("ddim", 20, 3.5), c("ddim", 7, 3.5, 2.0, 2), c("ddim", 7, 3.5, 2.0, 2, 1, (0, 600)),
                c("ddim", 7, 3.5, 2.25, 2, 1, (0, 600))]

    if name == "fast":
        return [c("ddim", 20, 1.0), S(guidance=1.0, fast=True), c("ddim", 20, 3.5), S(guidance=3.5, fast=True)]
    if name == "reuse":  # feature reuse on DDIM-20 and on the best sampler-only settings
        out = []
        for g, best in ((1.0, ("dpmpp_2m", 5, 3.0)), (3.5, ("ddim", 8, 2.0))):
            out += [c("ddim", 20, g), c("ddim", 20, g, None, 2), c("ddim", 20, g, None, 3), c("ddim", 20, g, None, 2, 2)]
            out += [c(*best[:2], g, best[2]), c(*best[:2], g, best[2], 2), c(*best[:2], g, best[2], 3),
                    c(*best[:2], g, best[2], 2, 2)]
            out += [c(best[0], n, g, best[2], 2) for n in (4, 6, 7)]
            out += [c(best[0], n, g, best[2]) for n in (4, 6)]
        return out

    if name == "guard":  # the presets the docs recommend, on every held-out video
        return [c("ddim", 20, 1.0), c("ddim", 10, 1.0, 1.5), c("ddim", 10, 1.0, 2.0), c("dpmpp_2m", 5, 1.0, 3.0),
                c("ddim", 20, 3.5), c("ddim", 8, 3.5, 1.5), c("ddim", 8, 3.5, 2.0), c("ddim", 10, 3.5, 2.0)]
    if name == "few":  # below 5 UNet evaluations
        return ([c("dpmpp_2m", s, 1.0, p) for s in (3, 4) for p in (3.0, 3.5, 4.0, 5.0)]
                + [c("ddim", 20, 1.0), c("dpmpp_2m", 5, 1.0, 3.0)])
    out = []
    for steps in (4, 5, 6, 8, 10):
        out += [c("ddim", steps, 1.0, p) for p in (None, 1.5, 2.0, 2.5, 3.0)]
        out += [c("dpmpp_2m", steps, 1.0, p) for p in (None, 2.0, 3.0)]
    out.append(c("ddim", 20, 1.0))
    for steps in (5, 8, 10):
        out += [c("ddim", steps, 3.5, p) for p in (None, 1.5, 2.0, 3.0)]
        out.append(c("dpmpp_2m", steps, 3.5, 2.0))
    out.append(c("ddim", 20, 3.5))
    return out


def example_video(ckpt) -> dict:
    """The bundled example as `aa-trt run` reads it: its pose stage, its output size."""
    from aa_trt.checkpoint import read_config
    from aa_trt.run import RunOptions, driving_poses, output_size
    from aa_trt.video import open_clip, read_image

    opts = RunOptions.create(ref=Path("examples/ref.png"), driving=Path("examples/dance.mp4"),
                             output=Path("unused.mp4"), quiet=True)
    ref = read_image(opts.ref)
    clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)
    w, h = output_size(ref.size, min(read_config(ckpt).default_size), None, None)
    poses, _ = driving_poses(opts, clip, ref, w, h)
    return {"name": "example", "ref": ref, "size": (w, h), "poses": poses, "seed": 0, "true": None}


def heldout_videos(root: Path, every: bool) -> list[dict]:
    import numpy as np

    videos = []
    for split in ("test_characters", "test_motions"):
        entries = json.loads((root / f"{split}.json").read_text())
        for e in entries if every else entries[:1]:
            with np.load(root / e["npz_path"]) as d:
                videos.append({"name": e["npz_path"], "ref": d["frames"][0], "poses": d["poses"][1:13],
                               "true": d["frames"][1:13], "seed": 0})
    return videos


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.videos != "example" and a.data is None:
        sys.exit(f"{a.videos}: give --data (a data set of `aa-trt data synth`)")
    import torch

    from aa_trt.options import SampleOptions
    from aa_trt.pipeline import Animator
    from aa_trt.run import DEFAULT_MODEL
    from aa_trt.training.evaluate import agreement_frontier

    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = a.ckpt or DEFAULT_MODEL
    configs = plan(a.plan or ("guard" if a.videos == "guard" else "frontier"), SampleOptions)
    if a.guidance is not None:
        configs = [c for c in configs if c.guidance == a.guidance]
    anim = Animator.from_pretrained(ckpt, dtype=torch.float32)
    runner = anim
    if a.engine is not None:
        from aa_trt.backends import animator_from_dir

        runner = animator_from_dir(a.engine, ckpt)
    videos = [example_video(ckpt)] if a.videos == "example" else heldout_videos(a.data, a.videos == "guard")
    videos = videos[a.skip:]
    agreement_frontier(runner, videos, configs, a.reference_steps, out=a.out, progress=False,
                       reference_animator=anim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
