"""`aa-trt eval` and its parts: metrics against scikit-image, the two baselines, the command."""
from __future__ import annotations

import json

import numpy as np
import pytest

from aa_trt.cli import main
from aa_trt.training.baselines import copy_reference, similarity, skeleton_warp
from aa_trt.training.metrics import l1, psnr, ssim
from aa_trt.training.synthetic import make_video, synthesize
from helpers import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _pair(seed=0, shape=(3, 40, 52, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    noise = rng.integers(-40, 41, shape)
    return a, np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)


def test_ssim_and_psnr_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    for seed in range(3):
        a, b = _pair(seed)
        ours = ssim(a, b)
        theirs = [metrics.structural_similarity(x, y, channel_axis=2, data_range=255, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
        np.testing.assert_allclose(psnr(a, b), [metrics.peak_signal_noise_ratio(x, y, data_range=255)
                                                for x, y in zip(a, b)], rtol=1e-9)
    a, b = _pair(7)
    np.testing.assert_allclose(l1(a, b), np.abs(a / 255.0 - b / 255.0).mean(axis=(1, 2, 3)), rtol=1e-12)
    assert np.all(ssim(a, a) > 0.999999) and np.all(psnr(a, a) == 100.0)


def test_similarity_maps_bone_ends():
    m = similarity((10, 20), (30, 25), (50, 60), (45, 90))
    for p, q in (((10, 20), (50, 60)), ((30, 25), (45, 90))):
        np.testing.assert_allclose(m[:, :2] @ np.array(p, float) + m[:, 2], q, atol=1e-9)


def test_skeleton_warp_follows_the_skeleton():
    v = make_video(3, 0, 0, (96, 96), 2)
    ref, body = v.frames[0], v.keypoints[0, :18].copy()
    # The same skeleton: every part is pasted onto itself, the reference comes back.
    same = skeleton_warp(ref, body, body[None])[0]
    assert np.abs(same.astype(int) - ref.astype(int)).max() <= 1
    # The whole skeleton 6 px to the right: the pasted torso is the reference's, shifted.
    moved = body.copy()
    moved[:, 0] += 6
    out = skeleton_warp(ref, body, moved[None])[0].astype(int)
    shifted = np.roll(ref, 6, axis=1).astype(int)
    neck, hip = body[1, :2].astype(int), ((body[8, :2] + body[11, :2]) / 2).astype(int)
    x, y0, y1 = neck[0] + 6, neck[1] + 2, hip[1] - 2
    np.testing.assert_array_less(np.abs(out[y0:y1, x - 1:x + 2] - shifted[y0:y1, x - 1:x + 2]).max(), 2)
    assert copy_reference(ref, 3).shape == (3,) + ref.shape


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    synthesize(root, videos=5, size=64, frames=5, seed=2, formats=("npz",), progress=False)
    return root


def test_eval_command_scores_model_and_baselines(synth_data, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval.json"
    rc = main(["eval", "--ckpt", str(ckpt), "--data", str(synth_data), "--frames", "3", "--steps", "2",
               "--quiet", "-o", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["splits"]) == {"test_characters", "test_motions"}
    printed = capsys.readouterr().out
    for split, r in result["splits"].items():
        assert set(r["mean"]) == {"model", "copy", "skeleton_warp"}
        assert f"| {split} | model |" in printed
        row = r["videos"][0]
        with np.load(synth_data / row["video"]) as z:
            frames = z["frames"]
        # The copy baseline's numbers are those of the reference against frames 1..3.
        true = frames[1:4]
        assert row["copy"]["ssim"] == pytest.approx(float(ssim(copy_reference(frames[0], 3), true).mean()))
        for m in r["mean"].values():
            assert np.isfinite(list(m.values())).all()
    # A random tiny model is far from the truth; copying the reference is close to it.
    mean = result["splits"]["test_motions"]["mean"]
    assert mean["copy"]["psnr"] > mean["model"]["psnr"]


def test_eval_refuses_a_folder_without_splits(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    rc = main(["eval", "--ckpt", str(ckpt), "--data", str(tmp_path), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "test_characters.json: no such split" in err and "Traceback" not in err


def test_eval_ceiling_without_the_model(synth_data, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(synth_data), "--frames", "2", "--no-model",
                 "--ceiling", "--splits", "test_motions", "--quiet", "-o", str(out)]) == 0
    mean = json.loads(out.read_text())["splits"]["test_motions"]["mean"]
    assert set(mean) == {"copy", "skeleton_warp", "vae_ceiling"}
    # A random tiny VAE reconstructs nothing: far below copying the reference.
    assert mean["vae_ceiling"]["psnr"] < mean["copy"]["psnr"]


def test_eval_on_an_engine_scores_what_torch_scores(synth_data, tmp_path):
    """`eval --engine DIR` runs the model on the build's graphs (here onnxruntime, fp32: the same
    computation within ~1e-5) and records the backend; its scores equal torch fp32's to 1e-3."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")
    from aa_trt.export.build import build
    from aa_trt.export.graphs import BuildShapes

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors", 3)
    build(ckpt, tmp_path / "eng", BuildShapes(height=64, width=64, frames=4, decode_chunk=4, pose_chunk=4),
          backend="onnxruntime", log=lambda s: None)
    common = ["--ckpt", str(ckpt), "--data", str(synth_data), "--frames", "3", "--steps", "2",
              "--splits", "test_motions", "--no-baselines", "--quiet"]
    assert main(["eval", *common, "--dtype", "fp32", "-o", str(tmp_path / "torch.json")]) == 0
    assert main(["eval", *common, "--engine", str(tmp_path / "eng"), "-o", str(tmp_path / "eng.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("torch.json", "eng.json"))
    assert b["precision"] == "onnxruntime" and b["engine"] == str(tmp_path / "eng")
    for m in ("ssim", "psnr", "l1"):
        x, y = (r["splits"]["test_motions"]["mean"]["model"][m] for r in (a, b))
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (m, x, y)
    assert main(["eval", *common, "--engine", str(tmp_path / "eng"), "--ceiling"]) == 2
