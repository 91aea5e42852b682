"""`aa-trt build`: checkpoint -> DIR of checked ONNX graphs (+ TensorRT engines or OpenVINO compiled
graphs, per backend).

Staged and cached: each graph is exported, checked (onnx.checker, full), run with onnxruntime against
PyTorch on random inputs, and recorded in DIR/manifest.json with its measured error; a graph whose
manifest entry still matches is reused, a stale one rebuilt. The manifest is rewritten after every
graph, so an interrupted build resumes where it stopped. The cond and uncond UNet steps keep one
copy of the UNet's weights between them (SHARED_WEIGHTS: one external data file both point into).
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
from aa_trt.export.onnx_io import (DEFAULT_OPSET, ExportError, check_graph, compare, data_file, export_graph,
                                   ort_session, share_weights)


# Graphs whose weights are written once into one shared external data file: the cond and uncond
# UNet steps run the same UNet (1.34 GB of fp32 weights each at half-width sd15).
SHARED_WEIGHTS = {"unet_cond": "unet.weights", "unet_uncond": "unet.weights"}
_LEGACY_TENSORRT = {"auto": "auto", "on": "tensorrt", "off": "onnxruntime"}


def _files(out_dir: Path, name: str) -> dict[str, int]:
    onnx_path = out_dir / f"{name}.onnx"
    files = {onnx_path.name: onnx_path.stat().st_size}
    data = out_dir / SHARED_WEIGHTS[name] if name in SHARED_WEIGHTS else data_file(onnx_path)
    if data.exists():
        files[data.name] = data.stat().st_size
    return files


def resolve_backend(backend: str | None = "auto", tensorrt: str | None = None) -> tuple[str, str]:
    """(backend, why) for a build, by the runs' own rule (aa_trt.backends.choose_backend):
    "tensorrt" engines on CUDA when importable, "openvino" compiled graphs on CPU when importable,
    else "onnxruntime" (the ONNX graphs alone, which every build has). tensorrt: the older switch
    (auto/on/off = backend auto without OpenVINO/tensorrt/onnxruntime)."""
    from aa_trt.backends import BackendUnavailable, choose_backend
    from aa_trt.backends import openvino as ovb
    from aa_trt.backends.tensorrt import unavailable as trt_unavailable
    from aa_trt.errors import OptionError

    if tensorrt is not None:
        if tensorrt not in _LEGACY_TENSORRT:
            raise OptionError("tensorrt", tensorrt, "expected auto, on or off")
        legacy = _LEGACY_TENSORRT[tensorrt]
        if backend not in (None, "auto", legacy):
            raise OptionError("tensorrt", tensorrt, f"contradicts `backend` {backend!r}; give one of them")
        backend = legacy if backend in (None, "auto") else backend
    backend = backend or "auto"
    # The older switch predates OpenVINO: its "auto" chose between TensorRT and onnxruntime only.
    ov_unready = (lambda: "--tensorrt builds no OpenVINO graphs") if tensorrt is not None else \
        (lambda: None if ovb.available() else "openvino not installed")
    try:
        name, passed = choose_backend(backend, {"tensorrt": trt_unavailable, "openvino": ov_unready})
    except BackendUnavailable as e:
        if e.backend == "tensorrt":
            raise ExportError(f"TensorRT engines asked for, but {e.reason}") from None
        raise ExportError(f"OpenVINO asked for, but openvino is not installed: {ovb.INSTALL_HINT}") from None
    if backend != "auto":
        return name, "asked for"
    if name == "tensorrt":
        return name, "TensorRT and a CUDA device are present"
    if name == "openvino":
        return name, f"CPU build ({passed[0]}), openvino installed"
    return name, passed[0] if tensorrt is not None else ", ".join(passed)


def _verify(spec, out_dir: Path, info: dict, key: dict) -> dict:
    """Check and measure one exported graph; its manifest entry."""
    path = out_dir / f"{spec.name}.onnx"
    t = time.perf_counter()
    check_graph(path)
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    session = ort_session(path, threads=torch.get_num_threads())
    result = compare(spec, session, "opt")
    del session
    verify_s = time.perf_counter() - t
    if not result["ok"]:
        raise ExportError(f"{spec.name}: onnxruntime differs from PyTorch by {result['max_abs_error']:.3g} "
                          f"(tolerance {spec.tolerance:g} x max(1, {result['ref_max_abs']:.3g}))")
    return {"key": key, "files": _files(out_dir, spec.name), **info, "check_s": round(check_s, 3),
            "verify_s": round(verify_s, 3), "max_abs_error": result["max_abs_error"],
            "ref_max_abs": result["ref_max_abs"], "verified_at": "opt", **spec.describe()}


def build_graph(spec, out_dir: Path, opset: int, key: dict) -> dict:
    """Export, check and measure one graph; its manifest entry."""
    info = export_graph(spec, out_dir / f"{spec.name}.onnx", opset)
    return _verify(spec, out_dir, info, key)


def build_shared(specs: list, out_dir: Path, opset: int, keys: dict, data_name: str,
                 log: Callable[[str], None] = print) -> dict:
    """Export graphs that hold the same weights, store those weights once (`data_name`), then
    check and measure each; their manifest entries."""
    infos = {s.name: export_graph(s, out_dir / f"{s.name}.onnx", opset) for s in specs}
    t = time.perf_counter()
    shared = share_weights([out_dir / f"{s.name}.onnx" for s in specs], out_dir / data_name)
    log(f"{', '.join(infos)}: weights stored once in {data_name} ({shared['bytes'] / 2**20:.1f} MiB; "
        f"{shared['shared_bytes'] / 2**20:.1f} MiB not repeated) in {time.perf_counter() - t:.1f} s")
    return {s.name: _verify(s, out_dir, dict(infos[s.name], shared_weights=shared), keys[s.name])
            for s in specs}


def build(checkpoint, out_dir, shapes: BuildShapes = BuildShapes(), opset: int = DEFAULT_OPSET,
          fp16: bool = False, graphs: tuple[str, ...] = GRAPHS, tensorrt: str | None = None,
          log: Callable[[str], None] = print, backend: str | None = None,
          precision: str | None = None, calibration=None) -> dict:
    """Build (or refresh) `out_dir` for `checkpoint` at `shapes`; returns the manifest.

    The ONNX graphs are fp32 masters (onnxruntime's CPU provider has few fp16 kernels, and the VAE
    overflows in fp16), checked with onnxruntime in every build. backend (resolve_backend): "auto"
    (TensorRT engines on CUDA, OpenVINO on CPU where importable, else the graphs alone),
    "tensorrt" (required), "openvino" (required; `precision` None/"auto", "bf16" or "f32", see
    aa_trt.backends.openvino.choose_precision) or "onnxruntime". precision "int8" quantizes the
    denoising UNet's graphs, calibrated on `calibration` (an export.int8.CalibrationSource;
    None: the bundled example, 8 steps, seed 0). `fp16` selects the precision of
    the TensorRT engines. tensorrt: the older switch, "auto", "on" (= backend "tensorrt") or
    "off" (= "onnxruntime").
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise ValueError(f"unknown graphs {sorted(unknown)}; choose from {', '.join(GRAPHS)}")
    backend, backend_why = resolve_backend(backend, tensorrt)
    ov_precision = None
    if precision not in (None, "auto") and backend != "openvino":
        from aa_trt.errors import OptionError

        raise OptionError("precision", precision, f"applies to the OpenVINO backend, not to {backend}")
    if backend == "openvino":
        from aa_trt.backends import openvino as ovb

        ov_precision, ov_why = ovb.choose_precision(precision)
    if calibration is not None and ov_precision != "int8":
        from aa_trt.errors import OptionError

        raise OptionError("calibration", "given", "applies to `precision` int8 only")
    if ov_precision == "int8":
        from aa_trt.export import int8

        int8.import_nncf()  # before any export: a missing nncf is one line, not minutes later
        calibration = (calibration or int8.CalibrationSource()).resolved()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sha = file_sha256(checkpoint)
    log(f"checkpoint {checkpoint.name}: sha256 {sha[:12]} ({time.perf_counter() - t0:.1f} s)")
    log(f"backend {backend} ({backend_why})" + (f", OpenVINO {ov_precision} ({ov_why})" if ov_precision else "")
        + (f" on {ovb.int8_support()}, the rest {ovb.inference_hint('int8')}" if ov_precision == "int8" else ""))
    models = load_checkpoint(checkpoint, dtype=torch.float32)
    specs = graph_specs(models, shapes)

    old = mf.read_manifest(out_dir) or {}
    manifest = {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "aa_trt_version": __version__,
        "checkpoint": {"path": str(checkpoint), "sha256": sha, "size": checkpoint.stat().st_size},
        "config": models.config.to_dict(), "shapes": shapes.to_dict(), "opset": opset,
        "precision": {"onnx": "fp32", "engines": "fp16" if fp16 else "fp32", "openvino": ov_precision},
        "backend": {"name": backend, "reason": backend_why},
        "libraries": mf.library_versions(), "complete": False, "graphs": {},
    }
    keys = {}
    for name in graphs:
        keys[name] = mf.graph_key(sha, shapes.to_dict(), opset, specs[name].describe())
        if name in SHARED_WEIGHTS:
            keys[name]["shared_weights"] = SHARED_WEIGHTS[name]
    fresh = {n for n in graphs if not mf.reusable(out_dir, old.get("graphs", {}).get(n), keys[n])}
    # Graphs sharing a weight file are rebuilt together: the file is rewritten for all of them.
    fresh |= {n for n in graphs if n in SHARED_WEIGHTS
              and any(SHARED_WEIGHTS.get(f) == SHARED_WEIGHTS[n] for f in fresh)}
    for name in graphs:
        entry = old.get("graphs", {}).get(name)
        if name not in fresh:
            log(f"{name}: up to date (max abs error {entry['max_abs_error']:.2e}), reused")
            manifest["graphs"][name] = entry
            mf.write_manifest(out_dir, manifest)
            continue
        if name in manifest["graphs"]:  # built with the first graph of its shared group
            continue
        if name in SHARED_WEIGHTS:
            group = [n for n in graphs if n in fresh and SHARED_WEIGHTS.get(n) == SHARED_WEIGHTS[name]]
            built = build_shared([specs[n] for n in group], out_dir, opset, keys, SHARED_WEIGHTS[name], log)
        else:
            built = {name: build_graph(specs[name], out_dir, opset, keys[name])}
        for n, e in built.items():
            why = "new" if old.get("graphs", {}).get(n) is None else "stale"
            manifest["graphs"][n] = e
            log(f"{n}: {why}, exported in {e['export_s']:.1f} s, checked, onnxruntime vs torch "
                f"max abs error {e['max_abs_error']:.2e}")
        mf.write_manifest(out_dir, manifest)
    manifest["graphs"] = {n: manifest["graphs"][n] for n in graphs}  # declaration order

    if backend == "tensorrt":
        from aa_trt.export import tensorrt as trt_build

        manifest["engines"] = trt_build.build_engines(
            out_dir, specs, {**manifest, "engines": old.get("engines")}, fp16=fp16, log=log)
    elif backend == "openvino":
        from aa_trt.export import openvino as ov_build

        calibrator = None
        if ov_precision == "int8":
            from aa_trt.export import int8

            calibrator = int8.Calibrator(models, shapes, specs, calibration, log)
        manifest["openvino"] = ov_build.compile_graphs(
            out_dir, specs, manifest, old.get("openvino"), ov_precision, ov_why,
            threads=torch.get_num_threads(), log=log, calibrator=calibrator)
    elif backend_why != "asked for":  # auto found neither TensorRT nor OpenVINO
        log(f"TensorRT engines skipped ({backend_why}): the ONNX graphs run with onnxruntime")
    manifest["complete"] = True
    manifest["build_s"] = round(time.perf_counter() - t0, 2)
    mf.write_manifest(out_dir, manifest)
    return manifest
