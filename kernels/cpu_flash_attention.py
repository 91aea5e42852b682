"""Attention on bf16 CPU tokens in one pass over the keys, as the op `aa_trt::attention` (profiles
count it as attention), in two builds: kernels/cpu/flash_attention.c (AVX-512 BF16 dot products,
online softmax) and, with `tiles=True`, kernels/cpu/flash_attention_amx.c (both products on the AMX
tiles, the softmax on AVX-512). Their plain reference with the same signature is
`flash_attention_reference`.

    q (b, n, c), k/v (b, m, c): bf16, heads of d = c / heads columns (d even, <= 256); any row
    stride, columns contiguous (column slices of one packed projection read in place).
    k_ref, v_ref (1, m2, c) or None: keys and values shared by every row, after its own (the
    reference attention, read where they lie instead of concatenated per row).
    -> (b, n, c) bf16 = softmax(q [k; k_ref]^T / sqrt(d)) [v; v_ref].

Numerics: scores and sums in fp32 from the bf16 inputs, the probabilities rounded to bf16 before
the second product (as ATen's GEMM paths round them), the output rounded once.
"""
from __future__ import annotations

import functools

import torch

from aa_trt.kernels import cpu_native

MAX_HEAD_DIM = 256


@functools.cache
def available(tiles: bool = False) -> bool:
    """Whether the library loaded and was built for a CPU with AVX-512 BF16 (tiles: with AMX-BF16,
    and the OS granted this process the tile state)."""
    lib = cpu_native.library()
    if lib is None:
        return False
    return bool(lib.aa_flash_attention_amx_available() if tiles else lib.aa_flash_attention_available())


def _rows_ok(t: torch.Tensor, c: int) -> bool:
    return t.dim() == 3 and t.shape[-1] == c and t.stride(-1) == 1 and t.dtype == torch.bfloat16 and t.device.type == "cpu"


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None, tiles: bool = False) -> bool:
    """Whether the kernel takes these arguments on this machine."""
    c = q.shape[-1]
    if heads < 1 or c % heads or (c // heads) % 2 or c // heads > MAX_HEAD_DIM:
        return False
    if not all(_rows_ok(t, c) for t in (q, k, v)) or k.shape != v.shape or k.shape[0] != q.shape[0]:
        return False
    if (k_ref is None) != (v_ref is None):
        return False
    if k_ref is not None and not (_rows_ok(k_ref, c) and _rows_ok(v_ref, c) and k_ref.shape == v_ref.shape
                                  and k_ref.shape[0] == 1):
        return False
    return min(q.shape[0], q.shape[1], k.shape[1]) > 0 and available(tiles)


@torch.library.custom_op("aa_trt::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  k_ref: torch.Tensor | None, v_ref: torch.Tensor | None, tiles: bool) -> torch.Tensor:
    b, n, c = q.shape
    m = k.shape[1]
    m2 = 0 if k_ref is None else k_ref.shape[1]
    out = torch.empty((b, n, c), dtype=q.dtype)
    lib = cpu_native.library()
    status = (lib.aa_flash_attention_amx if tiles else lib.aa_flash_attention)(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1),
        None if k_ref is None else k_ref.data_ptr(), 0 if k_ref is None else k_ref.stride(1),
        None if v_ref is None else v_ref.data_ptr(), 0 if v_ref is None else v_ref.stride(1),
        out.data_ptr(), out.stride(0), out.stride(1), b, n, m, m2, heads, c // heads,
        (c // heads) ** -0.5, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"aa_trt::attention failed (status {status})")
    return out


@_attention_op.register_fake
def _(q, k, v, heads, k_ref, v_ref, tiles):
    return q.new_empty(q.shape)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None,
                    tiles: bool = False) -> torch.Tensor:
    """The C kernel (see module docstring; tiles: the AMX build); callers check `supported` first."""
    return _attention_op(q, k, v, heads, k_ref, v_ref, tiles)


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None,
                              compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The same in plain torch (SDPA on the concatenated keys), computed in `compute` or q's
    dtype, whichever is wider, returned in q's dtype."""
    compute = torch.promote_types(compute, q.dtype)
    b, n, c = q.shape
    d = c // heads
    if k_ref is not None:
        k = torch.cat([k, k_ref.expand(b, -1, -1)], dim=1)
        v = torch.cat([v, v_ref.expand(b, -1, -1)], dim=1)

    def split(t):
        return t.to(compute).reshape(b, t.shape[1], heads, d).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)
