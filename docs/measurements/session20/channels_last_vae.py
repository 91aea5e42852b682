"""The VAE decoder in channels_last (the ResNet shortcut keeping the layout) against NCHW, the embedded
model's and sd15-half's, fp32 and bf16, random weights. Not adopted (docs/performance.md)."""
import time, torch, copy, dataclasses, sys
import torch.nn.functional as F
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
import aa_trt.models.vae as V
from aa_trt.models.vae import AutoencoderKL
from aa_trt.config import PRESETS
from aa_trt.checkpoint import read_config
from aa_trt.run import DEFAULT_MODEL
from benchmarks.workloads import randomize_
torch.set_num_threads(2)
def fwd(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous())
    return x + h
V.ResnetBlock.forward = fwd
cases = {"embedded 128px x8": (read_config(DEFAULT_MODEL).vae, 8, 16, 16),
         "sd15-half 256px x4": (dict(PRESETS["sd15"].vae, block_out_channels=[64,128,256,256]), 4, 32, 32)}
for name, (vc, n, h, w) in cases.items():
    cfgcls = V.VAEConfig
    vcfg = cfgcls.from_dict(vc)
    m = AutoencoderKL(vcfg); randomize_(m, 0); m.eval()
    z0 = torch.randn(n, vcfg.latent_channels, h, w)
    for dt in (torch.float32, torch.bfloat16):
        a = copy.deepcopy(m).to(dt); b = copy.deepcopy(m).to(dt).to(memory_format=torch.channels_last)
        z = z0.to(dt)
        ts = {"nchw": [], "cl": []}
        with torch.no_grad():
            for r in range(5):
                for k, mm, zz in (("nchw", a, z), ("cl", b, z.contiguous(memory_format=torch.channels_last))):
                    t = time.perf_counter(); y = mm.decode(zz).sample; ts[k].append(time.perf_counter() - t)
                    if r == 0: ys = ts.setdefault('y', {}); ys[k] = y.float()
        med = {k: sorted(v)[2] for k, v in ts.items() if k != 'y'}
        d = ts['y']['nchw'] - ts['y']['cl']
        print(f"{name} {dt}: nchw {med['nchw']:.3f} s, cl {med['cl']:.3f} s, ratio {med['nchw']/med['cl']:.2f}x, max|diff| {d.abs().max():.2e}")
