"""The denoising UNet call replayed from CUDA graphs, one graph per input-shape key (`--cuda-graph`).

A run calls the UNet with the same few shapes steps x windows times, and each call launches
hundreds of small kernels whose CPU launch cost a graph replay removes. `GraphedUNet(unet)` takes
the UNet's call, `(x, timestep, context, frames=, pose=, ref=)`. On a key it has not seen (shapes
and dtypes of x, context and pose, the frame count, the uncond/cond row runs, the reference K/V
shapes) it allocates static input buffers, warms the call up on a side stream (so the allocator,
cuDNN/cuBLAS and Triton settle before anything is recorded, as PyTorch's CUDA-graph docs
prescribe) and captures one graph. Every call copies its inputs into that key's buffers, replays,
and returns a copy of the static output: a new shape never replays a stale graph, and a caller
keeping an output is not overwritten by the next replay.

The timestep is a device scalar filled per call (no host-to-device copy recorded in the graph);
the reference K/V cache is copied into static buffers whenever a call brings another cache (once
per video). Each graph keeps its own memory pool: a handful of keys per run (full and remainder
window batches), each holding one UNet call's activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aa_trt.models.layers import ReferenceState


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    pose: torch.Tensor | None
    state: ReferenceState | None
    kv_source: list | None = None
    out: torch.Tensor | None = None


def _timestep_dtype(timestep) -> torch.dtype:
    if isinstance(timestep, torch.Tensor):
        return timestep.dtype
    return torch.as_tensor(timestep).dtype  # int -> int64, float -> float32, as the UNet sees them


class GraphedUNet:
    """`unet(x, timestep, context, frames=, pose=, ref=)` replayed from CUDA graphs (CUDA only)."""

    def __init__(self, unet, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict[tuple, _Graph] = {}

    @staticmethod
    def key(x, timestep, context, frames, pose, ref) -> tuple:
        t = torch.as_tensor(timestep)
        kv = None
        if ref is not None and ref.kv is not None:
            kv = tuple((tuple(k.shape), k.dtype, tuple(v.shape), v.dtype) for k, v in ref.kv)
        return (tuple(x.shape), x.dtype, x.device, tuple(t.shape), _timestep_dtype(timestep),
                tuple(context.shape), context.dtype, frames,
                None if pose is None else (tuple(pose.shape), pose.dtype),
                None if ref is None else tuple(ref.runs), kv)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep, context: torch.Tensor, *, frames: int = 1,
                 pose: torch.Tensor | None = None, ref: ReferenceState | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs replay CUDA work; the UNet input is on {x.device}")
        if ref is not None and ref.bank is not None:
            raise ValueError("CUDA graphs capture the denoising call; the ReferenceNet's bank mode is not one")
        key = self.key(x, timestep, context, frames, pose, ref)
        g = self.graphs.get(key)
        if g is None:
            g = self._static(x, timestep, context, pose, ref)
            self._load(g, x, timestep, context, pose, ref)
            self._capture(g, frames)
            self.graphs[key] = g
        else:
            self._load(g, x, timestep, context, pose, ref)
        g.graph.replay()
        return g.out.clone()

    @staticmethod
    def _static(x, timestep, context, pose, ref) -> _Graph:
        t = torch.zeros(torch.as_tensor(timestep).shape, dtype=_timestep_dtype(timestep), device=x.device)
        state = None
        if ref is not None:
            kv = None if ref.kv is None else [(torch.empty_like(k), torch.empty_like(v)) for k, v in ref.kv]
            state = ReferenceState(kv=kv, runs=list(ref.runs))
        return _Graph(torch.cuda.CUDAGraph(), torch.empty_like(x), t, torch.empty_like(context),
                      None if pose is None else torch.empty_like(pose), state)

    @staticmethod
    def _load(g: _Graph, x, timestep, context, pose, ref) -> None:
        g.x.copy_(x)
        if isinstance(timestep, torch.Tensor):
            g.t.copy_(timestep)
        else:
            g.t.fill_(timestep)
        g.context.copy_(context)
        if pose is not None:
            g.pose.copy_(pose)
        if ref is not None and ref.kv is not None and ref.kv is not g.kv_source:
            for (k, v), (sk, sv) in zip(ref.kv, g.state.kv):
                sk.copy_(k)
                sv.copy_(v)
            g.kv_source = ref.kv  # held, so that its identity is not reused by another cache

    def _capture(self, g: _Graph, frames: int) -> None:
        def call():
            return self.unet(g.x, g.t, g.context, frames=frames, pose=g.pose, ref=g.state)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g.graph):
            g.out = call()
