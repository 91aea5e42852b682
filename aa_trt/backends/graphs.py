"""The Animator on exported graphs, whatever runs them (onnxruntime sessions, TensorRT engines).

A *graph* here is any callable `graph(*tensors in input order, device=...) -> [tensors]`. Each
stand-in below wraps graphs so that it is called the way the Animator calls the module it replaces
(CLIP's `.image_embeds`, the VAE's `.encode(x).latent_dist.mean` / `.decode(z).sample`, the UNet's
`(x, t, ctx, frames=, pose=, ref=)`): `GraphAnimator` then inherits the Animator's preprocessing,
sampling and decoding unchanged and only computes the reference K/V cache with its own graph.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from ..checkpoint import Models
from ..config import ModelConfig
from ..errors import InputError
from ..models.layers import ReferenceState
from ..models.reference_kv import ReferenceKV
from ..pipeline import Animator

REQUIRED = ("clip", "vae_encoder", "vae_decoder", "pose_guider", "reference_kv", "unet_cond",
            "unet_uncond")
Graph = Callable[..., list[torch.Tensor]]


class ImageEncoder:
    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        # (1, 3, 224, 224) -> .image_embeds (1, D)
        return SimpleNamespace(image_embeds=self.graph(pixel_values, device=pixel_values.device)[0])


class Vae:
    """The graphs carry latent_scale inside (encoder output x scale, decoder input / scale); the
    Animator applies it itself, so it is undone here to keep the diffusers call contract."""

    def __init__(self, encoder: Graph, decoder: Graph, latent_scale: float):
        self.encoder, self.decoder, self.latent_scale = encoder, decoder, latent_scale

    def encode(self, image: torch.Tensor) -> SimpleNamespace:
        # (1, 3, H, W) in [-1, 1] -> .latent_dist.mean (1, c, H/f, W/f), unscaled
        scaled = self.encoder(image, device=image.device)[0]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=scaled / self.latent_scale))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        # unscaled latents (b, 4, h, w) -> .sample (b, 3, 8h, 8w)
        return SimpleNamespace(sample=self.decoder(z * self.latent_scale, device=z.device)[0])


class PoseGuider:
    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        # (n, 3, H, W) in [0, 1] -> (n, C0, H/8, W/8)
        return self.graph(frames, device=frames.device)[0]


class ReferenceKVNet:
    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, ref_latent: torch.Tensor, context: torch.Tensor) -> ReferenceKV:
        # ref_latent (1, c, h, w), context (1, 1, D) -> per block (k, v) (1, m_i, c_i)
        flat = self.graph(ref_latent, context, device=ref_latent.device)
        return ReferenceKV([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])


class UNetStep:
    """The denoising UNet's call, on the cond graph (reference rows) and the uncond graph (the
    rest), in chunks of at most `max_windows` windows (the build's profile)."""

    def __init__(self, cond: Graph, uncond: Graph, max_windows: int, max_frames: int):
        self.cond, self.uncond = cond, uncond
        self.max_windows, self.max_frames = max_windows, max_frames

    def __call__(self, x: torch.Tensor, timestep, context: torch.Tensor, *, frames: int = 1,
                 pose: torch.Tensor | None = None, ref: ReferenceState | None = None) -> torch.Tensor:
        # x (b*f, 4, h, w), context (b, 1, D), pose (b*f, C0, h, w) -> prediction (b*f, 4, h, w)
        if frames > self.max_frames:
            raise InputError(f"a context window of {frames} frames; this build's graphs take at most "
                             f"{self.max_frames} (rebuild with --frames {frames})")
        if pose is None:
            raise ValueError("the exported UNet step always takes pose features")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1)[:1]
        has_kv = ref is not None and ref.kv is not None
        runs = ref.runs if ref is not None and ref.runs else [(0, x.shape[0], has_kv)]
        kv = [a for pair in ref.kv for a in pair] if has_kv else []
        step = self.max_windows * frames
        outs = []
        for start, stop, use_ref in runs:
            for s in range(start, stop, step):
                e = min(s + step, stop)
                args = (x[s:e], t, pose[s:e], context[s // frames:e // frames])
                outs.append(self.cond(*args, *kv, device=x.device)[0] if use_ref
                            else self.uncond(*args, device=x.device)[0])
        return torch.cat(outs)


class GraphAnimator(Animator):
    """The Animator on a build DIR's graphs: same inputs, same outputs (fp32 in and out)."""

    def __init__(self, engine_dir, manifest: dict, graphs: dict[str, Graph], device="cpu"):
        config = ModelConfig.from_dict(manifest["config"])
        shapes = manifest["shapes"]
        models = Models(
            config=config,
            denoising_unet=UNetStep(graphs["unet_cond"], graphs["unet_uncond"], shapes["windows"],
                                    shapes["frames"]),
            reference_unet=ReferenceKVNet(graphs["reference_kv"]),
            pose_guider=PoseGuider(graphs["pose_guider"]),
            vae=Vae(graphs["vae_encoder"], graphs["vae_decoder"], config.latent_scale),
            image_encoder=ImageEncoder(graphs["clip"]),
        )
        super().__init__(models, device, torch.float32)
        self.engine_dir, self.manifest = Path(engine_dir), manifest
        self.size = (shapes["width"], shapes["height"])

    def encode_poses(self, poses: np.ndarray, chunk: int | None = None, to_host: bool = False) -> torch.Tensor:
        # The graph's batch axis stops at the build's pose_chunk.
        return super().encode_poses(poses, chunk or self.manifest["shapes"]["pose_chunk"], to_host)

    def decode(self, latents: torch.Tensor, chunk: int | None = None, progress: bool = False) -> np.ndarray:
        built = self.manifest["shapes"]["decode_chunk"]  # the graphs' largest batch
        return super().decode(latents, min(chunk or built, built), progress)

    def check_size(self, width: int, height: int) -> None:
        # Engines are built for one size (TensorRT profiles, the manifest's shapes).
        if (width, height) != self.size:
            raise InputError(f"{self.engine_dir}: built for {self.size[0]}x{self.size[1]}, asked for "
                             f"{width}x{height}; rebuild with --width {width} --height {height}")

    def reference_kv(self, ref_latent: torch.Tensor, clip_embeds: torch.Tensor):
        # The reference_kv graph runs the ReferenceNet and the projection in one.
        return self.models.reference_unet(ref_latent, clip_embeds[:, None])
