import time, sys, torch, copy
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../../.."))  # the repository root
from benchmarks.test_precision_speed import sd15_half
from benchmarks.workloads import full_models
torch.set_num_threads(1)
models = full_models(sd15_half(), seed=0)
v1 = models.vae.eval().to(torch.bfloat16)
v2 = copy.deepcopy(v1).to(memory_format=torch.channels_last)
z = torch.randn(4, 4, 32, 32).bfloat16()
z2 = z.contiguous(memory_format=torch.channels_last)
ts = {"nchw": [], "cl": []}
with torch.inference_mode():
    v1.decode(z); v2.decode(z2)
    for r in range(4):
        for name, v, x in (("nchw", v1, z), ("cl", v2, z2)):
            s = time.perf_counter(); v.decode(x); ts[name].append(time.perf_counter() - s)
print({k: [round(x, 2) for x in v] for k, v in ts.items()})
