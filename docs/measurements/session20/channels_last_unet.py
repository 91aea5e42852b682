"""python channels_last_unet.py embedded|half [x]: one CFG step with the denoising UNet's weights in
channels_last against NCHW (bf16; fp32 too with a second argument). Not adopted (docs/performance.md)."""
import copy, sys, time, torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
from benchmarks.test_precision_speed import sd15_half, _animator
from benchmarks.workloads import full_models, step_pair
torch.set_num_threads(2)
which = sys.argv[1] if len(sys.argv) > 1 else "half"
dts = [torch.bfloat16] if len(sys.argv) < 3 else [torch.bfloat16, torch.float32]
if which == "half":
    models = full_models(sd15_half(), seed=0); F, H, W = 16, 256, 256
else:
    from aa_trt.pipeline import Animator
    from aa_trt.run import DEFAULT_MODEL
    models = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).models; F, H, W = 24, 128, 128
for dt in dts:
    a = _animator(models, dt)
    b = _animator(models, dt)
    b.models.denoising_unet.to(memory_format=torch.channels_last)
    pa, pb = step_pair(a, F, H, W), step_pair(b, F, H, W)
    ya, yb = pa.ours(), pb.ours()
    ts = {"nchw": [], "cl": []}
    for r in range(3):
        for k, p in (("nchw", pa), ("cl", pb)):
            t = time.perf_counter(); p.ours(); ts[k].append(time.perf_counter() - t)
    d = (ya.float() - yb.float())
    print(which, dt, {k: ['%.3f' % x for x in v] for k, v in ts.items()},
          'ratio %.3f' % (sorted(ts['nchw'])[1] / sorted(ts['cl'])[1]),
          'rel diff %.2e' % (d.norm() / ya.float().norm()).item())
