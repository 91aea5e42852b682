"""A Moore-style baseline: aa-trt's modules and weights, computing the way Moore-AnimateAnyone does.

The comparison is only fair if both sides share every module, so this file changes nothing in
aa_trt; it reproduces the work Moore does (the waste that aa-trt removes) on top of it:
- the ReferenceNet runs at batch 2 ([zeros, clip] contexts), through to its last up block;
- every UNet call repeats each bank for every frame and concatenates it to the frame's tokens
  *before* the K/V projection, so the reference K/V is recomputed in every call;
- the uncond half computes reference attention (with bank row 0), discards it and recomputes
  plain self-attention (Moore's `uc_mask`);
- the PoseGuider sees all frames in one call, and the VAE decodes one frame at a time.
Everything else (CLIP, VAE encode, windows, guidance, DDIM) is aa-trt's own code, which matches
Moore's. Only window_batch=1 exists here, as in Moore (context_batch_size=1).
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from aa_trt import fused
from aa_trt.models.layers import ReferenceState, TransformerBlock
from aa_trt.models.reference_kv import quantize_bank
from aa_trt.pipeline import Animator
from aa_trt.guidance import context_windows, windowed_guidance
from aa_trt.sampling import ddim_schedule, sample_ddim


@dataclass
class MooreReferenceState(ReferenceState):
    """Moore's read mode: `banks[i]` (b, m, c) is block i's bank, one row per UNet batch entry
    (row 0 uncond, row 1 cond under CFG); `frames` per entry; `cfg` turns on the uc_mask."""

    banks: list[torch.Tensor] = field(default_factory=list)
    frames: int = 1
    cfg: bool = False


def moore_self_attention(block: TransformerBlock, x: torch.Tensor, ref) -> torch.Tensor:
    """attn1 as Moore's hacked BasicTransformerBlock computes it.  x (b*f, L, c) -> (b*f, L, c)."""
    a = block.attn1
    bank = ref.banks[block.index]
    b, m, c = bank.shape
    # Moore: bank.unsqueeze(1).repeat(1, video_length, 1, 1), then "b t l c -> (b t) l c": a copy
    # per frame, concatenated on the token axis, then projected by to_k/to_v for every frame.
    repeated = bank.unsqueeze(1).repeat(1, ref.frames, 1, 1).reshape(b * ref.frames, m, c)
    out = a(x, torch.cat([x, repeated], dim=1))
    if ref.cfg:
        # uc_mask: the uncond half threw its reference attention away and runs plain attention.
        half = x.shape[0] // 2
        out = out.clone()
        out[:half] = a(x[:half])
    return out


@contextlib.contextmanager
def moore_attention(unet):
    """While active, the UNet's transformer blocks compute attn1 Moore's way whenever they get a
    MooreReferenceState (any other state keeps aa-trt's path), attn2 as diffusers does (query
    projection and attention even for a one-token context), and every attention through SDPA
    (diffusers' AttnProcessor2_0; aa-trt's CPU matmul path for short sequences is off). Restored
    on exit."""
    from aa_trt import attention as attn_math

    blocks = unet.transformer_blocks()
    # An instance attribute may already shadow the method (another wrapper): put it back as found.
    saved = [block.__dict__.get("self_attention") for block in blocks]
    saved_cross = [block.__dict__.get("cross_attention") for block in blocks]

    def patch(block):
        original = block.self_attention

        def self_attention(self, x, ref, residual=None):
            if isinstance(ref, MooreReferenceState):
                out = moore_self_attention(self, x, ref)
                return out if residual is None else residual + out
            return original(x, ref, residual)

        block.self_attention = types.MethodType(self_attention, block)

        def cross_attention(self, x, context):
            return self.attn2(self.norm2(x), context)

        block.cross_attention = types.MethodType(cross_attention, block)

    backend = attn_math.set_backend("sdpa")
    plain = fused.plain()  # diffusers' NCHW layout and unfused layers
    plain.__enter__()
    try:
        for block in blocks:
            patch(block)
        yield unet
    finally:
        plain.__exit__(None, None, None)
        attn_math.set_backend(backend)
        for name, saved_methods in (("self_attention", saved), ("cross_attention", saved_cross)):
            for block, previous in zip(blocks, saved_methods):
                if previous is None:
                    delattr(block, name)
                else:
                    setattr(block, name, previous)


@dataclass
class MooreConditioning:
    clip_embeds: torch.Tensor     # (1, D)
    ref_latent: torch.Tensor      # (1, 4, h, w)
    banks: list[torch.Tensor]     # per transformer block (b, L, C), b = 2 with CFG, fp16-rounded
    pose_features: torch.Tensor   # (N, C0, h, w)
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return self.pose_features.shape[0]


@torch.no_grad()
def moore_banks(animator: Animator, ref_latent: torch.Tensor, clip_embeds: torch.Tensor,
                guidance: float = 3.5) -> list[torch.Tensor]:
    """The whole ReferenceNet at t=0, batch 2 ([zeros, clip]) under CFG: no early stop, both rows
    kept, each bank cast to the checkpoint's bank dtype (fp16 in Moore) and back."""
    refnet = animator.models.reference_unet
    ctx = clip_embeds[:, None].to(animator.dtype)
    if guidance > 1.0:
        ctx = torch.cat([torch.zeros_like(ctx), ctx])
    x = ref_latent.expand(ctx.shape[0], -1, -1, -1)
    state = ReferenceState(bank=[])
    with moore_attention(refnet):  # attn2 and SDPA as diffusers computes them
        refnet(x, 0, ctx, ref=state)
    return [quantize_bank(bank, animator.config.bank_dtype) for bank in state.bank]


def moore_prepare(animator: Animator, ref_image: Image.Image, poses: np.ndarray,
                  guidance: float = 3.5) -> MooreConditioning:
    poses = np.asarray(poses)  # uint8 (N, H, W, 3), as Animator.prepare takes them
    n, height, width, _ = poses.shape
    if width % 8 or height % 8:
        raise ValueError(f"poses of {width}x{height}: the baseline takes sizes that are multiples of 8")
    clip = animator.encode_clip(ref_image)
    ref_latent = animator.encode_reference(ref_image, width, height)
    banks = moore_banks(animator, ref_latent, clip, guidance)
    # Moore feeds the PoseGuider (1, 3, N, H, W) in one call: activations grow with the video.
    pose_features = animator.encode_poses(poses, chunk=n)
    return MooreConditioning(clip, ref_latent, banks, pose_features, width, height)


def moore_unet_step(animator: Animator, cond: MooreConditioning):
    """Same contract as `Animator.unet_step`: x_win (1, c, F, h, w) -> (len(branches), c, F, h, w)."""
    unet = animator.models.denoising_unet
    clip = cond.clip_embeds[:, None].to(animator.dtype)

    @torch.no_grad()
    def step(x_win: torch.Tensor, t: int, windows: list[list[int]], branches) -> torch.Tensor:
        k, c, f, h, w = x_win.shape
        if k != 1:
            raise ValueError("Moore's pipeline runs one window per UNet call (context_batch_size=1)")
        nb = len(branches)
        x = x_win.permute(0, 2, 1, 3, 4).reshape(f, c, h, w).to(animator.dtype)
        pose = cond.pose_features[torch.as_tensor(windows[0], device=animator.device)]
        x, pose = x.repeat(nb, 1, 1, 1), pose.repeat(nb, 1, 1, 1)
        ctx = torch.cat([clip if b == "cond" else torch.zeros_like(clip) for b in branches])
        state = MooreReferenceState(banks=cond.banks, frames=f, cfg=nb > 1)
        with moore_attention(unet):
            out = unet(x, t, ctx, frames=f, pose=pose, ref=state)
        return out.view(nb, f, c, h, w).permute(0, 2, 1, 3, 4).float()

    return step


def moore_denoise(animator: Animator, cond: MooreConditioning, latents: torch.Tensor, steps: int = 20,
                  guidance: float = 3.5, context_frames: int = 24, context_overlap: int = 4,
                  progress: bool = False) -> torch.Tensor:
    windows = context_windows(cond.num_frames, context_frames, context_overlap, "uniform")
    model = windowed_guidance(moore_unet_step(animator, cond), windows, guidance, window_batch=1)
    schedule = ddim_schedule(animator.config.scheduler, steps)
    return sample_ddim(model, latents.to(animator.device, torch.float32), schedule, disable=not progress)


def moore_animate(animator: Animator, ref_image: Image.Image, poses: np.ndarray, latents: torch.Tensor,
                  steps: int = 20, guidance: float = 3.5, context_frames: int = 24,
                  context_overlap: int = 4, output: str = "np"):
    """The whole pipeline, Moore-style: conditioning, denoising, then decoding frame by frame."""
    with fused.plain():  # diffusers computes everything unfused, in NCHW
        cond = moore_prepare(animator, ref_image, poses, guidance)
        out = moore_denoise(animator, cond, latents, steps, guidance, context_frames, context_overlap)
        return out if output == "latent" else animator.decode(out, chunk=1)
