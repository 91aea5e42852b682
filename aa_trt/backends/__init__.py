"""Inference backends that stand in for the torch modules: onnxruntime, OpenVINO and TensorRT, all
on the graphs of an `aa-trt build` DIR (see backends/graph_animator.py), and the one rule that picks among
them, for a build (export/build.py: what to compile) and for a run (`animator_from_dir`: what to load).

Runtimes only: nothing here imports the exporter (aa_trt.export) or a graph compiler's build code.
"""
from __future__ import annotations

from typing import Callable

from aa_trt.errors import AATrtError

# `--backend` of build and run ("auto" picks by PREFERENCE). Named apart from the attention
# backends of aa_trt.attention, which choose a kernel inside the torch path.
ENGINE_BACKENDS = ("auto", "tensorrt", "openvino", "onnxruntime")
# Fastest first; onnxruntime runs the ONNX graphs every build has, so it is always the last resort.
PREFERENCE = ("tensorrt", "openvino", "onnxruntime")


class BackendUnavailable(AATrtError):
    """A backend asked for by name cannot be used; `reason` says why."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"{backend}: {reason}")
        self.backend, self.reason = backend, reason


def choose_backend(asked: str, unready: dict[str, Callable[[], str | None]]) -> tuple[str, list[str]]:
    """(backend, why each one preferred to it was passed over). unready: for tensorrt and openvino,
    a probe saying why it cannot be used here (None: it can); each probe runs only when needed.
    "auto" takes the first ready one of PREFERENCE; a backend named outright must be ready, or
    BackendUnavailable."""
    from aa_trt.errors import OptionError

    if asked not in ENGINE_BACKENDS:
        raise OptionError("backend", asked, f"expected one of {', '.join(ENGINE_BACKENDS)}")
    if asked != "auto":
        reason = unready[asked]() if asked in unready else None
        if reason is not None:
            raise BackendUnavailable(asked, reason)
        return asked, []
    passed = []
    for name in PREFERENCE:
        reason = unready[name]() if name in unready else None
        if reason is None:
            return name, passed
        passed.append(reason)
    raise AssertionError("onnxruntime has no probe: it is always ready")


def _openvino_unready(manifest: dict) -> str | None:
    """Why a run does not use OpenVINO on this DIR, or None when it can."""
    from aa_trt.backends import openvino as ovb

    if not ovb.available():
        return "openvino not installed"
    if not manifest.get("openvino"):
        return "the build has no OpenVINO graphs (aa-trt build --backend openvino)"
    return None


def _tensorrt_unready(manifest: dict) -> str | None:
    from aa_trt.backends.tensorrt import unavailable

    return unavailable() or (None if manifest.get("engines") else "the build has no TensorRT engines")


def animator_from_dir(engine_dir, checkpoint=None, backend: str = "auto"):
    """The Animator for `aa-trt run --engine DIR`. backend "auto": TensorRT when importable with a
    CUDA device and the DIR has engines; else OpenVINO when installed and the DIR has OpenVINO
    graphs; else onnxruntime. The animator's `backend_name` ("openvino bf16", "onnxruntime", ...)
    and `backend_reason` say which ran and why. A named backend that cannot run this DIR, and a
    DIR whose OpenVINO graphs are stale (another OpenVINO, precision or set of graphs), are
    refused with one line."""
    from aa_trt.backends import manifest as mf
    from aa_trt.errors import InputError

    manifest = mf.read_manifest(engine_dir) or {}
    try:
        name, passed = choose_backend(backend, {"tensorrt": lambda: _tensorrt_unready(manifest),
                                                "openvino": lambda: _openvino_unready(manifest)})
    except BackendUnavailable as e:
        label = {"tensorrt": "TensorRT", "openvino": "OpenVINO"}[e.backend]
        raise InputError(f"{engine_dir}: {label} backend asked for, but {e.reason}") from None
    asked = backend != "auto"
    if name == "tensorrt":
        from aa_trt.backends.tensorrt import TrtAnimator

        return TrtAnimator.from_dir(engine_dir, checkpoint)
    if name == "openvino":
        from aa_trt.backends.openvino import OvAnimator

        return OvAnimator.from_dir(engine_dir, checkpoint, reason="asked for" if asked else None)
    from aa_trt.backends.onnxruntime import OrtAnimator

    return OrtAnimator.from_dir(engine_dir, checkpoint, reason="asked for" if asked else "; ".join(passed))
