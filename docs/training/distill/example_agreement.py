"""[REF=IMAGE] THREADS=1 PYTHONPATH=. python docs/training/distill/example_agreement.py STUDENT.safetensors [STUDENT2 ...] OUT.jsonl: the bundled example
(examples/ref.png + examples/dance.mp4, 24 frames, poses from aa-trt run's own pose stage), fp32,
seed 0: the teacher's DDIM-100 render as the reference; the teacher at DDIM-10 and DDIM-20 and the
student(s) at their declared steps and at 20 scored against it (agreement PSNR/SSIM over uint8 frames)."""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
from aa_trt.checkpoint import read_config
from aa_trt.options import SampleOptions as S
from aa_trt.pipeline import Animator
from aa_trt.run import DEFAULT_MODEL, RunOptions, driving_poses, output_size
from aa_trt.training.evaluate import to_uint8, unet_evaluations
from aa_trt.training.metrics import frame_metrics
from aa_trt.video import open_clip, read_image

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
student_paths, out = [Path(p) for p in sys.argv[1:-1]], sys.argv[-1]
opts = RunOptions.create(ref=Path(os.environ.get("REF", "examples/ref.png")), driving=Path("examples/dance.mp4"), output=Path("/tmp/x.mp4"), quiet=True)
config = read_config(DEFAULT_MODEL)
ref = read_image(opts.ref)
clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)
w, h = output_size(ref.size, min(config.default_size), None, None)
poses, _ = driving_poses(opts, clip, ref, w, h)
teacher = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)

def render(anim, sample):
    cond = anim.prepare(ref, poses, w, h)
    noise = anim.initial_latents(cond, 0)
    with torch.no_grad():
        return to_uint8(anim.decode(anim.run_denoise(cond, noise, anim.sample_options(sample, seed=0), progress=False)))

reference = render(teacher, S(sampler="ddim", steps=100))
rows = []
runs = [("teacher", DEFAULT_MODEL, teacher, S(steps=10)), ("teacher", DEFAULT_MODEL, teacher, S(steps=20))]
for path in student_paths:
    student = Animator.from_pretrained(path, dtype=torch.float32)
    runs += [("student", path, student, S()), ("student", path, student, S(steps=20))]
for name, path, anim, sample in runs:
    t0 = time.perf_counter()
    frames = render(anim, sample)
    s = anim.sample_options(sample, seed=0)
    row = {"video": "example", "model": name, "ckpt": str(path),
           "steps": s.steps, "guidance": s.guidance, "seconds": round(time.perf_counter() - t0, 1),
           "unet_evaluations": unet_evaluations(s, len(poses), anim.config.scheduler),
           "agreement": frame_metrics(frames, reference)}
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
