"""What each training stage trains, and the training forward built from the inference classes.

Stage 1 (image level, Animate Anyone §3.3): the denoising UNet *without* motion modules (built with
motion=None, as Moore's stage 1 uses a 2D UNet), the ReferenceNet and the PoseGuider are trained on
single frames. Stage 2: only the motion modules are trained, on N-frame clips; everything else is
frozen. Distill (training/distill.py): the whole denoising UNet, motion modules included; the
ReferenceNet and PoseGuider stay frozen. The forward is the inference path: the ReferenceNet's banks (`UNet.reference_bank`) are
projected by the denoising UNet's own attn1.to_k/to_v (`project_banks`) and read through
`ReferenceState`, so gradients reach the ReferenceNet through the K/V projection exactly as the
cache is used at inference. Unconditional rows skip reference attention and get a zero CLIP context.
"""
from __future__ import annotations

import torch
from torch import nn

from aa_trt.checkpoint import Models
from aa_trt.models import UNet
from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import project_banks

# "distill" (training/distill.py): the whole denoising UNet, motion modules included, learns from
# a frozen copy of itself; the ReferenceNet and PoseGuider are shared with that teacher and frozen.
STAGES = (1, 2, "distill")


def is_motion_key(name: str) -> bool:
    return "motion_modules." in name


def bank_parameters(refnet: UNet) -> set[str]:
    """Names of the ReferenceNet parameters that can influence its banks. The banks stop at the last
    block's norm1, so what comes after (that block's attentions and feed-forward, later resnets)
    never gets a gradient; Moore freezes those by name ("up_blocks.3"), here a probe finds them."""
    cfg = refnet.cfg
    side = 2 ** (len(cfg.block_out_channels) - 1) * 2
    p = next(refnet.parameters())
    x = torch.zeros(1, cfg.in_channels, side, side, device=p.device, dtype=p.dtype)
    ctx = torch.zeros(1, 1, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    named = [(n, q) for n, q in refnet.named_parameters()]
    flags = [q.requires_grad for _, q in named]
    for _, q in named:
        q.requires_grad_(True)
    try:
        with torch.enable_grad():
            out = sum(b.float().sum() for b in refnet.reference_bank(x, 0, ctx))
            grads = torch.autograd.grad(out, [q for _, q in named], allow_unused=True)
    finally:
        for (_, q), f in zip(named, flags):
            q.requires_grad_(f)
    return {n for (n, _), g in zip(named, grads) if g is not None}


class TrainModel(nn.Module):
    """The trainable part of one stage (what DistributedDataParallel wraps).

    forward: noisy (B*F, c, h, w), timesteps (B,) long, ref_latent (B, c, h, w), clip (B, D),
    pose (B*F, 3, H, W) in [0, 1], use_ref (B,) bool  ->  prediction (B*F, c, h, w), rows in input
    order (frames of a sample are consecutive rows).
    """

    def __init__(self, models: Models, stage: int):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 'distill', not {stage!r}")
        self.stage = stage
        self.config = models.config
        if stage == 1:
            unet = UNet(models.config.unet, None)
            sd = models.denoising_unet.state_dict()
            own = {k: v for k, v in sd.items() if not is_motion_key(k)}
            unet.load_state_dict(own, strict=True)
            self.denoising_unet = unet.to(next(models.denoising_unet.parameters()).device)
            # Kept aside (not trained, not in DDP) and put back when the stage is exported.
            self.motion_state = {k: v.detach().clone() for k, v in sd.items() if is_motion_key(k)}
            # The full denoiser's other weights now live in `unet`: free them (export rebuilds).
            models.denoising_unet.to("meta")
        else:
            self.denoising_unet = models.denoising_unet
            self.motion_state = None
        self.reference_unet = models.reference_unet
        self.pose_guider = models.pose_guider
        self._set_trainable()

    def _set_trainable(self) -> None:
        self.requires_grad_(False)
        if self.stage == 1:
            self.denoising_unet.requires_grad_(True)
            self.pose_guider.requires_grad_(True)
            used = bank_parameters(self.reference_unet)
            for n, p in self.reference_unet.named_parameters():
                p.requires_grad_(n in used)
        elif self.stage == "distill":
            self.denoising_unet.requires_grad_(True)
        else:
            for m in self.denoising_unet.motion_modules():
                m.requires_grad_(True)
        self.train()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def reference_banks(self, ref_latent: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """ref_latent (n, c, h, w), context (n, 1, D) -> the ReferenceNet's banks, (n, m_i, c_i)
        per transformer block; with a graph only in stage 1 (the one stage that trains it)."""
        with torch.set_grad_enabled(self.stage == 1 and torch.is_grad_enabled()):
            return self.reference_unet.reference_bank(ref_latent, 0, context)

    def reference_kv(self, ref_latent: torch.Tensor, context: torch.Tensor, frames: int,
                     banks: list[torch.Tensor] | None = None) -> list:
        """ref_latent (n, c, h, w), context (n, 1, D) -> per transformer block (k, v), each
        (1, m, c) for n = 1 (shared by all rows), else (n*frames, m, c) (one per cond row).
        `banks`: reference_banks of the same inputs, computed once for several forwards."""
        if banks is None:
            banks = self.reference_banks(ref_latent, context)
        # Projected by this UNet's own to_k/to_v (with a graph where they train: stages 1 and
        # distill). Training keeps the banks in the compute dtype: Moore's fp16 cast is an inference quirk.
        pairs = project_banks(self.denoising_unet, banks, "float32").pairs
        if ref_latent.shape[0] == 1:
            return pairs
        return [(k.repeat_interleave(frames, 0), v.repeat_interleave(frames, 0)) for k, v in pairs]

    def forward(self, noisy, timesteps, ref_latent, clip, pose, use_ref, banks=None):
        """`banks`: optionally, reference_banks of the conditional samples in the order this
        forward puts them (cond samples first, stable), e.g. shared by a teacher and a student."""
        b = timesteps.shape[0]
        frames = noisy.shape[0] // b
        # Conditional samples first: reference attention then runs over one contiguous block of
        # rows, reading one K/V row per frame row.
        order = torch.argsort((~use_ref).to(torch.int8), stable=True)
        rows = (order[:, None] * frames + torch.arange(frames, device=order.device)).flatten()
        n_cond = int(use_ref.sum())
        clip = clip[order]
        ctx = torch.where(use_ref[order][:, None], clip, torch.zeros_like(clip))[:, None]  # (B, 1, D)
        state = None
        if n_cond:
            kv = self.reference_kv(ref_latent[order[:n_cond]], ctx[:n_cond], frames, banks)
            state = ReferenceState(kv=kv, runs=ReferenceState.row_runs([True] * n_cond + [False] * (b - n_cond),
                                                                       frames))
        pred = self.denoising_unet(noisy[rows], timesteps[order], ctx, frames=frames,
                                   pose=self.pose_guider(pose[rows]), ref=state)
        return pred[torch.argsort(rows)]

    @torch.no_grad()
    def export(self, models: Models) -> Models:
        """`models` with this stage's weights in place (stage 1: the trained 2D UNet and the motion
        modules it was initialised with, back in the full denoiser)."""
        if self.stage == 1:
            full = models.denoising_unet
            if next(full.parameters()).is_meta:
                full.to_empty(device=next(self.denoising_unet.parameters()).device)
            sd = dict(self.denoising_unet.state_dict())
            sd.update(self.motion_state)
            full.load_state_dict(sd, strict=True)
        return models
