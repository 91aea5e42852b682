"""THREADS=2 PYTHONPATH=. python docs/samplers/step_error.py CKPT OUT.jsonl [inject,prefix]

Where a 10-step DDIM render makes its distance from the converged one (docs/samplers.md, "Where
the error is made"), on the bundled example (24 frames, poses from `aa-trt run`'s pose stage, fp32,
seed 0, CFG 1.0). CKPT takes the 10 steps (the embedded model itself, or a distilled student); the
embedded model's DDIM-100 is the reference. 'inject': DDIM-100 up to the state before step i of
the 10, that one step by CKPT, then DDIM-100 on to the end, so only step i differs; 'prefix': CKPT's
steps 0..i, then DDIM-100 on. Rows: the latent RMSE after the step against DDIM-100's state
there, and the final frames' agreement PSNR/SSIM."""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from aa_trt.checkpoint import read_config
from aa_trt.options import SampleOptions as S
from aa_trt.pipeline import Animator
from aa_trt.run import DEFAULT_MODEL, RunOptions, driving_poses, output_size
from aa_trt.training.evaluate import to_uint8
from aa_trt.training.metrics import frame_metrics
from aa_trt.video import open_clip, read_image

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
student_path, out = Path(sys.argv[1]), sys.argv[2]
modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["inject", "prefix"]
opts = RunOptions.create(ref=Path(os.environ.get("REF", "examples/ref.png")), driving=Path("examples/dance.mp4"), output=Path("/tmp/x.mp4"), quiet=True)
config = read_config(DEFAULT_MODEL)
ref = read_image(opts.ref)
clip = open_clip(opts.driving, opts.start, opts.stride, opts.frames)
w, h = output_size(ref.size, min(config.default_size), None, None)
poses, _ = driving_poses(opts, clip, ref, w, h)
teacher = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
student = Animator.from_pretrained(student_path, dtype=torch.float32)
ct, cs = teacher.prepare(ref, poses, w, h), student.prepare(ref, poses, w, h)
noise = teacher.initial_latents(ct, 0)

class Stop(Exception):
    pass

def run(anim, cond, x, steps, start=0, stop=None, record=None):
    def cb(d):
        if record is not None:
            record[d["i"]] = d["x"].clone()
        if stop is not None and d["i"] == stop:
            raise Stop(d["x"])
    try:
        with torch.no_grad():
            return anim.run_denoise(cond, x, anim.sample_options(S(sampler="ddim", steps=steps), seed=0),
                                    callback=cb, progress=False, start=start)
    except Stop as e:
        return e.args[0]

def frames(anim, lat):
    with torch.no_grad():
        return to_uint8(anim.decode(lat))

states = {}
ref_lat = run(teacher, ct, noise, 100, record=states)
reference = frames(teacher, ref_lat)
before = [noise] + [states[10 * i - 1] for i in range(1, 10)]  # teacher state before student step i

def emit(row):
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")

for mode in modes:
    x = noise
    for i in range(10):
        if mode == "inject":
            x1 = run(student, cs, before[i], 10, start=i, stop=i)
            # also: the latent error of that one step against the teacher's 10 steps
            lat_err = float((x1 - (states[10 * i + 9])).pow(2).mean().sqrt())
        else:
            x = run(student, cs, x, 10, start=i, stop=i)
            x1 = x
            lat_err = float((x1 - states[10 * i + 9]).pow(2).mean().sqrt())
        fin = run(teacher, ct, x1, 100, start=10 * (i + 1)) if i < 9 else x1
        emit({"mode": mode, "student_step": i, "t": 999 - 100 * i, "latent_rmse": lat_err,
              "agreement": frame_metrics(frames(teacher, fin), reference), "ckpt": str(student_path)})
