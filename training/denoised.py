"""The denoiser's own latents beside the true frames: data for fitting the VAE decoder to what it decodes.

Stage 0 trains the decoder on the *encoder's* latents, but at inference it decodes the *denoiser's*,
which miss the true latents in ways of their own (background drift, soft limbs). `sample_pairs` runs a
finished checkpoint's full inference path (DDIM, CFG, context windows, as `aa-trt eval`) on videos
of a data folder, with their exact pose renderings, and keeps each generated frame's final latent
beside the frame it should have been. `aa-trt train --stage 0 --decoder-only --denoised PAIRS` then
fits the decoder to both kinds of latent (autoencoder.py). Sample pairs from splits the model never
trained on (e.g. another synthetic set's test splits), not from the splits `aa-trt eval` scores.

    aa-trt data denoised --ckpt CKPT --out pairs.npz data/synth128s1/test_characters.json ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aa_trt.errors import InputError, OptionError
from aa_trt.files import atomic_output

from aa_trt.training.evaluate import load_synth_meta


@dataclass
class Pairs:
    latents: torch.Tensor   # (M, c, h, w) float32, VAE space (the final latents / latent_scale)
    frames: np.ndarray      # uint8 (M, H, W, 3), the true frames they should decode to

    def __len__(self) -> int:
        return len(self.latents)


def sample_pairs(ckpt, metas: list, out, frames: int = 24, videos: int | None = None, steps: int = 20,
                 guidance: float | None = None, seed: int = 0, progress: bool = True) -> Path:
    """For the first `videos` entries of each meta file: reference = frame 0, targets = the next
    `frames` frames driven by their exact poses -> `out` (.npz: latents, frames, videos, ckpt),
    written atomically. Entries need `npz_path` (made by `aa-trt data synth`)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from aa_trt.pipeline import Animator

    if not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: no such checkpoint")
    jobs = []
    for meta in map(Path, metas):
        if not meta.is_file():
            raise InputError(f"{meta}: no such meta file")
        jobs += [meta.parent / e["npz_path"] for e in load_synth_meta(meta)[:videos]]
    if not jobs:
        raise InputError(f"{', '.join(map(str, metas))}: no videos")
    animator = Animator.from_pretrained(ckpt, dtype=torch.float32)
    scale = animator.config.latent_scale
    lat, true = [], []
    for i, path in enumerate(tqdm(jobs, desc="denoised latents", disable=not progress)):
        with np.load(path) as z:
            fr, poses = z["frames"], z["poses"]
        n = min(frames, len(fr) - 1)
        if n < 1:
            raise InputError(f"{path}: a video of {len(fr)} frames has no target frames")
        z = animator(Image.fromarray(fr[0]), poses[1:1 + n], steps=steps, guidance=guidance, seed=seed + i,
                     output="latent", progress=False)  # (1, c, n, h, w), scaled
        lat.append((z[0].transpose(0, 1) / scale).float().cpu().numpy())
        true.append(fr[1:1 + n])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, latents=np.concatenate(lat), frames=np.concatenate(true),
                 videos=np.array([str(p) for p in jobs]), ckpt=np.array(str(ckpt)))
    return out


def load_pairs(path, latent_channels: int, factor: int) -> Pairs:
    """A file written by `sample_pairs`, checked against the VAE it will train."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (make it with `aa-trt data denoised`)")
    try:
        with np.load(path) as z:
            lat, fr = z["latents"], z["frames"]
    except (KeyError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a denoised-latents file ({e})") from None
    if lat.ndim != 4 or lat.shape[1] != latent_channels:
        raise InputError(f"{path}: latents of shape {lat.shape}; this VAE has {latent_channels} channels")
    if fr.shape[:1] != lat.shape[:1] or fr.shape[1:3] != (lat.shape[2] * factor, lat.shape[3] * factor):
        raise InputError(f"{path}: frames {fr.shape} do not match latents {lat.shape} at factor {factor}")
    return Pairs(torch.from_numpy(lat).float(), fr)


def random_pair_crops(pairs: Pairs, n: int, crop: int, factor: int,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random pairs, each cut at one random latent-aligned place and randomly mirrored ->
    latents (n, c, crop/f, crop/f) and pixels (n, 3, crop, crop) in [-1, 1]."""
    from aa_trt.training.data import to_unit

    _, _, h, w = pairs.latents.shape
    c = crop // factor
    if c > min(h, w):
        raise OptionError("crop", crop, f"is larger than the denoised frames ({w * factor}x{h * factor})")
    zs, xs = [], []
    for i in rng.integers(len(pairs), size=n):
        y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
        z = pairs.latents[i, :, y:y + c, x:x + c]
        px = pairs.frames[i, y * factor:(y + c) * factor, x * factor:(x + c) * factor]
        if rng.random() < 0.5:
            z, px = z.flip(-1), px[:, ::-1]
        zs.append(z)
        xs.append(np.ascontiguousarray(px))
    return torch.stack(zs), to_unit(np.stack(xs)) * 2 - 1
