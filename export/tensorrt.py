"""TensorRT engines from the checked ONNX graphs, written to TensorRT's documented Python API.

TensorRT cannot be installed on the project's machines (PyPI's tensorrt wheels download from
NVIDIA's index at install time), so this module is kept thin and imports tensorrt only inside its
functions. Per graph: parse the ONNX file (by path, so external weights load), one optimisation
profile from the GraphSpec's (min, opt, max) shapes, fp16 when asked, and one timing cache shared by
every graph and kept across builds. Engine files are named by precision and TensorRT version, so an
upgrade never loads a stale plan.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# The runtime owns TensorRT's import and the reasons it cannot run; the build asks the same questions.
from aa_trt.backends.tensorrt import INSTALL_HINT, import_tensorrt, unavailable  # noqa: F401

TIMING_CACHE = "timing.cache"


def engine_name(graph: str, fp16: bool, trt_version: str) -> str:
    return f"{graph}.{'fp16' if fp16 else 'fp32'}.trt{trt_version}.plan"


def build_engine(onnx_path, engine_path, profile: dict, fp16: bool = True, timing_cache=None,
                 workspace_gib: float | None = None, log: Callable[[str], None] = print) -> dict:
    """One serialized engine. profile: input name -> (min, opt, max) shapes (GraphSpec.profile())."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the flag exists (and is needed) before 10.
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)

    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    t = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    Path(engine_path).write_bytes(bytes(plan))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": Path(engine_path).name, "build_s": round(time.perf_counter() - t, 2),
            "fp16": fp16, "tensorrt": trt.__version__}


def build_engines(out_dir, specs: dict, manifest: dict, fp16: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Engines for every graph of the manifest, reusing those already built for the same graph file
    (same ONNX size), precision and TensorRT version."""
    trt = import_tensorrt()
    out_dir = Path(out_dir)
    old = manifest.get("engines") or {}
    engines = {}
    for name, entry in manifest["graphs"].items():
        path = out_dir / engine_name(name, fp16, trt.__version__)
        prev = old.get(name)
        if prev and path.exists() and prev.get("graph_files") == entry["files"]:
            engines[name] = prev
            continue
        info = build_engine(out_dir / f"{name}.onnx", path, specs[name].profile(), fp16,
                            out_dir / TIMING_CACHE, log=log)
        info["graph_files"] = entry["files"]
        engines[name] = info
        log(f"{name}: TensorRT {info['tensorrt']} engine ({'fp16' if fp16 else 'fp32'}) "
            f"in {info['build_s']:.1f} s")
    return engines
