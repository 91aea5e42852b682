"""PoseGuider: pose images -> features added to the denoising UNet's conv_in output.

`moore` (Moore's released weights): 3x3 convs, conv_in 3->16, then per stage a same-width conv and a
stride-2 conv to the next width (16->16, 16->32 s2, 32->32, 32->96 s2, 96->96, 96->256 s2), SiLU after
each, and a zero-initialised conv_out to the UNet width. `paper` (arXiv 2311.17117 §3.2): 4x4 stride-2
convs with 16/32/64/128 channels; the latent is 1/8 of the image, so the fourth conv keeps the size
(4x4 kernels with stride 2 four times would give 1/16), then the same zero conv_out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aa_trt.config import PoseGuiderConfig


class PoseGuider(nn.Module):
    def __init__(self, cfg: PoseGuiderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        if cfg.variant == "moore":
            self.conv_in = nn.Conv2d(cfg.conditioning_channels, ch[0], 3, padding=1)
            blocks = []
            for i in range(len(ch) - 1):
                blocks.append(nn.Conv2d(ch[i], ch[i], 3, padding=1))
                blocks.append(nn.Conv2d(ch[i], ch[i + 1], 3, padding=1, stride=2))
            self.blocks = nn.ModuleList(blocks)
            self.conv_out = nn.Conv2d(ch[-1], cfg.embedding_channels, 3, padding=1)
        else:
            if len(ch) != 4:
                raise ValueError("the paper's PoseGuider has four convolutions (four widths)")
            self.conv_in = nn.Conv2d(cfg.conditioning_channels, ch[0], 4, stride=2, padding=1)
            self.blocks = nn.ModuleList([
                nn.Conv2d(ch[0], ch[1], 4, stride=2, padding=1),
                nn.Conv2d(ch[1], ch[2], 4, stride=2, padding=1),
                nn.Conv2d(ch[2], ch[3], 3, stride=1, padding=1),
            ])
            self.conv_out = nn.Conv2d(ch[-1], cfg.embedding_channels, 1)

    def zero_init(self):
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        # pose (n, 3, H, W) in [0, 1]  ->  (n, C0, H/8, W/8)
        h = F.silu(self.conv_in(pose))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)
