"""`aa-trt build`: checkpoint -> DIR of checked ONNX graphs (+ TensorRT engines where importable).

Staged and cached: each graph is exported, checked (onnx.checker, full), run with onnxruntime against
PyTorch on random inputs, and recorded in DIR/manifest.json with its measured error; a graph whose
manifest entry still matches is reused, a stale one rebuilt. The manifest is rewritten after every
graph, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from aa_trt import __version__
from aa_trt.checkpoint import load_checkpoint
from aa_trt.files import file_sha256
from aa_trt.export import manifest as mf
from aa_trt.export.graphs import GRAPHS, BuildShapes, graph_specs
from aa_trt.export.onnx_io import DEFAULT_OPSET, ExportError, check_graph, compare, data_file, export_graph, ort_session


def _files(out_dir: Path, name: str) -> dict[str, int]:
    onnx_path = out_dir / f"{name}.onnx"
    files = {onnx_path.name: onnx_path.stat().st_size}
    data = data_file(onnx_path)
    if data.exists():
        files[data.name] = data.stat().st_size
    return files


def build_graph(spec, out_dir: Path, opset: int, key: dict) -> dict:
    """Export, check and measure one graph; its manifest entry."""
    path = out_dir / f"{spec.name}.onnx"
    info = export_graph(spec, path, opset)
    t = time.perf_counter()
    check_graph(path)
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    session = ort_session(path, threads=torch.get_num_threads())
    result = compare(spec, session, "opt")
    verify_s = time.perf_counter() - t
    if not result["ok"]:
        raise ExportError(f"{spec.name}: onnxruntime differs from PyTorch by {result['max_abs_error']:.3g} "
                          f"(tolerance {spec.tolerance:g} x max(1, {result['ref_max_abs']:.3g}))")
    return {"key": key, "files": _files(out_dir, spec.name), **info, "check_s": round(check_s, 3),
            "verify_s": round(verify_s, 3), "max_abs_error": result["max_abs_error"],
            "ref_max_abs": result["ref_max_abs"], "verified_at": "opt", **spec.describe()}


def build(checkpoint, out_dir, shapes: BuildShapes = BuildShapes(), opset: int = DEFAULT_OPSET,
          fp16: bool = False, graphs: tuple[str, ...] = GRAPHS, tensorrt: str = "auto",
          log: Callable[[str], None] = print) -> dict:
    """Build (or refresh) `out_dir` for `checkpoint` at `shapes`; returns the manifest.

    The ONNX graphs are fp32 masters (onnxruntime's CPU provider has few fp16 kernels, and the VAE
    overflows in fp16); `fp16` selects the precision of the TensorRT engines built from them.
    tensorrt: "auto" builds engines when TensorRT and a CUDA device are present, "on" requires
    them, "off" skips them.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise ValueError(f"unknown graphs {sorted(unknown)}; choose from {', '.join(GRAPHS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sha = file_sha256(checkpoint)
    log(f"checkpoint {checkpoint.name}: sha256 {sha[:12]} ({time.perf_counter() - t0:.1f} s)")
    models = load_checkpoint(checkpoint, dtype=torch.float32)
    specs = graph_specs(models, shapes)

    old = mf.read_manifest(out_dir) or {}
    manifest = {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "aa_trt_version": __version__,
        "checkpoint": {"path": str(checkpoint), "sha256": sha, "size": checkpoint.stat().st_size},
        "config": models.config.to_dict(), "shapes": shapes.to_dict(), "opset": opset,
        "precision": {"onnx": "fp32", "engines": "fp16" if fp16 else "fp32"},
        "libraries": mf.library_versions(), "complete": False, "graphs": {},
    }
    for name in graphs:
        spec = specs[name]
        key = mf.graph_key(sha, shapes.to_dict(), opset, spec.describe())
        entry = old.get("graphs", {}).get(name)
        if mf.reusable(out_dir, entry, key):
            log(f"{name}: up to date (max abs error {entry['max_abs_error']:.2e}), reused")
            manifest["graphs"][name] = entry
        else:
            why = "new" if entry is None else "stale"
            manifest["graphs"][name] = build_graph(spec, out_dir, opset, key)
            e = manifest["graphs"][name]
            log(f"{name}: {why}, exported in {e['export_s']:.1f} s, checked, onnxruntime vs torch "
                f"max abs error {e['max_abs_error']:.2e}")
        mf.write_manifest(out_dir, manifest)

    if tensorrt != "off":
        from aa_trt.export import tensorrt as trt_build

        reason = trt_build.unavailable()
        if reason is None:
            manifest["engines"] = trt_build.build_engines(
                out_dir, specs, {**manifest, "engines": old.get("engines")}, fp16=fp16, log=log)
        elif tensorrt == "on":
            raise ExportError(f"TensorRT engines asked for, but {reason}")
        else:
            log(f"TensorRT engines skipped ({reason}): the ONNX graphs run with onnxruntime")
    manifest["complete"] = True
    manifest["build_s"] = round(time.perf_counter() - t0, 2)
    mf.write_manifest(out_dir, manifest)
    return manifest
