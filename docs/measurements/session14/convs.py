import sys, torch, time, collections
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../../.."))  # the repository root
from benchmarks.test_precision_speed import sd15_half
from benchmarks.workloads import full_models
torch.set_num_threads(1)
models = full_models(sd15_half(), seed=0)
vae = models.vae.eval().to(torch.bfloat16)
shapes = collections.Counter()
def hook(m, inp, out):
    shapes[(tuple(inp[0].shape), m.in_channels, m.out_channels, m.kernel_size[0])] += 1
hs = [m.register_forward_hook(hook) for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
x = torch.randn(4, 4, 32, 32).bfloat16()
with torch.inference_mode(): vae.decode(x)
for h in hs: h.remove()
tot = {"nchw":0, "cl":0}
for (shape, ci, co, k), n in shapes.items():
    conv = torch.nn.Conv2d(ci, co, k, padding=k//2).bfloat16().eval()
    xi = torch.randn(shape).bfloat16()
    res = {}
    for name in ("nchw", "cl"):
        c = conv.to(memory_format=torch.channels_last if name=="cl" else torch.contiguous_format)
        xx = xi.contiguous(memory_format=torch.channels_last if name=="cl" else torch.contiguous_format)
        with torch.inference_mode():
            c(xx); s=time.perf_counter(); c(xx); c(xx); e=(time.perf_counter()-s)/2
        res[name]=e; tot[name]+=e*n
    fl = 2*shape[0]*shape[2]*shape[3]*ci*co*k*k
    print(shape, ci, co, k, "x", n, {k2: f"{v*1e3:.0f}ms {fl/v/1e9:.0f}GF/s" for k2,v in res.items()})
print(tot)
