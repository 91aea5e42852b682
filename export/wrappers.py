"""Thin traceable modules: each exported graph's forward, with tensors in and tensors out.

The ONNX exporter traces positional tensor arguments, so every wrapper takes exactly the graph's
inputs in the declared order and returns its outputs. They hold references to the real modules and
change nothing in them. (Their runtime counterparts, which call the exported graphs the way the
Animator calls the torch modules, are aa_trt.backends.graph_animator' *Graph classes.)
"""
from __future__ import annotations

import torch
from torch import nn

from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import project_banks
from aa_trt.models.unet import UNet


class ClipExport(nn.Module):
    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (b, 3, 224, 224) CLIP-normalised  ->  image_embeds (b, D)
        return self.image_encoder(pixel_values=pixel_values).image_embeds


class VaeEncoderExport(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.vae, self.latent_scale = vae, latent_scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (b, 3, H, W) in [-1, 1]  ->  posterior mean x latent_scale (b, 4, H/8, W/8)
        return self.vae.encode(image).latent_dist.mean * self.latent_scale


class VaeDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.vae, self.latent_scale = vae, latent_scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # scaled latents (b, 4, h, w)  ->  image (b, 3, 8h, 8w) in about [-1, 1]
        return self.vae.decode(latents / self.latent_scale).sample


class PoseGuiderExport(nn.Module):
    def __init__(self, pose_guider: nn.Module):
        super().__init__()
        self.pose_guider = pose_guider

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # (n, 3, H, W) in [0, 1]  ->  (n, C0, H/8, W/8)
        return self.pose_guider(frames)


class ReferenceKVExport(nn.Module):
    """ReferenceNet at t=0 plus the denoising UNet's attn1.to_k/to_v: the whole K/V cache in one
    graph, so the engine never materialises the banks."""

    def __init__(self, reference_unet: UNet, denoising_unet: UNet, bank_dtype: str):
        super().__init__()
        self.reference_unet, self.denoising_unet = reference_unet, denoising_unet
        self.bank_dtype = bank_dtype

    def forward(self, ref_latent: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # ref_latent (1, c, h, w), context (1, 1, D)  ->  k0, v0, k1, v1, ... each (1, m_i, c_i)
        banks = self.reference_unet.reference_bank(ref_latent, 0, context)
        return tuple(project_banks(self.denoising_unet, banks, self.bank_dtype).flat())


class UNetStepExport(nn.Module):
    """One denoising UNet call over b windows of f frames each, one guidance branch.

    `frames` is not an input: it is latents.shape[0] // context.shape[0], which the tracer records
    as shape arithmetic, so one graph serves every window length up to the motion modules' limit.
    cond: reference attention on the K/V cache; uncond: plain self-attention (Moore's semantics),
    so its graph has no reference inputs at all.
    """

    def __init__(self, unet: UNet, with_reference: bool):
        super().__init__()
        self.unet, self.with_reference = unet, with_reference

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, pose: torch.Tensor,
                context: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        # latents (b*f, 4, h, w), timestep (1,) float, pose (b*f, C0, h, w), context (b, 1, D),
        # kv: k0, v0, ... (1, m_i, c_i) for cond  ->  prediction (b*f, 4, h, w)
        frames = latents.shape[0] // context.shape[0]
        ref = None
        if self.with_reference:
            ref = ReferenceState(kv=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)])
        return self.unet(latents, timestep, context, frames=frames, pose=pose, ref=ref)
