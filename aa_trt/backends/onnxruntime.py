"""onnxruntime backend: the graphs of an `aa-trt build` DIR as drop-ins for the torch modules.

Each stand-in is called the way the Animator calls the module it replaces (CLIP's `.image_embeds`,
the VAE's `.encode(x).latent_dist.mean` / `.decode(z).sample`, the UNet's `(x, t, ctx, frames=,
pose=, ref=)`), so `OrtAnimator` inherits the Animator's preprocessing, sampling and decoding
unchanged and only computes the reference K/V cache with its own graph.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..checkpoint import Models
from ..config import ModelConfig
from ..errors import InputError
from ..models.layers import ReferenceState
from ..models.reference_kv import ReferenceKV
from ..pipeline import Animator, Conditioning, _check_poses, _resize

REQUIRED = ("clip", "vae_encoder", "vae_decoder", "pose_guider", "reference_kv", "unet_cond",
            "unet_uncond")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class OrtGraph:
    """One onnxruntime session called with torch tensors in input order -> list of torch tensors."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor | np.ndarray, device="cpu") -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{len(inputs)} inputs for a graph taking {self.input_names}")
        feeds = {n: (x if isinstance(x, np.ndarray) else _np(x)) for n, x in zip(self.input_names, inputs)}
        return [torch.from_numpy(o).to(device) for o in self.session.run(self.output_names, feeds)]


class OrtImageEncoder:
    def __init__(self, graph: OrtGraph):
        self.graph = graph

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        # (1, 3, 224, 224) -> .image_embeds (1, D)
        return SimpleNamespace(image_embeds=self.graph(pixel_values, device=pixel_values.device)[0])


class OrtVae:
    """The graphs carry latent_scale inside (encoder output x scale, decoder input / scale); the
    Animator applies it itself, so it is undone here to keep the diffusers call contract."""

    def __init__(self, encoder: OrtGraph, decoder: OrtGraph, latent_scale: float):
        self.encoder, self.decoder, self.latent_scale = encoder, decoder, latent_scale

    def encode(self, image: torch.Tensor) -> SimpleNamespace:
        # (1, 3, H, W) in [-1, 1] -> .latent_dist.mean (1, 4, H/8, W/8), unscaled
        scaled = self.encoder(image, device=image.device)[0]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=scaled / self.latent_scale))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        # unscaled latents (b, 4, h, w) -> .sample (b, 3, 8h, 8w)
        return SimpleNamespace(sample=self.decoder(z * self.latent_scale, device=z.device)[0])


class OrtPoseGuider:
    def __init__(self, graph: OrtGraph):
        self.graph = graph

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        # (n, 3, H, W) in [0, 1] -> (n, C0, H/8, W/8)
        return self.graph(frames, device=frames.device)[0]


class OrtReferenceKV:
    def __init__(self, graph: OrtGraph):
        self.graph = graph

    def __call__(self, ref_latent: torch.Tensor, context: torch.Tensor) -> ReferenceKV:
        # ref_latent (1, 4, h, w), context (1, 1, D) -> per block (k, v) (1, m_i, c_i)
        flat = self.graph(ref_latent, context, device=ref_latent.device)
        return ReferenceKV([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])


class OrtUNet:
    """The denoising UNet's call, on the cond graph (reference rows) and the uncond graph (the
    rest), in chunks of at most `max_windows` windows (the build's profile)."""

    def __init__(self, cond: OrtGraph, uncond: OrtGraph, max_windows: int, max_frames: int):
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
        t = np.asarray([float(torch.as_tensor(timestep).reshape(-1)[0])], dtype=np.float32)
        runs = ref.runs if ref is not None and ref.runs else [(0, x.shape[0], ref is not None and ref.kv is not None)]
        kv = [_np(a) for pair in ref.kv for a in pair] if ref is not None and ref.kv is not None else []
        outs = []
        for start, stop, use_ref in runs:
            step = self.max_windows * frames
            for s in range(start, stop, step):
                e = min(s + step, stop)
                args = [_np(x[s:e]), t, _np(pose[s:e]), _np(context[s // frames:e // frames])]
                outs.append(self.cond(*args, *kv)[0] if use_ref else self.uncond(*args)[0])
        return torch.cat(outs).to(x.device)


class OrtAnimator(Animator):
    """The Animator on an `aa-trt build` DIR: same inputs, same outputs (fp32, CPU or CUDA provider)."""

    def __init__(self, engine_dir, manifest: dict, providers: list[str] | None = None,
                 threads: int | None = None):
        engine_dir = Path(engine_dir)
        config = ModelConfig.from_dict(manifest["config"])
        g = {name: OrtGraph(engine_dir / f"{name}.onnx", providers, threads) for name in REQUIRED}
        shapes = manifest["shapes"]
        models = Models(
            config=config,
            denoising_unet=OrtUNet(g["unet_cond"], g["unet_uncond"], shapes["windows"], shapes["frames"]),
            reference_unet=OrtReferenceKV(g["reference_kv"]),
            pose_guider=OrtPoseGuider(g["pose_guider"]),
            vae=OrtVae(g["vae_encoder"], g["vae_decoder"], config.latent_scale),
            image_encoder=OrtImageEncoder(g["clip"]),
        )
        super().__init__(models, "cpu", torch.float32)
        self.engine_dir, self.manifest = engine_dir, manifest
        self.size = (shapes["width"], shapes["height"])

    @classmethod
    def from_dir(cls, engine_dir, checkpoint=None, providers: list[str] | None = None,
                 threads: int | None = None) -> "OrtAnimator":
        """Refuses (InputError, one line) a DIR from another aa-trt, an unfinished build, or, when
        `checkpoint` is given, a build from another checkpoint."""
        from aa_trt.export import manifest as mf

        sha = mf.file_sha256(checkpoint) if checkpoint is not None else None
        m = mf.load_for_run(engine_dir, sha, REQUIRED)
        return cls(engine_dir, m, providers, threads or torch.get_num_threads())

    def encode_poses(self, poses: np.ndarray, chunk: int | None = None) -> torch.Tensor:
        # The graph's batch axis stops at the build's pose_chunk.
        return super().encode_poses(poses, chunk or self.manifest["shapes"]["pose_chunk"])

    def decode(self, latents: torch.Tensor, chunk: int = 8, progress: bool = False) -> np.ndarray:
        return super().decode(latents, min(chunk, self.manifest["shapes"]["decode_chunk"]), progress)

    def prepare(self, ref_image, poses: np.ndarray, width: int | None = None,
                height: int | None = None) -> Conditioning:
        """As Animator.prepare, with the K/V cache from the reference_kv graph."""
        poses = _check_poses(poses)
        n, ph, pw, _ = poses.shape
        width = (width or pw) // 8 * 8
        height = (height or ph) // 8 * 8
        if (width, height) != self.size:
            raise InputError(f"{self.engine_dir}: built for {self.size[0]}x{self.size[1]}, asked for "
                             f"{width}x{height}; rebuild with --width {width} --height {height}")
        if (pw, ph) != (width, height):
            poses = np.stack([np.asarray(_resize(Image.fromarray(p), width, height)) for p in poses])
        clip = self.encode_clip(ref_image)
        ref_latent = self.encode_reference(ref_image, width, height)
        kv = self.models.reference_unet(ref_latent, clip[:, None])
        return Conditioning(clip, ref_latent, kv, self.encode_poses(poses), width, height)
