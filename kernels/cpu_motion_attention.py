"""Attention among the n entries of each row of a packed q|k|v projection on the CPU, in one pass
(kernels/cpu/motion_attention.c): the motion modules' attention over frames. `motion_attention`
runs the C kernel as the op `aa_trt::motion_attention` (so profiles name it); its plain torch
reference with the same signature is `motion_attention_reference`.

    qkv  (b, n, p, 3c) or (b, n, 3c): [q | k | v], heads of d = c / heads columns in each part;
         entries n attend to each other within each (b, p) (or each b).
    bias (3, heads, n, d) or None: added to q, k and v per entry (the positional encoding
         folded through the bias-free projections).
    ->   (b, n, p, c) or (b, n, c), the heads merged, qkv's dtype (fp32 or bf16).
"""
from __future__ import annotations

import torch

from aa_trt.kernels import cpu_native

MAX_ENTRIES = 32  # the motion modules' positional table; scratch per row stays in L2


def supported(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these arguments (and the library loaded)."""
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.bfloat16) or qkv.dim() not in (3, 4):
        return False
    if qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % heads or not 1 <= qkv.shape[1] <= MAX_ENTRIES:
        return False
    if bias is not None and (bias.device.type != "cpu"
                             or tuple(bias.shape) != (3, heads, qkv.shape[1], qkv.shape[-1] // 3 // heads)):
        return False
    return cpu_native.library() is not None


@torch.library.custom_op("aa_trt::motion_attention", mutates_args=())
def _motion_attention_op(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    lib = cpu_native.library()
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    four = qkv.dim() == 4
    q4 = qkv if four else qkv.unsqueeze(2)  # (b, n, p, 3c)
    b, n, p, c3 = q4.shape
    c = c3 // 3
    out = torch.empty((b, n, p, c), dtype=qkv.dtype)
    if bias is not None:
        bias = bias.to(qkv.dtype).contiguous()
    status = lib.aa_motion_attention(
        q4.data_ptr(), q4.stride(0), q4.stride(2), q4.stride(1),
        out.data_ptr(), out.stride(0), out.stride(2), out.stride(1),
        None if bias is None else bias.data_ptr(),
        b, p, n, c, heads, (c // heads) ** -0.5, 1 if qkv.dtype == torch.bfloat16 else 0,
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("aa_trt::motion_attention could not allocate its scratch memory or threads")
    return out if four else out.squeeze(2)


@_motion_attention_op.register_fake
def _(qkv, heads, bias):
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))


def motion_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The C kernel (see module docstring); callers check `supported` first."""
    return _motion_attention_op(qkv, heads, bias)


def motion_attention_reference(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                               compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The same in plain torch, computed in `compute` or qkv's dtype, whichever is wider (float64
    for an oracle), returned in qkv's dtype."""
    compute = torch.promote_types(compute, qkv.dtype)
    four = qkv.dim() == 4
    x = (qkv if four else qkv.unsqueeze(2)).to(compute)
    b, n, p, c3 = x.shape
    c = c3 // 3
    d = c // heads
    parts = x.view(b, n, p, 3, heads, d).permute(3, 0, 2, 4, 1, 5)  # (3, b, p, heads, n, d)
    if bias is not None:
        parts = parts + bias.to(compute)[:, None, None]
    q, k, v = parts.unbind(0)
    probs = ((q @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1)
    out = (probs @ v).permute(0, 3, 1, 2, 4).reshape(b, n, p, c)  # (b, n, p, heads*d)
    return (out if four else out.squeeze(2)).to(qkv.dtype)
