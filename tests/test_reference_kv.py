"""The reference K/V cache against Moore's naive path: the bank repeated for every frame and
concatenated to the frame's tokens *before* attn1's K/V projection, in every call."""
import pytest
import torch

from aa_trt.attention import attention, reference_attention
from aa_trt.config import PRESETS
from aa_trt.models import UNet, compute_reference_kv
from aa_trt.models.layers import ReferenceState, TransformerBlock
from aa_trt.models.reference_kv import quantize_bank
from helpers import max_abs, randomize_


def naive_self_attention(block: TransformerBlock, h, bank, use_ref: bool):
    """Moore's ReferenceAttentionControl in read mode, for one branch: h (n, L, c), bank (1, m, c)."""
    a = block.attn1
    if not use_ref:
        return a.to_out[0](attention(a.to_q(h), a.to_k(h), a.to_v(h), a.heads))
    kv_in = torch.cat([h, bank.repeat(h.shape[0], 1, 1)], dim=1)  # bank repeated per frame
    return a.to_out[0](attention(a.to_q(h), a.to_k(kv_in), a.to_v(kv_in), a.heads))


@pytest.mark.parametrize("n,L,m,c,heads", [(24, 64, 64, 32, 8), (5, 16, 16, 320, 8), (3, 12, 7, 160, 2)])
def test_plain_reference_attention_equals_concatenation(n, L, m, c, heads):
    q, k, v = (torch.randn(n, L, c) for _ in range(3))
    k_ref, v_ref = torch.randn(1, m, c), torch.randn(1, m, c)
    want = attention(q, torch.cat([k, k_ref.repeat(n, 1, 1)], 1), torch.cat([v, v_ref.repeat(n, 1, 1)], 1), heads)
    assert max_abs(reference_attention(q, k, v, k_ref, v_ref, heads), want) < 1e-5


@pytest.mark.parametrize("runs", [[True], [False, True], [True, False, True]])
def test_block_with_cache_equals_naive(runs):
    torch.manual_seed(1)
    block = randomize_(TransformerBlock(64, 8, 32, index=0), seed=1).eval()
    f, L, m = 6, 16, 16
    x = torch.randn(f * len(runs), L, 64)
    bank = torch.randn(1, m, 64)
    k_ref, v_ref = block.attn1.to_k(bank), block.attn1.to_v(bank)
    state = ReferenceState(kv=[(k_ref, v_ref)], runs=ReferenceState.row_runs(runs, f))
    with torch.no_grad():
        h = block.norm1(x)
        got = block.self_attention(h, state)
        want = torch.cat([naive_self_attention(block, h[i * f:(i + 1) * f], bank, r) for i, r in enumerate(runs)])
    assert max_abs(got, want) < 2e-5


@pytest.fixture(scope="module")
def tiny_unets():
    cfg = PRESETS["tiny"]
    refnet = randomize_(UNet(cfg.unet, with_output=False), seed=11).eval()
    den = randomize_(UNet(cfg.unet, cfg.motion), seed=12).eval()
    return refnet, den


def _naive_unet(den, banks, x, t, ctx, frames, use_ref):
    """The whole denoising UNet with every block's attn1 swapped for Moore's naive version."""
    originals = {}
    rows = ReferenceState.row_runs(use_ref, frames)
    for block in den.transformer_blocks():
        bank = banks[block.index]

        def naive(h, ref, residual=None, block=block, bank=bank):
            out = torch.cat([naive_self_attention(block, h[s:e], bank, u) for s, e, u in rows])
            return out if residual is None else residual + out

        originals[block] = block.self_attention
        block.self_attention = naive
    try:
        return den(x, t, ctx, frames=frames, ref=ReferenceState())
    finally:
        for block, fn in originals.items():
            block.self_attention = fn


def test_unet_with_cache_equals_naive_and_uncond_ignores_reference(tiny_unets):
    refnet, den = tiny_unets
    frames, h, w = 5, 8, 8
    ref_latent, clip = torch.randn(1, 4, h, w), torch.randn(1, 1, 32)
    with torch.no_grad():
        banks = [quantize_bank(b, "float16") for b in refnet.reference_bank(ref_latent, 0, clip)]
        kv = compute_reference_kv(refnet, den, ref_latent, clip, "float16")
        x = torch.randn(2 * frames, 4, h, w)
        ctx = torch.cat([torch.zeros_like(clip), clip])
        use_ref = [False, True]
        state = ReferenceState(kv=kv.pairs, runs=ReferenceState.row_runs(use_ref, frames))
        fast = den(x, 500, ctx, frames=frames, ref=state)
        naive = _naive_unet(den, banks, x, 500, ctx, frames, use_ref)
        assert max_abs(fast, naive) < 1e-4

        # The uncond rows never read the reference: another reference leaves them bit-identical,
        # while the cond rows move.
        other = compute_reference_kv(refnet, den, torch.randn(1, 4, h, w), clip, "float16")
        moved = den(x, 500, ctx, frames=frames, ref=ReferenceState(kv=other.pairs, runs=state.runs))
    assert torch.equal(moved[:frames], fast[:frames])
    assert max_abs(moved[frames:], fast[frames:]) > 1e-3


def test_reference_bank_stops_after_last_block(tiny_unets):
    refnet, _ = tiny_unets
    with torch.no_grad():
        banks = refnet.reference_bank(torch.randn(1, 4, 8, 8), 0, torch.randn(1, 1, 32))
    shapes = [tuple(b.shape) for b in banks]
    assert len(banks) == refnet.num_transformer_blocks == 7
    assert shapes == [(1, 64, 32), (1, 16, 64), (1, 16, 64), (1, 16, 64), (1, 16, 64), (1, 64, 32), (1, 64, 32)]


def test_fp32_bank_is_close_to_moore_fp16_bank(tiny_unets):
    refnet, den = tiny_unets
    args = (torch.randn(1, 4, 8, 8), torch.randn(1, 1, 32))
    k16 = compute_reference_kv(refnet, den, *args, "float16")
    k32 = compute_reference_kv(refnet, den, *args, "float32")
    diffs = [max_abs(a, b) for (a, _), (b, _) in zip(k16.pairs, k32.pairs)]
    assert 0 < max(diffs) < 1e-2
