"""`aa-trt data synth`: a synthetic dance data set with exact poses and held-out splits.

Each video is one character (puppet.py) performing one motion (dance.py). Characters and motions
are numbered and drawn from seeds derived from (seed, kind, number), so a video is a pure function
of the seed and its (character, motion) pair. Splits hold out whole characters and whole motions:

- `train.json`:           train characters x train motions
- `test_characters.json`: held-out characters x train motions   (does appearance generalise?)
- `test_motions.json`:    train characters x held-out motions    (does motion generalise?)

Every meta file is a list in Moore's `{video_path, kps_path}` format (paths relative to the data
folder), with extra keys Moore ignores: `npz_path` (lossless frames, pose renderings and
keypoints), `character`, `motion`, `fps`. The pose renderings are `aa_trt.pose.draw.render` of the
exact keypoints (body only: the puppets have no hand or face points), the style `aa-trt run` draws.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aa_trt.pose.draw import render
from aa_trt.pose.keypoints import Pose

from aa_trt.errors import OptionError
from aa_trt.files import atomic_output, write_json
from aa_trt.training.dance import random_framing, random_motion, skeleton
from aa_trt.training.puppet import SUPERSAMPLE, paint, random_background, random_character

FPS = 15.0
_KIND = {"character": 1, "motion": 2, "scene": 3}


def _rng(seed: int, kind: str, n: int) -> np.random.Generator:
    return np.random.default_rng([seed, _KIND[kind], n])


@dataclass
class SynthVideo:
    frames: np.ndarray     # uint8 (N, H, W, 3)
    poses: np.ndarray      # uint8 (N, H, W, 3): render() of `keypoints`
    keypoints: np.ndarray  # float32 (N, 128, 3): Pose.to_array() per frame (body only)


def make_video(seed: int, character: int, motion: int, size: tuple[int, int], frames: int,
               fps: float = FPS) -> SynthVideo:
    """Character `character` dancing motion `motion`, size = (width, height)."""
    width, height = size
    ch = random_character(_rng(seed, "character", character))
    mo = random_motion(_rng(seed, "motion", motion))
    # The scene (background, framing, start time) belongs to the pair, so a character is not
    # always seen in front of the same wall.
    scene = np.random.default_rng([seed, _KIND["scene"], character, motion])
    framing = random_framing(scene)
    S = SUPERSAMPLE
    bg = random_background(scene, width * S, height * S, framing.floor)
    t0 = float(scene.uniform(0, 8))
    angles = mo.angles(t0 + np.arange(frames) / fps)
    out_f, out_p, out_k = [], [], []
    for i in range(frames):
        a = {j: float(v[i]) for j, v in angles.items()}
        kps, unit = skeleton(ch.body, a, framing, width, height)
        out_f.append(paint(ch, kps, unit, bg))
        pose = Pose(width, height, body=kps, score=1.0)
        out_p.append(render(pose, width, height))
        out_k.append(pose.to_array())
    return SynthVideo(np.stack(out_f), np.stack(out_p), np.stack(out_k))


@dataclass(frozen=True)
class Plan:
    """Which (character, motion) pair each video of each split shows."""

    train: list[tuple[int, int]]
    test_characters: list[tuple[int, int]]
    test_motions: list[tuple[int, int]]

    def splits(self) -> dict[str, list[tuple[int, int]]]:
        return asdict(self)


def plan(videos: int, seed: int, held_out: float = 0.1) -> Plan:
    """`held_out` of the videos go to each test split (at least one each from 3 videos on)."""
    if videos < 1:
        raise OptionError("videos", videos, "must be at least 1")
    k = max(1, round(videos * held_out)) if videos >= 3 else 0
    n_train = videos - 2 * k
    # Roughly 4 videos per training character and 3 per training motion, each seen several times
    # in different combinations, and at least as many pairs as videos (no video twice); held-out
    # characters and motions are numbered after the training ones.
    n_chars = max(1, min(n_train, max(2, n_train // 4)))
    n_motions = max(1, min(n_train, max(-(-n_train // n_chars), n_train // 3)))
    rng = np.random.default_rng([seed, 0])

    def pairs(chars: range, motions: range, n: int) -> list[tuple[int, int]]:
        all_pairs = [(c, m) for c in chars for m in motions]
        # More videos than pairs only happens in the test splits of tiny sets: repeat pairs there.
        idx = rng.permutation(len(all_pairs))[:n] if n <= len(all_pairs) else rng.integers(0, len(all_pairs), n)
        return [all_pairs[i] for i in sorted(idx)]

    n_test_chars, n_test_motions = max(1, k // 2) if k else 0, max(1, k // 2) if k else 0
    return Plan(
        train=pairs(range(n_chars), range(n_motions), n_train),
        test_characters=pairs(range(n_chars, n_chars + n_test_chars), range(n_motions), k) if k else [],
        test_motions=pairs(range(n_chars), range(n_motions, n_motions + n_test_motions), k) if k else [],
    )


def write_video_files(root: Path, name: str, v: SynthVideo, fps: float, formats: tuple[str, ...]) -> dict:
    """videos/<name>.mp4 and <name>_kps.mp4 (Moore's naming) and/or <name>.npz -> meta entry."""
    entry = {}
    vdir = root / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    if "mp4" in formats:
        from aa_trt.video import write_video

        write_video(vdir / f"{name}.mp4", v.frames, fps)
        write_video(vdir / f"{name}_kps.mp4", v.poses, fps)
        entry.update(video_path=f"videos/{name}.mp4", kps_path=f"videos/{name}_kps.mp4")
    if "npz" in formats:
        with atomic_output(vdir / f"{name}.npz") as tmp:
            np.savez_compressed(tmp, frames=v.frames, poses=v.poses, keypoints=v.keypoints)
        entry["npz_path"] = f"videos/{name}.npz"
        entry.setdefault("video_path", entry["npz_path"])
        entry.setdefault("kps_path", entry["npz_path"])
    return entry


def synthesize(out, videos: int, size: int | tuple[int, int], frames: int = 24, seed: int = 0,
               formats: tuple[str, ...] = ("mp4", "npz"), fps: float = FPS, progress: bool = True) -> dict:
    """Write the data set into `out`; returns {split: [meta entries]} (also written as JSON)."""
    from tqdm.auto import tqdm

    out = Path(out)
    width, height = (size, size) if isinstance(size, int) else size
    if width % 8 or height % 8:
        raise OptionError("size", size, "width and height must be multiples of 8")
    if frames < 1:
        raise OptionError("frames", frames, "must be at least 1")
    p = plan(videos, seed)
    meta = {}
    t = time.perf_counter()
    jobs = [(split, c, m) for split, pairs in p.splits().items() for c, m in pairs]
    bar = tqdm(jobs, desc="synth", disable=not progress)
    for i, (split, c, m) in enumerate(bar):
        name = f"{split}_{i:05d}_c{c:04d}_m{m:04d}"
        v = make_video(seed, c, m, (width, height), frames, fps)
        entry = write_video_files(out, name, v, fps, formats)
        entry.update(character=c, motion=m, fps=fps, frames=frames, width=width, height=height)
        meta.setdefault(split, []).append(entry)
    for split in p.splits():
        write_json(out / f"{split}.json", meta.get(split, []))
    info = dict(generator="aa-trt synthetic v1", seed=seed, videos=videos, size=[width, height], frames=frames,
                fps=fps, formats=list(formats), seconds=round(time.perf_counter() - t, 1),
                splits={k: len(v) for k, v in p.splits().items()})
    write_json(out / "dataset.json", info)
    return meta

