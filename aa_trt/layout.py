"""Which memory layout the UNet's activations keep on this machine: NCHW or channels-last.

In channels-last (NHWC) memory, an image (n, c, h, w) is already the token matrix (n, h*w, c)
the transformer blocks work on, so the spatial transformers' permutes, their 1x1 projections
(run as linear layers on the same memory) and the residual adds need no copies; oneDNN's
convolutions read it natively, and on AMX Xeons bf16 3x3 convolutions run ~3.6x faster in it.
Where it does not pay (some CPUs, fp32 on others), NCHW stays. The choice is measured per
machine, dtype and size (`aa_trt.autotune`) on a convolution and GroupNorm + SiLU at each of the
network's levels, and carried by the tensors: every block keeps the layout it is given.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from aa_trt import autotune, fused

CHANNELS_LAST = torch.channels_last


def is_channels_last(x: torch.Tensor) -> bool:
    """x (n, c, h, w) stored as NHWC (and not also plainly contiguous, as a 1x1 image is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


def takes_nhwc_path(x: torch.Tensor) -> bool:
    """Whether a block runs its channels-last code on x: x is stored NHWC and the CPU fast paths
    apply. A training step can meet an NHWC tensor too (PyTorch keeps the layout of some inputs);
    it keeps the plain NCHW code, whose gradients the oracle tests pin."""
    return is_channels_last(x) and fused.active(x)


def _candidates(x: torch.Tensor, widths: Sequence[int], groups: int, scale: float, token_copies: int = 0):
    """Timed work for each layout: at every level of the network (width widths[i], size
    x's * scale**i), a 3x3 convolution and GroupNorm + SiLU after it, on a few rows, and in NCHW the
    `token_copies` transposes between the image and the token layout that its transformer blocks
    make there (channels-last makes none). The levels differ: channels-last GroupNorm is fast at a
    wide, small level on some CPUs and slow on others, so timing the first level alone chose wrongly."""
    n, _, h, w = x.shape
    rows = min(n, 4)
    g = torch.Generator().manual_seed(0)
    levels = []
    for i, c in enumerate(widths):
        hh, ww = max(1, round(h * scale ** i)), max(1, round(w * scale ** i))
        data = torch.randn(rows, c, hh, ww, generator=g).to(x.dtype)
        weight = (torch.randn(c, c, 3, 3, generator=g) * (c * 9) ** -0.5).to(x.dtype)
        levels.append((data, weight))

    def work(fmt):
        made = [(d.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt)) for d, wt in levels]

        copies = token_copies if fmt == torch.contiguous_format else 0

        def run():
            for d, wt in made:
                y = F.silu(F.group_norm(F.conv2d(d, wt, padding=1), groups))
                for _ in range(copies):
                    y = y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return run

    return {"nchw": work(torch.contiguous_format), "nhwc": work(CHANNELS_LAST)}


def choose_format(x: torch.Tensor, widths: Sequence[int], groups: int, scale: float = 0.5,
                  token_copies: int = 0) -> torch.memory_format:
    """The layout a network (UNet: scale 0.5 per level; VAE decoder: 2) whose levels have `widths`
    channels runs in, for an input x (n, c_in, h, w): channels-last where the CPU fast paths apply
    and it measured faster on this machine, NCHW otherwise (GPUs, training, tracing, `fused.plain()`).
    `token_copies`: the image <-> token transposes per level that NCHW costs the network."""
    if not fused.active(x) or x.dim() != 4:
        return torch.contiguous_format
    key = (f"layout:{str(x.dtype).removeprefix('torch.')}:c{'-'.join(map(str, widths))}:"
           f"{x.shape[-2]}x{x.shape[-1]}:s{scale:g}:t{token_copies}")
    choice = autotune.choose(key, ("nchw", "nhwc"), lambda: _candidates(x, widths, groups, scale, token_copies))
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
