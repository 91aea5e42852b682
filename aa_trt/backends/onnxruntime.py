"""onnxruntime backend: an `aa-trt build` DIR's graphs as onnxruntime sessions (CPU or CUDA
provider), behind the same calls as the torch modules (see backends/graphs.py)."""
from __future__ import annotations

import numpy as np
import torch

from .graphs import REQUIRED, GraphAnimator


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class OrtGraph:
    """One onnxruntime session called with torch tensors in input order -> list of torch tensors.
    Host round trips on every call: the TensorRT backend is the one that keeps tensors on the GPU."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor, device="cpu") -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{len(inputs)} inputs for a graph taking {self.input_names}")
        feeds = {n: _np(x) for n, x in zip(self.input_names, inputs)}
        return [torch.from_numpy(o).to(device) for o in self.session.run(self.output_names, feeds)]


class OrtAnimator(GraphAnimator):
    @classmethod
    def from_dir(cls, engine_dir, checkpoint=None, providers: list[str] | None = None,
                 threads: int | None = None) -> "OrtAnimator":
        """Refuses (InputError, one line) a DIR from another aa-trt, an unfinished build, or, when
        `checkpoint` is given, a build from another checkpoint. Sizes are checked in prepare."""
        from aa_trt.export import manifest as mf

        sha = mf.file_sha256(checkpoint) if checkpoint is not None else None
        m = mf.load_for_run(engine_dir, sha, REQUIRED)
        threads = threads or torch.get_num_threads()
        graphs = {name: OrtGraph(f"{engine_dir}/{name}.onnx", providers, threads) for name in REQUIRED}
        return cls(engine_dir, m, graphs, "cpu")
