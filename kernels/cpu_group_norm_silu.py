"""GroupNorm (+ SiLU) on channels-last CPU images in two passes (kernels/cpu/group_norm_silu.c),
as the op `aa_trt::group_norm_silu` (so profiles name it); its plain torch reference with the same
signature is `group_norm_silu_reference`.

    x (n, c, h, w) stored channels-last, fp32 or bf16, c a multiple of 16; weight, bias (c,) or None.
    -> silu(group_norm(x)) (group_norm(x) when not `silu`), channels-last, x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aa_trt.kernels import cpu_native


def supported(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes these arguments (and the library loaded)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    c = x.shape[1]
    if num_groups < 1 or c % num_groups or c % 16 or x.numel() == 0:
        return False
    for t in (weight, bias):
        if t is not None and (t.device.type != "cpu" or t.shape != (c,)):
            return False
    return cpu_native.library() is not None


@torch.library.custom_op("aa_trt::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, silu: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    weight = None if weight is None else weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    status = cpu_native.library().aa_group_norm_silu_nhwc(
        x.data_ptr(), y.data_ptr(), None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), n, h * w, c, num_groups, eps, int(silu),
        1 if x.dtype == torch.bfloat16 else 0, torch.get_num_threads())
    if status != 0:
        raise MemoryError("aa_trt::group_norm_silu could not allocate its scratch memory")
    return y


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, silu: bool = True) -> torch.Tensor:
    """The C kernel (see module docstring); callers check `supported` first."""
    return _group_norm_silu_op(x, num_groups, weight, bias, float(eps), bool(silu))


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, silu: bool = True,
                              compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The same in plain torch, computed in `compute` or x's dtype, whichever is wider (float64
    for an oracle), returned in x's dtype."""
    compute = torch.promote_types(compute, x.dtype)
    y = F.group_norm(x.to(compute), num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    return (F.silu(y) if silu else y).to(x.dtype).contiguous(memory_format=torch.channels_last)
