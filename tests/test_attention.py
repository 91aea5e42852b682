"""The torch attention paths of aa_trt/attention.py and the one-token cross-attention of
models/layers.py, each against its plain reference on random inputs (the Triton kernels have
tests/test_kernels.py)."""
import pytest
import torch

from aa_trt import autotune

from aa_trt import attention as A
from aa_trt.models.layers import TransformerBlock


def _qkv(b, n, m, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, c, generator=g) * 2 for s in (n, m, m))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("b,n,m,c,heads", [(37, 16, 16, 64, 2), (9, 24, 24, 160, 8), (5, 3, 7, 40, 4),
                                           (6, 32, 32, 80, 1), (4, 1, 1, 32, 2)])
def test_short_attention_equals_sdpa(b, n, m, c, heads):
    q, k, v = _qkv(b, n, m, c, torch.float32)
    exact = A.sdpa_attention(q.double(), k.double(), v.double(), heads)
    assert _rel(A.short_attention(q, k, v, heads), exact) < 1e-6
    assert _rel(A.sdpa_attention(q, k, v, heads), exact) < 1e-6
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    # bf16: the scores are rounded to bf16 before the softmax (SDPA keeps them in fp32): a few
    # times SDPA's error, ~0.5% here, within what the bf16 pipeline already carries.
    exact_b = A.sdpa_attention(qb.double(), kb.double(), vb.double(), heads)
    assert _rel(A.short_attention(qb, kb, vb, heads), exact_b) < 2e-2


def test_cpu_dispatch_takes_the_short_path_only_for_short_sequences():
    previous = A.set_backend("auto")
    try:
        q, k, v = _qkv(8, 16, 16, 64, torch.float32)
        assert torch.equal(A.attention(q, k, v, 2), A.short_attention(q, k, v, 2))
        bq, bk, bv = (torch.randn(16, 64) for _ in range(3))
        assert torch.equal(A.temporal_attention(q, k, v, 2, bq, bk, bv),
                           A.short_attention(q + bq, k + bk, v + bv, 2))
        # Longer sequences take the measured choice (SDPA or chunked GEMMs, tests/test_cpu_fast_paths.py);
        # pinned to SDPA here, they must not take the short path.
        with autotune.override({"attention:": "sdpa"}):
            q2, k2, v2 = _qkv(2, 16, A.SHORT_SEQUENCE + 1, 64, torch.float32)
            assert torch.equal(A.attention(q2, k2, v2, 2), A.sdpa_attention(q2, k2, v2, 2))
            q3, k3, v3 = _qkv(2, A.SHORT_SEQUENCE + 1, 4, 64, torch.float32)  # many queries, few keys
            assert torch.equal(A.attention(q3, k3, v3, 2), A.sdpa_attention(q3, k3, v3, 2))
        A.set_backend("sdpa")  # the plain path everywhere (the Moore-style baseline, training)
        assert torch.equal(A.attention(q, k, v, 2), A.sdpa_attention(q, k, v, 2))
    finally:
        A.set_backend(previous)


def test_traced_graphs_keep_sdpa():
    q, k, v = _qkv(2, 16, 16, 64, torch.float32)
    traced = torch.jit.trace(lambda q, k, v: A.attention(q, k, v, 2), (q, k, v))
    assert "scaled_dot_product_attention" in str(traced.graph)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_one_token_cross_attention_equals_attention(dtype, tol):
    torch.manual_seed(0)
    block = TransformerBlock(64, 2, context_dim=48, index=0).to(dtype).eval()
    for p in block.parameters():  # nothing zero: to_out's bias, the layer norms
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(6, 40, 64, dtype=dtype)
    one = torch.randn(6, 1, 48, dtype=dtype)
    with torch.no_grad():
        fast = block.cross_attention(x, one)  # (6, 1, 64), broadcast by the caller
        plain = block.attn2(block.norm2(x), one)  # query projection and attention, as diffusers does
        assert fast.shape == (6, 1, 64)
        assert _rel(fast.expand_as(plain), plain) < tol
        two = torch.randn(6, 2, 48, dtype=dtype)  # a longer context takes the attention itself
        assert torch.equal(block.cross_attention(x, two), block.attn2(block.norm2(x), two))
        # the whole block: the same residual stream either way
        ref = x + block.self_attention(block.norm1(x), None)
        ref = ref + block.attn2(block.norm2(ref), one)
        ref = ref + block.ff(block.norm3(ref))
        assert _rel(block(x, one), ref) < tol
    # Under autograd the attention runs as written (training's gradients, zero ones included).
    assert torch.equal(block.cross_attention(x, one), block.attn2(block.norm2(x), one))
