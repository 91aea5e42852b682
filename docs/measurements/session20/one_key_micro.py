"""Cross-attention shapes (one key, and 16/32 keys with many queries): SDPA against matmul + softmax, with
the error against float64."""
import torch, time, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, *a, n=7):
    f(*a); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(*a); ts.append(time.perf_counter()-t)
    return sorted(ts)[n//2]*1e3
def manual(q,k,v):
    s = (q @ k.transpose(-1,-2)) * q.shape[-1]**-0.5
    return s.softmax(-1) @ v
for qs, ks in [((32,8,1024,20),(32,8,1,20)), ((32,8,256,40),(32,8,1,40)), ((48,2,256,32),(48,2,1,32)), ((48,2,256,32),(48,2,16,32)), ((32,8,1024,20),(32,8,32,20))]:
    for dt in (torch.float32, torch.bfloat16):
        q=torch.randn(qs,dtype=dt); k=torch.randn(ks,dtype=dt); v=torch.randn(ks,dtype=dt)
        r=F.scaled_dot_product_attention(q.double(),k.double(),v.double())
        a=bench(F.scaled_dot_product_attention,q,k,v); b=bench(manual,q,k,v)
        ea=(F.scaled_dot_product_attention(q,k,v).double()-r).norm()/r.norm(); eb=(manual(q,k,v).double()-r).norm()/r.norm()
        print(qs, ks[2], str(dt)[6:], 'sdpa %.1f ms (err %.1e) manual %.1f ms (err %.1e)' % (a,ea,b,eb))
