"""Helpers shared by the attention kernels: head-dim chunking, launch checks, dtype choices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Half-precision tensor-core dots need every dot dimension >= 16.
MIN_DOT = 16
MAX_HEAD_DIM = 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def head_dim_chunks(d: int) -> tuple[int, int]:
    """Split a head dim into a power-of-two chunk and a (possibly empty) power-of-two tail.

    d = D0 + rest with D0 the largest power of two <= d; the tail is padded to D1 = next power of
    two >= max(rest, 16) and masked. SD1.5's head dims: 40 = 32 + 8 (tail padded to 16: 48 lanes,
    17% idle), 80 = 64 + 16 and 160 = 128 + 32 (exact). Padding the whole head to the next power of
    two instead (64, 128, 256) would leave 37.5% of every QK^T and PV dot idle for all three.
    D1 == 0 means no tail (d is a power of two).
    """
    if not MIN_DOT <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} outside the kernels' range [{MIN_DOT}, {MAX_HEAD_DIM}]")
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (0 if rest == 0 else max(MIN_DOT, _next_pow2(rest)))


def supported_head_dim(d: int) -> bool:
    return MIN_DOT <= d <= MAX_HEAD_DIM


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel was built for the interpreter (TRITON_INTERPRET=1 is read when
    the kernel's module is imported, not at launch)."""
    return type(kernel).__name__ == "InterpretedFunction"


def upcast_dots(dtype: torch.dtype, kernel) -> bool:
    """Run the dots in fp32: Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits."""
    return dtype == torch.bfloat16 and is_interpreted(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (not TF32) so that they match the fp32 torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_tokens(name: str, t: torch.Tensor, c: int) -> None:
    if t.dim() != 3 or t.shape[2] != c:
        raise ValueError(f"{name} must be (batch, tokens, {c}); got {tuple(t.shape)}")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must have a contiguous channel axis (stride 1); got {t.stride()}")


@dataclass
class Launch:
    """Everything one kernel launch needs, computed by a launcher's `plan` without touching data:
    `plan` runs on meta tensors too, which is how `aot.py` gets the exact signature, constexprs
    and num_warps/num_stages a launch would compile with."""
    kernel: Any                 # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple                 # the runtime arguments, in the kernel's parameter order
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    out: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the chosen Tiles, for reports

    def __call__(self) -> torch.Tensor | None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
        return self.out
