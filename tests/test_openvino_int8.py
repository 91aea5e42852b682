"""`aa-trt build --backend openvino --precision int8` on the tiny preset (32x32): the denoising
UNet's graphs quantized by NNCF on a calibration render of the bundled example, checked against
torch, recorded in the manifest, run by `run --engine`; a CPU without int8 units refused.

Tolerances (aa_trt.export.openvino): int8 graphs relative L2 <= INT8_REL_L2 on calibration inputs
and INT8_RANDOM_REL_L2 on seeded random inputs (the tiny preset's random weights are int8's worst
case: see that module's docstring for what was measured). ~110 s on 2 cores, almost all of it
NNCF's two quantizations of the tiny UNet (its graph work, not its arithmetic).
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx not installed (pip install 'aa-trt[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'aa-trt[openvino]')")

from aa_trt.backends import openvino as ovb  # noqa: E402
from aa_trt.checkpoint import load_checkpoint  # noqa: E402
from aa_trt.config import PRESETS  # noqa: E402
from aa_trt.export import int8  # noqa: E402
from aa_trt.export import manifest as mf  # noqa: E402
from aa_trt.export import openvino as ov_build  # noqa: E402
from aa_trt.export.build import build  # noqa: E402
from aa_trt.export.graphs import GRAPHS, BuildShapes, graph_specs  # noqa: E402
from helpers import save_tiny_checkpoint  # noqa: E402

SHAPES = BuildShapes(height=32, width=32, frames=4, windows=2, decode_chunk=4, pose_chunk=4)
STEPS = 2  # calibration steps: 2 samples per UNet graph (t = 999 and 499)
pytestmark = pytest.mark.usefixtures("one_thread_module")
INT8_HERE = ovb.int8_support()
needs_int8 = pytest.mark.skipif(INT8_HERE is None, reason="this CPU has no int8 dot-product unit "
                                "(amx_int8, avx512_vnni or avx_vnni), or OpenVINO does not list INT8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", 0)


@pytest.fixture(scope="module")
def specs(ckpt):
    return graph_specs(load_checkpoint(ckpt), SHAPES)


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    """(DIR, manifest, log lines) of the int8 build, calibrated on the bundled example."""
    pytest.importorskip("nncf", reason="nncf not installed (pip install 'aa-trt[openvino]')")
    if INT8_HERE is None:
        pytest.skip("this CPU has no int8 dot-product unit")
    d = tmp_path_factory.mktemp("int8")
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        if ovb.inference_hint("int8") != ovb.INT8_REST_FALLBACK:
            mp.setattr(ov_build, "compare", _fails_once(ov_build.compare, "unet_uncond"))
        m = build(ckpt, d, SHAPES, backend="openvino", precision="int8",
                  calibration=int8.CalibrationSource(steps=STEPS), log=logs.append)
    return d, m, logs


def _fails_once(compare, name: str):
    """`compare` whose checks of the first compiled graph `name` on calibration inputs report a miss
    (all of them: the build keeps the worst of its samples): the build
    must then compile that graph again with its unquantized nodes in INT8_REST_FALLBACK (what a
    bf16 rest did to the tiny unet_cond on an AMX-INT8 CPU), on any CPU."""
    first = []  # the first compiled graph of `name`: all its calibration checks miss

    def wrapped(spec, graph, precision, *args, **kwargs):
        r = compare(spec, graph, precision, *args, **kwargs)
        if spec.name == name and precision == "int8" and kwargs.get("inputs") is not None:
            first[:] = first or [graph]
            if graph is first[0]:
                r = dict(r, ok=False)
        return r
    return wrapped


@needs_int8
def test_manifest_records_int8(built):
    import nncf

    d, m, logs = built
    part = m["openvino"]
    assert part["precision"] == "int8" and m["precision"]["openvino"] == "int8"
    q = part["int8"]
    assert q["isa"] == INT8_HERE and q["isa"] in ovb.INT8_FLAGS
    assert q["rest"] == ovb.inference_hint("int8") and q["nncf"] == nncf.__version__
    assert q["quantized"] == ["unet_cond", "unet_uncond"]
    cal = q["calibration"]
    assert cal["samples"] == {"unet_cond": STEPS, "unet_uncond": STEPS}
    assert (cal["steps"], cal["seed"], cal["frames"]) == (STEPS, 0, SHAPES.frames)
    assert cal["video"].endswith("dance.mp4") and cal["ref"].endswith("ref.png") and cal["nncf"] == nncf.__version__
    assert len(cal["key"]["video_sha256"]) == 64
    assert sum("int8 calibration:" in s for s in logs) == 1
    forced = q["rest"] != ovb.INT8_REST_FALLBACK  # the fixture made unet_uncond's first compile miss
    if forced:
        assert part["graphs"]["unet_uncond"]["rest"] == ovb.INT8_REST_FALLBACK
        assert any(s.startswith("unet_uncond: OpenVINO int8 differs") and s.endswith(
            f"again with them in {ovb.INT8_REST_FALLBACK}") for s in logs), logs
    for name, e in part["graphs"].items():
        want = "int8" if name in int8.QUANTIZED else q["rest"]
        assert e["precision"] == want and e["file"] == ovb.blob_name(name, want), name
        assert e.get("rest") in ((None, ovb.INT8_REST_FALLBACK) if want == "int8" else (None,)), (name, e)
        assert (d / e["file"]).stat().st_size == e["size"] > 0, name
        if want == "int8":
            assert 0 < e["rel_l2"] <= ov_build.INT8_RANDOM_REL_L2, (name, e)
            assert 0 < e["rel_l2_calibration"] <= ov_build.INT8_REL_L2, (name, e)
            assert e["calibration"] == cal["key"]
    on_disk = json.loads((d / mf.MANIFEST).read_text())
    assert on_disk["openvino"]["int8"] == q


@needs_int8
@pytest.mark.parametrize("name", int8.QUANTIZED)
def test_int8_graph_matches_torch(built, specs, name):
    """The compiled blob, loaded as `run` loads it: int8 matmuls and convolutions inside, within
    the int8 tolerance of torch on other seeds and profile points than the build checked."""
    d, m, _ = built
    spec = specs[name]
    names = (tuple(spec.input_names), tuple(spec.output_names))
    entry = m["openvino"]["graphs"][name]
    graph = ovb.OvGraph.load(d / entry["file"], names, "int8", 1, entry.get("rest"))
    kinds = {}
    for n in graph.compiled.get_runtime_model().get_ordered_ops():
        rt = n.get_rt_info()
        kinds.setdefault(rt["runtimePrecision"].astype(str), set()).add(rt["layerType"].astype(str))
    assert {"Convolution", "FullyConnected"} & (kinds.get("i8", set()) | kinds.get("u8", set())), kinds
    for seed, point in enumerate(("min", "opt")):
        r = ov_build.compare(spec, graph, "int8", point, seed=20 + seed)
        assert 0 < r["rel_l2"] <= ov_build.INT8_RANDOM_REL_L2, (name, point, r)


@needs_int8
@pytest.mark.parametrize("name", int8.QUANTIZED)
def test_unquantized_nodes_stay_unquantized(built, specs, name):
    """int8.unquantized_nodes: the compiled graph runs the motion modules', the outermost level's
    and the other listed layers' GEMMs in the build's other precision, the rest in int8."""
    import re

    d, m, _ = built
    spec = specs[name]
    entry = m["openvino"]["graphs"][name]
    graph = ovb.OvGraph.load(d / entry["file"], (tuple(spec.input_names), tuple(spec.output_names)), "int8", 1,
                             entry.get("rest"))
    patterns = int8.unquantized_nodes(len(PRESETS["tiny"].unet.block_out_channels))
    precision = {"kept": {}, "quantized": {}}
    for n in graph.compiled.get_runtime_model().get_ordered_ops():
        rt = n.get_rt_info()
        if rt["layerType"].astype(str) not in ("FullyConnected", "Convolution"):
            continue
        names = rt["originalLayersNames"].astype(str).split(",")  # a FullyConnected is named after its bias Add
        if "time_embedding" in names[0]:
            continue
        kind = "kept" if any(re.match(p, n) for p in patterns for n in names) else "quantized"
        precision[kind][names[0]] = rt["runtimePrecision"].astype(str)
    kept = {p for p in patterns if any(re.match(p, f) for f in precision["kept"])}
    assert len(kept) == len(patterns), (patterns, sorted(precision["kept"]))  # each pattern found
    assert set(precision["kept"].values()) == {entry.get("rest") or m["openvino"]["int8"]["rest"]}, precision
    assert set(precision["quantized"].values()) & {"i8", "u8"}, precision


def test_unet_levels_and_unquantized_nodes_follow_the_graph():
    """The outermost up block is named from the graph's own level count, not from sd15's."""
    pytest.importorskip("openvino")
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    h = x
    for i in range(3):
        h = ops.relu(h)
        h.set_friendly_name(f"/unet/up_blocks.{i}/act/Relu")
    assert int8.unet_levels(ov.Model([h], [x])) == 3
    assert r".*/up_blocks\.(1|2)/.*" in int8.unquantized_nodes(3)
    with pytest.raises(Exception, match="up_blocks"):
        int8.unet_levels(ov.Model([ops.relu(x)], [x]))


@needs_int8
def test_rebuild_reuses_int8_without_calibrating(built, ckpt, tmp_path):
    d, _, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    logs: list[str] = []
    m = build(ckpt, copy, SHAPES, backend="openvino", precision="int8",
              calibration=int8.CalibrationSource(steps=STEPS), log=logs.append)
    assert sum("blob up to date, reused" in s for s in logs) == len(GRAPHS), logs
    assert not any("int8 calibration" in s for s in logs)
    assert m["openvino"]["int8"]["calibration"]["samples"] == {"unet_cond": STEPS, "unet_uncond": STEPS}


@needs_int8
def test_cli_run_engine_int8(built, ckpt, tmp_path, capsys):
    """`aa-trt run --engine DIR` on the int8 build: frames of the right shape, int8 said, and
    closer to torch's than another seed's frames are."""
    from aa_trt.cli import main as cli
    from media import make_reference, make_video, probe, stick_frames

    d, _, _ = built
    ref = make_reference(tmp_path / "ref.png", (32, 32))
    dance = make_video(tmp_path / "dance.mp4", stick_frames(6, (32, 32)), fps=8)
    base = [str(ref), str(dance), "--ckpt", str(ckpt), "--pose-video", "--steps", "2",
            "--context-frames", "4", "--context-overlap", "2", "--width", "32", "--height", "32", "--quiet"]
    fp32 = ["--dtype", "fp32"]
    assert cli(["run", *base, "--seed", "5", "--json", "-o", str(tmp_path / "int8.mp4"), "--engine", str(d)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["backend"] == "OvAnimator" and out["precision"] == "openvino int8", out
    assert cli(["run", *base, *fp32, "--seed", "5", "-o", str(tmp_path / "torch.mp4")]) == 0
    assert cli(["run", *base, *fp32, "--seed", "6", "-o", str(tmp_path / "other.mp4")]) == 0
    a, b, c = (probe(tmp_path / f)["pixels"].astype(float) / 255 for f in ("torch.mp4", "int8.mp4", "other.mp4"))
    assert a.shape == b.shape == (6, 32, 32, 3)
    same, other = np.abs(a - b).mean(), np.abs(a - c).mean()
    assert same < 0.1 and other > 1.5 * same, (same, other)


# ---------------------------------------------------------------------------------- refusals
def test_cli_refuses_cpu_without_int8(ckpt, tmp_path, capsys, monkeypatch):
    """A CPU without int8 units: one line naming --precision, exit code 2, no folder left; the
    calibration flags without int8 are refused too."""
    from aa_trt.cli import main

    monkeypatch.setattr(ovb, "int8_support", lambda: None)
    out = tmp_path / "cli"
    common = ["build", "--ckpt", str(ckpt), "-o", str(out), "--height", "32", "--width", "32",
              "--frames", "4", "--backend", "openvino"]
    assert main([*common, "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--precision int8: this CPU has no int8 dot-product unit" in err, err
    assert "avx512_vnni" in err and not out.exists()
    monkeypatch.undo()
    assert main([*common, "--precision", "f32", "--calibration-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("given: applies to --precision int8 only"), err
    # With an int8 unit (faked, so that this holds on any CPU): a missing calibration file, and a
    # missing nncf, are one line each before any export.
    monkeypatch.setattr(ovb, "int8_support", lambda: "avx512_vnni")
    assert main([*common, "--precision", "int8", "--calibration-ref", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(f"--calibration-ref {tmp_path / 'nope.png'}: no such file"), err
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError
    assert main([*common, "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install nncf" in err and not out.exists(), err


def test_int8_precision_choice(monkeypatch):
    from aa_trt.errors import OptionError

    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("BF16", "FP32", "INT8"))
    monkeypatch.setattr(ovb, "int8_support", lambda: "avx512_vnni")
    assert ovb.choose_precision("int8") == ("int8", "asked for")
    assert ovb.choose_precision() == ("bf16", "CPU lists BF16")  # auto never quantizes
    assert ovb.choose_precision(None, ("int8", "asked for")) == ("int8", "built for int8")
    assert ovb.inference_hint("int8") == "bf16" and ovb.keep_f32("int8") == ovb.KEEP_F32
    monkeypatch.setattr(ovb, "int8_support", lambda: "amx_int8")  # bf16 too; per-graph f32 fallback
    assert ovb.inference_hint("int8") == "bf16" and ovb.keep_f32("int8") == ovb.KEEP_F32
    assert ovb.compile_config("int8", rest="f32")["INFERENCE_PRECISION_HINT"] == "f32"
    assert ovb.compile_config("int8")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert ovb.compile_config("bf16", rest="f32")["INFERENCE_PRECISION_HINT"] == "bf16"  # int8 graphs only
    monkeypatch.setattr(ovb, "int8_support", lambda: "avx512_vnni")
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("FP32", "INT8"))
    assert ovb.inference_hint("int8") == "f32" and ovb.keep_f32("int8") is None
    monkeypatch.setattr(ovb, "int8_support", lambda: None)
    # An int8 build on a CPU without int8 units runs in another precision, which it then does not match.
    assert ovb.choose_precision(None, ("int8", "asked for"))[0] == "f32"
    with pytest.raises(OptionError, match="precision='int8': this CPU has no int8 dot-product unit"):
        ovb.choose_precision("int8")


def test_int8_support_reads_flags(monkeypatch):
    from aa_trt import precision

    def machine(flags):
        return lambda: precision.Machine(False, "test", frozenset(flags))

    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("FP32", "INT8"))
    monkeypatch.setattr(precision.Machine, "detect", machine({"avx2", "avx512_vnni", "amx_int8"}))
    assert ovb.int8_support() == "amx_int8"
    monkeypatch.setattr(precision.Machine, "detect", machine({"avx2", "avx_vnni"}))
    assert ovb.int8_support() == "avx_vnni"
    monkeypatch.setattr(precision.Machine, "detect", machine({"avx2", "avx512f"}))
    assert ovb.int8_support() is None
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ("FP32",))
    monkeypatch.setattr(precision.Machine, "detect", machine({"avx512_vnni"}))
    assert ovb.int8_support() is None
