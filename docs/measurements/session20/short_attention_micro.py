"""Motion-module attention shapes (b*h*w, heads, 16 frames, d): SDPA against matmul + softmax, 2 threads."""
import torch, time, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, *a, n=5):
    f(*a); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(*a); ts.append(time.perf_counter()-t)
    return sorted(ts)[n//2]*1e3
def manual(q,k,v):
    s = (q @ k.transpose(-1,-2)) * q.shape[-1]**-0.5
    return s.softmax(-1) @ v
for shape in [(2048,8,16,20),(512,8,16,40),(128,8,16,80),(32,8,16,80)]:
    for dt in (torch.float32, torch.bfloat16):
        q,k,v=(torch.randn(shape,dtype=dt) for _ in range(3))
        a=bench(F.scaled_dot_product_attention,q,k,v); b=bench(manual,q,k,v)
        print(shape, dt, 'sdpa %.1f ms manual %.1f ms' % (a,b))
