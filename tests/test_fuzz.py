"""A fuzzed front door: every reader of user files, fed mutations of real files (tests/fuzz_seeds/,
made by make_seeds.py) by hypothesis. Each input must end in the documented error type
(aa_trt.errors.AATrtError: one line, exit 2 or 3) or be accepted: never another exception, never
longer than a bounded time (a SIGALRM stops a hang), and the whole run's memory growth stays under
a stated bound (decompression bombs, huge declared sizes and counts are refused before they are
allocated).

The default run tries a few inputs per reader (seconds). AA_TRT_FUZZ_EXAMPLES=N tries N per
reader (the long run); AA_TRT_FUZZ_SEED fixes hypothesis' seed."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from aa_trt.errors import AATrtError, InputError

SEEDS = Path(__file__).resolve().parent / "fuzz_seeds"
EXAMPLES = int(os.environ.get("AA_TRT_FUZZ_EXAMPLES", "12"))
TIME_LIMIT_S = 20.0         # per input, wall clock: past it the input counts as a hang
MEMORY_BOUND_MB = 1024      # growth of this process's peak RSS over one reader's whole run
COUNTS: dict[str, dict[str, int]] = {}

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _settings():
    s = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                 suppress_health_check=list(HealthCheck))
    return s


def _seeded(test):
    fixed = os.environ.get("AA_TRT_FUZZ_SEED")
    return seed(int(fixed))(test) if fixed else test


# -- mutations ----------------------------------------------------------------------------------------

@st.composite
def mutated(draw, data: bytes, text: bool = False):
    """Bytes of `data` with a few edits: flipped/replaced bytes (mostly near the start, where the
    headers are), truncation, an inserted run, a duplicated block; or for text, edited characters
    and interesting values spliced in."""
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "dup", "int"] + (["token"] if text else [])))
        if not b:
            break
        hot = min(len(b), 512)
        pos = draw(st.one_of(st.integers(0, hot - 1), st.integers(0, len(b) - 1)))
        if kind == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            b[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("9")]))
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "dup":
            n = draw(st.integers(1, 64))
            b[pos:pos] = b[pos:pos + n]
        elif kind == "int":  # a declared size or count made absurd
            v = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000, 65535]))
            b[pos:pos + 4] = struct.pack(">I", v)
        elif kind == "token":
            tok = draw(st.sampled_from([b"null", b"[]", b"{}", b'""', b"-1", b"1e308", b"NaN", b"true",
                                        b"[[[[[[", b'"\\u0000"', b"999999999999999999999", b'{"a":']))
            n = draw(st.integers(0, 8))
            b[pos:pos + n] = tok
    return bytes(b)


@contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check(name: str, read, *args):
    """Run one reader on one input: accepted, or the documented error type (a one-line message)."""
    c = COUNTS.setdefault(name, {"inputs": 0, "accepted": 0, "refused": 0})
    c["inputs"] += 1
    with _time_limit(TIME_LIMIT_S):
        try:
            read(*args)
        except AATrtError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(str(e))
            c["refused"] += 1
            return
    c["accepted"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if COUNTS:
        lines = [f"{k}: {v['inputs']} inputs, {v['accepted']} accepted, {v['refused']} refused"
                 for k, v in sorted(COUNTS.items())]
        print("\nfuzz " + "; ".join(lines))
        out = os.environ.get("AA_TRT_FUZZ_REPORT")
        if out:
            Path(out).write_text(json.dumps(COUNTS, indent=1, sort_keys=True))


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="aa-trt-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _memory_bounded(fn):
    """The reader's whole run keeps the process's peak RSS growth under MEMORY_BOUND_MB."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        before = _peak_mb()
        fn(*a, **k)
        grew = _peak_mb() - before
        assert grew < MEMORY_BOUND_MB, f"peak memory grew by {grew:.0f} MB"
    return wrapper


def _seed(name: str) -> bytes:
    return (SEEDS / name).read_bytes()


def _fresh(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


# -- images --------------------------------------------------------------------------------------------

IMAGES = [_seed(n) for n in ("ref.png", "ref_alpha.png", "ref.jpg")]


@_memory_bounded
def test_images(tmp_path_factory):
    from aa_trt.video import read_image

    d = tmp_path_factory.mktemp("img")

    @_settings()
    @_seeded
    @given(st.sampled_from(range(len(IMAGES))).flatmap(lambda i: mutated(IMAGES[i])))
    def run(data):
        check("image", read_image, _fresh(d, "in.png", data))

    run()


def _png(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * min(width, 4096)) * 4)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 8000), (1, 10**8), (0x7FFFFFFF, 1)])
def test_image_bombs_refused_before_decoding(tmp_path, size):
    from aa_trt.video import read_image

    before = _peak_mb()
    with pytest.raises(AATrtError):
        read_image(_fresh(tmp_path, "bomb.png", _png(*size)))
    assert _peak_mb() - before < 200


# -- videos, frame folders, pose videos -----------------------------------------------------------------

VIDEOS = [_seed("dance.mp4"), _seed("dance.gif")]


def _read_video(path):
    from aa_trt.video import open_clip

    clip = open_clip(path, 0, 1, 3)
    n = sum(1 for _ in clip.frames())
    clip.duration(n)
    assert clip.fps > 0


@_memory_bounded
def test_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")

    @_settings()
    @_seeded
    @given(st.sampled_from(range(len(VIDEOS))).flatmap(lambda i: mutated(VIDEOS[i])))
    def run(data):
        check("video", _read_video, _fresh(d, "in.mp4", data))

    run()


@_memory_bounded
def test_frame_folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")

    @_settings()
    @_seeded
    @given(mutated(IMAGES[0]), st.booleans())
    def run(data, first):
        folder = d / "frames"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / ("00001.png" if first else "00000.png")).write_bytes(IMAGES[0])
        (folder / ("00000.png" if first else "00001.png")).write_bytes(data)
        check("frame folder", _read_video, folder)

    run()


# -- saved keypoints (the pose cache, `data prepare`) ---------------------------------------------------

def _read_cached_poses(path):
    """The pose cache's reader as extract_video uses it: a broken entry is recomputed."""
    from aa_trt.pose.keypoints import load_poses

    try:
        load_poses(path)
    except (OSError, KeyError, ValueError):
        raise InputError("a broken cache entry: recomputed") from None


@_memory_bounded
def test_saved_keypoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("kps")
    data0 = _seed("poses.npz")

    @_settings()
    @_seeded
    @given(mutated(data0))
    def run(data):
        check("saved keypoints", _read_cached_poses, _fresh(d, "p.npz", data))

    run()


# -- checkpoints, their metadata, Moore's .pth ------------------------------------------------------------

def _read_checkpoint(path):
    from aa_trt.checkpoint import load_checkpoint, read_config

    read_config(path)
    load_checkpoint(path, components=("pose_guider",))


@_memory_bounded
def test_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    data0 = _seed("model.safetensors")

    @_settings()
    @_seeded
    @given(mutated(data0, text=True))
    def run(data):
        check("checkpoint", _read_checkpoint, _fresh(d, "m.safetensors", data))

    run()


@_memory_bounded
def test_moore_pth(tmp_path_factory):
    from aa_trt.convert import load_pth

    d = tmp_path_factory.mktemp("pth")
    data0 = _seed("pose_guider.pth")

    @_settings()
    @_seeded
    @given(mutated(data0))
    def run(data):
        check("moore pth", load_pth, _fresh(d, "pose_guider.pth", data))

    run()


# -- build manifests -----------------------------------------------------------------------------------

def _read_manifest(folder):
    from aa_trt.backends.manifest import load_for_run

    load_for_run(folder, "0" * 64)


@_memory_bounded
def test_build_manifests(tmp_path_factory):
    d = tmp_path_factory.mktemp("manifest")
    data0 = _seed("manifest.json")
    (d / "clip.onnx").write_bytes(b"onnx")

    @_settings()
    @_seeded
    @given(mutated(data0, text=True))
    def run(data):
        _fresh(d, "manifest.json", data)
        check("build manifest", _read_manifest, d)

    run()


# -- batch job lines -----------------------------------------------------------------------------------

def _read_jobs(path):
    from aa_trt.batch import job_options, read_jobs

    for _, job in read_jobs(path):
        if isinstance(job, Exception):
            assert isinstance(job, AATrtError), job
            continue
        job_options(job, path.parent, {})


@_memory_bounded
def test_batch_job_lines(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    data0 = _seed("jobs.jsonl")

    @_settings()
    @_seeded
    @given(mutated(data0, text=True))
    def run(data):
        check("batch jobs", _read_jobs, _fresh(d, "jobs.jsonl", data))

    run()


# -- resume states ---------------------------------------------------------------------------------------

def _read_resume(out):
    from aa_trt.resume import ResumeState

    ident = json.loads((SEEDS / "resume_identity.json").read_text())
    ResumeState(out, ident).load()


@_memory_bounded
def test_resume_states(tmp_path_factory):
    from aa_trt.resume import state_path

    d = tmp_path_factory.mktemp("resume")
    out = d / "out.mp4"
    data0 = _seed("resume.safetensors")

    @_settings()
    @_seeded
    @given(mutated(data0, text=True))
    def run(data):
        state_path(out).write_bytes(data)
        check("resume state", _read_resume, out)

    run()


def test_resume_seed_is_accepted_unmutated(tmp_path):
    """Control: the seed itself loads (so the mutations start from a state that is read whole)."""
    from aa_trt.resume import ResumeState, state_path

    out = tmp_path / "out.mp4"
    state_path(out).write_bytes(_seed("resume.safetensors"))
    ident = json.loads((SEEDS / "resume_identity.json").read_text())
    saved = ResumeState(out, ident).load()
    assert saved.step == 0 and saved.seed == 7 and set(saved.carry) == {"prev"}


# -- training meta JSON ------------------------------------------------------------------------------------

def _read_meta(meta):
    from aa_trt.training.data import VideoSet

    videos = VideoSet(meta, size=(16, 16))
    for i in range(min(len(videos), 3)):
        videos.video(i)


@_memory_bounded
def test_training_meta(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta")
    shutil.copy(SEEDS / "video.npz", d / "video.npz")
    data0 = _seed("train.json")

    @_settings()
    @_seeded
    @given(mutated(data0, text=True))
    def run(data):
        check("training meta", _read_meta, _fresh(d, "train.json", data))

    run()


@_memory_bounded
def test_training_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    shutil.copy(SEEDS / "train.json", d / "train.json")
    data0 = _seed("video.npz")

    @_settings()
    @_seeded
    @given(mutated(data0))
    def run(data):
        _fresh(d, "video.npz", data)
        check("training npz", _read_meta, d / "train.json")

    run()
