"""`aa-trt data prepare`: a folder of real dance videos -> pose videos and Moore's meta JSON.

For every video under the input folder (mp4/mov/webm/mkv/avi, searched recursively), the pose
extractor of `aa-trt run` (BlazePose by default, DWPose with --dwpose) finds one skeleton per frame;
the renderings (the style `aa-trt run` draws, at the video's own size) are written as
`<out>/videos/<name>_kps.mp4` beside a copy-free reference to the source, and the keypoints as
`<out>/videos/<name>_kps.npz` (what `aa-trt eval` and a skeleton-warp baseline need). The meta file
`<out>/train.json` lists `{video_path, kps_path, npz_keypoints}` in Moore's format (absolute
video paths, so the folder can be moved only with its sources). A video whose pose file already
exists is skipped, so an interrupted run resumes; a video that cannot be read is reported by name
and left out.
"""
from __future__ import annotations

import time
from pathlib import Path

from aa_trt.errors import InputError

from aa_trt.files import write_json

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


def find_videos(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of videos")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                   and not p.stem.endswith("_kps"))
    if not found:
        raise InputError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    return found


def _name(root: Path, video: Path) -> str:
    rel = video.relative_to(root).with_suffix("")
    return "__".join(rel.parts)


def prepare(src, out, dwpose=None, max_frames: int | None = None, progress: bool = True) -> list[dict]:
    """Write pose videos and `train.json` for every video under `src`; returns the meta entries."""
    from tqdm.auto import tqdm

    from aa_trt.pose.extract import make_extractor
    from aa_trt.pose.keypoints import save_poses
    from aa_trt.pose.stage import extract_poses, render_poses
    from aa_trt.video import read_clip, write_video

    src, out = Path(src), Path(out)
    videos = find_videos(src)
    extractor = make_extractor(dwpose)
    vdir = out / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    entries, failed = [], []
    t = time.perf_counter()
    for video in tqdm(videos, desc="prepare", unit="video", disable=not progress):
        name = _name(src, video)
        kps_mp4, kps_npz = vdir / f"{name}_kps.mp4", vdir / f"{name}_kps.npz"
        if not (kps_mp4.is_file() and kps_npz.is_file()):
            try:
                clip = read_clip(video, 0, 1, max_frames)
            except InputError as e:
                failed.append(str(e))
                continue
            frames = clip.frames
            h, w = frames[0].shape[:2]
            poses = extract_poses(extractor, frames, progress=False)
            write_video(kps_mp4, render_poses(poses, w, h), clip.fps)  # atomic, as every output
            save_poses(kps_npz, poses, w, h)  # the saved-pose format (aa_trt.pose.keypoints)
        entries.append({"video_path": str(video.resolve()), "kps_path": f"videos/{kps_mp4.name}",
                        "npz_keypoints": f"videos/{kps_npz.name}"})
    if not entries:
        raise InputError(f"{src}: no video could be read ({failed[0] if failed else 'none found'})")
    write_json(out / "train.json", entries)
    write_json(out / "dataset.json", {"generator": "aa-trt data prepare", "source": str(src.resolve()),
                                      "videos": len(entries), "failed": failed,
                                      "extractor": type(extractor).__name__,
                                      "seconds": round(time.perf_counter() - t, 1)})
    return entries
