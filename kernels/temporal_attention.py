"""Temporal attention: attention over the frame axis (f <= 32) at every spatial position and head.

The motion modules keep their tokens as (b*h*w, f, c) (aa_trt.models.motion), so one position's f
frames of one head are f rows of d contiguous channels: the kernel reads q, k, v and writes the
output in that stored layout, no rearrange copies. One program handles BLOCK_P positions of one
head; the whole f x f score matrix of a position fits in one tile (f <= 32), so the softmax is
exact in one pass, with batched (rank-3) dots over the positions of the block.

Positional encoding. AnimateDiff adds pe to x *before* the q/k/v projections, so it cannot be added
to the already-projected q/k/v as is. But the projections are linear and bias-free:
    (x + pe) W^T = x W^T + pe W^T,
so pe folds exactly into one per-frame bias per projection, (f, c) each, computed once per weight
(`fold_positional_encoding`, a (f, c) x (c, c) matmul: nothing next to the (b*h*w*f, c) x (c, c)
projections). The kernel adds those biases to q, k, v as it loads them (HAS_BIAS), so the
`x + pe` pass over the whole activation (one read and one write of b*h*w*f*c) disappears and x
itself goes into the projections. The only difference from the reference is rounding order (pe
is added after, not before, the half-precision projection): within half-precision tolerance.

Head dims are split into two power-of-two chunks as in `reference_attention` (40 = 32 + 16,
80 = 64 + 16, 160 = 128 + 32). `temporal_attention_torch` beside the launcher is the plain math.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from aa_trt.kernels._common import (Launch, check_tokens, dot_precision, head_dim_chunks,
                                   is_interpreted, upcast_dots)
from aa_trt.kernels.resources import Tiles, capability, choose, element_size

LOG2E = 1.4426950408889634
MAX_FRAMES = 32


@triton.jit
def _load_chunk(ptr, bias_ptr, offs_p, offs_f, offs_d, stride_p, stride_f, stride_bf, bmask, mask3,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_P, BLOCK_F, DC) chunk of one head, plus its per-frame bias (fp32 add, one rounding)."""
    x = tl.load(ptr + offs_p[:, None, None] * stride_p + offs_f[None, :, None] * stride_f
                + offs_d[None, None, :], mask=mask3, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_f[:, None] * stride_bf + offs_d[None, :], mask=bmask, other=0.0)
        y = x.to(tl.float32) + bias.to(tl.float32)[None, :, :]
        if UPCAST:
            x = y
        else:
            x = y.to(x.dtype)
    elif UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _temporal_attention_kernel(
        q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, o_ptr,
        n_pos, n_frames,
        stride_qp, stride_qf, stride_kp, stride_kf, stride_vp, stride_vf, stride_op, stride_of,
        stride_bf, qk_scale,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_F: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    head = h * D
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_F)
    pmask = offs_p < n_pos
    fmask = offs_f < n_frames
    rows = pmask[:, None, None] & fmask[None, :, None]

    offs_d0 = tl.arange(0, D0)
    dmask0 = offs_d0 < D0
    b0 = fmask[:, None] & dmask0[None, :]
    m0 = rows & dmask0[None, None, :]
    q0 = _load_chunk(q_ptr + head, bq_ptr + head, offs_p, offs_f, offs_d0, stride_qp, stride_qf,
                     stride_bf, b0, m0, HAS_BIAS, UPCAST)
    k0 = _load_chunk(k_ptr + head, bk_ptr + head, offs_p, offs_f, offs_d0, stride_kp, stride_kf,
                     stride_bf, b0, m0, HAS_BIAS, UPCAST)
    s = tl.dot(q0, tl.permute(k0, (0, 2, 1)), input_precision=PREC)   # (P, F, F)
    if D1 > 0:
        offs_d1 = tl.arange(0, D1)
        dmask1 = offs_d1 < D - D0
        b1 = fmask[:, None] & dmask1[None, :]
        m1 = rows & dmask1[None, None, :]
        q1 = _load_chunk(q_ptr + head + D0, bq_ptr + head + D0, offs_p, offs_f, offs_d1, stride_qp,
                         stride_qf, stride_bf, b1, m1, HAS_BIAS, UPCAST)
        k1 = _load_chunk(k_ptr + head + D0, bk_ptr + head + D0, offs_p, offs_f, offs_d1, stride_kp,
                         stride_kf, stride_bf, b1, m1, HAS_BIAS, UPCAST)
        s = tl.dot(q1, tl.permute(k1, (0, 2, 1)), s, input_precision=PREC)

    s = tl.where(fmask[None, None, :], s * qk_scale, -float("inf"))     # padded frames are not keys
    m = tl.max(s, 2)
    p = tl.exp2(s - m[:, :, None])
    inv_l = 1.0 / tl.sum(p, 2)
    p = p.to(q0.dtype)

    out_ty = o_ptr.dtype.element_ty
    o_rows = o_ptr + head + offs_p[:, None, None] * stride_op + offs_f[None, :, None] * stride_of
    v0 = _load_chunk(v_ptr + head, bv_ptr + head, offs_p, offs_f, offs_d0, stride_vp, stride_vf,
                     stride_bf, b0, m0, HAS_BIAS, UPCAST)
    o0 = tl.dot(p, v0, input_precision=PREC) * inv_l[:, :, None]
    tl.store(o_rows + offs_d0[None, None, :], o0.to(out_ty), mask=m0)
    if D1 > 0:
        v1 = _load_chunk(v_ptr + head + D0, bv_ptr + head + D0, offs_p, offs_f, offs_d1, stride_vp,
                         stride_vf, stride_bf, b1, m1, HAS_BIAS, UPCAST)
        o1 = tl.dot(p, v1, input_precision=PREC) * inv_l[:, :, None]
        tl.store(o_rows + D0 + offs_d1[None, None, :], o1.to(out_ty), mask=m1)


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter."""
    return is_interpreted(_temporal_attention_kernel)


def _block_p(block_f: int, d: int) -> int:
    """Positions per program: about 8K elements per q/k/v tile (register budget of 4 warps)."""
    lanes = block_f * sum(head_dim_chunks(d))
    return max(1, min(64, 1 << max(0, (8192 // lanes).bit_length() - 1)))


def block_frames(f: int) -> int:
    """The frame tile: the whole window, padded to a power of two >= 16 (the dots' minimum)."""
    return max(16, triton.next_power_of_2(f))


def tile_candidates(f: int, d: int) -> list[Tiles]:
    """Launch configurations in order of preference; `choose_tiles` takes the first that fits."""
    block_f = block_frames(f)
    bp = _block_p(block_f, d)
    cands = [Tiles.of(4, 3, BLOCK_P=bp, BLOCK_F=block_f)]
    if bp > 1:
        cands.append(Tiles.of(4, 3, BLOCK_P=max(1, bp // 2), BLOCK_F=block_f))
    return cands


def shared_estimate(d: int, dtype: torch.dtype, tiles: Tiles) -> int:
    """Upper bound of the shared memory (bytes) Triton allocates for one program."""
    d0, d1 = head_dim_chunks(d)
    e = element_size(dtype)
    bp, bf = tiles["BLOCK_P"], tiles["BLOCK_F"]
    return 3 * bp * bf * (d0 + d1) * e + bp * bf * bf * e  # q, k, v operands + P


def choose_tiles(f: int, d: int, dtype: torch.dtype, cc: int | None) -> Tiles:
    return choose(tile_candidates(f, d), lambda t: shared_estimate(d, dtype, t), cc)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
         bias_q: torch.Tensor | None = None, bias_k: torch.Tensor | None = None,
         bias_v: torch.Tensor | None = None, *, block_p: int | None = None,
         cc: int | None = None) -> Launch:
    """Check the inputs and compute the launch (grid, arguments, constexprs, tiles for compute
    capability `cc`) without running it; works on meta tensors. See `temporal_attention`."""
    n_pos, f, c = q.shape
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    if not 1 <= f <= MAX_FRAMES:
        raise ValueError(f"temporal attention kernel takes 1..{MAX_FRAMES} frames; got {f}")
    d = c // heads
    d0, d1 = head_dim_chunks(d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tokens(name, t, c)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    biases = (bias_q, bias_k, bias_v)
    has_bias = bias_q is not None
    if has_bias:
        if any(t is None for t in biases):
            raise ValueError("pass all three per-frame biases or none")
        biases = tuple(t[:f].to(q.device).contiguous() for t in biases)
        if any(t.shape != (f, c) for t in biases):
            raise ValueError(f"per-frame biases must be ({f}, {c}) (or longer); "
                             f"got {[tuple(t.shape) for t in biases]}")
    else:
        biases = (q, q, q)  # never read
    out = torch.empty((n_pos, f, c), dtype=q.dtype, device=q.device)
    tiles = choose_tiles(f, d, q.dtype, cc).replace(BLOCK_P=block_p)
    grid = (triton.cdiv(n_pos, tiles["BLOCK_P"]), heads)
    args = (q, k, v, *biases, out, n_pos, f,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), c, LOG2E / math.sqrt(d))
    constexprs = dict(D=d, D0=d0, D1=d1, **dict(tiles.block), HAS_BIAS=has_bias,
                      UPCAST=upcast_dots(q.dtype, _temporal_attention_kernel),
                      PREC=dot_precision(q.dtype))
    return Launch(_temporal_attention_kernel, grid, args, constexprs, tiles.num_warps,
                  tiles.num_stages, out, {"tiles": tiles})


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       bias_q: torch.Tensor | None = None, bias_k: torch.Tensor | None = None,
                       bias_v: torch.Tensor | None = None, *, block_p: int | None = None) -> torch.Tensor:
    """softmax((q+bq)(k+bk)^T / sqrt(d)) (v+bv) over the frame axis.

    q, k, v: (positions, f, c) with f <= 32, as the motion module's projections produce them;
    bias_q/k/v: optional per-frame biases (f, c) (all three or none), e.g. from
    `fold_positional_encoding`. Returns (positions, f, c) in q's dtype.
    """
    return plan(q, k, v, heads, bias_q, bias_k, bias_v, block_p=block_p, cc=capability(q.device))()


@torch.no_grad()
def fold_positional_encoding(pe: torch.Tensor, weights: tuple[torch.Tensor, ...], frames: int,
                             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Per-frame biases pe[:f] W^T, one per projection weight (c_out, c_in), computed in fp32.

    (x + pe) W^T == x W^T + pe W^T for bias-free projections, so these replace the `x + pe` pass.
    pe: (1, max_len, c) or (max_len, c) (PositionalEncoding's buffer).
    """
    table = pe.reshape(-1, pe.shape[-1])[:frames].float()
    return tuple((table @ w.float().t()).to(dtype or w.dtype) for w in weights)


def temporal_attention_torch(q, k, v, heads, bias_q=None, bias_k=None, bias_v=None) -> torch.Tensor:
    """The plain math in fp32: the reference the kernel is tested against."""
    n_pos, f, c = q.shape
    d = c // heads
    q, k, v = q.float(), k.float(), v.float()
    if bias_q is not None:
        q, k, v = q + bias_q[:f].float(), k + bias_k[:f].float(), v + bias_v[:f].float()
    qh, kh, vh = (t.view(n_pos, f, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(1, 2).reshape(n_pos, f, c)
