"""THREADS=2 PYTHONPATH=. python docs/samplers/converged.py OUT.jsonl

Is DDIM-100 (the issue's "converged render") converged, and is the power-spaced DDIM-10 closer to
the converged video or only to DDIM-100's own last steps? The bundled example (24 frames, poses
from `aa-trt run`'s pose stage, embedded model, fp32, seed 0, CFG 1.0) rendered with DDIM-1000 (every
timestep of the schedule) and each render below scored against it."""
import json, os, sys
from pathlib import Path
import torch
from aa_trt.checkpoint import read_config
from aa_trt.options import SampleOptions as S
from aa_trt.pipeline import Animator
from aa_trt.run import DEFAULT_MODEL, RunOptions, driving_poses, output_size
from aa_trt.training.evaluate import to_uint8
from aa_trt.training.metrics import frame_metrics
from aa_trt.video import open_clip, read_image

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
out = sys.argv[1]
opts = RunOptions.create(ref=Path("examples/ref.png"), driving=Path("examples/dance.mp4"), output=Path("/tmp/x.mp4"), quiet=True)
ref = read_image(opts.ref)
clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)
w, h = output_size(ref.size, min(read_config(DEFAULT_MODEL).default_size), None, None)
poses, _ = driving_poses(opts, clip, ref, w, h)
anim = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
cond = anim.prepare(ref, poses, w, h)
noise = anim.initial_latents(cond, 0)

def render(steps, power=None):
    with torch.no_grad():
        s = anim.sample_options(S(steps=steps, guidance=1.0, timestep_power=power), seed=0)
        return to_uint8(anim.decode(anim.run_denoise(cond, noise.clone(), s, progress=False)))

finest = render(1000)
for steps, power in [(100, None), (200, None), (100, 2.0), (20, None), (20, 2.0), (10, None), (10, 1.5),
                     (10, 2.0), (10, 3.0), (8, 2.0), (6, 2.0), (6, 3.0)]:
    row = {"steps": steps, "timestep_power": power, "vs_ddim1000": frame_metrics(render(steps, power), finest)}
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
