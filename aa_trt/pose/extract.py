"""Choosing a pose backend, and extracting a driving video's poses once (cached by input hash)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .keypoints import Pose

CACHE_VERSION = 1


def make_extractor(dwpose_dir=None):
    """DWPose when the user gives its ONNX files, else the offline default (BlazePose)."""
    if dwpose_dir is not None:
        from .dwpose import DWPoseExtractor
        return DWPoseExtractor(dwpose_dir)
    from .blazepose import BlazePoseExtractor
    return BlazePoseExtractor()


def cache_dir() -> Path:
    root = os.environ.get("AA_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aa-trt"
    return Path(root) / "poses"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file():
                h.update(p.name.encode())
                h.update(file_digest(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def extract_video(extractor, frames: Sequence[np.ndarray], cache_key: str | None = None,
                  progress: bool = True) -> list[Pose | None]:
    """Poses of every frame; with a cache_key (the input's hash and the frame selection) a rerun
    reads them back instead of extracting again."""
    name = type(extractor).__name__
    path = None
    if cache_key is not None:
        key = hashlib.sha256(f"{CACHE_VERSION}:{name}:{cache_key}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    arr, found, size = z["poses"], z["found"], z["size"]
                if len(arr) == len(frames):
                    return [Pose.from_array(a, int(size[0]), int(size[1])) if ok else None
                            for a, ok in zip(arr, found)]
            except (OSError, KeyError, ValueError):
                pass  # a broken cache entry is recomputed
    bar = tqdm(total=len(frames), desc="pose", unit="frame", disable=not progress)

    def counted():
        for f in frames:
            yield f
            bar.update(1)

    poses = extractor.video(counted())
    bar.close()
    if path is not None:
        h, w = frames[0].shape[:2]
        arr = np.stack([p.to_array() if p is not None else np.zeros((128, 3), np.float32) for p in poses])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, poses=arr, found=np.array([p is not None for p in poses]), size=np.array([w, h]))
        os.replace(tmp, path)
    return poses
