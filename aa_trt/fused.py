"""Linear and convolution layers with their epilogue fused, on the CPU: bias, GELU, a residual
add or a gating product computed by oneDNN while the GEMM's output is still in cache.

Why: a bf16 `F.linear` with a bias runs as addmm, which first copies the broadcast bias into the
output (a full write of it), then accumulates the GEMM on top; the residual add, the GELU and
GEGLU's product after it are each one more pass over the same tensor. In one UNet call at SD1.5
half width (16 frames, CFG) those copies alone were 214 `copy_` calls writing 2 GB. oneDNN's
matmul and convolution primitives take the bias and these operations as post-ops
(`torch.ops.mkldnn._linear_pointwise` / `_convolution_pointwise`, the ops inductor's CPU backend
emits), so the output is written once.

Every function here has a plain reference with the same signature (`*_reference`) that the fast
path falls back to (CUDA tensors, autograd, tracing and export, other dtypes, a torch without
oneDNN) and that the tests compare it against. In fp32 the fused result equals the reference to
rounding; in bf16 it is rounded once instead of twice (closer to fp32, not bit-equal).

`plain()` turns every fast path of the CPU (these fusions, the channels-last layout and the
measured attention choice) off for a block of code: the Moore-style baseline computes that way.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

_state = threading.local()


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Within: the plain computation everywhere (no fusions, NCHW, SDPA attention)."""
    saved = getattr(_state, "plain", False)
    _state.plain = True
    try:
        yield
    finally:
        _state.plain = saved


def is_plain() -> bool:
    return getattr(_state, "plain", False)


@functools.cache
def _have_onednn() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def tracing() -> bool:
    """Tracing, compiling or exporting: the graph must keep the plain form (every fast path,
    here and in aa_trt.attention, asks this)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def active(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the CPU fast paths apply to x: a CPU fp32/bf16 tensor in inference (no autograd,
    no autocast: training keeps the plain modules, their gradients and autocast's casts), outside
    tracing, with oneDNN present and `plain()` not in force. `params` are accepted for the
    callers' symmetry; grad mode decides for all of them."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or is_plain():
        return False
    if torch.is_grad_enabled() or _autocast():
        return False
    return not tracing() and _have_onednn()


def _ok_params(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and weight.stride(-1) == 1


# ---------------------------------------------------------------------------- linear
def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     act: str = "none") -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if act == "gelu" else y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """act(x W^T + b), act "none" or "gelu" (erf form, as F.gelu).  x (..., k) -> (..., n)."""
    if act not in ("none", "gelu"):
        raise ValueError(f"act={act!r}: 'none' or 'gelu'")
    if active(x, weight, bias) and _ok_params(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")
    return linear_reference(x, weight, bias, act)


def linear_add_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         other: torch.Tensor) -> torch.Tensor:
    return other + F.linear(x, weight, bias)  # residual first (see conv_add_reference)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               other: torch.Tensor) -> torch.Tensor:
    """x W^T + b + other (a residual of the output's shape).  x (..., k), other (..., n)."""
    if _binary_ok(x, weight, bias, other):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")
    return linear_add_reference(x, weight, bias, other)


def layer(x: torch.Tensor, lin: torch.nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """lin(x), plus `residual` when given: `linear` / `linear_add` on an nn.Linear's parameters."""
    if residual is None:
        return linear(x, lin.weight, lin.bias)
    return linear_add(x, lin.weight, lin.bias, residual)


def derived(owner: torch.nn.Module, slot: str, tensors, make: Callable[[], object], extra: tuple = ()):
    """make(): something computed from `tensors` (parameters or buffers of `owner`), kept in
    owner.__dict__[slot] until one of them changes (its storage, version or dtype) or `extra`
    does, and returned from there until then."""
    key = tuple(extra) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = (key, make())
        owner.__dict__[slot] = cached
    return cached[1]


def stacked(owner: torch.nn.Module,
            linears: tuple[torch.nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, when every layer has one) of `linears`, which read the same input,
    stacked along the output axis: one GEMM computes all their outputs side by side (q, k and v
    from one pass over the tokens). Cached on `owner` until a weight changes (`derived`)."""
    def make():
        w = torch.cat([lin.weight for lin in linears]).contiguous()
        biases = [lin.bias for lin in linears]
        b = torch.cat(biases) if all(bb is not None for bb in biases) else None
        if b is None and any(bb is not None for bb in biases):
            raise ValueError("stacked: some of the layers have a bias and some do not")
        return w, b

    params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
    return derived(owner, "_stacked_cache", params, make)


def linear_mul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         other: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) * other


def linear_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               other: torch.Tensor) -> torch.Tensor:
    """(x W^T + b) * other (GEGLU's gate).  x (..., k), other (..., n)."""
    if _binary_ok(x, weight, bias, other):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "mul")
    return linear_mul_reference(x, weight, bias, other)


def _binary_ok(x, weight, bias, other) -> bool:
    return (active(x, weight, bias, other) and _ok_params(x, weight, bias) and other.dtype == x.dtype
            and other.shape == x.shape[:-1] + weight.shape[:1] and other.is_contiguous()
            and x.is_contiguous())


# ---------------------------------------------------------------------------- convolution
def conv_add_reference(x: torch.Tensor, conv: torch.nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    # `other` first, as the residual blocks always wrote it: the sum is the same either way, but
    # autograd accumulates the residual input's two gradients in the graph's order (training's
    # gradients stay bit-identical to what they were).
    return other + conv(x)


def conv_add(x: torch.Tensor, conv: torch.nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """conv(x) + other, other of the output's shape and x's memory layout.  (n, c, h, w)."""
    w, b = conv.weight, conv.bias
    if (active(x, w, b, other) and w.dtype == x.dtype and (b is None or b.dtype == x.dtype)
            and other.dtype == x.dtype
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
            and _same_layout(x, other)):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "add", None, None, [], None)
    return conv_add_reference(x, conv, other)


def _same_layout(x: torch.Tensor, other: torch.Tensor) -> bool:
    if x.is_contiguous() and other.is_contiguous():
        return True
    cl = torch.channels_last
    return x.is_contiguous(memory_format=cl) and other.is_contiguous(memory_format=cl)


def conv_bias(x: torch.Tensor, conv: torch.nn.Conv2d, extra: torch.Tensor) -> torch.Tensor:
    """conv(x) + extra, extra (c_out,) added to every position of every row: folded into the
    convolution's bias (the time embedding of a call whose rows share one timestep)."""
    bias = extra if conv.bias is None else conv.bias + extra
    return F.conv2d(x, conv.weight, bias.to(x.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bias_reference(x: torch.Tensor, conv: torch.nn.Conv2d, extra: torch.Tensor) -> torch.Tensor:
    return conv(x) + extra[:, None, None]


LAYER_NORMS = ("as-stored", "fp32-affine", "native")


def layer_norm_reference(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return norm(x)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """norm(x). A bf16 LayerNorm whose weight and bias are handed over in fp32 (exact copies of
    the bf16 ones) runs ATen's mixed-precision kernel: the same values bit for bit (both compute
    in fp32 and round once), but on an EPYC 2.5x faster at 160 channels, where the all-bf16
    kernel's per-row overhead dominates rows that short; or the project's C kernel
    (kernels/cpu/layer_norm.c: the same arithmetic, ~1.3x faster again there). Which kernel is
    measured per width (aa_trt.autotune); the plain module elsewhere."""
    w, b = norm.weight, norm.bias
    if x.dtype != torch.bfloat16 or w is None or w.dtype != torch.bfloat16 or not active(x):
        return layer_norm_reference(x, norm)
    from aa_trt import autotune

    from aa_trt.kernels import cpu_layer_norm

    c = x.shape[-1]
    w32, b32 = _fp32_affine(norm)
    native = cpu_layer_norm.supported(x, w32, b32)
    key = f"layer_norm:bfloat16:c{c}"
    names = LAYER_NORMS if native else LAYER_NORMS[:-1]
    choice = autotune.choose(key, names, lambda: _layer_norm_candidates(x, norm))
    if choice == "as-stored" or (choice == "native" and not native):
        return layer_norm_reference(x, norm)
    if choice == "native":
        return cpu_layer_norm.layer_norm(x, w32, b32, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, w32, b32, norm.eps)


def _fp32_affine(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 copies of norm's weight and bias, kept until the parameters change (a conversion per
    call would be two more copies per norm)."""
    params = (norm.weight, norm.bias)
    return derived(norm, "_fp32_affine", params,
                   lambda: tuple(None if p is None else p.detach().float() for p in params))


def _layer_norm_candidates(x: torch.Tensor, norm: torch.nn.LayerNorm):
    c = x.shape[-1]
    rows = torch.randn((max(1, (4 << 20) // c), c), generator=torch.Generator().manual_seed(0)).to(x.dtype)
    w, b = _fp32_affine(norm)
    work = {"as-stored": lambda: norm(rows),
            "fp32-affine": lambda: F.layer_norm(rows, norm.normalized_shape, w, b, norm.eps)}
    from aa_trt.kernels import cpu_layer_norm

    if cpu_layer_norm.supported(rows, w, b):
        work["native"] = lambda: cpu_layer_norm.layer_norm(rows, w, b, norm.eps)
    return work
