"""The VAE and the CLIP image encoder: built from the configs diffusers and transformers save
(ModelConfig.vae / .clip), as this package's own modules (models/vae.py, models/clip.py: the same
parameter names and arithmetic, without those libraries' import time), and CLIP's preprocessing."""
from __future__ import annotations

import torch
from torch import nn

from aa_trt.models.clip import CLIPConfig, CLIPVisionModelWithProjection
from aa_trt.models.vae import AutoencoderKL, VAEConfig


def build_vae(cfg: dict) -> nn.Module:
    return AutoencoderKL(VAEConfig.from_dict(cfg))


def build_clip(cfg: dict) -> nn.Module:
    return CLIPVisionModelWithProjection(CLIPConfig.from_dict(cfg))


# CLIP's image normalisation (OpenAI's statistics, as sd-image-variations' processor uses them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size: int = 224) -> torch.Tensor:
    """PIL images or uint8 (H, W, 3) arrays -> CLIP's pixel_values (B, 3, size, size) float32:
    Moore's preprocessing, a PIL bicubic resize to size x size, then rescale and normalise."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = (torch.from_numpy(np.stack(out)) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def restore_nonpersistent_buffers(module: nn.Module, device) -> None:
    """Models built on the meta device keep their non-persistent buffers there; rebuild the known
    ones (CLIP's position_ids) and refuse anything else rather than compute with meta tensors."""
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                mod.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                    persistent=False)
            else:
                raise RuntimeError(f"buffer {mod_name}.{name} was not restored after meta loading")
