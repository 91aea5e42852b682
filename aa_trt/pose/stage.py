"""The driving-pose stage: a video's frames -> the pose images the model is driven by.

extract (one person per frame, cached by the input's hash) -> hold missing frames (a frame where
nobody was found keeps the last pose seen) -> align (the skeleton rescaled to the reference
character's bones and position) -> render (DWPose's drawing style, at the output size). A driving
video that already is a pose rendering is only resized. `aa-trt run`, `aa-trt pose` and
`aa-trt data prepare` all go through here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from aa_trt.errors import InputError
from aa_trt.pose.keypoints import Pose


def hold_missing(poses: Sequence[Pose | None]) -> list[Pose | None]:
    """A frame where nobody was found keeps the last pose seen (the first ones take the first found)."""
    first = next((p for p in poses if p is not None), None)
    out, last = [], first
    for p in poses:
        last = p if p is not None else last
        out.append(last)
    return out


def extract_poses(extractor, frames: Sequence[np.ndarray], cache_key: str | None = None,
                  progress: bool = True) -> list[Pose | None]:
    """One pose (or None) per frame; `cache_key` (the input's hash and frame selection) lets a
    rerun read them back."""
    from aa_trt.pose.extract import extract_video

    return extract_video(extractor, frames, cache_key, progress=progress)


def video_cache_key(source: Path, start: int, stride: int, n_frames: int) -> str:
    from aa_trt.files import file_sha256

    return f"{file_sha256(source)}:{start}:{stride}:{n_frames}"


def render_poses(poses: Sequence[Pose | None], width: int, height: int) -> np.ndarray:
    """uint8 (N, height, width, 3); an empty canvas where a pose is None."""
    from aa_trt.pose.draw import render

    return np.stack([render(p, width, height) for p in poses])


def resize_frames(frames: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """uint8 (N, height, width, 3), Lanczos where the size differs (a pose video taken as is)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS))
                     if f.shape[:2] != (height, width) else f for f in frames])


class PoseFrames:
    """The pose images of a video at the output size, made when asked for, chunk by chunk, so
    that a long video's pose images are never held whole (the PoseGuider's features, the latents'
    companions, are what a run keeps). `len()` is the number of frames."""

    width: int
    height: int

    def __len__(self) -> int:
        raise NotImplementedError

    def chunks(self, size: int = 16) -> Iterator[np.ndarray]:
        """uint8 (k <= size, height, width, 3) in frame order."""
        raise NotImplementedError

    def array(self) -> np.ndarray:
        """All of them, uint8 (N, height, width, 3) (short clips, previews)."""
        return np.concatenate(list(self.chunks()))


class RenderedPoses(PoseFrames):
    """Keypoints (one Pose per frame), rendered in DWPose's style when a chunk is asked for."""

    def __init__(self, poses: Sequence[Pose | None], width: int, height: int):
        self.poses, self.width, self.height = list(poses), width, height

    def __len__(self) -> int:
        return len(self.poses)

    def chunks(self, size: int = 16) -> Iterator[np.ndarray]:
        for s in range(0, len(self.poses), size):
            yield render_poses(self.poses[s:s + size], self.width, self.height)


class PoseVideoFrames(PoseFrames):
    """A driving video that already is a pose rendering, read again and resized per chunk."""

    def __init__(self, clip, width: int, height: int):
        self.clip, self.width, self.height = clip, width, height
        if clip.count is None:  # one decoding pass to learn the length (nothing is kept)
            for _ in clip.frames():
                pass

    def __len__(self) -> int:
        return self.clip.count

    def chunks(self, size: int = 16) -> Iterator[np.ndarray]:
        for chunk in self.clip.chunks(size):
            yield resize_frames(chunk, self.width, self.height)


def driving_poses(clip, width: int, height: int, *, source: Path, pose_video: bool = False,
                  extractor=None, dwpose=None, ref_image=None, ref_source: Path | None = None,
                  cache_key: str | None = None, progress: bool = True) -> tuple[PoseFrames, dict]:
    """The frames of `source` (a video.ClipStream, read as it goes; or a sequence of uint8
    (H, W, 3) frames) -> their pose images at (width, height) as PoseFrames, and facts for the
    run's summary. With `ref_image` (of `ref_source`) the skeletons are aligned to it. A failure
    names the file: nobody found in the video or the reference, or no alignment."""
    if pose_video:
        if isinstance(clip, (list, tuple, np.ndarray)):
            return RenderedFrames(resize_frames(clip, width, height)), {"pose_source": "pose video"}
        return PoseVideoFrames(clip, width, height), {"pose_source": "pose video"}
    from aa_trt.pose.align import align_sequence
    from aa_trt.pose.extract import make_extractor

    extractor = extractor or make_extractor(dwpose)
    frames = clip.frames() if hasattr(clip, "frames") else clip
    poses = extract_poses(extractor, frames, cache_key, progress)
    found = sum(p is not None for p in poses)
    if found == 0:
        raise InputError(f"{source}: no person found in any of its {len(poses)} frames")
    poses = hold_missing(poses)
    if ref_image is not None:
        ref_pose = extractor(np.asarray(ref_image))
        if ref_pose is None:
            raise InputError(f"{ref_source}: no person found in the reference image "
                             f"(drive it without alignment: align=False, `--no-align`)")
        try:
            poses = align_sequence(ref_pose, poses)
        except ValueError as e:
            raise InputError(f"{source}: cannot align to the reference ({e})") from None
    return RenderedPoses(poses, width, height), {"pose_source": type(extractor).__name__,
                                                 "frames_with_person": found}


class RenderedFrames(PoseFrames):
    """Pose images already in memory (N, height, width, 3)."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.height, self.width = images.shape[1:3]

    def __len__(self) -> int:
        return len(self.images)

    def chunks(self, size: int = 16) -> Iterator[np.ndarray]:
        for s in range(0, len(self.images), size):
            yield self.images[s:s + size]
