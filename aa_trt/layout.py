"""Which memory layout the UNet's activations keep on this machine: NCHW or channels-last.

In channels-last (NHWC) memory, an image (n, c, h, w) is already the token matrix (n, h*w, c)
the transformer blocks work on, so the spatial transformers' permutes, their 1x1 projections
(run as linear layers on the same memory) and the residual adds need no copies; oneDNN's
convolutions read it natively, and on AMX Xeons bf16 3x3 convolutions run ~3.6x faster in it.
Where it does not pay (some CPUs, fp32 on others), NCHW stays. The choice is measured per
machine, dtype and size (`aa_trt.autotune`) on the UNet's own first-level convolution and
GroupNorm + SiLU, and carried by the tensors: every block keeps the layout it is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aa_trt import autotune, fused

CHANNELS_LAST = torch.channels_last


def is_channels_last(x: torch.Tensor) -> bool:
    """x (n, c, h, w) stored as NHWC (and not also plainly contiguous, as a 1x1 image is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


def _candidates(x: torch.Tensor, channels: int, groups: int):
    """Timed work for each layout: a 3x3 convolution at the UNet's first width and GroupNorm +
    SiLU after it, on a few rows of x's size."""
    n, _, h, w = x.shape
    rows = min(n, 4)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(rows, channels, h, w, generator=g).to(x.dtype)
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * (channels * 9) ** -0.5).to(x.dtype)

    def work(fmt):
        xx, ww = data.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
        return lambda: F.silu(F.group_norm(F.conv2d(xx, ww, padding=1), groups))

    return {"nchw": work(torch.contiguous_format), "nhwc": work(CHANNELS_LAST)}


def choose_format(x: torch.Tensor, channels: int, groups: int) -> torch.memory_format:
    """The layout a network (UNet, VAE decoder) whose first convolution has `channels` outputs runs
    in, for an input x (n, c_in, h, w): channels-last where the CPU fast paths apply and it measured
    faster on this machine, NCHW otherwise (GPUs, tracing, `fused.plain()`)."""
    if not fused.active(x) or x.dim() != 4:
        return torch.contiguous_format
    key = f"layout:{str(x.dtype).removeprefix('torch.')}:c{channels}:{x.shape[-2]}x{x.shape[-1]}"
    choice = autotune.choose(key, ("nchw", "nhwc"), lambda: _candidates(x, channels, groups))
    return CHANNELS_LAST if choice == "nhwc" else torch.contiguous_format


def keep_conv_weights(module: torch.nn.Module, fmt: torch.memory_format) -> None:
    """Store `module`'s convolution weights in the activations' layout `fmt`: oneDNN would
    otherwise reorder each weight at every call, and an NHWC weight would turn an NCHW call's
    output NHWC. Values and parameter identity are unchanged (an optimizer's references hold)."""
    if getattr(module, "_conv_format", torch.contiguous_format) == fmt:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    module._conv_format = fmt
