"""Device memory of a run, counted from tensor allocations (no GPU needed).

`AllocationCounter` is a dispatch mode that sees every tensor an op returns on one device type
and keeps the bytes of the storages still alive: `current` and `peak`. Run on the meta device
the real code path at full size allocates nothing, so a 512x768 sd15 run can be counted on a
CPU. A storage is counted once, however many views of it exist, and freed when its last tensor
dies (weakref finalizers on the tensor objects; torch keeps a tensor's Python object alive while
C++ holds it).

What a count is, and is not:
- it is the sum of live tensor storages: what `torch.cuda.memory_allocated` would report for
  the same ops, not what the caching allocator reserves (block rounding, fragmentation), nor
  cuDNN/cuBLAS workspaces, nor the CUDA context (~0.3-0.5 GB);
- attention is counted as the flash kernel allocates on CUDA (output + log-sum-exp), not as
  the meta device's math fallback, which would materialise the (n x m) score matrix;
- our attention goes through the SDPA fallback (the Triton kernels are not selected on meta),
  so the reference K/V concatenation the kernels avoid is counted: an upper bound for that path.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from aa_trt.pipeline import default_decode_chunk

from .workloads import video_inputs


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (e.g. a module's parameters)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return storage_bytes(list(module.parameters()) + list(module.buffers()))


class _FlashAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention without mask/dropout on meta tensors -> the flash op's own
    allocation pattern (its meta kernel: output + log-sum-exp), as a CUDA run (flash or
    memory-efficient kernel) and the CPU's flash kernel allocate, instead of the meta device's
    math fallback."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and not kwargs:
            q, k, v = args
            if q.device.type == "meta":
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        return func(*args, **kwargs)


class AllocationCounter(TorchDispatchMode):
    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}      # storage id -> bytes, storages allocated while counting
        self.holders: dict[int, int] = {}   # storage id -> live tensor objects on it
        self._seen: set[int] = set()        # id() of the tensor objects holding a counted storage
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _release(self, key: int, obj_id: int) -> None:
        self._seen.discard(obj_id)
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.current -= self.live.pop(key)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if t.device.type != self.device_type or id(t) in self._seen:
            return  # another device, or an in-place op handing back a tensor already held
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.live:
            if key in inputs:
                return  # a view of a storage made before counting (a weight, an input)
            self.live[key] = st.nbytes()
            self.holders[key] = 0
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
        self.holders[key] += 1
        self._seen.add(id(t))
        weakref.finalize(t, self._release, key, id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type == self.device_type}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


@contextmanager
def counting(counter: AllocationCounter):
    """Count allocations inside the block (SDPA on meta counted as a fused kernel allocates)."""
    with _FlashAttention(), counter:
        yield counter


GiB = 2**30


def resident_weights(animator, offload: bool) -> dict[str, int]:
    """Weight bytes on the device in each phase of a run. Conditioning needs all five models;
    denoising and decoding keep the UNet, the PoseGuider and the VAE decoder, plus, without
    `offload`, the ReferenceNet, CLIP and the VAE encoder that `Animator.set_options` moves away."""
    m = animator.models
    moved = sum(module_bytes(mod) for mod in animator.conditioning_models())
    total = sum(module_bytes(mod) for mod in m.components().values())
    return {"conditioning": total, "denoising": total - moved if offload else total,
            "decoding": total - moved if offload else total}


def count_run(animator, frames: int, width: int, height: int, *, offload: bool, steps: int = 1,
              context_frames: int = 24, decode_chunk: int | None = None, seed: int = 0) -> dict:
    """Peak device bytes of each phase of `Animator.__call__` on the meta device: what is
    allocated (activations, conditioning, latents) plus the phase's resident weights. One DDIM
    step: every step runs the same windows. Decoding mirrors `Animator.decode` up to its copy
    to the host (the frames are written into host memory chunk by chunk)."""
    ref, poses, _ = video_inputs(frames, height, width, seed)
    if decode_chunk is None:
        decode_chunk = default_decode_chunk(height, width)
    weights = resident_weights(animator, offload)
    if offload:
        # What `prepare` does with offload on a GPU, which the meta device cannot copy to the host:
        # each chunk's pose features are made on the device (counted) and kept in host memory.
        device_encode = animator.encode_poses

        def encode_to_host(poses, chunk=16, to_host=False):
            for s in range(0, len(poses), chunk):
                f = device_encode(poses[s:s + chunk], chunk)
                shape, dtype = f.shape[1:], f.dtype
                del f
            return torch.empty((len(poses),) + tuple(shape), dtype=dtype)  # host memory

        animator.encode_poses = encode_to_host
    try:
        peaks, held = _count_phases(
            animator, lambda: animator.prepare(ref, poses),
            lambda cond, x: animator.denoise(cond, x, steps=steps, context_frames=context_frames, progress=False),
            decode_chunk)
    finally:
        animator.__dict__.pop("encode_poses", None)
    total = {k: peaks[k] + weights[k] for k in peaks}
    return dict(frames=frames, width=width, height=height, offload=offload, context_frames=context_frames,
                decode_chunk=decode_chunk, weights=weights, allocated_peak=peaks, peak=total,
                run_peak=max(total.values()), held_after_conditioning=held)


def count_moore_run(animator, frames: int, width: int, height: int, *, steps: int = 1,
                    guidance: float = 3.5, context_frames: int = 24, seed: int = 0) -> dict:
    """The Moore-style run (benchmarks/moore_baseline.py) counted the same way: every model stays
    on the device; the ReferenceNet at batch 2, the PoseGuider on all frames in one call, banks
    repeated per frame, the VAE decoding one frame at a time. Our row-chunked feed-forward is
    switched off: Moore's runs whole. `animator` should hold fp16 models with an fp16 VAE (Moore
    runs everything in its weight_dtype)."""
    from aa_trt.models import layers

    from .moore_baseline import moore_denoise, moore_prepare

    ref, poses, _ = video_inputs(frames, height, width, seed)
    weights = sum(module_bytes(mod) for mod in animator.models.components().values())
    chunk_elements, layers.FF_CHUNK_ELEMENTS = layers.FF_CHUNK_ELEMENTS, 1 << 62
    try:
        peaks, _ = _count_phases(
            animator, lambda: moore_prepare(animator, ref, poses, guidance),
            lambda cond, x: moore_denoise(animator, cond, x, steps, guidance, context_frames), 1)
    finally:
        layers.FF_CHUNK_ELEMENTS = chunk_elements
    total = {k: v + weights for k, v in peaks.items()}
    return dict(frames=frames, width=width, height=height, weights=weights, allocated_peak=peaks,
                peak=total, run_peak=max(total.values()))


def _count_phases(animator, prepare, denoise, decode_chunk: int) -> tuple[dict[str, int], int]:
    """Allocated peak of conditioning (`prepare()`), denoising (`denoise(cond, latents)`) and
    decoding (`decode_chunk` frames a VAE call), and what conditioning leaves held."""
    counter, peaks = AllocationCounter("meta"), {}
    with counting(counter):
        cond = prepare()
        peaks["conditioning"], held = counter.peak, counter.current
        counter.reset_peak()
        latents = torch.empty(animator.latent_shape(cond), device="meta")
        out = denoise(cond, latents)
        del latents
        peaks["denoising"] = counter.peak
        counter.reset_peak()
        vae, scale = animator.models.vae, animator.config.latent_scale
        z = out[0].permute(1, 0, 2, 3)
        for s in range(0, z.shape[0], decode_chunk):
            x = vae.decode((z[s:s + decode_chunk] / scale).to(animator.vae_dtype)).sample
            x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # then copied to the host
            del x
        peaks["decoding"] = counter.peak
    return peaks, held
