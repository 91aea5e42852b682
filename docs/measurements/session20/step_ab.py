"""python step_ab.py embedded|half bfloat16[,float32]: one CFG DDIM step (benchmarks.workloads.step_pair),
before (SDPA everywhere, attn2 with its query projection) against after (short_attention on the CPU,
the one-token cross-attention), alternating; median time and the relative difference of the outputs."""
import sys, time, torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
import aa_trt.attention as A
from aa_trt.models.layers import TransformerBlock
from benchmarks.test_precision_speed import sd15_half, _animator
from benchmarks.workloads import full_models, step_pair
torch.set_num_threads(2)
fast_cross = TransformerBlock.cross_attention
def long_cross(self, x, context): return self.attn2(self.norm2(x), context)
def mode(before):
    A.set_backend("sdpa" if before else "auto")
    TransformerBlock.cross_attention = long_cross if before else fast_cross
which = sys.argv[1]; dts = [getattr(torch, d) for d in sys.argv[2].split(",")]
if which == "half":
    models = full_models(sd15_half(), seed=0); Fr, H, W, R = 16, 256, 256, 3
else:
    from aa_trt.pipeline import Animator
    from aa_trt.run import DEFAULT_MODEL
    models = Animator.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).models; Fr, H, W, R = 24, 128, 128, 11
for dt in dts:
    a = _animator(models, dt); p = step_pair(a, Fr, H, W)
    ts = {True: [], False: []}; ys = {}
    for r in range(R + 1):
        for before in (True, False):
            mode(before)
            t = time.perf_counter(); ys[before] = p.ours(); el = time.perf_counter() - t
            if r: ts[before].append(el)
    mode(False)
    med = {k: sorted(v)[len(v)//2] for k, v in ts.items()}
    d = ys[True].float() - ys[False].float()
    print(which, dt, 'before %.3f s after %.3f s: %.3fx' % (med[True], med[False], med[True]/med[False]),
          'rel diff %.2e' % (d.norm() / ys[True].float().norm()).item(), flush=True)
