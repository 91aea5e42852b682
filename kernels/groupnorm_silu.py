"""Fused GroupNorm (+ SiLU): silu(group_norm(x)) in one kernel, statistics in fp32.

Every resnet of the UNets computes silu(norm1(x)) and silu(norm2(h)), and the denoising UNet ends
with silu(conv_norm_out(h)). In torch that is GroupNorm (a statistics read of x, then a normalising
read and a write) followed by SiLU (another read and write): the fused kernel drops SiLU's full
read and write of the activation and its launch.

Layout: x is contiguous (N, C, *spatial), S = prod(spatial) (any number of trailing axes, none
included), so the cpg = C / groups channels of group g of sample n are one contiguous run of
cpg * S elements starting at (n * groups + g) * cpg * S. One program per (sample, group) walks
that run twice in BLOCK-wide tiles:
  1. statistics in fp32: each tile's sum and its sum of squared deviations from the tile's own
     mean, merged into the running (count, mean, M2) with Chan's parallel update (the two-pass
     variance within a tile, no E[x^2] - E[x]^2 cancellation for activations with a large mean);
  2. y = (x - mean) * rstd * weight[c] + bias[c] (c: the element's channel), then y * sigmoid(y)
     when SILU, stored in x's dtype. rstd uses the biased variance, as nn.GroupNorm.
The second walk rereads the group (from L2 where it still fits), so the traffic is two reads and
one write of x against GroupNorm + SiLU's three reads and two writes.

`group_norm_silu_torch` beside the launcher is the plain math (F.group_norm then F.silu).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aa_trt.kernels._common import Launch, is_interpreted
from aa_trt.kernels.resources import Tiles, capability, choose, element_size

MAX_BLOCK = 4096


@triton.jit
def _group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, S, cpg, groups, eps,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # n * groups + g
    g = pid % groups
    n_elem = cpg * S
    base = pid.to(tl.int64) * n_elem
    offs = tl.arange(0, BLOCK)

    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, n_elem, BLOCK):
        idx = start + offs
        mask = idx < n_elem
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        bn = tl.minimum(n_elem - start, BLOCK).to(tl.float32)
        bmean = tl.sum(x, 0) / bn
        dev = tl.where(mask, x - bmean, 0.0)
        bm2 = tl.sum(dev * dev, 0)
        total = count + bn
        delta = bmean - mean
        mean += delta * (bn / total)
        m2 += bm2 + delta * delta * (count * bn / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    for start in range(0, n_elem, BLOCK):
        idx = start + offs
        mask = idx < n_elem
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, (x - mean) * rstd, 0.0)  # padding lanes stay finite through sigmoid
        c = g * cpg + idx // S
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + base + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """True when this module's kernel runs in Triton's CPU interpreter."""
    return is_interpreted(_group_norm_silu_kernel)


def _block(n_elem: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole group when it fits in MAX_BLOCK lanes, about 8 elements per
    thread; not tuned on a GPU."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(n_elem)))
    return block, max(1, min(8, block // 256))


def tile_candidates(n_elem: int) -> list[Tiles]:
    """Launch configurations in order of preference; `choose_tiles` takes the first that fits."""
    block, warps = _block(n_elem)
    return [Tiles.of(warps, 3, BLOCK=block)]


def shared_estimate(dtype: torch.dtype, tiles: Tiles) -> int:
    """Upper bound of the shared memory (bytes) Triton allocates for one program: the cross-warp
    scratch of the two tl.sum reductions (fp32), plus the loads if the loops were pipelined."""
    return 4 * 32 * tiles.num_warps + max(1, tiles.num_stages) * tiles["BLOCK"] * element_size(dtype)


def choose_tiles(n_elem: int, dtype: torch.dtype, cc: int | None) -> Tiles:
    return choose(tile_candidates(n_elem), lambda t: shared_estimate(dtype, t), cc)


def plan(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = True, *,
         block: int | None = None, cc: int | None = None) -> Launch:
    """Check the inputs and compute the launch (grid, arguments, constexprs, tiles for compute
    capability `cc`) without running it; works on meta tensors. See `group_norm_silu`."""
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial); got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (N, C, *spatial); got strides {x.stride()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != x.device):
            raise ValueError(f"{name} must be ({c},) on {x.device}; got {tuple(t.shape)} on {t.device}")
    y = torch.empty_like(x)
    cpg = c // num_groups
    s = x.numel() // (n * c) if x.numel() else 0
    tiles = choose_tiles(max(1, cpg * s), x.dtype, cc).replace(BLOCK=block)
    w = weight.contiguous() if weight is not None else x  # x: never read
    b = bias.contiguous() if bias is not None else x
    args = (x, w, b, y, s, cpg, num_groups, float(eps))
    constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
                      **dict(tiles.block))
    return Launch(_group_norm_silu_kernel, (n * num_groups,), args, constexprs, tiles.num_warps,
                  tiles.num_stages, y, {"tiles": tiles})


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = True, *,
                    block: int | None = None) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then F.silu when `silu`, in one kernel.

    x: contiguous (N, C, *spatial), fp32/fp16/bf16; weight, bias: (C,) or None. Statistics and
    arithmetic in fp32; returns x's shape and dtype. `block` overrides the tile width (a power of
    two; the tests use it to exercise partial tiles).
    """
    launch = plan(x, num_groups, weight, bias, eps, silu, block=block, cc=capability(x.device))
    if x.numel() == 0:
        return launch.out
    return launch()


def group_norm_silu_torch(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True) -> torch.Tensor:
    """The plain math the kernel replaces: F.group_norm, then F.silu."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
