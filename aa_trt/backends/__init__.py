"""Inference backends that stand in for the torch modules: onnxruntime, OpenVINO and TensorRT, all
on the graphs of an `aa-trt build` DIR (see backends/graphs.py)."""
from __future__ import annotations

BACKENDS = ("auto", "tensorrt", "openvino", "onnxruntime")


def _openvino_unready(engine_dir, manifest: dict) -> str | None:
    """Why auto does not pick OpenVINO for this DIR, or None when it can."""
    from aa_trt.backends import openvino as ovb

    if not ovb.available():
        return "openvino not installed"
    if not manifest.get("openvino"):
        return "the build has no OpenVINO graphs (aa-trt build --backend openvino)"
    return None


def animator_from_dir(engine_dir, checkpoint=None, backend: str = "auto"):
    """The Animator for `aa-trt run --engine DIR`. backend "auto": TensorRT when importable with a
    CUDA device and the DIR has engines; else OpenVINO when installed and the DIR has OpenVINO
    graphs; else onnxruntime. The animator's `backend_name` ("openvino bf16", "onnxruntime", ...)
    and `backend_reason` say which ran and why. A named backend that cannot run this DIR, and a
    DIR whose OpenVINO graphs are stale (another OpenVINO, precision or set of graphs), are
    refused with one line."""
    from aa_trt.errors import InputError, OptionError
    from aa_trt.export import manifest as mf

    if backend not in BACKENDS:
        raise OptionError("backend", backend, f"expected one of {', '.join(BACKENDS)}")
    manifest = mf.read_manifest(engine_dir) or {}
    why_not = []
    if backend in ("auto", "tensorrt"):
        from aa_trt.export.tensorrt import unavailable

        reason = unavailable() or (None if manifest.get("engines") else "the build has no TensorRT engines")
        if reason is None:
            from aa_trt.backends.tensorrt import TrtAnimator

            anim = TrtAnimator.from_dir(engine_dir, checkpoint)
            anim.backend_name = f"tensorrt {manifest.get('precision', {}).get('engines', '')}".strip()
            anim.backend_reason = "CUDA device, TensorRT engines in the build"
            return anim
        if backend == "tensorrt":
            raise InputError(f"{engine_dir}: TensorRT backend asked for, but {reason}")
        why_not.append(reason)
    if backend in ("auto", "openvino"):
        reason = _openvino_unready(engine_dir, manifest)
        if reason is None:
            from aa_trt.backends.openvino import OvAnimator

            anim = OvAnimator.from_dir(engine_dir, checkpoint)
            if backend == "openvino":
                anim.backend_reason = f"asked for; {anim.backend_reason}"
            return anim
        if backend == "openvino":
            raise InputError(f"{engine_dir}: OpenVINO backend asked for, but {reason}")
        why_not.append(reason)
    from aa_trt.backends.onnxruntime import OrtAnimator

    anim = OrtAnimator.from_dir(engine_dir, checkpoint)
    anim.backend_name = "onnxruntime"
    anim.backend_reason = "asked for" if backend == "onnxruntime" else "; ".join(why_not)
    return anim
