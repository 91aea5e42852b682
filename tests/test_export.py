"""`aa-trt build` on the tiny preset: every graph vs PyTorch, the manifest cache, the onnxruntime
pipeline vs the torch pipeline, and the TensorRT path where it can run.

Tolerances: fp32 graphs max |ort - torch| <= 1e-4 x max(1, max |torch|) (measured ~1e-6); the
reference K/V graph 1e-3 (Moore's fp16 bank rounding can flip); the whole pipeline 1e-3 on frames in
[0, 1] and latents (measured ~1e-5: thread-order noise through two DDIM steps and the VAE).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx", reason="onnx not installed (pip install 'aa-trt[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")

from aa_trt.checkpoint import build_models, load_checkpoint  # noqa: E402
from aa_trt.config import PRESETS  # noqa: E402
from aa_trt.files import file_sha256  # noqa: E402
from aa_trt.errors import InputError  # noqa: E402
from aa_trt.export import manifest as mf  # noqa: E402
from aa_trt.export import tensorrt as trt_build  # noqa: E402
from aa_trt.export.build import build  # noqa: E402
from aa_trt.export.graphs import GRAPHS, BuildShapes, graph_specs  # noqa: E402
from aa_trt.export.onnx_io import compare, ort_session, run_torch  # noqa: E402
from helpers import max_abs, save_tiny_checkpoint  # noqa: E402

# 32x32 pixels (4x4 latents), windows of up to 4 frames, 2 windows per UNet call.
SHAPES = BuildShapes(height=32, width=32, frames=4, windows=2, decode_chunk=4, pose_chunk=4)
QUIET = dict(log=lambda s: None, tensorrt="off")
_TRT_MISSING = trt_build.unavailable()  # "tensorrt not importable" / "no CUDA device" / None


# One thread for torch and onnxruntime here (see conftest.one_thread_module).
pytestmark = pytest.mark.usefixtures("one_thread_module")


def _tiny_checkpoint(path, seed=0):
    return save_tiny_checkpoint(path, seed * 10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    return out, build(ckpt, out, SHAPES, **QUIET)


@pytest.fixture(scope="module")
def specs(ckpt):
    return graph_specs(load_checkpoint(ckpt), SHAPES)


# ---------------------------------------------------------------------------------- graphs
def test_manifest_records_build(built, ckpt):
    out, m = built
    assert m["complete"] and set(m["graphs"]) == set(GRAPHS)
    assert m["checkpoint"]["sha256"] == file_sha256(ckpt)
    assert m["shapes"] == SHAPES.to_dict() and m["opset"] == 17
    assert m["libraries"]["onnxruntime"] and m["libraries"]["torch"]
    on_disk = json.loads((out / mf.MANIFEST).read_text())
    for name, e in on_disk["graphs"].items():
        assert e["max_abs_error"] <= e["tolerance"] * max(1.0, e["ref_max_abs"]), name
        assert e["max_abs_error"] > 0, f"{name}: an exactly equal output suggests untested inputs"
    # 7 transformer blocks in the tiny UNet: 7 (K, V) pairs out of the reference graph.
    assert len(on_disk["graphs"]["reference_kv"]["outputs"]) == 2 * 7
    assert len(on_disk["graphs"]["unet_cond"]["inputs"]) == 4 + 2 * 7
    assert len(on_disk["graphs"]["unet_uncond"]["inputs"]) == 4


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_matches_torch_across_profile(built, specs, name):
    out, _ = built
    spec = specs[name]
    session = ort_session(out / f"{name}.onnx", threads=torch.get_num_threads())
    points = ["min", "opt"]
    if name.startswith("unet"):
        points.append(dict(spec.point("max"), windows=2, frames=3))  # a window shorter than traced
    for seed, point in enumerate(points):
        r = compare(spec, session, point, seed=10 + seed)
        assert r["ok"], (name, point, r)


def test_polygraphy_onnxrt_matches_torch(built, specs, tmp_path):
    """The UNet cond graph through `polygraphy run --onnxrt`, compared with PyTorch's outputs."""
    if importlib.util.find_spec("polygraphy") is None:
        pytest.skip("polygraphy not installed")
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    out, _ = built
    spec = specs["unet_cond"]
    inputs = spec.sample_inputs("opt", seed=5)
    ref = run_torch(spec, inputs)
    save_json([{k: v.numpy() for k, v in inputs.items()}], str(tmp_path / "inputs.json"))
    RunResults([("torch", [IterationResult(ref, runner_name="torch")])]).save(str(tmp_path / "torch.json"))
    cmd = [sys.executable, "-m", "polygraphy", "run", str(out / "unet_cond.onnx"), "--onnxrt",
           "--load-inputs", str(tmp_path / "inputs.json"), "--load-outputs", str(tmp_path / "torch.json"),
           "--atol", "1e-4", "--rtol", "1e-4"]
    if shutil.which("polygraphy"):
        cmd[:3] = [shutil.which("polygraphy")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PASSED" in p.stdout + p.stderr


# ---------------------------------------------------------------------------------- manifest cache
def test_manifest_reuses_matching_and_rebuilds_stale(ckpt, tmp_path):
    out = tmp_path / "e"
    one = ("pose_guider",)
    logs = []
    build(ckpt, out, SHAPES, graphs=one, tensorrt="off", log=logs.append)
    path = out / "pose_guider.onnx"
    mtime = path.stat().st_mtime_ns
    logs.clear()
    build(ckpt, out, SHAPES, graphs=one, tensorrt="off", log=logs.append)
    assert any("reused" in s for s in logs) and path.stat().st_mtime_ns == mtime

    # other shapes, another checkpoint, a truncated file, another aa-trt: each rebuilds
    def rebuilt(c, shapes):
        logs.clear()
        build(c, out, shapes, graphs=one, tensorrt="off", log=logs.append)
        return any("pose_guider: stale" in s for s in logs)

    assert rebuilt(ckpt, BuildShapes(32, 32, frames=4, windows=2, decode_chunk=4, pose_chunk=2))
    other = _tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    assert rebuilt(other, SHAPES)
    m = json.loads((out / mf.MANIFEST).read_text())
    assert m["checkpoint"]["sha256"] == file_sha256(other)
    path.write_bytes(path.read_bytes()[:100])
    assert rebuilt(other, SHAPES)
    m = json.loads((out / mf.MANIFEST).read_text())
    m["graphs"]["pose_guider"]["key"]["aa_trt_version"] = "0.0.0"
    (out / mf.MANIFEST).write_text(json.dumps(m))
    assert rebuilt(other, SHAPES)


def test_cli_build(ckpt, tmp_path, capsys):
    from aa_trt.cli import main

    out = tmp_path / "cli"
    rc = main(["build", "--ckpt", str(ckpt), "-o", str(out), "--height", "32", "--width", "32",
               "--frames", "4", "--graphs", "pose_guider,clip", "--tensorrt", "off"])
    assert rc == 0
    m = json.loads((out / mf.MANIFEST).read_text())
    assert set(m["graphs"]) == {"pose_guider", "clip"} and m["shapes"]["frames"] == 4
    assert main(["build", "--ckpt", str(ckpt), "-o", str(out), "--frames", "40"]) == 2
    assert "exceeds the motion modules' maximum window of 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- runtime
def _inputs():
    g = np.random.default_rng(0)
    ref = Image.fromarray(g.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    poses = g.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    return ref, poses


def test_ort_pipeline_matches_torch(built, ckpt):
    from aa_trt.backends.onnxruntime import OrtAnimator
    from aa_trt.pipeline import Animator

    out, _ = built
    ref, poses = _inputs()
    # 6 frames in windows of 4 with overlap 2: three windows, wrapping, run two per UNet call.
    kw = dict(steps=2, guidance=3.5, context_frames=4, context_overlap=2, window_batch=2, seed=7,
              progress=False)
    torch_anim, ort_anim = Animator.from_pretrained(ckpt), OrtAnimator.from_dir(out, checkpoint=ckpt)
    a_cond, b_cond = torch_anim.prepare(ref, poses), ort_anim.prepare(ref, poses)
    assert max_abs(a_cond.clip_embeds, b_cond.clip_embeds) < 1e-4
    assert max_abs(a_cond.ref_latent, b_cond.ref_latent) < 1e-4
    assert max_abs(a_cond.pose_features, b_cond.pose_features) < 1e-4
    a = torch_anim(ref, poses, output="latent", **kw)
    b = ort_anim(ref, poses, output="latent", **kw)
    assert a.shape == b.shape == (1, 4, 6, 4, 4)
    assert max_abs(a, b) < 1e-3, max_abs(a, b)
    fa, fb = torch_anim.decode(a), ort_anim.decode(b)
    assert fa.shape == fb.shape == (6, 32, 32, 3)
    assert max_abs(fa, fb) < 1e-3, max_abs(fa, fb)


def test_backend_choice(built, ckpt):
    from aa_trt.backends import animator_from_dir
    from aa_trt.backends.onnxruntime import OrtAnimator

    out, _ = built
    if _TRT_MISSING is not None:  # TensorRT cannot run here: onnxruntime, or a clear no
        assert isinstance(animator_from_dir(out, ckpt), OrtAnimator)
        with pytest.raises(InputError, match="TensorRT backend asked for, but"):
            animator_from_dir(out, ckpt, backend="tensorrt")


def test_ort_refuses_other_build(built, ckpt, tmp_path):
    from aa_trt.backends.onnxruntime import OrtAnimator

    out, _ = built
    other = _tiny_checkpoint(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(InputError, match="another checkpoint"):
        OrtAnimator.from_dir(out, checkpoint=other)
    ref, poses = _inputs()
    with pytest.raises(InputError, match="built for 32x32, asked for 64x64"):
        OrtAnimator.from_dir(out).prepare(ref, poses, width=64, height=64)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = json.loads((copy / mf.MANIFEST).read_text())
    m["aa_trt_version"] = "0.0.0"
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError, match="built by aa-trt 0.0.0"):
        OrtAnimator.from_dir(copy)
    with pytest.raises(InputError, match="no aa-trt build here"):
        OrtAnimator.from_dir(tmp_path / "nothing")
    # A build whose recorded tensor names are not this aa-trt's declaration is refused: the
    # runtimes bind by name, never by position.
    m["aa_trt_version"] = json.loads((out / mf.MANIFEST).read_text())["aa_trt_version"]
    m["graphs"]["unet_cond"]["inputs"] = {("x" if k == "latents" else k): v
                                          for k, v in m["graphs"]["unet_cond"]["inputs"].items()}
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError, match="graph unet_cond declares .* not this aa-trt's"):
        OrtAnimator.from_dir(copy)


def test_graphs_bind_by_name(built, specs):
    from aa_trt.backends.onnxruntime import OrtGraph
    from aa_trt.export.graphs import declared_names

    out, _ = built
    graph = OrtGraph(out / "unet_uncond.onnx")
    feeds = specs["unet_uncond"].sample_inputs("opt")
    assert tuple(feeds) == declared_names("unet_uncond", 0)[0]
    ref = graph(**feeds)["prediction"]
    shuffled = dict(reversed(list(feeds.items())))  # the order of the keywords does not matter
    assert torch.equal(graph(**shuffled)["prediction"], ref)
    with pytest.raises(InputError, match="missing \\['latents'\\], unexpected \\['x'\\]"):
        graph(x=feeds["latents"], **{k: v for k, v in feeds.items() if k != "latents"})


# ---------------------------------------------------------------------------------- TensorRT
def test_tensorrt_import_is_lazy_and_explains():
    import aa_trt.backends.tensorrt  # noqa: F401  (imports without TensorRT: it loads on first use)

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(ImportError, match="pip install tensorrt"):
        trt_build.import_tensorrt()


@pytest.mark.skipif(_TRT_MISSING is not None, reason=_TRT_MISSING or "")
def test_tensorrt_engines_match_torch(built, specs, ckpt):
    from aa_trt.backends.tensorrt import TrtAnimator
    from aa_trt.export.manifest import write_manifest
    from aa_trt.pipeline import Animator

    out, m = built
    m = dict(m, engines=trt_build.build_engines(out, specs, m, fp16=False, log=lambda s: None))
    write_manifest(out, m)
    assert set(m["engines"]) == set(GRAPHS) and (out / trt_build.TIMING_CACHE).exists()
    ref, poses = _inputs()
    kw = dict(steps=2, context_frames=4, context_overlap=2, window_batch=2, seed=7, progress=False)
    a = Animator.from_pretrained(ckpt)(ref, poses, **kw)
    b = TrtAnimator.from_dir(out, checkpoint=ckpt)(ref, poses, **kw)
    # fp32 engines still use TF32 matmuls by default: ~1e-3 relative per layer.
    assert max_abs(a, b) < 2e-2, max_abs(a, b)


# ---------------------------------------------------------------------------------- sd15
@pytest.mark.slow
def test_sd15_unet_step_exports(tmp_path):
    """SD1.5 widths + motion modules (1.3 B parameters, ~5 GB fp32: external data), traced at a
    small point (the graph is dynamic in rows). Prints export time and peak memory."""
    import resource
    import time

    from aa_trt.export.onnx_io import check_graph, export_graph
    from aa_trt.models import UNet

    cfg = PRESETS["sd15"]
    unet = UNet(cfg.unet, cfg.motion).eval().requires_grad_(False)
    models = build_models(PRESETS["tiny"])  # the other graphs are not built here
    models.denoising_unet = unet
    models.config = cfg
    spec = graph_specs(models, BuildShapes(height=64, width=64, frames=2))["unet_cond"]
    t = time.perf_counter()
    info = export_graph(spec, tmp_path / "unet_cond.onnx")
    export_s = time.perf_counter() - t
    assert info["external_data"] and (tmp_path / "unet_cond.onnx.data").stat().st_size > 4e9
    check_graph(tmp_path / "unet_cond.onnx")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"sd15 unet_cond: export {export_s:.1f} s, peak RSS {peak:.1f} GiB")
    assert peak < 24
    del models
    # onnxruntime vs torch at the traced point (8x8 latents, 2 frames): cheap, and it proves the
    # external-data graph loads and computes the same step.
    r = compare(spec, ort_session(tmp_path / "unet_cond.onnx"), "max", seed=3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"sd15 unet_cond: onnxruntime vs torch max abs error {r['max_abs_error']:.2e} "
          f"(max |torch| {r['ref_max_abs']:.2f}), peak RSS with the session {peak:.1f} GiB")
    assert r["ok"], r


def test_cli_run_on_engine_dir_equals_torch(built, ckpt, tmp_path, capsys):
    """`aa-trt run --engine DIR` gives the torch backend's video (same seed, same pose video)."""
    from aa_trt.cli import main as cli
    from media import make_reference, make_video, probe, stick_frames

    out_dir, _ = built
    ref = make_reference(tmp_path / "ref.png", (32, 32))
    dance = make_video(tmp_path / "dance.mp4", stick_frames(6, (32, 32)), fps=8, audio=True)
    base = [str(ref), str(dance), "--ckpt", str(ckpt), "--pose-video", "--steps", "2",
            "--context-frames", "4", "--context-overlap", "2", "--width", "32", "--height", "32", "--quiet"]
    common = [*base, "--seed", "5", "--json"]
    assert cli(["run", *common, "-o", str(tmp_path / "torch.mp4"), "--dtype", "fp32"]) == 0  # as the graphs
    assert cli(["run", *common, "-o", str(tmp_path / "engine.mp4"), "--engine", str(out_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert '"backend": "Animator"' in lines[0] and '"backend": "OrtAnimator"' in lines[1]
    a, b = probe(tmp_path / "torch.mp4"), probe(tmp_path / "engine.mp4")
    assert (a["frames"], a["width"], a["height"], a["audio"]) == (b["frames"], b["width"], b["height"], b["audio"]) == (6, 32, 32, 1)
    # The frames agree to ~1e-3 before encoding (test_ort_pipeline_matches_torch); after H.264 at
    # crf 18 on noise-like random-weight output they differ by a couple of levels, while another
    # seed moves them by tens: the comparison can tell a wrong backend from a right one.
    assert cli(["run", *base, "--seed", "6", "-o", str(tmp_path / "other.mp4"), "--dtype", "fp32"]) == 0
    c = probe(tmp_path / "other.mp4")
    same = np.abs(a["pixels"].astype(int) - b["pixels"].astype(int)).mean()
    other = np.abs(a["pixels"].astype(int) - c["pixels"].astype(int)).mean()
    assert same < 3 and other > 5 * same, (same, other)


def test_geglu_exports_as_two_gemms_without_a_split(tmp_path):
    """An exported GEGLU is the projection's two halves as two GEMMs (OpenVINO fuses the gelu and
    the product into them; a split of one wide output ran as its slow reference kernel), and
    computes what the module computes."""
    import onnx
    import onnxruntime as ort

    from aa_trt.models.layers import GEGLU

    torch.manual_seed(0)
    m = GEGLU(16, 24).eval()
    x = torch.randn(2, 5, 16)
    path = tmp_path / "geglu.onnx"
    with torch.no_grad():
        want = m(x)  # the plain path outside export (autograd off, no tracing)
        torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          do_constant_folding=True, dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Split" not in ops, ops
    assert ops.count("MatMul") + ops.count("Gemm") == 2, ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() < 1e-5
