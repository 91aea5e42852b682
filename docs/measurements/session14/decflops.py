import sys, torch, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../../.."))  # the repository root
from torch.utils.flop_counter import FlopCounterMode
from benchmarks.test_precision_speed import sd15_half
from benchmarks.workloads import full_models
torch.set_num_threads(1)
models = full_models(sd15_half(), seed=0)
vae = models.vae.eval().to(torch.bfloat16)
x = torch.randn(4, 4, 32, 32).bfloat16()
with torch.inference_mode():
    with FlopCounterMode(display=False) as fc:
        vae.decode(x)
    f = fc.get_total_flops()
    s=time.perf_counter(); vae.decode(x); e=time.perf_counter()-s
print(f"{f/1e9:.1f} GFLOP, {e:.2f}s, {f/1e9/e:.0f} GFLOP/s")
