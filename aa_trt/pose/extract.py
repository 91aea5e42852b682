"""Choosing a pose backend, and extracting a driving video's poses once (cached by input hash)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from aa_trt.pose.keypoints import Pose, load_poses, save_poses

CACHE_VERSION = 2  # 2: the saved-pose format of keypoints.save_poses


def make_extractor(dwpose_dir=None):
    """DWPose when the user gives its ONNX files, else the offline default (BlazePose)."""
    if dwpose_dir is not None:
        from aa_trt.pose.dwpose import DWPoseExtractor
        return DWPoseExtractor(dwpose_dir)
    from aa_trt.pose.blazepose import BlazePoseExtractor
    return BlazePoseExtractor()


def cache_dir() -> Path:
    root = os.environ.get("AA_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aa-trt"
    return Path(root) / "poses"


def extract_video(extractor, frames: Iterable[np.ndarray], cache_key: str | None = None,
                  progress: bool = True) -> list[Pose | None]:
    """Poses of every frame (a sequence, or an iterable such as video.ClipStream.frames(), taken
    one at a time: the video is never held whole); with a cache_key (the input's hash and the
    frame selection) a rerun reads them back instead of extracting again."""
    name = type(extractor).__name__
    path = None
    if cache_key is not None:
        key = hashlib.sha256(f"{CACHE_VERSION}:{name}:{cache_key}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.npz"
        if path.is_file():
            try:
                cached = load_poses(path)
                if not hasattr(frames, "__len__") or len(cached) == len(frames):
                    return cached
            except (OSError, KeyError, ValueError):
                pass  # a broken cache entry is recomputed
    bar = tqdm(total=len(frames) if hasattr(frames, "__len__") else None, desc="pose", unit="frame",
               disable=not progress)
    size = []

    def counted():
        for f in frames:
            if not size:
                size.extend(f.shape[:2])
            yield f
            bar.update(1)

    poses = extractor.video(counted())
    bar.close()
    if path is not None and size:
        h, w = size
        save_poses(path, poses, w, h)
    return poses
