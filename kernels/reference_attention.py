"""Fused reference attention: softmax(Q [K; K_ref]^T / sqrt(d)) [V; V_ref], one kernel per call.

Animate Anyone's spatial self-attention lets every frame attend to its own tokens and to the
reference image's tokens. Moore concatenates a copy of the reference bank onto every frame; here
every frame's program reads the one shared reference K/V (1, m, c) in place (batch stride 0), so
nothing of size frames x m is ever materialised, and the uncond rows skip the reference entirely
(a per-row flag) instead of computing it and throwing it away.

Layout: q, k, v, out are (b, n, heads*d), the projections' natural layout (only the channel axis
must be contiguous; slices of a fused qkv projection work as they are). One program computes a
BLOCK_M x d tile of one (frame, head): an online softmax over the frame's own key tiles, then over
the reference's key tiles when the row's flag is set. fp32 accumulation whatever the input dtype.

Head dims: the head is processed as two power-of-two chunks (see `_common.head_dim_chunks`):
40 = 32 + 16 (8 lanes masked), 80 = 64 + 16, 160 = 128 + 32. Every QK^T dot is the sum of two
chunk dots and every PV dot writes two accumulators, so SD1.5's heads waste at most 17% of the
lanes (d = 40) instead of 37.5% with one next-power-of-two block.

`reference_attention_torch` beside the launcher is the plain math it must equal.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from aa_trt.kernels._common import (Launch, check_tokens, dot_precision, head_dim_chunks,
                                   is_interpreted, upcast_dots)
from aa_trt.kernels.resources import Tiles, capability, choose, element_size

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kn, stride_vn, n_keys,
                  qk_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (acc, m, l) over the n_keys keys at k_base/v_base (one head)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    for start in range(0, n_keys, BLOCK_N):
        kn = start + offs_n
        kmask = kn < n_keys
        k0 = tl.load(k_base + kn[:, None] * stride_kn + offs_d0[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q0, tl.trans(k0.to(q0.dtype)), input_precision=PREC)
        if D1 > 0:
            offs_d1 = tl.arange(0, D1)
            tmask = kmask[:, None] & (offs_d1[None, :] < D - D0)
            k1 = tl.load(k_base + kn[:, None] * stride_kn + D0 + offs_d1[None, :], mask=tmask, other=0.0)
            s = tl.dot(q1, tl.trans(k1.to(q1.dtype)), s, input_precision=PREC)
        s = tl.where(kmask[None, :], s * qk_scale, -float("inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q0.dtype)
        v0 = tl.load(v_base + kn[:, None] * stride_vn + offs_d0[None, :], mask=kmask[:, None], other=0.0)
        acc0 = tl.dot(p, v0.to(q0.dtype), acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            offs_d1 = tl.arange(0, D1)
            tmask = kmask[:, None] & (offs_d1[None, :] < D - D0)
            v1 = tl.load(v_base + kn[:, None] * stride_vn + D0 + offs_d1[None, :], mask=tmask, other=0.0)
            acc1 = tl.dot(p, v1.to(q0.dtype), acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _reference_attention_kernel(
        q_ptr, k_ptr, v_ptr, kr_ptr, vr_ptr, flag_ptr, o_ptr,
        n_q, n_k, n_ref, heads,
        stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
        stride_krb, stride_krn, stride_vrb, stride_vrn, stride_ob, stride_on,
        qk_scale,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_REF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    b64 = b.to(tl.int64)
    head = h * D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    qmask = offs_m < n_q
    q_base = q_ptr + b64 * stride_qb + head
    q0 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d0[None, :], mask=qmask[:, None], other=0.0)
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = tl.arange(0, D1)
        tmask = qmask[:, None] & (offs_d1[None, :] < D - D0)
        q1 = tl.load(q_base + offs_m[:, None] * stride_qn + D0 + offs_d1[None, :], mask=tmask, other=0.0)
        q1 = q1.to(q0.dtype)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # placeholders, never read
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1) the frame's own tokens
    acc0, acc1, m_i, l_i = _attend_tiles(
        acc0, acc1, m_i, l_i, q0, q1, k_ptr + b64 * stride_kb + head, v_ptr + b64 * stride_vb + head,
        stride_kn, stride_vn, n_k, qk_scale, D, D0, D1, BLOCK_N, PREC)
    # 2) the shared reference tokens (batch stride 0 for a (1, m, c) cache), unless the row is uncond
    if HAS_REF:
        use = tl.load(flag_ptr + b)
        if use != 0:
            acc0, acc1, m_i, l_i = _attend_tiles(
                acc0, acc1, m_i, l_i, q0, q1, kr_ptr + b64 * stride_krb + head,
                vr_ptr + b64 * stride_vrb + head, stride_krn, stride_vrn, n_ref, qk_scale,
                D, D0, D1, BLOCK_N, PREC)

    inv_l = 1.0 / l_i
    o_base = o_ptr + b64 * stride_ob + head
    out0 = (acc0 * inv_l[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d0[None, :], out0, mask=qmask[:, None])
    if D1 > 0:
        offs_d1 = tl.arange(0, D1)
        tmask = qmask[:, None] & (offs_d1[None, :] < D - D0)
        out1 = (acc1 * inv_l[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_on + D0 + offs_d1[None, :], out1, mask=tmask)


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter."""
    return is_interpreted(_reference_attention_kernel)


def _flags(use_reference, b: int, device) -> torch.Tensor:
    if use_reference is None:
        return torch.ones(b, dtype=torch.int32, device=device)
    if isinstance(use_reference, torch.Tensor):
        flags = use_reference.to(device=device, dtype=torch.int32).reshape(-1)
    else:
        flags = torch.tensor([int(bool(u)) for u in use_reference], dtype=torch.int32, device=device)
    if flags.numel() != b:
        raise ValueError(f"use_reference has {flags.numel()} entries for a batch of {b}")
    return flags.contiguous()


def tile_candidates(d: int, n_q: int) -> list[Tiles]:
    """Launch configurations in order of preference; `choose_tiles` takes the first that fits.

    1. FlashAttention-2-like tiles (not timed on a GPU): 128 query rows up to d = 80, 64 above;
       64 keys a step; 8 warps where the query tile is 128 rows or d > 80 (4 warps at d = 40
       spill on sm_89 and sit at 255 registers on sm_80: `python -m aa_trt.kernels.aot`);
       3 stages up to d = 80, 2 above.
    2. Above d = 80, the same tiles single-buffered (K/V not pipelined): d = 160 then fits the
       99 KiB of sm_86/sm_89/sm_120 (the first choice's estimate does not). Up to d = 80 the
       first choice fits every card with 64 KiB or more, and the single-buffered 128-row tile
       would spill on sm_80 at d = 40.
    3. A small last resort (64 x 32, 4 warps, 1 stage): fits the 48 KiB every card has, up to
       d = 160.
    """
    block_m = 128 if d <= 80 else 64
    block_m = min(block_m, max(16, triton.next_power_of_2(n_q)))
    warps = 8 if block_m >= 128 or d > 80 else 4
    first = Tiles.of(warps, 3 if d <= 80 else 2, BLOCK_M=block_m, BLOCK_N=64)
    single = Tiles.of(warps, 1, BLOCK_M=block_m, BLOCK_N=64)
    small = Tiles.of(4, 1, BLOCK_M=min(block_m, 64), BLOCK_N=32)
    out: list[Tiles] = []
    for t in (first, single if d > 80 else first, small):
        if t not in out:
            out.append(t)
    return out


def shared_estimate(d: int, dtype: torch.dtype, tiles: Tiles) -> int:
    """Upper bound of the shared memory (bytes) Triton allocates for one program."""
    d0, d1 = head_dim_chunks(d)
    e = element_size(dtype)
    bm, bn, stages = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles.num_stages
    kv = 2 * max(1, stages) * bn * (d0 + d1) * e  # the pipelined K and V tiles
    return kv + bm * (d0 + d1) * e + bm * bn * e   # + Q and P staged for the dots


def choose_tiles(d: int, n_q: int, dtype: torch.dtype, cc: int | None) -> Tiles:
    return choose(tile_candidates(d, n_q), lambda t: shared_estimate(d, dtype, t), cc)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         k_ref: torch.Tensor | None, v_ref: torch.Tensor | None, heads: int,
         use_reference: torch.Tensor | Sequence[bool] | None = None, *,
         block_m: int | None = None, block_n: int | None = None, cc: int | None = None) -> Launch:
    """Check the inputs and compute the launch (grid, arguments, constexprs, tiles for compute
    capability `cc`) without running it; works on meta tensors. See `reference_attention`."""
    b, n_q, c = q.shape
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    d = c // heads
    d0, d1 = head_dim_chunks(d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tokens(name, t, c)
    if k.shape != v.shape or k.shape[0] != b:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be ({b}, n_k, {c})")
    has_ref = k_ref is not None
    if has_ref:
        check_tokens("k_ref", k_ref, c)
        check_tokens("v_ref", v_ref, c)
        if k_ref.shape != v_ref.shape or k_ref.shape[0] not in (1, b):
            raise ValueError(f"k_ref {tuple(k_ref.shape)} / v_ref {tuple(v_ref.shape)} "
                             f"must be (1 or {b}, m, {c})")
        kr, vr = k_ref, v_ref
        n_ref = kr.shape[1]
        krb = 0 if kr.shape[0] == 1 else kr.stride(0)
        vrb = 0 if vr.shape[0] == 1 else vr.stride(0)
    else:
        kr, vr, n_ref, krb, vrb = k, v, 0, 0, 0
    flags = _flags(use_reference, b, q.device)
    out = torch.empty((b, n_q, c), dtype=q.dtype, device=q.device)
    tiles = choose_tiles(d, n_q, q.dtype, cc).replace(BLOCK_M=block_m, BLOCK_N=block_n)
    grid = (triton.cdiv(n_q, tiles["BLOCK_M"]), b * heads)
    args = (q, k, v, kr, vr, flags, out,
            n_q, k.shape[1], n_ref, heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            krb, kr.stride(1), vrb, vr.stride(1), out.stride(0), out.stride(1),
            LOG2E / math.sqrt(d))
    constexprs = dict(D=d, D0=d0, D1=d1, HAS_REF=has_ref, **dict(tiles.block),
                      UPCAST=upcast_dots(q.dtype, _reference_attention_kernel),
                      PREC=dot_precision(q.dtype))
    return Launch(_reference_attention_kernel, grid, args, constexprs, tiles.num_warps,
                  tiles.num_stages, out, {"tiles": tiles})


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_ref: torch.Tensor | None, v_ref: torch.Tensor | None, heads: int,
                        use_reference: torch.Tensor | Sequence[bool] | None = None, *,
                        block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Triton version of `aa_trt.attention.reference_attention`, plus the per-row flag.

    q (b, n, c); k, v (b, n_k, c); k_ref, v_ref (1 or b, m, c) or None (plain attention);
    use_reference: (b,) flags (tensor or sequence; None = every row): rows with a false flag attend
    to their own tokens only. Returns (b, n, c) in q's dtype. block_m/block_n override the tiles
    (the tests use them to exercise partial tiles).
    """
    return plan(q, k, v, k_ref, v_ref, heads, use_reference, block_m=block_m, block_n=block_n,
                cc=capability(q.device))()


def reference_attention_torch(q, k, v, k_ref, v_ref, heads, use_reference=None) -> torch.Tensor:
    """The plain math, row by row, in fp32 (returns fp32): what the kernel is tested against."""
    b, _, c = q.shape
    d = c // heads
    flags = [True] * b if use_reference is None else [bool(u) for u in use_reference]
    outs = []
    for i in range(b):
        ks, vs = k[i].float(), v[i].float()
        if k_ref is not None and flags[i]:
            j = 0 if k_ref.shape[0] == 1 else i
            ks = torch.cat([ks, k_ref[j].float()], 0)
            vs = torch.cat([vs, v_ref[j].float()], 0)
        qh = q[i].float().view(-1, heads, d).transpose(0, 1)        # (h, n, d)
        kh = ks.view(-1, heads, d).transpose(0, 1)
        vh = vs.view(-1, heads, d).transpose(0, 1)
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append((w @ vh).transpose(0, 1).reshape(-1, c))
    return torch.stack(outs)
