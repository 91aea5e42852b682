"""TensorRT backend: engines from `aa-trt build` run on torch CUDA tensors, no host copies.

Written to TensorRT's documented Python API (>= 8.6, the name-based tensor API): inputs are bound
by `set_input_shape` + `set_tensor_address` on the torch tensors' own memory, outputs are torch
tensors allocated once per input-shape key and reused, and `execute_async_v3` runs on torch's
current stream. tensorrt is imported only here (the builder, aa_trt.export.tensorrt, imports it
through `import_tensorrt`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from aa_trt.backends.graph_animator import GRAPHS, GraphAnimator, bind_check
from aa_trt.errors import InputError

INSTALL_HINT = ("install TensorRT for your CUDA version from NVIDIA (pip install tensorrt "
                "--extra-index-url https://pypi.nvidia.com), or use the onnxruntime backend")


def unavailable() -> str | None:
    """Why TensorRT cannot run (or build) here, or None: the reasons the tests skip with too."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not importable"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError(f"tensorrt is not importable: {INSTALL_HINT}") from None
    return trt


def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dt]


class TrtEngine:
    """One deserialized engine, called like the onnxruntime graphs: tensors by input name ->
    {output name: tensor} (on the engine's CUDA device)."""

    def __init__(self, path, device="cuda"):
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise InputError(f"{path}: TensorRT cannot load this engine (built by another TensorRT "
                             f"version or for another GPU?); rebuild it with `aa-trt build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._shape_key = None
        self._outputs: list[torch.Tensor] = []

    def __call__(self, device=None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        bind_check("TensorRT engine", self.input_names, inputs)
        bound = []
        for name in self.input_names:
            x = inputs[name]
            want = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            x = x.to(self.device, want).contiguous()  # no-op for tensors already in place
            bound.append(x)  # keep alive until the stream has consumed it
            self.context.set_tensor_address(name, x.data_ptr())
        key = tuple(tuple(x.shape) for x in bound)
        if key != self._shape_key:  # re-bind shapes and outputs only when the shapes change
            for name, x in zip(self.input_names, bound):
                self.context.set_input_shape(name, tuple(x.shape))
            self._outputs = [torch.empty(tuple(self.context.get_tensor_shape(n)), device=self.device,
                                         dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(n)))
                             for n in self.output_names]
            self._shape_key = key
        for name, out in zip(self.output_names, self._outputs):
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log above)")
        # The output buffers are reused by the next call with the same shapes: hand out copies
        # (device-to-device) so the caller may keep them.
        return {n: o.clone() for n, o in zip(self.output_names, self._outputs)}


class TrtAnimator(GraphAnimator):
    backend_name = "tensorrt"
    backend_reason = "CUDA device, TensorRT engines in the build"

    @classmethod
    def from_dir(cls, engine_dir, checkpoint=None, device="cuda", reason: str | None = None) -> "TrtAnimator":
        """As OrtAnimator.from_dir, on the DIR's TensorRT engines; `backend_name` gives their precision."""
        from aa_trt.backends import manifest as mf
        from aa_trt.files import file_sha256

        sha = file_sha256(checkpoint) if checkpoint is not None else None
        m = mf.load_for_run(engine_dir, sha, GRAPHS)
        engines = m.get("engines") or {}
        missing = [g for g in GRAPHS if g not in engines]
        if missing:
            raise InputError(f"{engine_dir}: no TensorRT engines for {', '.join(missing)}; run "
                             f"`aa-trt build` on a machine with TensorRT and CUDA")
        graphs = {g: TrtEngine(Path(engine_dir) / engines[g]["file"], device) for g in GRAPHS}
        anim = cls(engine_dir, m, graphs, device)
        anim.backend_name = f"tensorrt {m.get('precision', {}).get('engines', '')}".strip()
        if reason is not None:
            anim.backend_reason = reason
        return anim
