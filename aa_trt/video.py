"""Reading driving videos and writing results with PyAV (H.264 mp4/mov/mkv, VP9 webm, the source's
audio; or numbered PNG frames).

Outputs are written to a temporary name beside the target and renamed when complete, so an
interrupted or failed run leaves neither a half-written file nor the temporary one.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
from dataclasses import dataclass
from fractions import Fraction
from struct import error as struct_error
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aa_trt.errors import InputError, OptionError, StorageError
from aa_trt.files import atomic_output

_READ_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENXIO, errno.ENODEV}

MAX_IMAGE_PIXELS = 1 << 26  # 67 Mpixel (8192 x 8192): a bigger picture is refused before it is decoded
MAX_FPS = 1000.0  # a declared frame rate above this is a broken header, not a video
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FOLDER_FPS = 30.0


def _av():
    try:
        import av
    except ImportError:
        raise InputError("reading and writing video needs PyAV: pip install av") from None
    return av


@dataclass
class Clip:
    """Frames taken from a driving video, and what the output needs to know about their source."""

    frames: list[np.ndarray]  # uint8 (H, W, 3) RGB each
    fps: float                # of the taken frames (source fps / stride)
    start_time: float         # seconds into the source where the first taken frame sits
    duration: float           # seconds the taken frames cover
    audio_path: Path | None   # the source, when it has an audio stream


def read_image(path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; transparency composited on white."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: {w}x{h} pixels is more than this reads ({MAX_IMAGE_PIXELS} "
                                 f"pixels); scale the picture down")
            im.load()
            im = ImageOps.exif_transpose(im)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError,
            KeyError, struct_error, ZeroDivisionError, MemoryError) as e:
        _raise_if_storage(e, path)
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if im.mode in ("RGBA", "LA", "P", "PA") and (im.mode != "P" or "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


class ClipStream:
    """Frames start, start + stride, ... (at most max_frames) of a video file or a folder of images,
    decoded when iterated (`frames()`, again from the start at each call): a long video is never
    held whole. Opening checks the file and reads what the output needs (fps, where the taken
    frames start, whether there is audio) from its first taken frame."""

    def __init__(self, path, start: int = 0, stride: int = 1, max_frames: int | None = None):
        path = Path(path)
        for name, v, low in (("start", start, 0), ("stride", stride, 1), ("frames", max_frames, 1)):
            if v is not None and v < low:
                raise OptionError(name, v, f"must be >= {low}")
        self.path, self.start, self.stride, self.max_frames = path, start, stride, max_frames
        self.count: int | None = None  # known after a complete pass
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)[start::stride][:max_frames]
            if not self.files:
                raise InputError(f"{path}: no image frames in this folder")
            self.source_fps, self.start_time, self.audio_path = FOLDER_FPS, 0.0, None
            self.count = len(self.files)
            self.first_shape = np.asarray(read_image(self.files[0])).shape
            return
        if not path.is_file():
            raise InputError(f"{path}: no such file or folder")
        self.files = None
        self.signature = _signature(path)
        first = None
        try:
            with _av().open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{path}: has no video stream")
                vs = container.streams.video[0]
                rate = vs.average_rate or vs.guessed_rate or vs.base_rate
                self.source_fps = float(rate) if rate else FOLDER_FPS
                self.audio_path = path if container.streams.audio else None
                for i, frame in enumerate(container.decode(vs)):
                    if i == start:
                        first = frame
                        break
        except InputError:
            raise
        except Exception as e:  # PyAV raises av.error.* (InvalidDataError, ...) for broken input
            _raise_if_storage(e, path)
            raise InputError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
        if first is None:
            raise InputError(f"{path}: no frames" + (f" at or after frame {start}" if start else ""))
        if not (0 < self.source_fps <= MAX_FPS):
            raise InputError(f"{path}: declares {self.source_fps:g} frames per second; expected 0 < fps <= {MAX_FPS}")
        if first.width * first.height > MAX_IMAGE_PIXELS or min(first.width, first.height) <= 0:
            raise InputError(f"{path}: frames of {first.width}x{first.height} pixels; at most "
                             f"{MAX_IMAGE_PIXELS} pixels a frame are read")
        self.start_time = float(first.time) if first.time is not None else start / self.source_fps
        self.first_shape = (first.height, first.width, 3)

    @property
    def fps(self) -> float:
        """Of the taken frames (the source's divided by the stride)."""
        return self.source_fps / self.stride

    def duration(self, n: int | None = None) -> float:
        """Seconds that n taken frames cover (default: all of them; known after one pass)."""
        n = self.count if n is None else n
        if n is None:
            raise ValueError("the clip's length is known after one pass over its frames")
        return n / self.fps

    def frames(self) -> Iterator[np.ndarray]:
        """uint8 (H, W, 3) RGB each, decoded as they are taken."""
        n = 0
        if self.files is not None:
            for f in self.files:
                a = np.asarray(read_image(f))
                if a.shape != self.first_shape:
                    h, w = self.first_shape[:2]
                    raise InputError(f"{f}: size differs from the folder's first frame {w}x{h}")
                yield a
            return
        try:
            with _av().open(str(self.path)) as container:
                vs = container.streams.video[0]
                vs.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(vs)):
                    if i < self.start or (i - self.start) % self.stride:
                        continue
                    a = frame.to_ndarray(format="rgb24")
                    if a.shape != self.first_shape:
                        raise InputError(f"{self.path}: frame {i} is {a.shape[1]}x{a.shape[0]}, the first "
                                         f"taken frame {self.first_shape[1]}x{self.first_shape[0]}: the video "
                                         f"changes size (or changed while it was read)")
                    yield a
                    n += 1
                    if self.max_frames is not None and n >= self.max_frames:
                        break
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 -- a file broken past its first frame
            _raise_if_storage(e, self.path)
            raise InputError(f"{self.path}: not a readable video ({type(e).__name__}: {e})") from None
        if _signature(self.path) != self.signature:
            raise StorageError(f"{self.path}: changed while it was read (its size or bytes differ from "
                               f"when it was opened); run again once it is complete")
        self.count = n

    def chunks(self, size: int) -> Iterator[list[np.ndarray]]:
        """The frames in lists of at most `size`."""
        chunk = []
        for f in self.frames():
            chunk.append(f)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _signature(path: Path, edge: int = 1 << 20):
    """What tells a file that changed or vanished: its size and the hashes of its first and last
    MiB (a copy still being written grows; the same bytes written again, as an upload cache does,
    are no change). None if it is gone."""
    import hashlib

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = hashlib.sha256(f.read(edge)).hexdigest()
            f.seek(max(0, size - edge))
            tail = hashlib.sha256(f.read(edge)).hexdigest()
    except OSError:
        return None
    return size, head, tail


def _raise_if_storage(e: BaseException, path: Path) -> None:
    """A system failure while reading (the file vanished, permission denied, an I/O error) as a
    StorageError; what the file holds being wrong stays an InputError (the caller's)."""
    from aa_trt.files import is_storage_failure, storage_error

    if isinstance(e, FileNotFoundError) or (is_storage_failure(e) and e.errno in _READ_ERRNOS):
        raise storage_error(e, path) from None


def open_clip(path, start: int = 0, stride: int = 1, max_frames: int | None = None) -> ClipStream:
    return ClipStream(path, start, stride, max_frames)


def read_clip(path, start: int = 0, stride: int = 1, max_frames: int | None = None) -> Clip:
    """The frames of `open_clip` held in memory (short clips: previews, training data)."""
    stream = ClipStream(path, start, stride, max_frames)
    frames = list(stream.frames())
    return Clip(frames, stream.fps, stream.start_time, len(frames) / stream.fps, stream.audio_path)


@dataclass(frozen=True)
class Container:
    format: str       # PyAV/FFmpeg muxer
    video_codec: str
    audio_codec: str
    crf_max: int      # the encoder's quality scale: 0 (best) .. crf_max


# What `-o NAME.EXT` writes: H.264 in mp4/mov/mkv, VP9 (with Opus audio) in webm.
CONTAINERS = {
    ".mp4": Container("mp4", "libx264", "aac", 51),
    ".mov": Container("mov", "libx264", "aac", 51),
    ".mkv": Container("matroska", "libx264", "aac", 51),
    ".webm": Container("webm", "libvpx-vp9", "libopus", 63),
}
DEFAULT_CRF = 18


def container_for(path, param: str = "output") -> Container:
    """The container a video path asks for by its extension (OptionError for any other)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        raise OptionError(param, str(path), f"unknown video extension {suffix or '(none)'!r}; expected "
                          f"{', '.join(CONTAINERS)} (or a folder with PNG frames)")
    return CONTAINERS[suffix]


def check_crf(crf: int, container: Container, param: str = "crf") -> None:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= container.crf_max:
        raise OptionError(param, crf, f"must be in 0..{container.crf_max} for {container.video_codec}")


def write_video(path, frames: Iterable[np.ndarray], fps: float, audio_from: Path | None = None,
                audio_start: float = 0.0, audio_duration: float | None = None,
                crf: int = DEFAULT_CRF) -> Path:
    """A video at `fps` in the container its extension names (CONTAINERS: H.264 yuv420p, or VP9
    for webm); the audio of `audio_from` between audio_start and audio_start + audio_duration,
    re-encoded to the container's audio codec (any source codec fits that way)."""
    av = _av()
    path = Path(path)
    kind = container_for(path)
    check_crf(crf, kind)
    rate = Fraction(fps).limit_denominator(1001)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise InputError(f"{path}: no frames to write")
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format=kind.format) as out, contextlib.ExitStack() as stack:
            h, w = first.shape[:2]
            vs = out.add_stream(kind.video_codec, rate=rate)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            if kind.video_codec == "libx264":
                # mbtree off: on CPUs with AVX-512, libx264's macroblock-tree code reads memory it
                # never initialised, so the same frames encoded twice in one process could differ
                # by up to ~36 levels (seen at 64x88 up to 256x176). Without it the bitstream is a
                # function of the frames alone; the cost is a slightly larger file at the same CRF.
                vs.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
            else:  # VP9 in constant-quality mode (a CRF with no bitrate cap)
                vs.options = {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
            # Every stream must exist before the first packet is muxed (the header is written then).
            audio = None
            if audio_from is not None:
                inp = stack.enter_context(av.open(str(audio_from)))
                if inp.streams.audio:
                    audio = _AudioCopy(av, inp, out, kind.audio_codec)
            for frame in itertools.chain([first], frames):
                for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
            if audio is not None:
                audio.copy(audio_start, audio_duration)
    return path


def check_png_folder(path, param: str = "output", overwrite: bool = False) -> None:
    """A folder for numbered PNG frames: absent or empty (frames of another run are not mixed in);
    with `overwrite` a non-empty one too (it is replaced whole once the new frames are written)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(param, str(path), "exists and is not a folder; PNG frames go to a new or empty folder")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise OptionError(param, str(path), "exists and is not an empty folder; PNG frames go to a new or "
                          "empty folder (--overwrite replaces it)")
    from aa_trt.files import check_output_folder

    check_output_folder(path.parent)


def write_png_frames(folder, frames: Iterable[np.ndarray], overwrite: bool = False) -> Path:
    """frames -> FOLDER/00000.png, 00001.png, ...; written into a temporary folder beside it and
    renamed when complete, so an interrupted run leaves no partial folder (with `overwrite`, a
    folder already there is replaced only then)."""
    import shutil
    import tempfile

    from aa_trt.files import is_storage_failure, replace_folder, storage_error

    folder = Path(folder)
    check_png_folder(folder, overwrite=overwrite)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.partial", dir=folder.parent))
        n = 0
        for n, frame in enumerate(frames, 1):
            Image.fromarray(np.ascontiguousarray(frame)).save(tmp / f"{n - 1:05d}.png")
        if n == 0:
            raise InputError(f"{folder}: no frames to write")
        replace_folder(tmp, folder)
    except OSError as e:
        if not is_storage_failure(e):
            raise
        raise storage_error(e, folder, tmp=tmp) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class _AudioCopy:
    def __init__(self, av, inp, out, codec: str = "aac"):
        self.inp, self.out = inp, out
        self.ins = inp.streams.audio[0]
        self.rate = self.ins.rate or 44100
        if codec == "libopus":  # Opus encodes at 48 kHz (and a few lower rates) only
            self.rate = 48000
        layout = "stereo" if (self.ins.channels or 2) >= 2 else "mono"
        self.stream = out.add_stream(codec, rate=self.rate)
        self.stream.layout = layout
        self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=self.rate)

    def copy(self, start: float, duration: float | None) -> None:
        end = None if duration is None else start + duration
        pts = 0
        for frame in self.inp.decode(self.ins):
            t = float(frame.time) if frame.time is not None else 0.0
            if t + frame.samples / self.rate <= start:
                continue
            if end is not None and t >= end:
                break
            for rf in self.resampler.resample(frame):
                rf.pts, rf.time_base = pts, Fraction(1, self.rate)
                pts += rf.samples
                for packet in self.stream.encode(rf):
                    self.out.mux(packet)
        for packet in self.stream.encode(None):
            self.out.mux(packet)
