"""LayerNorm over the last axis on the CPU (kernels/cpu/layer_norm.c), as the op
`aa_trt::layer_norm` (profiles name it); its plain torch reference with the same signature is
`layer_norm_reference`.

    x (..., c) contiguous, fp32 or bf16, c a multiple of 16; weight, bias (c,) fp32 or None.
    -> F.layer_norm(x, (c,), weight, bias, eps), x's dtype, computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aa_trt.kernels import cpu_native


def supported(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes these arguments (and the library loaded)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() < 1:
        return False
    c = x.shape[-1]
    if c < 16 or c % 16 or not x.is_contiguous():
        return False
    for t in (weight, bias):
        if t is not None and (t.dtype != torch.float32 or t.shape != (c,) or not t.is_contiguous()):
            return False
    return cpu_native.library() is not None


@torch.library.custom_op("aa_trt::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = torch.empty_like(x)
    c = x.shape[-1]
    status = cpu_native.library().aa_layer_norm(
        x.data_ptr(), y.data_ptr(), None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), x.numel() // c, c, eps,
        1 if x.dtype == torch.bfloat16 else 0, torch.get_num_threads())
    if status != 0:
        raise MemoryError("aa_trt::layer_norm could not allocate its scratch memory")
    return y


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The C kernel (see module docstring); callers check `supported` first."""
    return _layer_norm_op(x, weight, bias, float(eps))


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                         compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The same in plain torch, computed in `compute` or x's dtype, whichever is wider."""
    compute = torch.promote_types(compute, x.dtype)
    return F.layer_norm(x.to(compute), x.shape[-1:], None if weight is None else weight.to(compute),
                        None if bias is None else bias.to(compute), eps).to(x.dtype)
