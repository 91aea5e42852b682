"""The OpenVINO backend on the tiny preset (32x32): `aa-trt build --backend openvino` compiles and
checks every graph, `run --engine` runs on it, a stale build is refused, and auto picks the
backend the CPU's capabilities call for.

Tolerances (aa_trt.export.openvino): f32 graphs max |ov - torch| <= the graph's onnxruntime
tolerance (1e-4, the reference K/V 1e-3) x max(1, max |torch|); bf16 graphs relative L2 <= 0.15
(measured 0.2-6% at the "opt" point, up to 11% for the UNet at t=999; torch's own bf16 is within
2x of OpenVINO's). End to end: f32 frames within 1e-3 of torch's (measured 1.6e-4); bf16 frames
within 0.06 mean abs on [0, 1] (measured 0.033; torch's own bf16 0.007) and at least 3x closer to
torch's than another seed's frames are (0.18).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx not installed (pip install 'aa-trt[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'aa-trt[openvino]')")

from aa_trt.backends import animator_from_dir  # noqa: E402
from aa_trt.backends import openvino as ovb  # noqa: E402
from aa_trt.checkpoint import load_checkpoint  # noqa: E402
from aa_trt.errors import InputError, OptionError  # noqa: E402
from aa_trt.export import manifest as mf  # noqa: E402
from aa_trt.export import openvino as ov_build  # noqa: E402
from aa_trt.export.build import build, resolve_backend  # noqa: E402
from aa_trt.export.graphs import GRAPHS, BuildShapes, graph_specs  # noqa: E402
from helpers import max_abs, save_tiny_checkpoint  # noqa: E402

SHAPES = BuildShapes(height=32, width=32, frames=4, windows=2, decode_chunk=4, pose_chunk=4)
pytestmark = pytest.mark.usefixtures("one_thread_module")
BF16_HERE = "BF16" in ovb.cpu_capabilities()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", 0)


@pytest.fixture(scope="module")
def specs(ckpt):
    return graph_specs(load_checkpoint(ckpt), SHAPES)


@pytest.fixture(scope="module")
def builds(ckpt, tmp_path_factory):
    """{precision: (DIR, manifest)}: f32 always, bf16 where this CPU lists BF16. The second
    build starts from a copy of the first: its ONNX graphs are reused, only OpenVINO recompiles."""
    root = tmp_path_factory.mktemp("ov")
    out = {}
    first = None
    for precision in ("bf16", "f32") if BF16_HERE else ("f32",):
        d = root / precision
        if first is not None:
            shutil.copytree(first, d)
        out[precision] = (d, build(ckpt, d, SHAPES, backend="openvino", precision=precision, log=lambda s: None))
        first = first or d
    return out


def test_build_records_openvino(builds):
    for precision, (d, m) in builds.items():
        part = m["openvino"]
        assert part["precision"] == precision and part["version"] == ovb.openvino_version()
        assert set(part["graphs"]) == set(GRAPHS) and m["backend"]["name"] == "openvino"
        for name, e in part["graphs"].items():
            assert (d / e["file"]).stat().st_size == e["size"] > 0, name
            assert e["graph_key"] == m["graphs"][name]["key"], name
            assert e["max_abs_error"] > 0, f"{name}: an exactly equal output suggests untested inputs"
            if precision == "bf16":
                assert e["rel_l2"] <= ov_build.BF16_REL_L2, (name, e)
            else:
                assert e["max_abs_error"] <= m["graphs"][name]["tolerance"] * max(1.0, e["ref_max_abs"]), name


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_matches_torch(builds, specs, name):
    """Each compiled blob, loaded as `run` loads it, against torch on other seeds and points."""
    spec = specs[name]
    names = (tuple(spec.input_names), tuple(spec.output_names))
    for precision, (d, m) in builds.items():
        graph = ovb.OvGraph.load(d / m["openvino"]["graphs"][name]["file"], names, precision, 1)
        for seed, point in enumerate(("min", "opt")):
            r = ov_build.compare(spec, graph, precision, point, seed=20 + seed)
            assert r["ok"], (name, precision, point, r)
            assert r["rel_l2"] > 0


def test_unet_weights_stored_once(builds):
    d, m = builds["f32"]
    cond, uncond = m["graphs"]["unet_cond"]["files"], m["graphs"]["unet_uncond"]["files"]
    assert cond["unet.weights"] == uncond["unet.weights"] == (d / "unet.weights").stat().st_size
    # The graphs themselves hold only their structure and small constants.
    assert cond["unet_cond.onnx"] < cond["unet.weights"] / 2
    assert not (d / "unet_cond.onnx.data").exists()


# ---------------------------------------------------------------------------------- end to end
def _inputs():
    from PIL import Image

    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (40, 36, 3), dtype=np.uint8)), \
        g.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


KW = dict(steps=2, guidance=3.5, context_frames=4, context_overlap=2, window_batch=2, seed=7, progress=False)


def test_f32_pipeline_matches_torch(builds, ckpt):
    from aa_trt.pipeline import Animator

    d, _ = builds["f32"]
    ref, poses = _inputs()
    a = Animator.from_pretrained(ckpt)(ref, poses, **KW)
    anim = ovb.OvAnimator.from_dir(d, ckpt)
    assert anim.backend_name == "openvino f32"
    b = anim(ref, poses, **KW)
    assert a.shape == b.shape == (6, 32, 32, 3)
    assert max_abs(a, b) < 1e-3, max_abs(a, b)


@pytest.mark.skipif(not BF16_HERE, reason="this CPU does not list BF16")
def test_cli_run_bf16_close_to_torch(builds, ckpt, tmp_path, capsys):
    """`aa-trt run --engine DIR` picks OpenVINO bf16 here, and its video is torch's within bf16's
    error, far closer than another seed's."""
    from aa_trt.cli import main as cli
    from media import make_reference, make_video, probe, stick_frames

    d, _ = builds["bf16"]
    ref = make_reference(tmp_path / "ref.png", (32, 32))
    dance = make_video(tmp_path / "dance.mp4", stick_frames(6, (32, 32)), fps=8)
    base = [str(ref), str(dance), "--ckpt", str(ckpt), "--pose-video", "--steps", "2",
            "--context-frames", "4", "--context-overlap", "2", "--width", "32", "--height", "32", "--quiet"]
    fp32 = ["--dtype", "fp32"]  # the torch path in fp32, what the tolerances were measured against
    assert cli(["run", *base, *fp32, "--seed", "5", "--json", "-o", str(tmp_path / "torch.mp4")]) == 0
    assert cli(["run", *base, "--seed", "5", "--json", "-o", str(tmp_path / "ov.mp4"), "--engine", str(d)]) == 0
    assert cli(["run", *base, *fp32, "--seed", "6", "-o", str(tmp_path / "other.mp4")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert '"backend": "OvAnimator"' in lines[1]
    a, b, c = (probe(tmp_path / f)["pixels"].astype(float) / 255 for f in ("torch.mp4", "ov.mp4", "other.mp4"))
    assert a.shape == b.shape == (6, 32, 32, 3)
    same, other = np.abs(a - b).mean(), np.abs(a - c).mean()
    assert same < 0.06 and other > 3 * same, (same, other)


# ---------------------------------------------------------------------------------- refusals
def _edited(builds, tmp_path, edit):
    d, _ = builds["f32"]
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    m = json.loads((copy / mf.MANIFEST).read_text())
    edit(m)
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    return copy


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_stale_builds_refused(builds, ckpt, tmp_path):
    d, _ = builds["f32"]
    other = save_tiny_checkpoint(tmp_path / "other.safetensors", 30)
    with pytest.raises(InputError, match="another checkpoint") as e:
        ovb.OvAnimator.from_dir(d, checkpoint=other)
    _one_line(e)
    copy = _edited(builds, tmp_path / "v", lambda m: m["openvino"].update(version="2020.1.0"))
    with pytest.raises(InputError, match="compiled by OpenVINO 2020.1.0, this is OpenVINO") as e:
        animator_from_dir(copy, ckpt)  # auto refuses too: the build says OpenVINO, and it is stale
    _one_line(e)
    copy = _edited(builds, tmp_path / "p", lambda m: m["openvino"].update(precision="bf16"))
    with pytest.raises(InputError, match="compiled for bf16, this run wants f32") as e:
        ovb.OvAnimator.from_dir(copy, precision="f32")
    _one_line(e)

    def other_graph(m):
        m["openvino"]["graphs"]["unet_cond"]["graph_key"]["checkpoint_sha256"] = "0" * 64
    copy = _edited(builds, tmp_path / "g", other_graph)
    with pytest.raises(InputError, match="OpenVINO graph unet_cond was compiled from other ONNX graphs") as e:
        ovb.OvAnimator.from_dir(copy)
    _one_line(e)


def test_rebuild_reuses_and_recompiles(builds, ckpt, tmp_path):
    d, _ = builds["f32"]
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    logs = []
    build(ckpt, copy, SHAPES, backend="openvino", precision="f32", log=logs.append)
    assert sum("OpenVINO f32 blob up to date, reused" in s for s in logs) == len(GRAPHS)
    m = json.loads((copy / mf.MANIFEST).read_text())
    m["openvino"]["version"] = "2020.1.0"
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    logs.clear()
    build(ckpt, copy, SHAPES, graphs=("pose_guider",), backend="openvino", precision="f32", log=logs.append)
    assert any("pose_guider: OpenVINO f32 compiled" in s for s in logs), logs


# ---------------------------------------------------------------------------------- choices
def test_precision_choice(monkeypatch):
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("BF16", "FP32", "INT8"))
    assert ovb.choose_precision() == ("bf16", "CPU lists BF16")
    assert ovb.choose_precision("f32") == ("f32", "asked for")
    assert ovb.choose_precision(None, ("f32", "asked for")) == ("f32", "built for f32")
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("FP32", "INT8"))
    assert ovb.choose_precision() == ("f32", "CPU does not list BF16")
    # A bf16 build on a CPU without BF16 runs in f32, which that build then does not match.
    assert ovb.choose_precision(None, ("bf16", "CPU lists BF16"))[0] == "f32"
    with pytest.raises(OptionError, match="precision='bf16': this CPU does not list BF16"):
        ovb.choose_precision("bf16")
    with pytest.raises(OptionError, match="precision='fp8'"):
        ovb.choose_precision("fp8")


def test_backend_auto_choice(builds, ckpt, monkeypatch, tmp_path):
    from aa_trt.backends import tensorrt as trt_runtime
    from aa_trt.backends.onnxruntime import OrtAnimator

    d, _ = builds["f32"]
    monkeypatch.setattr(trt_runtime, "unavailable", lambda: "no CUDA device")
    assert resolve_backend("auto") == ("openvino", "CPU build (no CUDA device), openvino installed")
    assert resolve_backend(None, tensorrt="off") == ("onnxruntime", "asked for")
    with pytest.raises(OptionError, match="tensorrt='on': contradicts `backend`"):
        resolve_backend("openvino", tensorrt="on")
    anim = animator_from_dir(d, ckpt)
    assert isinstance(anim, ovb.OvAnimator)
    assert (anim.backend_name, anim.backend_reason) == ("openvino f32", "built for f32")
    anim = animator_from_dir(d, ckpt, backend="onnxruntime")
    assert isinstance(anim, OrtAnimator) and anim.backend_reason == "asked for"
    # The same build where openvino is missing: onnxruntime, saying why.
    monkeypatch.setattr(ovb, "available", lambda: False)
    anim = animator_from_dir(d, ckpt)
    assert isinstance(anim, OrtAnimator) and anim.backend_name == "onnxruntime"
    assert anim.backend_reason == "no CUDA device; openvino not installed"
    assert resolve_backend("auto") == ("onnxruntime", "no CUDA device, openvino not installed")
    with pytest.raises(InputError, match="OpenVINO backend asked for, but openvino not installed"):
        animator_from_dir(d, ckpt, backend="openvino")


def test_cli_build_backend(ckpt, tmp_path, capsys):
    from aa_trt.cli import main

    out = tmp_path / "cli"
    common = ["build", "--ckpt", str(ckpt), "-o", str(out), "--height", "32", "--width", "32",
              "--frames", "4", "--graphs", "pose_guider"]
    assert main([*common, "--backend", "openvino", "--precision", "f32"]) == 0
    assert "OpenVINO f32 (asked for)" in capsys.readouterr().out
    m = json.loads((out / mf.MANIFEST).read_text())
    assert set(m["openvino"]["graphs"]) == {"pose_guider"} and m["openvino"]["precision"] == "f32"
    assert main([*common, "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--precision bf16: applies to the OpenVINO backend, not to onnxruntime"), err
    assert main([*common, "--backend", "openvino", "--tensorrt", "on"]) == 2
    assert "--tensorrt on: contradicts --backend 'openvino'" in capsys.readouterr().err


@pytest.mark.skipif(not BF16_HERE, reason="needs a CPU that OpenVINO lists BF16 on")
def test_timestep_embedding_kept_f32(builds, specs):
    """A bf16 compile keeps the nodes computed from the timestep alone (sinusoidal embedding and
    time MLP) in f32: found in the graph, f32 in the compiled model, and at t = 999 (where bf16
    rounds t to a multiple of 4) no worse than without the mark; an older build is refused."""
    import openvino as ov
    import torch

    d, m = builds["bf16"]
    assert m["openvino"]["keep_f32"] == ovb.KEEP_F32
    core = ov.Core()
    plain = core.read_model(str(d / "unet_uncond.onnx"))
    names = ovb.timestep_nodes(plain)
    kinds = {n.get_type_name() for n in plain.get_ordered_ops() if n.get_friendly_name() in names}
    assert {"Sin", "Cos", "MatMul"} <= kinds
    spec = specs["unet_uncond"]
    io_names = (tuple(spec.input_names), tuple(spec.output_names))
    marked = ovb.OvGraph.load(d / m["openvino"]["graphs"]["unet_uncond"]["file"], io_names, "bf16", 1)
    kept = {}  # compiled node kind -> its precisions, for nodes made of marked layers only
    for n in marked.compiled.get_runtime_model().get_ordered_ops():
        rt = n.get_rt_info()
        layers = {x for x in rt["originalLayersNames"].astype(str).split(",") if x}
        if layers and layers <= names:
            kept.setdefault(rt["layerType"].astype(str), set()).add(rt["runtimePrecision"].astype(str))
    # The sin/cos run in f32 (what bf16 broke), and so does t * f (below). The time MLP's matmuls, on
    # f16-stored weights, are still compiled for bf16 by the plugin: on a well-scaled embedding
    # that is ordinary bf16 rounding.
    assert kept.get("Math") == {"f32"}, kept
    # And nothing between the timestep input and sin/cos runs in bf16: the plugin runs shape ops
    # (an Unsqueeze of t, a split) in bf16 whatever their marks say, and bf16 rounds t = 999 to
    # 1000 (found on the half-width sd15 UNet: 3.6% relative L2 to torch fp32 on real inputs,
    # 1.1% once the embedding took sin/cos before any reshape; torch's own bf16 1.2%).
    path, todo = [], [n for n in marked.compiled.get_runtime_model().get_ordered_ops()
                      if n.get_rt_info()["layerType"].astype(str) == "Math"]
    while todo:
        n = todo.pop()
        path.append((n.get_friendly_name(), n.get_rt_info()["runtimePrecision"].astype(str)))
        todo += [i.get_source_output().get_node() for i in n.inputs()
                 if i.get_source_output().get_node().get_rt_info()["layerType"].astype(str) != "Const"]
    assert any(name == "timestep" for name, _ in path), path
    assert all(prec in ("f32", "i32", "i64") for _, prec in path), path
    cfg = ovb.compile_config("bf16", 1)
    unmarked = ovb.OvGraph(core.compile_model(plain, "CPU", cfg), io_names, "plain")
    inputs = spec.sample_inputs("opt", 5)
    inputs["timestep"] = torch.tensor([999.0])
    ref = ov_build.run_torch(spec, inputs)["prediction"]
    err = lambda g: float(np.linalg.norm(g(**inputs)["prediction"].numpy() - ref) / np.linalg.norm(ref))
    assert err(marked) <= err(unmarked) * 1.05
    copy = _edited(builds, d.parent / "k", lambda mm: mm["openvino"].update(precision="bf16", keep_f32=None))
    with pytest.raises(InputError, match="compiled by an older aa-trt") as e:
        ovb.OvAnimator.from_dir(copy)
    _one_line(e)
