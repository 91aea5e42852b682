"""onnxruntime backend: an `aa-trt build` DIR's graphs as onnxruntime sessions (CPU or CUDA
provider), behind the same calls as the torch modules (see backends/graph_animator.py)."""
from __future__ import annotations

import numpy as np
import torch

from aa_trt.backends.graph_animator import GRAPHS, GraphAnimator, bind_check


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class OrtGraph:
    """One onnxruntime session called with torch tensors by input name -> {output name: tensor}.
    Host round trips on every call: the TensorRT backend is the one that keeps tensors on the GPU."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, device="cpu", **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        bind_check(str(self.path), self.input_names, inputs)
        feeds = {n: _np(x) for n, x in inputs.items()}
        outs = self.session.run(self.output_names, feeds)
        return {n: torch.from_numpy(o).to(device) for n, o in zip(self.output_names, outs)}


class OrtAnimator(GraphAnimator):
    backend_name = "onnxruntime"
    backend_reason = "the build's ONNX graphs"

    @classmethod
    def from_dir(cls, engine_dir, checkpoint=None, providers: list[str] | None = None,
                 threads: int | None = None, reason: str | None = None) -> "OrtAnimator":
        """Refuses (InputError, one line) a DIR from another aa-trt, an unfinished build, or, when
        `checkpoint` is given, a build from another checkpoint. Sizes are checked in prepare.
        reason: why this backend was chosen (`backend_reason`, which the run summary shows)."""
        from aa_trt.backends import manifest as mf
        from aa_trt.files import file_sha256

        sha = file_sha256(checkpoint) if checkpoint is not None else None
        m = mf.load_for_run(engine_dir, sha, GRAPHS)
        threads = threads or torch.get_num_threads()
        graphs = {name: OrtGraph(f"{engine_dir}/{name}.onnx", providers, threads) for name in GRAPHS}
        anim = cls(engine_dir, m, graphs, "cpu")
        if reason is not None:
            anim.backend_reason = reason
        return anim
