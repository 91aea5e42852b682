"""Test media made on the fly: reference images, dance videos with an audio track, pose videos."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def make_reference(path: Path, size=(64, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.full_like(xx, 128)], -1).astype(np.uint8)
    img[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def stick_frames(n: int, size=(64, 64)) -> list[np.ndarray]:
    """Pose-rendering-like frames: coloured sticks on black, moving."""
    w, h = size
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        x = int(w * (0.3 + 0.4 * i / max(n - 1, 1)))
        f[h // 5: 4 * h // 5, max(0, x - 2): x + 2] = (255, 85, 0)
        f[h // 2 - 2: h // 2 + 2, w // 4: 3 * w // 4] = (0, 255, 170)
        frames.append(f)
    return frames


def make_video(path: Path, frames: list[np.ndarray], fps: int = 10, audio: bool = True,
               video: bool = True) -> Path:
    with av.open(str(path), "w") as out:
        vs = None
        if video:
            vs = out.add_stream("libx264", rate=fps)
            vs.height, vs.width = frames[0].shape[:2]
            vs.pix_fmt = "yuv420p"
            vs.options = {"x264-params": "mbtree=0"}  # deterministic test inputs (see aa_trt/video.py)
        aus = out.add_stream("aac", rate=22050) if audio else None
        if aus is not None:
            aus.layout = "mono"
        if vs is not None:
            for f in frames:
                for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(p)
            for p in vs.encode():
                out.mux(p)
        if aus is not None:
            seconds = len(frames) / fps
            t = np.arange(int(22050 * seconds)) / 22050
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for s in range(0, samples.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(samples[:, s:s + 1024], format="fltp", layout="mono")
                af.sample_rate = 22050
                af.pts = s
                af.time_base = Fraction(1, 22050)
                for p in aus.encode(af):
                    out.mux(p)
            for p in aus.encode(None):
                out.mux(p)
    return path


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(vs)]
        return {"frames": len(frames), "fps": float(vs.average_rate), "width": vs.width,
                "height": vs.height, "audio": len(c.streams.audio), "codec": vs.codec_context.name,
                "pixels": np.stack(frames)}
