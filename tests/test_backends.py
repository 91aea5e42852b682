"""aa_trt.backends: runtimes only (nothing from the exporter), and the one rule that picks a backend
for builds and runs alike."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from aa_trt.backends import BackendUnavailable, choose_backend
from aa_trt.errors import OptionError

BACKENDS_DIR = Path(__file__).resolve().parents[1] / "aa_trt" / "backends"


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(BACKENDS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_runtimes_never_import_the_exporter(path):
    # Build -> runtime, one way: export/ may import the backends, never the reverse.
    bad = {m for m in imported_modules(path) if m.split(".")[:2] == ["aa_trt", "export"]
           or m.split(".")[0] in ("onnx", "onnxscript", "polygraphy")}
    assert not bad, (path.name, bad)


def test_loading_the_runtimes_loads_no_exporter():
    code = ("import sys\n"
            "import aa_trt.backends, aa_trt.backends.declarations, aa_trt.backends.manifest\n"
            "import aa_trt.backends.graph_animator, aa_trt.backends.onnxruntime, aa_trt.backends.openvino\n"
            "import aa_trt.backends.tensorrt\n"
            "bad = [m for m in sys.modules if m.startswith('aa_trt.export') or m in ('onnx', 'onnxscript')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_exporter_reads_the_runtimes_declarations():
    from aa_trt.backends import declarations, manifest
    from aa_trt.export import graphs, manifest as written

    assert graphs.GRAPHS is declarations.GRAPHS and graphs.declared_names is declarations.declared_names
    assert written.read_manifest is manifest.read_manifest and written.MANIFEST == manifest.MANIFEST


def probes(**reasons):
    calls = []

    def probe(name):
        def f():
            calls.append(name)
            return reasons.get(name)
        return f
    return {n: probe(n) for n in ("tensorrt", "openvino")}, calls


def test_auto_takes_the_first_ready_backend_and_says_what_it_passed():
    unready, calls = probes(tensorrt="no CUDA device")
    assert choose_backend("auto", unready) == ("openvino", ["no CUDA device"])
    unready, _ = probes(tensorrt="no CUDA device", openvino="openvino not installed")
    assert choose_backend("auto", unready) == ("onnxruntime", ["no CUDA device", "openvino not installed"])
    unready, calls = probes()
    assert choose_backend("auto", unready) == ("tensorrt", []) and calls == ["tensorrt"]


def test_a_named_backend_must_be_ready_and_probes_only_itself():
    unready, calls = probes(tensorrt="no CUDA device")
    assert choose_backend("onnxruntime", unready) == ("onnxruntime", []) and calls == []
    assert choose_backend("openvino", unready) == ("openvino", []) and calls == ["openvino"]
    with pytest.raises(BackendUnavailable) as e:
        choose_backend("tensorrt", unready)
    assert (e.value.backend, e.value.reason) == ("tensorrt", "no CUDA device")
    with pytest.raises(OptionError, match="expected one of auto, tensorrt, openvino, onnxruntime"):
        choose_backend("cuda", unready)


def test_the_runtime_classes_carry_their_name_and_reason():
    from aa_trt.backends.onnxruntime import OrtAnimator
    from aa_trt.backends.openvino import OvAnimator
    from aa_trt.backends.tensorrt import TrtAnimator

    for cls, name in ((OrtAnimator, "onnxruntime"), (OvAnimator, "openvino"), (TrtAnimator, "tensorrt")):
        assert cls.backend_name == name and cls.backend_reason
