"""Gradient checkpointing for the UNet family without touching the model code.

Each block's forward is wrapped in `torch.utils.checkpoint` (non-reentrant: it accepts the
non-tensor ReferenceState argument and works under DistributedDataParallel). In the denoising UNet
the wrapped units are the down/mid/up blocks. In the ReferenceNet only the resnets are wrapped: its
spatial transformers append to the bank and the last one stops the forward with BankComplete,
side effects that a recomputation in the backward pass must not repeat.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from aa_trt.models.layers import ResnetBlock
from aa_trt.models.unet import DownBlock, MidBlock, UpBlock


def _wrap(module: nn.Module) -> None:
    if getattr(module, "_aa_trt_checkpointed", False):
        return
    inner = module.forward

    def run(*args, **kw):
        # UpBlock pops its skip list: give each run (forward and recomputation) its own copy.
        return inner(*[list(a) if isinstance(a, list) else a for a in args], **kw)

    @functools.wraps(inner)
    def forward(*args, **kw):
        if not module.training:
            return inner(*args, **kw)
        return checkpoint(run, *args, use_reentrant=False, **kw)

    module.forward = forward
    module._aa_trt_checkpointed = True


def enable(unet: nn.Module, reference: bool = False) -> int:
    """Checkpoint the blocks of a UNet (`reference=True`: a ReferenceNet, resnets only).
    Returns how many modules were wrapped."""
    kinds = (ResnetBlock,) if reference else (DownBlock, MidBlock, UpBlock)
    mods = [m for m in unet.modules() if isinstance(m, kinds)]
    for m in mods:
        _wrap(m)
    return len(mods)
