"""Renders that survive repeated kills: a `run --resume` killed with SIGKILL at many random moments
(some timed to land while the resume state or the output is being written), resumed each time,
writes the same video file as an uninterrupted render, byte for byte; nothing but the video is
left beside it."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import save_tiny_checkpoint
from media import make_reference, make_video, stick_frames

KILLS = int(os.environ.get("AA_TRT_KILLS", "12"))


def _argv(d: Path, out: Path):
    return [sys.executable, "-m", "aa_trt", "run", str(d / "ref.png"), str(d / "dance.mp4"), "-o", str(out),
            "--ckpt", str(d / "tiny.safetensors"), "--pose-video", "--steps", "12", "--context-frames", "4",
            "--context-overlap", "1", "--seed", "5", "--dtype", "fp32", "--quiet", "--resume"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _kill_when_writing(proc, folder: Path, timeout: float) -> bool:
    """SIGKILL as soon as a temporary (a state or the video being written) appears; False if the
    process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any("partial" in p.name for p in folder.iterdir()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_killed_many_times_gives_the_same_file(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    save_tiny_checkpoint(d / "tiny.safetensors", 500)
    make_reference(d / "ref.png", (48, 48))
    make_video(d / "dance.mp4", stick_frames(6, (48, 48)), fps=10, audio=True)
    whole = tmp_path / "whole.mp4"
    t0 = time.monotonic()
    r = subprocess.run(_argv(d, whole), capture_output=True, text=True, env=_env(), timeout=300)
    t_full = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    truth = whole.read_bytes()

    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.mp4"
    seed = int(os.environ.get("AA_TRT_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kills, finished, moments = 0, 0, []
    while kills < KILLS:
        proc = subprocess.Popen(_argv(d, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env())
        if kills % 3 == 2:  # while a file is being written
            killed = _kill_when_writing(proc, work, t_full * 3)
            moment = "writing"
        else:  # anywhere in the run: start-up, reading, loading, denoising, encoding
            moment = rng.uniform(0.0, t_full)
            try:
                proc.wait(timeout=moment)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
        if killed:
            kills += 1
            moments.append(moment if isinstance(moment, str) else round(moment, 2))
            assert not out.exists() or out.read_bytes() == truth, f"kill seed {seed}: a partial video under the name"
            continue
        err = proc.stderr.read()
        assert proc.returncode == 0, f"kill seed {seed}: {err}"
        assert out.read_bytes() == truth, f"kill seed {seed}, after kills at {moments}"
        finished += 1
        out.unlink()  # render it again: more kills to go
    if not out.exists():
        r = subprocess.run(_argv(d, out), capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, f"kill seed {seed}: {r.stderr}"
    assert out.read_bytes() == truth, f"kill seed {seed}, after kills at {moments}"
    assert sorted(p.name for p in work.iterdir()) == ["out.mp4"], f"kill seed {seed}: left {list(work.iterdir())}"
    print(f"\n{kills} kills at {moments} (seed {seed}), {finished} renders finished between them; "
          f"uninterrupted render {t_full:.1f} s")


def test_batch_killed_mid_job_loses_no_finished_output(tmp_path):
    """SIGKILL while the second job renders: the first job's video stays as it was, the rerun skips
    it and finishes the others."""
    import json

    d = tmp_path / "in"
    d.mkdir()
    save_tiny_checkpoint(d / "tiny.safetensors", 510)
    make_reference(d / "ref.png", (48, 48))
    make_video(d / "dance.mp4", stick_frames(4, (48, 48)), fps=10, audio=False)
    jobs = tmp_path / "jobs.jsonl"
    job = {"ref": str(d / "ref.png"), "driving": str(d / "dance.mp4"), "pose_video": True, "steps": 30,
           "context_frames": 4, "context_overlap": 1, "seed": 2, "dtype": "fp32"}
    jobs.write_text("".join(json.dumps({**job, "output": f"{n}.mp4", "steps": 1 if n == "a" else 30}) + "\n"
                            for n in "abc"))
    argv = [sys.executable, "-m", "aa_trt", "batch", str(jobs), "--ckpt", str(d / "tiny.safetensors"), "--resume",
            "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    state = tmp_path / ".b.mp4.resume.safetensors"
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = (tmp_path / "a.mp4").read_bytes()
    assert not (tmp_path / "b.mp4").exists()
    r = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert (s["done"], s["skipped"]) == (2, 1)
    assert (tmp_path / "a.mp4").read_bytes() == first and (tmp_path / "c.mp4").is_file()


def test_killed_between_the_video_and_the_state_removal(tmp_path, monkeypatch):
    """The narrowest window: the video is published, the state not yet removed. The rerun writes
    the same bytes from the kept last step (no --overwrite needed: the video is its own)."""
    from aa_trt.cli import main as cli
    from aa_trt.resume import ResumeState, state_path

    d = tmp_path / "in"
    d.mkdir()
    save_tiny_checkpoint(d / "tiny.safetensors", 520)
    make_reference(d / "ref.png", (48, 48))
    make_video(d / "dance.mp4", stick_frames(4, (48, 48)), fps=10, audio=False)
    whole, out = tmp_path / "whole.mp4", tmp_path / "out.mp4"
    argv = _argv(d, whole)[3:]
    argv[argv.index("12")] = "2"
    assert cli(argv) == 0
    real = ResumeState.remove

    def killed(self):
        raise KeyboardInterrupt  # stands for the SIGKILL that lands here

    monkeypatch.setattr(ResumeState, "remove", killed)
    argv[argv.index(str(whole))] = str(out)
    assert cli(argv) == 130
    assert out.read_bytes() == whole.read_bytes() and state_path(out).is_file()
    monkeypatch.setattr(ResumeState, "remove", real)
    assert cli(argv) == 0
    assert out.read_bytes() == whole.read_bytes() and not state_path(out).exists()
    assert cli([a for a in argv if a != "--resume"]) == 2  # without a state the video is a finished result
