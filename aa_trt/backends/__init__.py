"""Inference backends that stand in for the torch modules: onnxruntime and TensorRT, both on the
graphs of an `aa-trt build` DIR (see backends/graphs.py)."""
from __future__ import annotations


def animator_from_dir(engine_dir, checkpoint=None, backend: str = "auto"):
    """The Animator for `aa-trt run --engine DIR`: TensorRT when importable with a CUDA device and
    the DIR has engines, otherwise onnxruntime. backend: "auto", "tensorrt" or "onnxruntime"."""
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise ValueError(f"backend {backend!r}: expected auto, tensorrt or onnxruntime")
    if backend != "onnxruntime":
        from aa_trt.export import manifest as mf
        from aa_trt.export.tensorrt import unavailable

        reason = unavailable()
        has_engines = bool((mf.read_manifest(engine_dir) or {}).get("engines"))
        if reason is None and has_engines:
            from aa_trt.backends.tensorrt import TrtAnimator

            return TrtAnimator.from_dir(engine_dir, checkpoint)
        if backend == "tensorrt":
            from aa_trt.errors import InputError

            raise InputError(f"{engine_dir}: TensorRT backend asked for, but "
                             f"{reason or 'the build has no TensorRT engines'}")
    from aa_trt.backends.onnxruntime import OrtAnimator

    return OrtAnimator.from_dir(engine_dir, checkpoint)
