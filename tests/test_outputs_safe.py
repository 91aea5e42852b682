"""Outputs never clobber inputs: every command refuses, before any work and in one line (exit 2),
an output that is an input (same path, symlink, hard link), lies inside an input folder or contains
an input; and a finished result already there is replaced only with --overwrite."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aa_trt.cli import main as cli
from aa_trt.files import clash
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, probe, stick_frames

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("safe")
    inp = d / "in"
    inp.mkdir()
    return {"dir": d, "in": inp, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 300),
            "ref": make_reference(inp / "ref.png", (64, 64)),
            "dance": make_video(inp / "dance.mp4", stick_frames(4, (64, 64)), fps=10, audio=False)}


def _run_argv(files, out, *extra):
    return ["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
            "--pose-video", "--steps", "1", "--context-frames", "4", "--context-overlap", "1", "--seed", "1",
            "--quiet", *extra]


def _refused(capsys, argv, needle, code=2):
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or video decode fails the test: refusals come before any work."""
    import aa_trt.video
    from aa_trt.pipeline import Animator

    def fail(*a, **k):
        pytest.fail("work started before the output was checked")

    monkeypatch.setattr(Animator, "from_pretrained", fail)
    monkeypatch.setattr(aa_trt.video, "open_clip", fail)


def _unchanged(path: Path, before: bytes):
    assert path.read_bytes() == before


# -- the helper -------------------------------------------------------------------------------

def test_clash_by_path_link_and_folder(tmp_path):
    a = tmp_path / "a.mp4"
    a.write_bytes(b"x")
    (tmp_path / "sym.mp4").symlink_to(a)
    os.link(a, tmp_path / "hard.mp4")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path / "folder")
    assert clash(a, a) == "is"
    assert clash(tmp_path / "sym.mp4", a) == "is"
    assert clash(tmp_path / "hard.mp4", a) == "is"
    assert clash(tmp_path / "x" / ".." / "a.mp4", a) == "is"
    assert clash(tmp_path / "dirlink" / "o.mp4", tmp_path / "folder") == "lies inside"
    assert clash(tmp_path, a) == "contains"
    assert clash(tmp_path / "b.mp4", a) is None
    assert clash(tmp_path / "folder", a) is None


# -- run ----------------------------------------------------------------------------------------

def test_run_refuses_its_own_inputs(files, tmp_path, capsys, no_work):
    dance, ref = files["dance"], files["ref"]
    before = dance.read_bytes()
    _refused(capsys, _run_argv(files, dance), "is the driving video")
    _refused(capsys, _run_argv(files, dance, "--overwrite"), "is the driving video")
    (tmp_path / "sym.mp4").symlink_to(dance)
    _refused(capsys, _run_argv(files, tmp_path / "sym.mp4", "--overwrite"), "is the driving video")
    os.link(dance, tmp_path / "hard.mp4")
    _refused(capsys, _run_argv(files, tmp_path / "hard.mp4", "--overwrite"), "is the driving video")
    _refused(capsys, _run_argv(files, ref, "--png", "--overwrite"), "is the reference image")
    # A PNG folder that holds the inputs: even --overwrite never replaces it.
    _refused(capsys, _run_argv(files, files["in"], "--png", "--overwrite"), "contains the reference image")
    _refused(capsys, _run_argv(files, files["ckpt"].with_suffix(".mp4").parent, "--png", "--overwrite"),
             "contains")
    _unchanged(dance, before)
    assert sorted(p.name for p in files["in"].iterdir()) == ["dance.mp4", "ref.png"]


def test_run_output_inside_a_frame_folder(files, tmp_path, capsys, no_work):
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image
    for i, f in enumerate(stick_frames(3)):
        Image.fromarray(f).save(frames / f"{i:03d}.png")
    argv = _run_argv(files, frames / "out.mp4")
    argv[2] = str(frames)
    _refused(capsys, argv, "lies inside the driving video")
    (tmp_path / "flink").symlink_to(frames)
    argv = _run_argv(files, tmp_path / "flink" / "out.mp4")
    argv[2] = str(frames)
    _refused(capsys, argv, "lies inside the driving video")
    argv = _run_argv(files, frames, "--png", "--overwrite")
    argv[2] = str(frames)
    _refused(capsys, argv, "is the driving video")
    assert len(list(frames.iterdir())) == 3


def test_run_existing_result_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an hours-long render")
    _refused(capsys, _run_argv(files, out), "out.mp4: exists; pass --overwrite to replace it")
    _unchanged(out, b"an hours-long render")
    assert cli(_run_argv(files, out, "--overwrite")) == 0
    assert probe(out)["frames"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_run_png_folder_needs_overwrite(files, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "00000.png").write_bytes(b"old")
    _refused(capsys, _run_argv(files, folder, "--png"), "exists and is not an empty folder")
    assert (folder / "00000.png").read_bytes() == b"old"
    assert cli(_run_argv(files, folder, "--png", "--overwrite")) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert (folder / "00000.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]  # nothing moved aside is left


# -- pose ---------------------------------------------------------------------------------------

def test_pose_refuses_inputs_and_existing(files, tmp_path, capsys, monkeypatch):
    import aa_trt.video

    dance = files["dance"]
    before = dance.read_bytes()
    calls = []
    monkeypatch.setattr(aa_trt.video, "open_clip", lambda *a, **k: calls.append(a) or pytest.fail("work"))
    _refused(capsys, ["pose", str(dance), "-o", str(dance), "--overwrite"], "is the driving video")
    _refused(capsys, ["pose", str(dance), "-o", str(files["ref"]), "--ref", str(files["ref"])], "is the reference")
    (tmp_path / "l.mp4").symlink_to(dance)
    _refused(capsys, ["pose", str(dance), "-o", str(tmp_path / "l.mp4")], "is the driving video")
    out = tmp_path / "poses.mp4"
    out.write_bytes(b"mine")
    _refused(capsys, ["pose", str(dance), "-o", str(out)], "exists; pass --overwrite")
    _unchanged(out, b"mine")
    _unchanged(dance, before)
    assert not calls

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(aa_trt.video, "open_clip", reached)
    with pytest.raises(Reached):  # --overwrite lets it through to the work
        cli(["pose", str(dance), "-o", str(out), "--overwrite"])


# -- build --------------------------------------------------------------------------------------

def test_build_refuses_inputs_and_foreign_folders(files, tmp_path, capsys, monkeypatch):
    import aa_trt.export.build

    ckpt = files["ckpt"]
    before = ckpt.read_bytes()
    calls = []
    monkeypatch.setattr(aa_trt.export.build, "build", lambda *a, **k: calls.append(a) or {"graphs": {}, "build_s": 0})
    _refused(capsys, ["build", "--ckpt", str(ckpt), "-o", str(ckpt), "--overwrite"], "is the checkpoint")
    _refused(capsys, ["build", "--ckpt", str(ckpt), "-o", str(ckpt.parent), "--overwrite"], "contains the checkpoint")
    (tmp_path / "ck.safetensors").symlink_to(ckpt)
    _refused(capsys, ["build", "--ckpt", str(tmp_path / "ck.safetensors"), "-o", str(ckpt.parent)], "contains")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "clip.onnx").write_bytes(b"my own graph")
    _refused(capsys, ["build", "--ckpt", str(ckpt), "-o", str(foreign)], "not a build folder")
    assert not calls
    assert cli(["build", "--ckpt", str(ckpt), "-o", str(foreign), "--overwrite"]) == 0
    built = tmp_path / "engines"
    built.mkdir()
    (built / "manifest.json").write_text("{}")
    assert cli(["build", "--ckpt", str(ckpt), "-o", str(built)]) == 0  # a build folder is reused as is
    assert cli(["build", "--ckpt", str(ckpt), "-o", str(tmp_path / "new")]) == 0
    assert len(calls) == 3
    _unchanged(ckpt, before)


# -- convert ------------------------------------------------------------------------------------

def test_convert_refuses_inputs_and_existing(tmp_path, capsys, monkeypatch):
    import aa_trt.convert

    moore, base = tmp_path / "moore", tmp_path / "base"
    moore.mkdir()
    base.mkdir()
    for name in ("denoising_unet.pth", "reference_unet.pth", "motion_module.pth", "pose_guider.pth"):
        (moore / name).write_bytes(b"weights")
    monkeypatch.setattr(aa_trt.convert, "load_pth", lambda *a: pytest.fail("work started"))
    argv = ["convert", "--moore", str(moore), "--base", str(base), "-o"]
    _refused(capsys, [*argv, str(moore / "denoising_unet.pth"), "--overwrite"], "lies inside the Moore weights folder")
    _refused(capsys, [*argv, str(base / "m.safetensors")], "lies inside the base models folder")
    _refused(capsys, [*argv, str(tmp_path), "--overwrite"], "contains the Moore weights folder")
    (tmp_path / "blink").symlink_to(base)
    _refused(capsys, [*argv, str(tmp_path / "blink" / "m.safetensors")], "lies inside the base models folder")
    cfg = tmp_path / "inference.yaml"
    cfg.write_text("x: 1\n")
    _refused(capsys, [*argv, str(cfg), "--inference-config", str(cfg), "--overwrite"], "is the inference config")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"converted yesterday")
    _refused(capsys, [*argv, str(out)], "m.safetensors: exists; pass --overwrite")
    _unchanged(out, b"converted yesterday")
    _unchanged(moore / "denoising_unet.pth", b"weights")
    # With --overwrite the guard lets it through: the (stand-in) work starts.
    with pytest.raises(pytest.fail.Exception, match="work started"):
        cli([*argv, str(out), "--overwrite"])


# -- train --------------------------------------------------------------------------------------

def test_train_refuses_inputs_and_earlier_training(tmp_path, capsys, monkeypatch, files):
    import aa_trt.training.loop

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text("[]")
    calls = []
    monkeypatch.setattr(aa_trt.training.loop, "train", lambda opts, **k: calls.append(opts) or None)
    base = ["train", "--stage", "1", "--preset", "tiny", "--data", str(data), "--device", "cpu", "--quiet"]
    _refused(capsys, [*base, "--out", str(data), "--overwrite"], "is the training data")
    _refused(capsys, [*base, "--out", str(data / "run")], "lies inside the training data")
    _refused(capsys, [*base, "--out", str(tmp_path)], "contains the training data")
    init = ["train", "--stage", "1", "--init", str(files["ckpt"]), "--data", str(data), "--quiet"]
    _refused(capsys, [*init, "--out", str(files["ckpt"].parent)], "contains the initial checkpoint")
    assert not calls
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"last week's model")
    _refused(capsys, [*base, "--out", str(out)], "holds an earlier training (model.safetensors); pass --overwrite")
    _refused(capsys, [*base, "--out", str(out), "--resume"], "pass --overwrite")  # no state to continue
    (out / "train_state.pt").write_bytes(b"state")
    _refused(capsys, [*base, "--out", str(out)], "pass --resume to continue it")
    assert not calls
    assert cli([*base, "--out", str(out), "--resume"]) == 0  # the folder is the training's own
    assert cli([*base, "--out", str(out), "--overwrite"]) == 0
    assert cli([*base, "--out", str(tmp_path / "fresh")]) == 0
    assert len(calls) == 3
    _unchanged(out / "model.safetensors", b"last week's model")  # the stand-in wrote nothing


# -- batch --------------------------------------------------------------------------------------

def _jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _job(files, output, **kw):
    return {"ref": str(files["ref"]), "driving": str(files["dance"]), "output": str(output),
            "pose_video": True, "steps": 1, "context_frames": 4, "context_overlap": 1, "seed": 1, **kw}


def test_batch_refuses_a_job_that_clobbers_any_input(files, tmp_path, capsys, no_work):
    dance = files["dance"]
    before = dance.read_bytes()
    jobs = _jobs(tmp_path / "jobs.jsonl", [_job(files, tmp_path / "a.mp4"), _job(files, dance)])
    _refused(capsys, ["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet"],
             "jobs.jsonl:2: output")
    other_ref = make_reference(tmp_path / "other.png")
    jobs = _jobs(tmp_path / "jobs.jsonl", [_job(files, other_ref.with_suffix(".mp4")),
                                           _job(files, other_ref, ref=str(other_ref))])
    err = _refused(capsys, ["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet", "--overwrite"],
                   "jobs.jsonl:2: output")
    assert "reference image of line 2" in err
    jobs = _jobs(tmp_path / "jobs.jsonl", [_job(files, tmp_path / "jobs.jsonl")])
    _refused(capsys, ["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet"], "the jobs file")
    _unchanged(dance, before)
    assert not (tmp_path / "jobs.jsonl.status").exists() or not list((tmp_path / "jobs.jsonl.status").iterdir())


def test_batch_keeps_existing_outputs_unless_overwrite(files, tmp_path, capsys):
    mine, fresh = tmp_path / "mine.mp4", tmp_path / "fresh.mp4"
    mine.write_bytes(b"not this batch's")
    jobs = _jobs(tmp_path / "jobs.jsonl", [_job(files, mine), _job(files, fresh)])
    argv = ["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet", "--json"]
    assert cli(argv) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["done"], s["skipped"]) == (1, 1)
    _unchanged(mine, b"not this batch's")
    done = fresh.read_bytes()
    assert cli([*argv, "--overwrite"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["done"], s["skipped"]) == (1, 1)  # the job it finished is kept; the other replaced
    assert probe(mine)["frames"] == 4
    assert fresh.read_bytes() == done
