"""The streamed run: the driving video decoded as it is read, pose images made per
chunk, the output decoded a chunk at a time into the encoder. It gives the whole-video path's
pixels, keeps the source's audio in sync, and reads its inputs lazily."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from aa_trt.cli import main as cli
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, stick_frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    return {"ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 1200),
            "ref": make_reference(d / "ref.png", (64, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(30, (64, 64)), fps=10, audio=True)}


def test_streamed_run_equals_the_whole_video_path(files, tmp_path):
    from aa_trt.pipeline import Animator
    from aa_trt.video import read_clip

    folder = tmp_path / "frames"
    kw = dict(steps=2, context_frames=8, context_overlap=2, seed=4)
    assert cli(["run", str(files["ref"]), str(files["dance"]), "-o", str(folder), "--png", "--ckpt",
                str(files["ckpt"]), "--pose-video", "--steps", "2", "--context-frames", "8",
                "--context-overlap", "2", "--seed", "4", "--dtype", "fp32", "--quiet"]) == 0
    streamed = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])
    # The whole-video path: every pose frame in memory, the video decoded whole (Animator.__call__).
    anim = Animator.from_pretrained(files["ckpt"])
    poses = np.stack(read_clip(files["dance"]).frames)
    whole = anim(Image.open(files["ref"]).convert("RGB"), poses, progress=False, **kw)
    whole = (whole * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    assert streamed.shape == whole.shape == (30, 64, 64, 3)
    assert np.array_equal(streamed, whole)


def test_audio_stays_in_sync(files, tmp_path):
    out = tmp_path / "o.mkv"
    assert cli(["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
                "--pose-video", "--steps", "1", "--context-frames", "8", "--context-overlap", "2",
                "--stride", "2", "--start", "4", "--quiet"]) == 0
    with av.open(str(out)) as c:
        times = [float(f.time) for f in c.decode(c.streams.video[0])]
    with av.open(str(out)) as c:
        aus = c.streams.audio[0]
        audio_s = sum(f.samples for f in c.decode(aus)) / aus.rate
    frames = len(times)
    video_s = times[-1] + (times[-1] - times[0]) / (frames - 1)  # the last frame's end
    assert frames == 13 and video_s == pytest.approx(2.6, abs=0.01)  # frames 4, 6, ..., 28 at 10 / 2 fps
    assert abs(audio_s - video_s) < 0.05, (audio_s, video_s)


def test_clip_stream_reads_lazily(files):
    from aa_trt.video import ClipStream, read_clip

    s = ClipStream(files["dance"], start=3, stride=4, max_frames=5)
    assert s.count is None and s.fps == pytest.approx(2.5) and s.first_shape == (64, 64, 3)
    frames = iter(s.frames())
    first = next(frames)  # decoded on demand
    rest = list(frames)
    assert s.count == 5
    want = read_clip(files["dance"], 3, 4, 5).frames
    assert len(want) == 1 + len(rest) == 5 and all(np.array_equal(a, b) for a, b in zip(want, [first, *rest]))
    assert s.duration() == pytest.approx(2.0)
