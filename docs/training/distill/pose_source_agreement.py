"""THREADS=1 PYTHONPATH=. python docs/training/distill/pose_source_agreement.py DATA STUDENT OUT.jsonl [FRAMES]:
does the pose source move a student's agreement? The first video of each test split of DATA
(reference frame 0, targets 1..FRAMES, as `aa-trt eval`), driven once by the data set's own pose
renderings (what eval and training use) and once by the poses `aa-trt run` would give (its pose
stage on the same lossless frames: extract, hold, align to the reference, render). For each: the
teacher's DDIM-100 as the reference, the teacher at DDIM-20 and the student at its steps against it."""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from aa_trt.options import SampleOptions as S
from aa_trt.pipeline import Animator
from aa_trt.pose.stage import driving_poses
from aa_trt.run import DEFAULT_MODEL
from aa_trt.training.evaluate import to_uint8, unet_evaluations
from aa_trt.training.metrics import frame_metrics

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
data, student_path, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 12
teacher = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
student = Animator.from_pretrained(student_path, dtype=torch.float32)


def render(anim, ref, poses, sample):
    h, w = ref.shape[:2]
    cond = anim.prepare(Image.fromarray(ref), poses, w, h)
    noise = anim.initial_latents(cond, 0)
    with torch.no_grad():
        return to_uint8(anim.decode(anim.run_denoise(cond, noise, anim.sample_options(sample, seed=0), progress=False)))


for split in ("test_characters", "test_motions"):
    entry = json.loads((data / f"{split}.json").read_text())[0]
    with np.load(data / entry["npz_path"]) as z:
        frames, dataset_poses = z["frames"], z["poses"]
    ref = frames[0]
    h, w = ref.shape[:2]
    run_poses, _ = driving_poses(list(frames[1:1 + n]), w, h, source=data / entry["npz_path"],
                                 ref_image=Image.fromarray(ref), ref_source=data / entry["npz_path"], progress=False)
    sources = {"dataset": dataset_poses[1:1 + n], "run": run_poses.array()}
    diff = np.abs(sources["dataset"].astype(np.int16) - sources["run"].astype(np.int16)).mean()
    for name, poses in sources.items():
        reference = render(teacher, ref, poses, S(sampler="ddim", steps=100))
        for model, anim, sample in (("teacher", teacher, S(steps=20)), ("student", student, S())):
            s = anim.sample_options(sample, seed=0)
            row = {"video": entry["npz_path"], "poses": name, "pose_image_mean_abs_diff": round(float(diff), 3),
                   "model": model, "steps": s.steps, "unet_evaluations": unet_evaluations(s, n, anim.config.scheduler),
                   "agreement": frame_metrics(render(anim, ref, poses, sample), reference)}
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
