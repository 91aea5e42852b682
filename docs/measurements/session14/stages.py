import time, sys, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../../.."))  # the repository root
from benchmarks.test_precision_speed import sd15_half, _animator, SIZE
from benchmarks.workloads import full_models, video_inputs
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
models = full_models(sd15_half(), seed=0)
a = _animator(models, torch.bfloat16)
ref, poses, latents = video_inputs(SIZE["frames"], SIZE["height"], SIZE["width"])
def t(f, n=1):
    best = 1e9
    for _ in range(n):
        s = time.perf_counter(); r = f(); best = min(best, time.perf_counter() - s)
    return r, best
with torch.inference_mode():
    cond, tp = t(lambda: a.prepare(ref, poses))
    out, td = t(lambda: a.denoise(cond, latents, steps=1, guidance=SIZE["guidance"], progress=False))
    fr, tdec = t(lambda: a.decode(out))
    cond, tp = t(lambda: a.prepare(ref, poses))
    fr, tdec = t(lambda: a.decode(out))
print(f"prepare {tp:.2f}s  one CFG step {td:.2f}s  decode {tdec:.2f}s  (4 steps total ~ {tp+4*td+tdec:.1f}s)")
