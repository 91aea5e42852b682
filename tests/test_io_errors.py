"""I/O failures as user errors: a full disk, a read-only or vanished output folder, a file that
changes while it is read. Each ends in one line naming the file and the cause, exit 3, nothing
partial left, and nothing that earlier work wrote lost (batch outputs, resume states, training
states).

Two ways to make the failure: a real small tmpfs (mounted where the tests may mount: root in a
container that allows it; filled up, or remounted read-only), and, everywhere, a stand-in that
makes the real write call fail with the real errno (the output's temporary name a link to
/dev/full, or os.replace raising the errno for the one target)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aa_trt.cli import main as cli
from aa_trt.files import partial_name
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("io")
    return {"dir": d, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 400),
            "ref": make_reference(d / "ref.png", (64, 64)),
            "dance": make_video(d / "dance.mp4", stick_frames(4, (64, 64)), fps=10, audio=False)}


def _argv(files, out, *extra):
    return ["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
            "--pose-video", "--steps", "2", "--context-frames", "4", "--context-overlap", "1", "--seed", "1",
            "--dtype", "fp32", "--quiet", *extra]


def _fails(capsys, argv, *needles, code=3):
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _no_partials(folder: Path):
    left = [p.name for p in folder.rglob("*") if "partial" in p.name or p.name.endswith(".old")]
    assert not left, left


# -- a real small disk ----------------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path):
    """A 256 KiB tmpfs (skipped where this process cannot mount one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the stand-in tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _read_only(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def test_run_on_a_full_tmpfs(files, disk, capsys):
    _fill(disk)
    _fails(capsys, _argv(files, disk / "out.mp4"), "out.mp4: no space left on device (ENOSPC)")
    _fails(capsys, _argv(files, disk / "frames", "--png"), "frames: no space left on device (ENOSPC)")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_run_into_a_read_only_tmpfs(files, disk, capsys):
    _read_only(disk)
    _fails(capsys, _argv(files, disk / "out.mp4"), "disk: output folder is not writable: read-only file system (EROFS)")


def test_batch_with_one_output_on_a_full_tmpfs(files, disk, tmp_path, capsys):
    _fill(disk)
    outs = [tmp_path / "a.mp4", disk / "b.mp4", tmp_path / "c.mp4"]
    jobs = _jobs(tmp_path / "jobs.jsonl", files, outs)
    rc = cli(["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "b.mp4: no space left on device (ENOSPC)" in err and "Traceback" not in err
    assert outs[0].is_file() and outs[2].is_file() and not outs[1].exists()
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_train_on_a_full_tmpfs(disk, synth, capsys):
    _fill(disk)
    _fails(capsys, _train_argv(synth, disk / "t"), "no space left on device (ENOSPC)")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_train_into_a_read_only_tmpfs(disk, synth, capsys):
    _read_only(disk)
    _fails(capsys, _train_argv(synth, disk / "t"), "read-only file system (EROFS)")


# -- stand-ins: the real write call fails with the real errno --------------------------------------

def test_run_full_disk_at_the_video_write(files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    partial_name(out).symlink_to("/dev/full")  # the encoder's writes go to a device that is always full
    _fails(capsys, _argv(files, out), f"{out}: no space left on device (ENOSPC)")
    assert list(tmp_path.iterdir()) == []


def test_run_full_disk_keeps_the_resume_state(files, tmp_path, capsys, failing_replace):
    """The video cannot be written: the denoising's last state stays, and the rerun (room made)
    writes the same video as an uninterrupted render without denoising again."""
    whole = tmp_path / "whole.mp4"
    assert cli(_argv(files, whole)) == 0
    out = tmp_path / "out.mp4"
    failing_replace(lambda dst: dst == out)
    _fails(capsys, _argv(files, out, "--resume"), "out.mp4: no space left on device (ENOSPC)")
    failing_replace(lambda dst: False)
    state = out.with_name(f".{out.name}.resume.safetensors")
    assert state.is_file() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.name, "whole.mp4"])
    assert cli([*_argv(files, out, "--resume"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 2  # both steps were kept: nothing denoised again
    assert out.read_bytes() == whole.read_bytes()
    assert not state.exists()


@pytest.fixture
def failing_replace(monkeypatch):
    """os.replace raising `code` for targets `match(dst)` accepts: the rename that publishes a
    finished file fails as a full or read-only disk makes it fail."""
    real = os.replace
    rule = {}

    def replace(src, dst, *a, **k):
        if rule and rule["match"](Path(dst)):
            raise OSError(rule["code"], os.strerror(rule["code"]), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)

    def set_rule(match, code=errno.ENOSPC):
        rule.update(match=match, code=code)
    return set_rule


@pytest.mark.parametrize("code,says", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                       (errno.EROFS, "read-only file system (EROFS)"),
                                       (errno.EACCES, "permission denied (EACCES)")])
def test_run_publish_fails(files, tmp_path, capsys, failing_replace, code, says):
    out = tmp_path / "out.mp4"
    failing_replace(lambda dst: dst == out, code)
    _fails(capsys, _argv(files, out), f"{out}: {says}")
    assert list(tmp_path.iterdir()) == []


def test_run_png_publish_fails(files, tmp_path, capsys, failing_replace):
    out = tmp_path / "frames"
    failing_replace(lambda dst: dst == out)
    _fails(capsys, _argv(files, out, "--png"), "frames: no space left on device (ENOSPC)")
    assert list(tmp_path.iterdir()) == []


def test_run_output_folder_vanishes(files, tmp_path, capsys, monkeypatch):
    import shutil

    import aa_trt.run

    folder = tmp_path / "gone"
    folder.mkdir()
    real = aa_trt.run.streamed_frames

    def vanish_then_decode(*a, **k):
        shutil.rmtree(folder)  # removed by someone else while the render ran
        return real(*a, **k)

    monkeypatch.setattr(aa_trt.run, "streamed_frames", vanish_then_decode)
    _fails(capsys, _argv(files, folder / "out.mp4"), "gone: output folder does not exist (removed while in use?)")
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_by_permissions(files, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root's writes (the tmpfs and errno tests cover it)")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _fails(capsys, _argv(files, folder / "out.mp4"), "permission denied (EACCES)")
    finally:
        folder.chmod(0o755)


def test_driving_video_changes_while_read(files, tmp_path, capsys, monkeypatch):
    import aa_trt.run

    dance = tmp_path / "dance.mp4"
    dance.write_bytes(files["dance"].read_bytes())
    real = aa_trt.run.driving_poses

    def touch_then_pose(opts, clip, *a, **k):
        with open(dance, "ab") as f:  # the file grows while it is being read (a copy not finished)
            f.write(b"\0" * 100)
        return real(opts, clip, *a, **k)

    monkeypatch.setattr(aa_trt.run, "driving_poses", touch_then_pose)
    argv = _argv(files, tmp_path / "out.mp4")
    argv[2] = str(dance)
    _fails(capsys, argv, "dance.mp4: changed while it was read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dance.mp4"]


def test_driving_video_vanishes_while_read(files, tmp_path, capsys, monkeypatch):
    import aa_trt.run

    dance = tmp_path / "dance.mp4"
    dance.write_bytes(files["dance"].read_bytes())
    real = aa_trt.run.driving_poses

    def remove_then_pose(opts, clip, *a, **k):
        dance.unlink()
        return real(opts, clip, *a, **k)

    monkeypatch.setattr(aa_trt.run, "driving_poses", remove_then_pose)
    argv = _argv(files, tmp_path / "out.mp4")
    argv[2] = str(dance)
    _fails(capsys, argv, "dance.mp4: no such file or folder (removed while in use?) (ENOENT)")
    assert list(tmp_path.iterdir()) == []


# -- batch: a job that cannot write fails alone; the finished ones stay -----------------------------

def _jobs(path: Path, files, outputs) -> Path:
    lines = [json.dumps({"ref": str(files["ref"]), "driving": str(files["dance"]), "output": str(o),
                         "pose_video": True, "steps": 1, "context_frames": 4, "context_overlap": 1,
                         "seed": 1}) for o in outputs]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_full_disk_for_one_job(files, tmp_path, capsys, failing_replace):
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"]
    jobs = _jobs(tmp_path / "jobs.jsonl", files, outs)
    failing_replace(lambda dst: dst == outs[1])
    rc = cli(["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"job 1 (line 2) failed: {outs[1]}: no space left on device (ENOSPC)" in err and "Traceback" not in err
    assert outs[0].is_file() and outs[2].is_file() and not outs[1].exists()
    status = json.loads((tmp_path / "jobs.jsonl.status" / "job-00001.json").read_text())
    assert status["state"] == "failed" and "ENOSPC" in status["error"]
    _no_partials(tmp_path)
    first = outs[0].read_bytes()
    failing_replace(lambda dst: False)  # room made: the rerun does the one job left
    assert cli(["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["done"], s["skipped"], s["failed"]) == (1, 2, 0)
    assert outs[0].read_bytes() == first and probe(outs[1])["frames"] == 4


def test_batch_status_folder_full(files, tmp_path, capsys, failing_replace):
    """The status notes cannot be written: the jobs still run and their outputs are kept."""
    outs = [tmp_path / "a.mp4"]
    jobs = _jobs(tmp_path / "jobs.jsonl", files, outs)
    failing_replace(lambda dst: dst.parent.name == "jobs.jsonl.status")
    assert cli(["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet"]) == 0
    assert outs[0].is_file()
    _no_partials(tmp_path)


# -- build ----------------------------------------------------------------------------------------

def test_build_full_disk(files, tmp_path, capsys, failing_replace):
    pytest.importorskip("onnx")
    out = tmp_path / "engines"
    failing_replace(lambda dst: dst.parent == out)
    _fails(capsys, ["build", "--ckpt", str(files["ckpt"]), "-o", str(out), "--height", "32", "--width", "32",
                    "--frames", "4", "--graphs", "pose_guider", "--backend", "onnxruntime"],
           "engines/", "no space left on device (ENOSPC)")
    assert list(tmp_path.iterdir()) == []  # the folder it made, empty, is gone


# -- train ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from aa_trt.training.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, videos=3, size=32, frames=4, seed=1, formats=("npz",), progress=False)
    return root


def _train_argv(data, out, *extra):
    return ["train", "--stage", "1", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch", "1", "--save-every", "1", "--device", "cpu", "--quiet", *extra]


def test_train_full_disk_keeps_the_earlier_state(synth, tmp_path, capsys, failing_replace):
    out = tmp_path / "t"
    assert cli(_train_argv(synth, out)) == 0
    state = (out / "train_state.pt").read_bytes()
    model = (out / "model.safetensors").read_bytes()
    failing_replace(lambda dst: dst.name in ("train_state.pt", "model.safetensors"))
    _fails(capsys, _train_argv(synth, out, "--resume", "--steps", "4"), "train_state.pt: no space left on device")
    assert (out / "train_state.pt").read_bytes() == state  # the earlier state and checkpoint stay whole
    assert (out / "model.safetensors").read_bytes() == model
    _no_partials(out)
    failing_replace(lambda dst: False)
    assert cli(_train_argv(synth, out, "--resume", "--steps", "4")) == 0  # and it continues from them


def test_train_log_write_fails(synth, tmp_path, capsys, monkeypatch):
    """An append the system refuses (the log) is one line too, naming the training folder."""
    import builtins

    real = builtins.open
    out = tmp_path / "t"

    def refusing_open(file, mode="r", *a, **k):
        if str(file).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", refusing_open)
    _fails(capsys, _train_argv(synth, out), "log.jsonl: read-only file system (EROFS)")
    # The state saved at step 1, before the log's first line, stays for a --resume.
    assert sorted(p.name for p in out.iterdir()) == ["train_state.pt"]


def test_exit_codes_are_documented():
    from aa_trt import cli as cli_mod
    from aa_trt.errors import AATrtError, StorageError

    assert StorageError.exit_code == 3 and AATrtError.exit_code == 2
    assert "3 (a file the system could not" in " ".join(cli_mod.__doc__.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "exit 3" in readme and "--overwrite" in readme


def test_clean_read_needs_no_change(files, tmp_path):
    """Control for the change tests: the same video, not touched, is read without complaint."""
    from aa_trt.video import open_clip

    clip = open_clip(files["dance"])
    frames = list(clip.frames())
    assert len(frames) == 4 and np.asarray(frames[0]).shape == (64, 64, 3)
