"""Counted FLOPs: torch.utils.flop_counter with CPU attention included, and the denoising UNet's
cost per render (whole and shallow calls apart), counted on a meta-device copy of the network.

FlopCounterMode counts matmuls, convolutions and the CUDA attention kernels, but not the CPU
SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu` is not in its registry in torch 2.13),
so on CPU it would silently count every attention as 0. The formula below adds it: the two
matmuls q k^T and p v, 2 FLOPs per multiply-add, as the registry does for the CUDA kernels.
Elementwise work (norms, softmax, activations) is not counted, by FlopCounterMode's convention.
"""
from __future__ import annotations

import functools
import json
import os
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


@functools.lru_cache(maxsize=4)
def _meta_unet(unet_config, motion_config, dtype: torch.dtype):
    from aa_trt.models.unet import UNet

    with torch.device("meta"):
        return UNet(unet_config, motion_config).to(dtype).eval().requires_grad_(False)


@functools.lru_cache(maxsize=256)
def _call_flops(unet_config, motion_config, key) -> int:
    """The FLOPs of one call with these shapes: from `$AA_TRT_CACHE/flops.json` when counted
    before (the meta-device count costs ~1 s the first time in a process: torch's meta
    decompositions import torch._dynamo), else counted and kept there."""
    import hashlib

    from aa_trt import __version__

    name = hashlib.sha256(repr((__version__, _network_source(), unet_config, motion_config, key)).encode()).hexdigest()[:24]
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
        if isinstance(known, dict) and isinstance(known.get(name), int):
            return known[name]
    except (OSError, ValueError):
        known = {}
    n = _count_call(unet_config, motion_config, key)
    try:
        known = known if isinstance(known, dict) else {}
        known[name] = n
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: counted again next time
    return n


@functools.cache
def _network_source() -> str:
    """A digest of the network's code: a count kept by another version of it is not reused."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    files = sorted((root / "models").glob("*.py")) + [root / "attention.py", root / "fused.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()[:16]


def _cache_file():
    from aa_trt.autotune import cache_file

    return cache_file().with_name("flops.json")


def _count_call(unet_config, motion_config, key) -> int:
    from aa_trt.models.layers import ReferenceState
    from aa_trt.models.unet import DeepFeatures

    (x, ctx, pose, kv, runs, frames, dtype, depth, features) = key

    def meta(shape):
        return None if shape is None else torch.empty(shape, device="meta", dtype=dtype)

    ref = ReferenceState(kv=[(meta(k), meta(v)) for k, v in kv] if kv is not None else None, runs=list(runs))
    deep = None if depth is None else DeepFeatures(depth, meta(features))
    unet = _meta_unet(unet_config, motion_config, dtype)
    with torch.no_grad():
        flops, _ = count_flops(unet, meta(x), 500, meta(ctx), frames=frames, pose=meta(pose), ref=ref, deep=deep)
    return flops


class UNetCost:
    """The counted FLOPs of the denoising UNet calls of one render (both CFG branches, as run),
    whole calls and shallow ones (feature reuse) apart. Each distinct call shape is counted once,
    on a meta-device copy of the UNet (nothing computed); engines run the same network."""

    def __init__(self, config):
        self.unet_config, self.motion_config = config.unet, config.motion
        self.full = self.shallow = 0
        self.full_calls = self.shallow_calls = 0

    def add(self, x, context, pose, ref, frames: int, deep=None, shallow: bool = False) -> None:
        """One UNet call's inputs (after it ran: `deep` holds its features either way)."""
        def shape(t):
            return None if t is None else tuple(t.shape)

        kv = None if ref is None or ref.kv is None else tuple((shape(k), shape(v)) for k, v in ref.kv)
        runs = tuple(tuple(r) for r in (ref.runs if ref is not None else ()))
        key = (shape(x), shape(context), shape(pose), kv, runs, frames, x.dtype,
               None if deep is None else deep.depth, shape(deep.features) if shallow else None)
        n = _call_flops(self.unet_config, self.motion_config, key)
        if shallow:
            self.shallow += n
            self.shallow_calls += 1
        else:
            self.full += n
            self.full_calls += 1

    @property
    def total(self) -> int:
        return self.full + self.shallow

    def as_dict(self) -> dict:
        """TFLOP, rounded for a summary: total, whole calls, shallow calls."""
        return {"total": round(self.total / 1e12, 4), "full": round(self.full / 1e12, 4),
                "shallow": round(self.shallow / 1e12, 4)}
