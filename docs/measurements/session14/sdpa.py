import torch, time, torch.nn.functional as F
torch.set_num_threads(1)
def tm(f, n=3):
    f(); s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n
for (B,H,L,S,D) in [(32,8,1024,2048,20),(32,8,1024,77,20),(32,8,256,512,40),(32,8,64,128,80),(1024*2,8,16,16,20)]:
    q=torch.randn(B,H,L,D); k=torch.randn(B,H,S,D); v=torch.randn(B,H,S,D)
    qb,kb,vb=q.bfloat16(),k.bfloat16(),v.bfloat16()
    with torch.inference_mode():
        t32=tm(lambda: F.scaled_dot_product_attention(q,k,v))
        t16=tm(lambda: F.scaled_dot_product_attention(qb,kb,vb))
        tup=tm(lambda: F.scaled_dot_product_attention(qb.float(),kb.float(),vb.float()).bfloat16())
    print((B,H,L,S,D), f"fp32 {t32*1e3:.0f}ms bf16 {t16*1e3:.0f}ms bf16->fp32->bf16 {tup*1e3:.0f}ms")
