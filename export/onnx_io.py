"""Export one GraphSpec to ONNX, check it, and measure it against PyTorch with onnxruntime."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from aa_trt.errors import AATrtError
from aa_trt.export.graphs import GraphSpec

DEFAULT_OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6+ and 10 parse it
PROTOBUF_LIMIT = 2**31 - 2**24  # a little under protobuf's 2 GiB cap: the graph itself needs room


class ExportError(AATrtError):
    """An exported graph failed its check or disagrees with PyTorch beyond its tolerance."""

    exit_code = 1


def _missing(pkg: str) -> AATrtError:
    return AATrtError(f"{pkg} is not installed; install the export extra: pip install 'aa-trt[export]'")


def data_file(path: Path) -> Path:
    """Where a graph's weights go when they do not fit in the protobuf: one side file."""
    return path.with_name(path.name + ".data")


def export_graph(spec: GraphSpec, path, opset: int = DEFAULT_OPSET) -> dict:
    """Trace spec.module at its "max" profile point into `path` (legacy TorchScript exporter: a
    fraction of a second for tiny, and it names the weights as the state dict does). Weights go to
    `path.data` when the model is over ~2 GB. Returns {"export_s", "external_data"}."""
    try:
        import onnx
    except ImportError:
        raise _missing("onnx") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    external = weight_bytes > PROTOBUF_LIMIT
    sample = tuple(spec.sample_inputs("max").values())
    t0 = time.perf_counter()
    # A temporary folder: with large models the legacy exporter writes one file per tensor beside
    # the graph; they are gathered into one side file below, and nothing half-written is left.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}.") as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on Python-level shape checks
            torch.onnx.export(spec.module, sample, str(raw), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        data = data_file(path)
        if data.exists():
            data.unlink()
        if external:
            model = onnx.load(str(raw), load_external_data=True)
            tmp_out = Path(tmp) / path.name
            onnx.save_model(model, str(tmp_out), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
            del model
            shutil.move(str(Path(tmp) / data.name), data)
            os.replace(tmp_out, path)
        else:
            os.replace(raw, path)
    return {"export_s": round(time.perf_counter() - t0, 3), "external_data": external}


def check_graph(path) -> None:
    """onnx.checker with full_check (shape inference too); by path, so > 2 GB graphs work."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"{path}: onnx checker: {str(e).splitlines()[0]}") from None


def ort_session(path, providers: list[str] | None = None, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise _missing("onnxruntime") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def run_torch(spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = spec.module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {n: o.float().numpy() for n, o in zip(spec.output_names, out)}


def compare(spec: GraphSpec, session, dims: dict[str, int] | str = "opt", seed: int = 1) -> dict:
    """Random inputs (seeded, never zeros) through PyTorch and onnxruntime.
    Returns {"max_abs_error", "ref_max_abs", "ok"}, the error over all outputs."""
    inputs = spec.sample_inputs(dims, seed)
    ref = run_torch(spec, inputs)
    got = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    err, scale = 0.0, 0.0
    for name, g in zip(spec.output_names, got):
        if g.shape != ref[name].shape:
            raise ExportError(f"{spec.name}: output {name} has shape {g.shape}, torch gives "
                              f"{ref[name].shape}")
        err = max(err, float(np.abs(g.astype(np.float64) - ref[name]).max()))
        scale = max(scale, float(np.abs(ref[name]).max()))
    return {"max_abs_error": err, "ref_max_abs": scale,
            "ok": err <= spec.tolerance * max(1.0, scale)}


SHARED_ALIGN = 4096  # page-aligned offsets: the runtimes may map the tensors straight from the file


def share_weights(paths, data_path, size_threshold: int = 1024) -> dict:
    """Rewrite the ONNX graphs at `paths` so that their initializers of `size_threshold` bytes or
    more live once in one external data file, `data_path` (beside them): a tensor whose bytes
    equal an earlier one's (the cond and uncond UNet steps hold the same UNet) points at the same
    offset. Exact: the bytes are the graphs' own, only stored once. One graph in memory at a time;
    nothing is renamed into place before every file is written. Returns {"bytes", "tensors",
    "shared_bytes"} (shared_bytes: what the repeated copies would have cost)."""
    import contextlib
    import hashlib

    import onnx
    from onnx import numpy_helper

    from aa_trt.files import atomic_output

    data_path = Path(data_path)
    where: dict[bytes, tuple[int, int]] = {}
    offset, shared = 0, 0
    with contextlib.ExitStack() as stack:
        # Exited in reverse: the data file is renamed into place first, then the graphs.
        graph_tmps = [stack.enter_context(atomic_output(p)) for p in paths]
        data_tmp = stack.enter_context(atomic_output(data_path))
        with open(data_tmp, "wb") as fh:
            for p, tmp in zip(paths, graph_tmps):
                model = onnx.load(str(p), load_external_data=True)
                for t in model.graph.initializer:
                    raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                    if len(raw) < size_threshold:
                        continue
                    digest = hashlib.sha256(raw).digest() + len(raw).to_bytes(8, "little")
                    if digest in where:
                        shared += len(raw)
                    else:
                        pad = -offset % SHARED_ALIGN
                        fh.write(b"\0" * pad)
                        where[digest] = (offset + pad, len(raw))
                        fh.write(raw)
                        offset += pad + len(raw)
                    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                                  "uint64_data", "string_data"):
                        t.ClearField(field)
                    at, length = where[digest]
                    del t.external_data[:]
                    for k, v in (("location", data_path.name), ("offset", str(at)), ("length", str(length))):
                        entry = t.external_data.add()
                        entry.key, entry.value = k, v
                    t.data_location = onnx.TensorProto.EXTERNAL
                Path(tmp).write_bytes(model.SerializeToString())
                del model
    # The graphs' own side files (large models) are not referenced any more.
    for p in paths:
        own = data_file(Path(p))
        if own.exists():
            own.unlink()
    return {"bytes": data_path.stat().st_size, "tensors": len(where), "shared_bytes": shared}
