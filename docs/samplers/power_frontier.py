"""THREADS=2 PYTHONPATH=. python docs/samplers/power_frontier.py example|heldout|guard OUT.jsonl [GUIDANCE] [DATA]

The timestep-power frontier of docs/samplers.md: DDIM and DPM-Solver++(2M) at few steps with
power-spaced timesteps (`SampleOptions.timestep_power`), scored against DDIM-100 of the same noise
and guidance scale (the default spacing, CFG at every step), embedded model, fp32, seed 0.
example: examples/ref.png + examples/dance.mp4, 24 frames, poses from `aa-trt run`'s own pose
stage. heldout: the first video of test_characters and of test_motions of DATA (default
/tmp/dst/synth128, made by `aa-trt data synth --out DATA --videos 40 --size 128 --frames 24
--format npz --seed 0`), frames 1-12 driven by their exact poses, reference = frame 0.
guard: every video of both held-out splits (8), the few candidate options only (the truth guard).
PLAN=few (environment): DPM-Solver++(2M) at 3 and 4 steps with powers 3..5 instead (session 20)."""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from aa_trt.options import SampleOptions as S
from aa_trt.pipeline import Animator
from aa_trt.run import DEFAULT_MODEL
from aa_trt.training.evaluate import agreement_frontier

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
which, out = sys.argv[1], sys.argv[2]
only = float(sys.argv[3]) if len(sys.argv) > 3 else None
anim = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
if which == "example":
    from aa_trt.checkpoint import read_config
    from aa_trt.run import RunOptions, driving_poses, output_size
    from aa_trt.video import open_clip, read_image
    opts = RunOptions.create(ref=Path("examples/ref.png"), driving=Path("examples/dance.mp4"), output=Path("/tmp/x.mp4"), quiet=True)
    ref = read_image(opts.ref)
    clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)
    w, h = output_size(ref.size, min(read_config(DEFAULT_MODEL).default_size), None, None)
    poses, _ = driving_poses(opts, clip, ref, w, h)
    videos = [{"name": "example", "ref": ref, "size": (w, h), "poses": poses, "seed": 0, "true": None}]
else:
    root = Path(sys.argv[4] if len(sys.argv) > 4 else "/tmp/dst/synth128")
    videos = []
    for split in ("test_characters", "test_motions"):
      for e in json.load(open(root / f"{split}.json"))[:None if which == "guard" else 1]:
        with np.load(root / e["npz_path"]) as d:
            videos.append({"name": e["npz_path"], "ref": d["frames"][0], "poses": d["poses"][1:13],
                           "true": d["frames"][1:13], "seed": 0})

def c(sampler, steps, g, power=None):
    return S(sampler=sampler, steps=steps, guidance=g, timestep_power=power)

plan = []
for steps in (4, 5, 6, 8, 10):
    for power in (None, 1.5, 2.0, 2.5, 3.0):
        plan.append(c("ddim", steps, 1.0, power))
    for power in (None, 2.0, 3.0):
        plan.append(c("dpmpp_2m", steps, 1.0, power))
plan.append(c("ddim", 20, 1.0))
for steps in (5, 8, 10):
    for power in (None, 1.5, 2.0, 3.0):
        plan.append(c("ddim", steps, 3.5, power))
    plan.append(c("dpmpp_2m", steps, 3.5, 2.0))
plan.append(c("ddim", 20, 3.5))
if which == "guard":
    plan = [c("ddim", 20, 1.0), c("ddim", 10, 1.0, 1.5), c("ddim", 10, 1.0, 2.0), c("dpmpp_2m", 5, 1.0, 3.0),
            c("ddim", 20, 3.5), c("ddim", 8, 3.5, 1.5), c("ddim", 8, 3.5, 2.0), c("ddim", 10, 3.5, 2.0)]
if os.environ.get("PLAN") == "few":  # fewer than 5 evaluations: 2M at 3-4 steps, larger powers (session 20)
    plan = [c("dpmpp_2m", steps, 1.0, power) for steps in (3, 4) for power in (3.0, 3.5, 4.0, 5.0)]
    plan += [c("ddim", 20, 1.0), c("dpmpp_2m", 5, 1.0, 3.0)]
if only is not None:
    plan = [p for p in plan if p.guidance == only]
agreement_frontier(anim, videos, plan, 100, out=out, progress=False)
