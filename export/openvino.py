"""OpenVINO graphs from the checked ONNX graphs: compiled for this CPU's precision, cached in DIR,
and measured against PyTorch at build time.

Cached as OpenVINO's own compiled blobs (`CompiledModel.export_model`, loaded by `Core.import_model`)
rather than through CACHE_DIR or IR files: a blob is the compiled model itself (no compile at run:
0.45 s to import the tiny UNet step against 2.5 s to compile it), it has a name the manifest can
record with its size and key, and a stale one is refused rather than silently recompiled under a
hashed name. Each blob's manifest entry holds the graph's key and files it was compiled from; the
OpenVINO section holds the OpenVINO version, the precision and the weights' storage. Anything else
is recompiled. A blob holds its own copy of the weights: for bf16 they are stored in f16 (half the
size, 0.68 GB instead of 1.34 GB for the half-width sd15 UNet step, no measurable cost in error or
time); f32 keeps them in f32.

Tolerances, per precision, on seeded random inputs at the "opt" profile point:
- f32: max |ov - torch| <= the graph's own onnxruntime tolerance x max(1, max |torch|).
- bf16: relative L2, ||ov - torch|| / ||torch||, <= BF16_REL_L2 for every output. bf16 keeps 8
  significant bits (unit roundoff 2^-9 = 0.2%) and the error grows with depth. Measured on the tiny
  preset (random weights, seed 1, "opt" point, f16-stored weights): CLIP 0.5%, VAE encoder 2.1%,
  decoder 1.0%, PoseGuider 0.2%, reference K/V 1.2%, UNet steps 5.7-6.2%, where torch's own bf16
  (the module cast to bf16; seeds 1-3) gives 0.6%, 1.4-1.6%, 1.1%, 0.2%, 1.2-1.6% and 2.4-6.3%.
  The tiny UNet's error grows with the timestep: 1.7% at t=5, 3.7% at t=500, 11.0% at t=999
  (torch bf16: 1.8%, 1.5%, 5.6%). Half-width sd15 UNet step (16 rows, 32x32 latents): 1.02%
  (torch bf16 1.09%). 15% holds all of that; a wrong graph (wiring, weights) is off by ~100%.
- int8 (the graphs of aa_trt.export.int8.QUANTIZED; an int8 build's other graphs are checked as
  the bf16 or f32 graphs they are): relative L2 <= INT8_REL_L2 for every output, both on the
  seeded random inputs and on the first and last calibration samples (t = 999 and the smallest t
  of the calibration render: the real inputs the ranges were taken from); INT8_RANDOM_REL_L2 on
  the seeded random inputs, which fall partly outside the calibrated ranges (random pose
  features, K/V and contexts are unlike any real ones). Measured on the tiny preset (random
  weights: 32-64 channels without outlier structure, int8's worst case): calibration inputs
  7-8%, random inputs 18-37% (seeds 1, 20, 21; "min" and "opt"). Half-width sd15 unet_cond on
  random inputs: 8.1% (bf16 0.96%). 15% and 60% hold that with room for other CPUs' rounding;
  a wrong graph is off by >= 100%.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aa_trt.backends import openvino as ovb
from aa_trt.export.onnx_io import ExportError, run_torch

BF16_REL_L2 = 0.15
INT8_REL_L2 = 0.15         # on calibration inputs
INT8_RANDOM_REL_L2 = 0.6   # on seeded random inputs
REL_L2 = {"bf16": BF16_REL_L2, "int8": INT8_RANDOM_REL_L2}


def tolerance(precision: str) -> dict:
    if precision == "int8":
        return {"metric": "rel_l2", "rel_l2_calibration": INT8_REL_L2, "rel_l2_random": INT8_RANDOM_REL_L2,
                "calibration_inputs": "the first and last calibration samples",
                "random_inputs": "seeded random inputs at opt, seed 1",
                "other_graphs": tolerance(ovb.inference_hint("int8"))}
    if precision == "bf16":
        return {"metric": "rel_l2", "rel_l2": BF16_REL_L2}
    return {"metric": "max_abs", "max_abs": "the graph's tolerance x max(1, max |torch|)"}


def compare(spec, graph, precision: str, dims="opt", seed: int = 1, inputs: dict | None = None) -> dict:
    """Seeded random inputs (never zeros), or the given `inputs` (arrays or tensors by name), through
    PyTorch and the OpenVINO graph: max abs error, relative L2 (worst output), the reference's
    scale, and whether the precision's tolerance holds (int8: INT8_RANDOM_REL_L2 on random
    inputs, INT8_REL_L2 on given ones)."""
    limits = dict(REL_L2, int8=INT8_REL_L2) if inputs is not None else REL_L2
    if inputs is None:
        inputs = spec.sample_inputs(dims, seed)
    else:
        inputs = {n: torch.as_tensor(x) for n, x in inputs.items()}
    ref = run_torch(spec, inputs)
    got = graph(**inputs)
    err = scale = rel = 0.0
    for name in spec.output_names:
        g, r = got[name].double().numpy(), ref[name].astype(np.float64)
        if g.shape != r.shape:
            raise ExportError(f"{spec.name}: OpenVINO output {name} has shape {g.shape}, torch gives {r.shape}")
        err = max(err, float(np.abs(g - r).max()))
        scale = max(scale, float(np.abs(r).max()))
        rel = max(rel, float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
    ok = rel <= limits[precision] if precision in limits else err <= spec.tolerance * max(1.0, scale)
    return {"max_abs_error": err, "ref_max_abs": scale, "rel_l2": rel, "ok": ok}


def _limit(spec, precision: str, calibration: bool = False) -> str:
    if precision == "int8" and calibration:
        return f"relative L2 {INT8_REL_L2:g} on calibration inputs"
    return f"relative L2 {REL_L2[precision]:g}" if precision in REL_L2 \
        else f"max abs {spec.tolerance:g} x max(1, max |torch|)"


def _on_calibration(spec, graph, samples: list[dict]) -> dict:
    """`compare` on the first and last calibration samples (t = 999 and the render's smallest t):
    the worst of the two."""
    worst = None
    for sample in dict.fromkeys((0, len(samples) - 1)):
        r = compare(spec, graph, "int8", inputs=samples[sample])
        worst = r if worst is None or r["rel_l2"] > worst["rel_l2"] else worst
    return worst


def compile_graphs(out_dir, specs: dict, manifest: dict, old: dict | None, precision: str, why: str,
                   threads: int | None = None, log: Callable[[str], None] = print, calibrator=None) -> dict:
    """The manifest's "openvino" section: every graph of the manifest compiled for `precision`,
    its blob in `out_dir`, checked against torch; blobs still matching (same graph key and files,
    same OpenVINO, same precision; for int8 graphs the same calibration) are reused. int8: the
    graphs of int8.QUANTIZED are quantized on `calibrator`'s recording (an int8.Calibrator, asked
    only when one of them is compiled), the others compiled in `ovb.inference_hint("int8")`; an
    int8 graph that misses its check is compiled again with its unquantized nodes in
    `ovb.INT8_REST_FALLBACK` (its entry's "rest")."""
    from aa_trt.export import int8

    out_dir = Path(out_dir)
    version = ovb.openvino_version()
    hint = ovb.inference_hint(precision)  # what runs unquantized
    weights = "f16" if hint == "bf16" else "f32"  # see OvGraph.compile
    keep = ovb.keep_f32(precision)  # see OvGraph.compile
    same = bool(old) and (old.get("version"), old.get("precision"), old.get("weights"), old.get("keep_f32")) \
        == (version, precision, weights, keep)
    prev_graphs = (old or {}).get("graphs", {}) if same else {}
    part = {"version": version, "precision": precision, "reason": why, "weights": weights, "keep_f32": keep,
            "capabilities": list(ovb.cpu_capabilities()), "tolerance": tolerance(precision), "graphs": {}}
    if precision == "int8":
        if calibrator is None:
            raise ValueError("an int8 build needs a calibrator (aa_trt.export.int8.Calibrator)")
        old_cal = ((old or {}).get("int8") or {}).get("calibration") or {}
        part["int8"] = {"isa": ovb.int8_support(), "rest": hint, "nncf": int8.nncf_version(),
                        "quantized": [g for g in int8.QUANTIZED if g in manifest["graphs"]],
                        "calibration": old_cal if old_cal.get("key") == calibrator.key else {"key": calibrator.key}}
    for name, entry in manifest["graphs"].items():
        spec = specs[name]
        names = (tuple(spec.input_names), tuple(spec.output_names))
        graph_precision = "int8" if precision == "int8" and name in int8.QUANTIZED else hint
        cal_key = calibrator.key if graph_precision == "int8" else None
        blob = out_dir / ovb.blob_name(name, graph_precision)
        prev = prev_graphs.get(name)
        if (prev and prev.get("graph_key") == entry["key"] and prev.get("graph_files") == entry["files"]
                and prev.get("calibration") == cal_key and blob.is_file() and blob.stat().st_size == prev.get("size")):
            part["graphs"][name] = prev
            log(f"{name}: OpenVINO {graph_precision} blob up to date, reused")
            continue
        quantize, samples = None, None
        if graph_precision == "int8":
            samples = calibrator.get().samples[name]
            part["int8"]["calibration"] = {"key": calibrator.key, **calibrator.recorded.facts}

            quantized = []

            def quantize(model, samples=samples, quantized=quantized):
                # NNCF runs once a graph: a compile again with an f32 rest (below) takes a copy of
                # the same quantized model (the first compile compresses its own in place).
                if not quantized:
                    quantized.append(int8.quantize(model, samples))
                return quantized[0].clone()
        # An int8 graph that misses its check with the build's rest is tried again with an f32
        # rest (ovb.inference_hint says where and why), recorded in its entry as "rest".
        rests = [None] + ([ovb.INT8_REST_FALLBACK] if graph_precision == "int8" and hint != ovb.INT8_REST_FALLBACK
                          else [])
        for attempt, rest in enumerate(rests):
            t = time.perf_counter()
            compiled = ovb.OvGraph.compile(out_dir / f"{name}.onnx", names, graph_precision, threads,
                                           f16_weights=weights == "f16" and rest is None, quantize=quantize,
                                           rest=rest)
            compile_s = time.perf_counter() - t
            size = compiled.export(blob)
            del compiled
            t = time.perf_counter()
            graph = ovb.OvGraph.load(blob, names, graph_precision, threads, rest)  # what `run` will load
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            r = compare(spec, graph, graph_precision)
            rc = _on_calibration(spec, graph, samples) if samples else None
            verify_s = time.perf_counter() - t
            failed = [(what, res) for what, res in (("random inputs", r), ("calibration inputs", rc))
                      if res is not None and not res["ok"]]
            if not failed:
                break
            what, res = failed[0]
            problem = (f"OpenVINO {graph_precision} differs from PyTorch on {what} (max abs "
                       f"{res['max_abs_error']:.3g}, relative L2 {res['rel_l2']:.3g}; tolerance "
                       f"{_limit(spec, graph_precision, res is rc)})")
            blob.unlink()
            if attempt + 1 == len(rests):
                raise ExportError(f"{name}: {problem}" + (" with either rest" if len(rests) > 1 else ""))
            log(f"{name}: {problem} with its unquantized nodes in {hint}; again with them in {rests[attempt + 1]}")
        part["graphs"][name] = {
            "file": blob.name, "size": size, "precision": graph_precision, "graph_key": entry["key"],
            "graph_files": entry["files"], "compile_s": round(compile_s, 3), "load_s": round(load_s, 3),
            "verify_s": round(verify_s, 3), "max_abs_error": r["max_abs_error"], "ref_max_abs": r["ref_max_abs"],
            "rel_l2": r["rel_l2"], "verified_at": "opt"}
        if rest is not None:
            part["graphs"][name]["rest"] = rest
        if rc is not None:
            part["graphs"][name].update(calibration=cal_key, rel_l2_calibration=rc["rel_l2"])
        log(f"{name}: OpenVINO {graph_precision} compiled in {compile_s:.1f} s"
            + (f" (unquantized nodes in {rest})" if rest is not None else "")
            + f", vs torch max abs error {r['max_abs_error']:.2e}, relative L2 {r['rel_l2']:.2e}"
            + (f" (calibration inputs: {rc['rel_l2']:.2e})" if rc is not None else ""))
    return part
