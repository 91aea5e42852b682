"""The Animator on exported graphs, whatever runs them (onnxruntime sessions, TensorRT engines).

A *graph* here is any callable `graph(device=..., **inputs) -> {output name: tensor}`, its inputs
and outputs named by the one declaration in aa_trt.backends.declarations (INPUTS, OUTPUTS, kv_name); a
build whose recorded names differ is refused. Each *Graph stand-in below wraps graphs so that it is called the way the
Animator calls the module it replaces (CLIP's `.image_embeds`, the VAE's
`.encode(x).latent_dist.mean` / `.decode(z).sample`, the UNet's `(x, t, ctx, frames=, pose=,
ref=)`), binding every tensor by its declared name: `GraphAnimator` then inherits the Animator's
preprocessing, sampling and decoding unchanged and only computes the reference K/V cache with its
own graph.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from aa_trt.checkpoint import Models
from aa_trt.config import ModelConfig
from aa_trt.errors import InputError
from aa_trt.backends.declarations import GRAPHS, UNET_INPUTS, declared_names, kv_name
from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import ReferenceKV
from aa_trt.pipeline import Animator

Graph = Callable[..., dict[str, torch.Tensor]]


def bind_check(what: str, expected, given) -> None:
    """Refuse a call whose tensor names differ from the graph's (a build of another layout)."""
    if set(expected) != set(given):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise InputError(f"{what}: inputs {sorted(given)} do not match the graph's {list(expected)} "
                         f"(missing {missing}, unexpected {extra}); rebuild with `aa-trt build`")


def check_declarations(engine_dir, manifest: dict) -> int:
    """The build's recorded names must be this aa-trt's declaration (backends.declarations); returns the
    number of K/V pairs (transformer blocks) they carry."""
    n_kv = sum(1 for n in manifest["graphs"]["unet_cond"]["inputs"] if n not in UNET_INPUTS) // 2
    for g in GRAPHS:
        want = declared_names(g, n_kv)
        rec = manifest["graphs"][g]
        if (set(rec["inputs"]), set(rec["outputs"])) != (set(want[0]), set(want[1])):
            raise InputError(f"{engine_dir}: graph {g} declares {sorted(rec['inputs'])} -> "
                             f"{sorted(rec['outputs'])}, not this aa-trt's {list(want[0])} -> "
                             f"{list(want[1])}; rebuild it with `aa-trt build`")
    return n_kv


class ClipGraph:
    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        # (1, 3, 224, 224) -> .image_embeds (1, D)
        return SimpleNamespace(image_embeds=self.graph(device=pixel_values.device,
                                                       pixel_values=pixel_values)["image_embeds"])


class VaeGraphs:
    """The graphs carry latent_scale inside (encoder output x scale, decoder input / scale); the
    Animator applies it itself, so it is undone here to keep the diffusers call contract."""

    def __init__(self, encoder: Graph, decoder: Graph, latent_scale: float):
        self.encoder, self.decoder, self.latent_scale = encoder, decoder, latent_scale

    def encode(self, image: torch.Tensor) -> SimpleNamespace:
        # (1, 3, H, W) in [-1, 1] -> .latent_dist.mean (1, c, H/f, W/f), unscaled
        scaled = self.encoder(device=image.device, image=image)["latent"]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=scaled / self.latent_scale))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        # unscaled latents (b, 4, h, w) -> .sample (b, 3, 8h, 8w)
        return SimpleNamespace(sample=self.decoder(device=z.device, latents=z * self.latent_scale)["image"])


class PoseGuiderGraph:
    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        # (n, 3, H, W) in [0, 1] -> (n, C0, H/8, W/8)
        return self.graph(device=frames.device, frames=frames)["features"]


class ReferenceKVGraph:
    def __init__(self, graph: Graph, n_kv: int):
        self.graph = graph
        self.names = [(kv_name("k", i), kv_name("v", i)) for i in range(n_kv)]

    def __call__(self, ref_latent: torch.Tensor, context: torch.Tensor) -> ReferenceKV:
        # ref_latent (1, c, h, w), context (1, 1, D) -> per block (k, v) (1, m_i, c_i)
        out = self.graph(device=ref_latent.device, ref_latent=ref_latent, context=context)
        return ReferenceKV([(out[k], out[v]) for k, v in self.names])


class UNetGraphs:
    """The denoising UNet's call, on the cond graph (reference rows) and the uncond graph (the
    rest), in chunks of at most `max_windows` windows (the build's profile)."""

    def __init__(self, cond: Graph, uncond: Graph, n_kv: int, max_windows: int, max_frames: int):
        self.cond, self.uncond = cond, uncond
        self.kv_names = [(kv_name("k", i), kv_name("v", i)) for i in range(n_kv)]
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
        kv = {}
        if has_kv:
            if len(ref.kv) != len(self.kv_names):
                raise ValueError(f"{len(ref.kv)} K/V pairs for a graph declaring {len(self.kv_names)}")
            kv = {n: a for names, pair in zip(self.kv_names, ref.kv) for n, a in zip(names, pair)}
        step = self.max_windows * frames
        outs = []
        for start, stop, use_ref in runs:
            for s in range(start, stop, step):
                e = min(s + step, stop)
                feeds = dict(latents=x[s:e], timestep=t, pose=pose[s:e], context=context[s // frames:e // frames])
                graph, extra = (self.cond, kv) if use_ref else (self.uncond, {})
                outs.append(graph(device=x.device, **feeds, **extra)["prediction"])
        return torch.cat(outs)


class GraphAnimator(Animator):
    """The Animator on a build DIR's graphs: same inputs, same outputs (fp32 in and out)."""

    def __init__(self, engine_dir, manifest: dict, graphs: dict[str, Graph], device="cpu"):
        config = ModelConfig.from_dict(manifest["config"])
        shapes = manifest["shapes"]
        n_kv = check_declarations(engine_dir, manifest)
        models = Models(
            config=config,
            denoising_unet=UNetGraphs(graphs["unet_cond"], graphs["unet_uncond"], n_kv, shapes["windows"],
                                      shapes["frames"]),
            reference_unet=ReferenceKVGraph(graphs["reference_kv"], n_kv),
            pose_guider=PoseGuiderGraph(graphs["pose_guider"]),
            vae=VaeGraphs(graphs["vae_encoder"], graphs["vae_decoder"], config.latent_scale),
            image_encoder=ClipGraph(graphs["clip"]),
        )
        super().__init__(models, device, torch.float32)
        self.engine_dir, self.manifest = Path(engine_dir), manifest
        self.size = (shapes["width"], shapes["height"])

    def encode_poses(self, poses, chunk: int | None = None, to_host: bool = False, size=None) -> torch.Tensor:
        # The graph's batch axis stops at the build's pose_chunk.
        return super().encode_poses(poses, chunk or self.manifest["shapes"]["pose_chunk"], to_host, size)

    def decode_chunks(self, latents: torch.Tensor, chunk: int | None = None, progress: bool = False):
        built = self.manifest["shapes"]["decode_chunk"]  # the graphs' largest batch
        return super().decode_chunks(latents, min(chunk or built, built), progress)

    def check_size(self, width: int, height: int) -> None:
        # Engines are built for one size (TensorRT profiles, the manifest's shapes).
        if (width, height) != self.size:
            raise InputError(f"{self.engine_dir}: built for {self.size[0]}x{self.size[1]}, asked for "
                             f"{width}x{height}; rebuild with --width {width} --height {height}")

    def reference_kv(self, ref_latent: torch.Tensor, clip_embeds: torch.Tensor):
        # The reference_kv graph runs the ReferenceNet and the projection in one.
        return self.models.reference_unet(ref_latent, clip_embeds[:, None])
