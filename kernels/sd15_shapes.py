"""The kernel launches of one SD1.5 (Animate Anyone) denoising step, by shape: the one list that
`aot.py` compiles and `tests/test_kernels_aot.py` checks.

SD1.5's UNet: block_out_channels (320, 640, 1280, 1280), two resnets per down block and three per
up block, 8 heads, 32 groups, spatial attention in down blocks 0-2, the mid block and up blocks
1-3 (head dims 40 / 80 / 160 / 160). Every spatial self-attention of the denoising UNet is a
reference attention whose reference tokens are the reference image's tokens at the same level,
as many as the frame's own (the reference image has the frames' size). Motion modules: every
level and the mid block, windows of 8..32 frames, the level's width, 8 heads. GroupNorm + SiLU:
norm1 (on the resnet's input, skip connection concatenated in the up blocks) and norm2 (on its
output) of every resnet, and conv_norm_out.

Batch sizes do not change what is compiled (they only set the grid), so the shapes use one
classifier-free-guidance pair of 16-frame rows: 32 frames for the spatial attention and the
norms, 2 x h x w positions for the motion modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
LAYERS_PER_BLOCK = 2
HEADS = 8
GROUPS = 32
ATTENTION_LEVELS = (0, 1, 2)       # down blocks 0-2 and up blocks 1-3 (+ the mid block, level 3)
RESOLUTIONS = {"512x512": (64, 64), "512x768": (64, 96)}  # image -> latent (h, w)
WINDOWS = (8, 16, 24, 32)          # motion-module window lengths (frames)
DTYPES = (torch.float16, torch.bfloat16)
FRAMES = 16                        # frames per row; x2 rows for CFG (no effect on what compiles)


@dataclass(frozen=True)
class Shape:
    """One launch shape: which kernel, a label for reports, and its arguments' sizes."""
    kernel: str                     # "reference_attention" | "temporal_attention" | "groupnorm_silu"
    label: str
    sizes: dict = field(hash=False, compare=True)


def _levels(h: int, w: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of the four UNet levels, downsampling by stride-2 convs (ceil)."""
    out = []
    for c in BLOCK_OUT_CHANNELS:
        out.append((c, h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def reference_attention_shapes() -> list[Shape]:
    shapes = []
    for res, (h, w) in RESOLUTIONS.items():
        levels = _levels(h, w)
        sites = [(f"level {i}", levels[i]) for i in ATTENTION_LEVELS] + [("mid", levels[-1])]
        for where, (c, lh, lw) in sites:
            n = lh * lw
            shapes.append(Shape("reference_attention", f"{res} {where}: {lh}x{lw} tokens, d={c // HEADS}",
                                dict(batch=2 * FRAMES, tokens=n, ref_tokens=n, channels=c, heads=HEADS)))
    return shapes


def temporal_attention_shapes() -> list[Shape]:
    """Each width at the largest level it runs at (512x512): positions only set the grid."""
    h, w = RESOLUTIONS["512x512"]
    first = {}
    for c, lh, lw in _levels(h, w):
        first.setdefault(c, (lh, lw))
    shapes = []
    for c, (lh, lw) in first.items():
        for f in WINDOWS:
            shapes.append(Shape("temporal_attention", f"c={c} d={c // HEADS} f={f} ({lh}x{lw} positions x2)",
                                dict(positions=2 * lh * lw, frames=f, channels=c, heads=HEADS)))
    return shapes


def resnet_norm_sites(h: int, w: int) -> list[tuple[str, int, int, int]]:
    """(where, channels, h, w) of every GroupNorm + SiLU of the denoising UNet, in execution order."""
    boc, sites = BLOCK_OUT_CHANNELS, []
    ch, skips = boc[0], [(boc[0], h, w)]   # conv_in's output is the first skip
    for i, out in enumerate(boc):
        for j in range(LAYERS_PER_BLOCK):
            sites += [(f"down{i}.resnet{j}.norm1", ch, h, w), (f"down{i}.resnet{j}.norm2", out, h, w)]
            ch = out
            skips.append((ch, h, w))
        if i < len(boc) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            skips.append((ch, h, w))
    for j in range(2):
        sites += [(f"mid.resnet{j}.norm1", ch, h, w), (f"mid.resnet{j}.norm2", ch, h, w)]
    for i, out in enumerate(reversed(boc)):
        for j in range(LAYERS_PER_BLOCK + 1):
            skip_c = skips.pop()[0]
            sites += [(f"up{i}.resnet{j}.norm1", ch + skip_c, h, w), (f"up{i}.resnet{j}.norm2", out, h, w)]
            ch = out
        if skips:
            h, w = skips[-1][1:]
    sites.append(("conv_norm_out", boc[0], h, w))
    return sites


def groupnorm_silu_shapes() -> list[Shape]:
    """The distinct (channels, h, w) of `resnet_norm_sites`, per resolution."""
    shapes = []
    for res, (h, w) in RESOLUTIONS.items():
        seen: dict[tuple[int, int, int], list[str]] = {}
        for where, c, lh, lw in resnet_norm_sites(h, w):
            seen.setdefault((c, lh, lw), []).append(where)
        for (c, lh, lw), wheres in sorted(seen.items(), key=lambda kv: (-kv[0][1] * kv[0][2], kv[0][0])):
            shapes.append(Shape("groupnorm_silu", f"{res} C={c} {lh}x{lw} ({len(wheres)} norms)",
                                dict(batch=2 * FRAMES, channels=c, h=lh, w=lw, groups=GROUPS)))
    return shapes


def sd15_shapes() -> list[Shape]:
    return reference_attention_shapes() + temporal_attention_shapes() + groupnorm_silu_shapes()
