"""`--resume`: a run killed with SIGKILL while denoising continues from its last step and writes
the same video as an uninterrupted run; a state of another render is refused; a killed batch
resumes its job. And the outputs by name: containers, PNG frames, the grid."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aa_trt.cli import main as cli
from aa_trt.resume import state_path
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

STEPS = "60"  # long enough on the tiny model to be killed mid-way, short enough for the suite


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return {"dir": d, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 900),
            "ckpt2": save_tiny_checkpoint(d / "other.safetensors", 950),
            "ref": make_reference(d / "ref.png", (64, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(10, (64, 64)), fps=10, audio=True)}


def _args(files, out, *extra, ckpt="ckpt"):
    return ["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files[ckpt]),
            "--pose-video", "--steps", STEPS, "--context-frames", "8", "--context-overlap", "2",
            "--seed", "11", "--dtype", "fp32", *extra]


def _popen(argv):
    return subprocess.Popen([sys.executable, "-m", "aa_trt", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _state_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def _kill_after_steps(proc, state: Path, steps: int = 3, timeout: float = 120) -> int:
    """SIGKILL `proc` once its saved state says `steps` steps are done; the state's step then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.communicate()}")
        try:
            if state.is_file() and _state_step(state) >= steps - 1:
                break
        except Exception:  # noqa: BLE001 -- read while being replaced: try again
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return _state_step(state)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "aa_trt", *_args(files, out, "--quiet")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return probe(out)


def test_killed_run_resumes_to_the_same_video(files, uninterrupted, tmp_path):
    out = tmp_path / "out.mp4"
    state = state_path(out)
    step = _kill_after_steps(_popen(_args(files, out, "--resume", "--quiet")), state)
    assert not out.exists() and state.is_file() and 2 <= step < int(STEPS) - 1
    r = subprocess.run([sys.executable, "-m", "aa_trt", *_args(files, out, "--resume", "--quiet", "--json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["resumed_from_step"] == step + 1 and result["seed"] == 11
    got = probe(out)
    assert np.array_equal(got["pixels"], uninterrupted["pixels"])  # the same frames, bit for bit
    assert (got["frames"], got["audio"]) == (uninterrupted["frames"], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no state, no temporaries left


def test_a_state_of_another_render_is_refused(files, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    _kill_after_steps(_popen(_args(files, out, "--resume", "--quiet")), state_path(out), steps=1)
    for extra, ckpt, what in [(["--guidance", "2.0"], "ckpt", "sampling options.guidance"),
                              (["--frames", "6"], "ckpt", "frame selection.frames"),
                              (["--width", "32", "--height", "32"], "ckpt", "size"),
                              ([], "ckpt2", "checkpoint")]:
        rc = cli(_args(files, out, "--resume", "--quiet", *extra, ckpt=ckpt))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"the saved render differs in {what}" in err and "Traceback" not in err
    changed = tmp_path / "ref2.png"  # another reference image under another name
    make_reference(changed, (64, 64), seed=5)
    argv = _args(files, out, "--resume", "--quiet")
    argv[1] = str(changed)
    assert cli(argv) == 2 and "differs in ref" in capsys.readouterr().err
    assert state_path(out).is_file() and not out.exists()  # a refusal keeps the state


def test_killed_batch_resumes_its_job(files, uninterrupted, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    job = {"ref": str(files["ref"]), "driving": str(files["dance"]), "output": "a.mp4", "pose_video": True,
           "steps": int(STEPS), "context_frames": 8, "context_overlap": 2, "seed": 11, "dtype": "fp32"}
    jobs.write_text(json.dumps(job) + "\n")
    argv = ["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--resume", "--quiet"]
    step = _kill_after_steps(_popen(argv), state_path(tmp_path / "a.mp4"))
    r = subprocess.run([sys.executable, "-m", "aa_trt", *argv, "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    status = json.loads((tmp_path / "jobs.jsonl.status" / "job-00000.json").read_text())
    assert status["state"] == "done" and status["result"]["resumed_from_step"] == step + 1
    assert np.array_equal(probe(tmp_path / "a.mp4")["pixels"], uninterrupted["pixels"])
    assert not state_path(tmp_path / "a.mp4").exists()


# ---------------------------------------------------------------------------------- outputs
def _quick(files, out, *extra):
    return ["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
            "--pose-video", "--steps", "1", "--context-frames", "8", "--context-overlap", "2", "--seed", "1",
            "--quiet", *extra]


@pytest.mark.parametrize("ext,codec", [(".mp4", "h264"), (".mov", "h264"), (".mkv", "h264"), (".webm", "vp9")])
def test_each_container_by_its_name(files, tmp_path, ext, codec):
    out = tmp_path / f"out{ext}"
    assert cli(_quick(files, out)) == 0
    info = probe(out)
    assert (info["codec"], info["frames"], info["fps"], info["width"], info["height"]) == (codec, 10, 10.0, 64, 64)
    assert info["audio"] == 1  # the source's audio, in the container's own codec
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_png_frames_and_grid(files, tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    assert cli(_quick(files, folder, "--png", "--grid")) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:05d}.png" for i in range(10)]
    first = np.asarray(Image.open(folder / names[0]))
    assert first.shape == (64, 3 * 64, 3)  # reference | pose | result
    ref = np.asarray(Image.open(files["ref"]).convert("RGB"))
    assert np.abs(first[:, :64].astype(int) - ref.astype(int)).max() <= 1
    video = tmp_path / "v.mp4"
    assert cli(_quick(files, video, "--crf", "30")) == 0
    crf18 = tmp_path / "v18.mp4"
    assert cli(_quick(files, crf18)) == 0
    assert video.stat().st_size < crf18.stat().st_size  # a higher CRF: a smaller file


@pytest.mark.parametrize("extra,says", [
    (["-o", "out.avi"], "--output out.avi: unknown video extension '.avi'; expected .mp4, .mov, .mkv, .webm"),
    (["-o", "noext"], "unknown video extension '(none)'"),
    (["-o", "x.mp4", "--png"], "with --png the output is a folder"),
    (["-o", "x.webm", "--crf", "70"], "--crf 70: must be in 0..63 for libvpx-vp9"),
    (["-o", "x.mp4", "--crf", "52"], "--crf 52: must be in 0..51 for libx264"),
])
def test_bad_outputs_refused_before_loading(files, tmp_path, capsys, monkeypatch, extra, says):
    import aa_trt.checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(aa_trt.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded"))
    argv = ["run", str(files["ref"]), str(files["dance"]), "--ckpt", str(files["ckpt"]), "--pose-video", *extra]
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_png_folder_must_be_new_or_empty(files, tmp_path, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    assert cli(_quick(files, folder, "--png")) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
