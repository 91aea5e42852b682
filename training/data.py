"""A data set in Moore's meta-JSON format -> training batches (pixels, then latents).

A data folder holds `train.json` (and test splits), each a list of `{video_path, kps_path}` with
paths relative to the folder (absolute paths work too). Entries with `npz_path` (the synthetic
generator's) are read losslessly from it, and their pose images are re-rendered from the exact
keypoints at the training size; otherwise the two videos are decoded with PyAV and resized.

Sampling is a pure function of a numpy Generator, which the loop seeds from (seed, step, rank), so
a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aa_trt.errors import InputError
from aa_trt.files import write_json
from aa_trt.models.external import clip_pixels


@dataclass
class Video:
    frames: np.ndarray  # uint8 (N, H, W, 3)
    poses: np.ndarray   # uint8 (N, H, W, 3)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if a.shape[2] == size[0] and a.shape[1] == size[1]:
        return a
    interp = cv2.INTER_AREA if a.shape[2] > size[0] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interp) for f in a])


def read_meta(meta: Path) -> list[dict]:
    """A meta JSON file: a list of {video_path, kps_path} or {npz_path} entries (InputError naming
    the file, and the entry, for anything else)."""
    try:
        entries = json.loads(meta.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{meta}: not a meta JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(entries, list):
        raise InputError(f"{meta}: expected a list of videos, found {type(entries).__name__}")
    for i, e in enumerate(entries):
        ok = isinstance(e, dict) and (isinstance(e.get("npz_path"), str) and e["npz_path"] or
                                      all(isinstance(e.get(k), str) and e[k] for k in ("video_path", "kps_path")))
        if not ok:
            raise InputError(f"{meta}: entry {i} is not {{video_path, kps_path}} or {{npz_path}} (paths as text)")
    return entries


def read_video_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic video's npz: frames and poses uint8 (N, H, W, 3), keypoints (N, 128, 3)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            frames, poses, kps = z["frames"], z["poses"], z["keypoints"]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # a damaged zip, a truncated array, a missing array
        raise InputError(f"{path}: not a readable video npz ({type(e).__name__}: {e})") from None
    n = len(frames) if frames.ndim == 4 else 0
    if (frames.dtype != np.uint8 or poses.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3
            or poses.shape != frames.shape or n == 0 or min(frames.shape[1:3]) == 0
            or kps.shape != (n, 128, 3)):
        raise InputError(f"{path}: expected frames and poses uint8 (N, H, W, 3) and keypoints (N, 128, 3), "
                         f"found {frames.dtype}{list(frames.shape)}, {poses.dtype}{list(poses.shape)}, "
                         f"{list(kps.shape)}")
    return frames, poses, np.asarray(kps, np.float32)


class VideoSet:
    """The videos of one meta file, loaded lazily, the last `cache` of them kept in memory."""

    def __init__(self, meta, size: tuple[int, int] | None = None, cache: int = 64):
        meta = Path(meta)
        if meta.is_dir():
            meta = meta / "train.json"
        if not meta.is_file():
            raise InputError(f"{meta}: no such meta file (expected a data folder with train.json)")
        self.root = meta.parent
        self.meta = meta
        self.entries = read_meta(meta)
        if not self.entries:
            raise InputError(f"{meta}: no videos")
        self.size = size  # (width, height) or None: as stored
        self._cache: OrderedDict[int, Video] = OrderedDict()
        self._cache_size = cache

    def __len__(self):
        return len(self.entries)

    def _path(self, p: str) -> Path:
        p = Path(p)
        return p if p.is_absolute() else self.root / p

    def video(self, i: int) -> Video:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        v = self._load(self.entries[i])
        self._cache[i] = v
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return v

    def _load(self, e: dict) -> Video:
        if "npz_path" in e:
            frames, poses, kps = read_video_npz(self._path(e["npz_path"]))
            if self.size is not None and (frames.shape[2], frames.shape[1]) != self.size:
                from aa_trt.pose.draw import render
                from aa_trt.pose.keypoints import Pose

                h, w = frames.shape[1:3]
                poses = np.stack([render(Pose.from_array(k, w, h), *self.size) for k in kps])
                frames = _resize(frames, self.size)
            return Video(frames, poses)
        from aa_trt.video import read_clip

        frames = np.stack(read_clip(self._path(e["video_path"])).frames)
        poses = np.stack(read_clip(self._path(e["kps_path"])).frames)
        if frames.shape[1:] != poses.shape[1:]:
            raise InputError(f"{self._path(e['kps_path'])}: frames of another size than "
                             f"{self._path(e['video_path'])}'s")
        n = min(len(frames), len(poses))
        size = self.size or (frames.shape[2], frames.shape[1])
        return Video(_resize(frames[:n], size), _resize(poses[:n], size))


@dataclass
class PixelBatch:
    ref: np.ndarray     # uint8 (B, H, W, 3)   the reference frame
    frames: np.ndarray  # uint8 (B, F, H, W, 3) the targets
    poses: np.ndarray   # uint8 (B, F, H, W, 3) their pose renderings


def sample_batch(videos: VideoSet, rng: np.random.Generator, batch: int, frames: int = 1,
                 stride: int = 1, cross_ref: float = 0.0) -> PixelBatch:
    """Moore's sampling: a random video, a random reference frame from it, and a random target
    frame (stage 1) or clip of `frames` frames `stride` apart (stage 2) from the same video.

    cross_ref: the probability that a sample's reference frame comes from another video instead
    (another character, as when a user animates their picture with someone else's dance). Only
    distillation uses it: its target is the teacher's output, not the clip, so the pair need not
    match. At 0 the generator is drawn exactly as before."""
    refs, tgts, poses = [], [], []
    for _ in range(batch):
        vi = int(rng.integers(len(videos)))
        v = videos.video(vi)
        n = len(v.frames)
        span = (frames - 1) * stride + 1
        if span > n:
            s = max(1, (n - 1) // max(1, frames - 1))  # short video: the widest stride that fits
            span = (frames - 1) * s + 1
            if span > n:
                raise InputError(f"a video of {n} frames cannot give a {frames}-frame clip")
            idx = np.arange(frames) * s
        else:
            idx = int(rng.integers(n - span + 1)) + np.arange(frames) * stride
        rv = v
        if cross_ref > 0 and len(videos) > 1 and rng.random() < cross_ref:
            other = int(rng.integers(len(videos) - 1))
            rv = videos.video(other + (other >= vi))  # any video but this one
        refs.append(rv.frames[int(rng.integers(len(rv.frames)))])
        tgts.append(v.frames[idx])
        poses.append(v.poses[idx])
    return PixelBatch(np.stack(refs), np.stack(tgts), np.stack(poses))


def to_unit(a: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(a)).float() / 255.0
    return x.movedim(-1, -3).contiguous()


@dataclass
class LatentBatch:
    latents: torch.Tensor     # (B, c, F, h, w) targets x latent_scale
    ref_latent: torch.Tensor  # (B, c, h, w) reference posterior mean x latent_scale
    clip: torch.Tensor        # (B, D) CLIP image_embeds of the reference
    pose: torch.Tensor        # (B*F, 3, H, W) in [0, 1]


@torch.no_grad()
def encode(vae, image_encoder, px: PixelBatch, latent_scale: float, device, generator: torch.Generator,
           chunk: int = 16) -> LatentBatch:
    """The frozen encoders. Targets are sampled from the VAE posterior (Moore's
    latent_dist.sample(); the noise comes from `generator`, on the CPU, for reproducibility); the
    reference uses the posterior mean, as inference does."""
    b, f = px.frames.shape[:2]
    dtype = next(vae.parameters()).dtype
    imgs = to_unit(px.frames.reshape(b * f, *px.frames.shape[2:])) * 2 - 1
    lat = []
    for s in range(0, len(imgs), chunk):
        d = vae.encode(imgs[s:s + chunk].to(device, dtype)).latent_dist
        eps = torch.randn(d.mean.shape, generator=generator).to(device, d.mean.dtype)
        lat.append((d.mean + d.std * eps).float())
    lat = torch.cat(lat) * latent_scale
    lat = lat.view(b, f, *lat.shape[1:]).transpose(1, 2).contiguous()
    ref = vae.encode((to_unit(px.ref) * 2 - 1).to(device, dtype)).latent_dist.mean.float() * latent_scale
    cdtype = next(image_encoder.parameters()).dtype
    size = image_encoder.config.image_size
    clip = image_encoder(pixel_values=clip_pixels(px.ref, size).to(device, cdtype)).image_embeds.float()
    pose = to_unit(px.poses.reshape(b * f, *px.poses.shape[2:])).to(device)
    return LatentBatch(lat, ref, clip, pose)
