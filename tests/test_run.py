"""`aa-trt run` end to end on a tiny random-weight checkpoint, and its handling of bad input."""
import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aa_trt.cli import main as cli
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    return {"dir": d, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 200),
            "ref": make_reference(d / "ref.png", (48, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(12, (64, 64)), fps=10, audio=True)}


def _run(files, out, *extra):
    return cli(["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
                "--pose-video", "--steps", "2", "--context-frames", "8", "--context-overlap", "2",
                "--quiet", "--json", *extra])


def test_end_to_end_mp4(files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert _run(files, out, "--seed", "3") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"frames": 12' in line and '"seed": 3' in line
    assert '"guidance": 3.5' in line  # the tiny checkpoint declares none: Moore's scale
    info = probe(out)
    # 48x64 reference, tiny preset short side 64 -> 64 wide... the short side is the width here
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (12, 10.0, 64, 88)
    assert info["audio"] == 1 and info["codec"] == "h264"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary left behind

    out2 = tmp_path / "again.mp4"
    assert _run(files, out2, "--seed", "3") == 0
    assert np.abs(probe(out2)["pixels"].astype(int) - info["pixels"].astype(int)).max() <= 1


def test_stride_frames_and_size(files, tmp_path):
    out = tmp_path / "s.mp4"
    assert _run(files, out, "--stride", "2", "--frames", "5", "--width", "32", "--height", "40") == 0
    info = probe(out)
    assert (info["frames"], info["fps"], info["width"], info["height"], info["audio"]) == (5, 5.0, 32, 40, 1)


def _bad(tmp_path, capsys, argv, needle):
    out = tmp_path / "o.mp4"
    if "-o" not in argv:
        argv = [*argv, "-o", str(out)]
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_bad_inputs(files, tmp_path, capsys):
    ck = ["--ckpt", str(files["ckpt"]), "--pose-video", "--steps", "1", "--quiet"]
    ref, dance = str(files["ref"]), str(files["dance"])
    _bad(tmp_path, capsys, ["run", str(tmp_path / "nope.png"), dance, *ck], "nope.png: no such file")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(files["ref"].read_bytes()[:60])
    _bad(tmp_path, capsys, ["run", str(trunc), dance, *ck], "trunc.png: not a readable image")
    txt = tmp_path / "notes.mp4"
    txt.write_text("not a video\n" * 20)
    _bad(tmp_path, capsys, ["run", ref, str(txt), *ck], "notes.mp4: not a readable video")
    audio_only = make_video(tmp_path / "audio_only.mp4", stick_frames(5), video=False)
    _bad(tmp_path, capsys, ["run", ref, str(audio_only), *ck], "audio_only.mp4: has no video stream")
    _bad(tmp_path, capsys, ["run", ref, dance, *ck, "--start", "100"], "dance.mp4: no frames")
    _bad(tmp_path, capsys, ["run", ref, dance, *ck, "--width", "60"], "--width 60: must be a positive multiple of 8")
    _bad(tmp_path, capsys, ["run", ref, dance, *ck, "-o", str(tmp_path / "missing_dir" / "o.mp4")],
         "missing_dir: output folder does not exist")
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.randn(3)}, str(wrong))
    _bad(tmp_path, capsys, ["run", ref, dance, "--ckpt", str(wrong), "--pose-video"], "not an aa-trt checkpoint")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["ckpt"].read_bytes()[: files["ckpt"].stat().st_size // 2])
    _bad(tmp_path, capsys, ["run", ref, dance, "--ckpt", str(cut), "--pose-video"], "cut.safetensors")


def test_speed_flags(files, tmp_path, capsys, monkeypatch):
    ref, dance = str(files["ref"]), str(files["dance"])
    ck = ["--ckpt", str(files["ckpt"]), "--pose-video", "--steps", "1", "--quiet"]
    _bad(tmp_path, capsys, ["run", ref, dance, *ck, "--cuda-graph"], "--cuda-graph: needs a CUDA device")
    _bad(tmp_path, capsys, ["run", ref, dance, *ck, "--engine", str(tmp_path), "--compile"],
         "--compile: applies to the torch backend")
    import aa_trt.run
    seen = []
    monkeypatch.setattr(aa_trt.run, "run", lambda opts, *a, **k: seen.append(opts) or {})
    monkeypatch.setattr(aa_trt.run, "summary_line", lambda result: "")
    cli(["run", ref, dance, "-o", str(tmp_path / "o.mp4"), "--offload", "--compile", "--cuda-graph",
         "--device", "cuda"])
    assert (seen[0].offload, seen[0].compile, seen[0].cuda_graph) == (True, True, True)


def test_no_embedded_model_says_so(files, tmp_path, capsys, monkeypatch):
    import aa_trt.run
    monkeypatch.setattr(aa_trt.run, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    _bad(tmp_path, capsys, ["run", str(files["ref"]), str(files["dance"]), "--pose-video"],
         "no embedded default model")


def test_process_entry_runs_the_command_and_freezes_only_its_own_process(files, tmp_path):
    """`aa-trt` and `python -m aa_trt` (cli.entry) run the command as `main` does, then keep the
    objects alive at that point (torch's, from its import) out of the garbage collector
    (gc.freeze: measured 0.3 s of the README command); `main` called in a process leaves its
    collector alone."""
    out = tmp_path / "entry.mp4"
    code = ("import gc, sys; from aa_trt.cli import entry; sys.argv[0] = 'aa-trt'; "
            "rc = entry(); print('ENTRY', rc, gc.get_freeze_count())")
    proc = subprocess.run([sys.executable, "-c", code, "run", str(files["ref"]), str(files["dance"]), "-o", str(out),
                           "--ckpt", str(files["ckpt"]), "--pose-video", "--steps", "2", "--context-frames", "8",
                           "--context-overlap", "2", "--quiet", "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rc, frozen = proc.stdout.split("ENTRY")[1].split()
    assert rc == "0" and int(frozen) > 50_000, proc.stdout  # torch's import alone leaves ~10^5 objects
    assert probe(out)["frames"] == 12
    bad = subprocess.run([sys.executable, "-m", "aa_trt", "run", str(tmp_path / "absent.png"), str(files["dance"]),
                          "-o", str(tmp_path / "x.mp4"), "--ckpt", str(files["ckpt"])],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "absent.png" in bad.stderr and "Traceback" not in bad.stderr
    before = gc.get_freeze_count()
    assert _run(files, tmp_path / "main.mp4", "--seed", "3") == 0
    assert gc.get_freeze_count() == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupt_leaves_nothing(files, tmp_path, sig, code):
    out = tmp_path / "int.mp4"
    cmd = [sys.executable, "-m", "aa_trt", "run", str(files["ref"]), str(files["dance"]), "-o", str(out),
           "--ckpt", str(files["ckpt"]), "--pose-video", "--steps", "500"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_MININTERVAL": "0"})
    seen = ""
    deadline = time.time() + 120
    while "denoise" not in seen and time.time() < deadline:  # wait until it is denoising
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, seen + rest
    assert "Traceback" not in rest
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ with real pose extraction
skimage = pytest.importorskip("skimage.data", reason="scikit-image ships the photo of a person")


@pytest.fixture(scope="module")
def person(files):
    """The astronaut photo as a reference, and a short 'dance': the photo shifted frame by frame."""
    from PIL import Image

    d = files["dir"]
    img = skimage.astronaut()  # (512, 512, 3) uint8, a person from the waist up
    Image.fromarray(img[:, 40:424]).save(d / "astronaut.png")
    frames = [np.roll(img, 6 * i, axis=1)[:, 32:480] for i in range(4)]
    return {"ref": d / "astronaut.png", "dance": make_video(d / "astro.mp4", [f[::2, ::2] for f in frames], fps=8)}


def test_end_to_end_with_extraction_and_alignment(files, person, tmp_path, capsys):
    out = tmp_path / "astro_out.mp4"
    rc = cli(["run", str(person["ref"]), str(person["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
              "--steps", "1", "--context-frames", "4", "--context-overlap", "1", "--quiet", "--json", "--seed", "0"])
    assert rc == 0, capsys.readouterr().err
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"pose_source": "BlazePoseExtractor"' in line and '"frames_with_person": 4' in line
    info = probe(out)
    assert info["frames"] == 4 and (info["width"], info["height"]) == (64, 88) and info["audio"] == 1


def test_pose_preview(person, tmp_path, capsys):
    out = tmp_path / "poses.mp4"
    assert cli(["pose", str(person["dance"]), "-o", str(out), "--ref", str(person["ref"]), "--quiet"]) == 0
    info = probe(out)
    assert info["frames"] == 4 and info["width"] == 2 * 224 and info["height"] == 256
    skeleton_half = info["pixels"][:, :, 224:]
    assert skeleton_half.max() > 100  # a skeleton was drawn


def test_no_person(files, person, tmp_path, capsys):
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 48, 3), 128, np.uint8)).save(grey)
    blank = make_video(tmp_path / "blank.mp4", [np.zeros((64, 64, 3), np.uint8)] * 3, fps=8, audio=False)
    ck = ["--ckpt", str(files["ckpt"]), "--steps", "1", "--quiet"]
    _bad(tmp_path, capsys, ["run", str(grey), str(person["dance"]), *ck], "grey.png: no person found in the reference")
    _bad(tmp_path, capsys, ["run", str(person["ref"]), str(blank), *ck], "blank.mp4: no person found in any of its 3 frames")


def test_output_that_cannot_be_written(files, tmp_path, capsys):
    folder = tmp_path / "taken.mp4"
    folder.mkdir()
    rc = cli(["run", str(files["ref"]), str(files["dance"]), "-o", str(folder), "--ckpt", str(files["ckpt"]),
              "--pose-video", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "taken.mp4: is a folder" in err and len(err.splitlines()) == 1


def test_write_video_is_a_function_of_its_frames(tmp_path):
    # libx264's AVX-512 macroblock-tree code read uninitialised memory: the same frames written
    # twice in one process gave different files (6 distinct of 8 at 88x64) before mbtree was off.
    from aa_trt.video import write_video
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (11, 8, 3), dtype=np.uint8)
    frames = [np.ascontiguousarray(np.roll(np.kron(base, np.ones((8, 8, 1), np.uint8)), i, 1))
              for i in range(24)]  # (88, 64, 3) each, moving blocks so inter prediction has work
    junk = []
    outs = set()
    for k in range(6):
        junk.append(np.random.bytes(100_000 * (k + 1)))  # a different heap each time
        outs.add(write_video(tmp_path / f"v{k}.mp4", frames, 10.0).read_bytes())
    assert len(outs) == 1
