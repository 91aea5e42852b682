"""FLOP counting with torch.utils.flop_counter, CPU attention included.

FlopCounterMode counts matmuls, convolutions and the CUDA attention kernels, but not the CPU
SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu` is not in its registry in torch 2.13),
so on CPU it would silently count every attention as 0. The formula below adds it: the two
matmuls q k^T and p v, 2 FLOPs per multiply-add, as the registry does for the CUDA kernels.
Elementwise work (norms, softmax, activations) is not counted, by FlopCounterMode's convention.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


CUSTOM = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """Run fn(*args, **kwargs) (meta tensors work: nothing is computed) -> (total, by aten op)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as mode:
        fn(*args, **kwargs)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in mode.get_flop_counts()["Global"].items()}
    return int(mode.get_total_flops()), by_op


def attention_share(by_op: dict[str, int]) -> int:
    """FLOPs of attention matmuls: SDPA kernels, or bmm where SDPA decomposed (meta device)."""
    return sum(n for op, n in by_op.items() if "attention" in op or op == "bmm")
