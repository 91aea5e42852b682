"""ONNX Runtime (CPU provider) against torch for each exported graph, tiny preset, one thread.

Both sides run the same traceable wrapper on the same seeded inputs at the build's "max" profile
point: torch calls the wrapper, onnxruntime the graph `aa-trt build` wrote from it. The ratio is
torch time / onnxruntime time per round (above 1: the graph is faster). Tiny widths weigh per-op
overheads heavily, which is where a graph runtime differs most from eager torch.
"""
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install .[export])")

from aa_trt.backends.onnxruntime import OrtGraph  # noqa: E402
from aa_trt.checkpoint import save_models  # noqa: E402
from aa_trt.export.build import build  # noqa: E402
from aa_trt.export.graphs import GRAPHS, BuildShapes, graph_specs  # noqa: E402

from .timing import PER_ROUND, compare  # noqa: E402

SHAPES = BuildShapes(height=64, width=64, frames=24, windows=1, decode_chunk=8, pose_chunk=16)


@pytest.fixture(scope="module")
def graphs(tiny_animator, tmp_path_factory):
    models = tiny_animator.models
    d = tmp_path_factory.mktemp("ort")
    ckpt = save_models(d / "tiny.safetensors", models)
    build(ckpt, d / "graphs", SHAPES, log=lambda s: None, tensorrt="off")
    return d / "graphs", graph_specs(models, SHAPES)


@pytest.mark.benchmark(group="onnxruntime-vs-torch-tiny-cpu")
@pytest.mark.parametrize("name", GRAPHS)
def test_graph_speed(benchmark, graphs, name, one_thread, rounds, record):
    folder, specs = graphs
    spec = specs[name]
    named = spec.sample_inputs("max")
    inputs = list(named.values())
    session = OrtGraph(folder / f"{name}.onnx", threads=1)
    module = spec.module.eval()

    def eager():
        with torch.no_grad():
            return module(*inputs)

    s = compare(benchmark, lambda: session(**named), eager, rounds).summary()
    dims = spec.point("max")
    benchmark.extra_info.update(s, dims=dims)
    record(f"onnxruntime vs torch: {name} (tiny, 64x64, {dims}, CPU fp32, 1 thread)", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND, details=s)
