"""`aa-trt data prepare`: real videos -> pose renderings, keypoints and Moore's meta JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from aa_trt.cli import main
from aa_trt.training.data import VideoSet
from aa_trt.training.synthetic import make_video
from aa_trt.video import read_clip, write_video

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    (root / "sub").mkdir()
    for i, dest in enumerate((root / "a.mp4", root / "sub" / "b.mp4")):
        v = make_video(5, i, i, (128, 128), 4)
        write_video(dest, v.frames, 15.0)
    return root


def test_prepare_writes_poses_and_meta_and_resumes(videos, tmp_path, capsys):
    out = tmp_path / "prep"
    (videos / "broken.mp4").write_bytes(b"not a video")
    try:
        assert main(["data", "prepare", str(videos), "--out", str(out), "--quiet"]) == 0
    finally:
        (videos / "broken.mp4").unlink()
    meta = json.loads((out / "train.json").read_text())
    assert [e["kps_path"] for e in meta] == ["videos/a_kps.mp4", "videos/sub__b_kps.mp4"]
    info = json.loads((out / "dataset.json").read_text())
    assert len(info["failed"]) == 1 and "broken.mp4" in info["failed"][0]
    for e in meta:
        kps = read_clip(out / e["kps_path"])
        assert len(kps.frames) == 4 and kps.frames[0].shape == (128, 128, 3)
        with np.load(out / e["npz_keypoints"]) as z:
            assert z["keypoints"].shape == (4, 128, 3)
    # The pose video is a rendering of the keypoints: the skeleton's pixels are not all black.
    assert max(f.max() for f in read_clip(out / meta[0]["kps_path"]).frames) > 0
    # What training reads: the pair of videos, frame for frame.
    v = VideoSet(out).video(0)
    assert v.frames.shape == v.poses.shape == (4, 128, 128, 3)
    # A rerun skips the done videos.
    stamp = (out / meta[0]["kps_path"]).stat().st_mtime_ns
    assert main(["data", "prepare", str(videos), "--out", str(out), "--quiet"]) == 0
    assert (out / meta[0]["kps_path"]).stat().st_mtime_ns == stamp


def test_prepare_refuses_an_empty_folder(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert "no videos" in capsys.readouterr().err
