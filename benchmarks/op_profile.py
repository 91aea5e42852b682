"""Where a denoising step's CPU time goes, in figures that do not depend on the machine's speed.

For one piece of work (a bf16 UNet call with CFG, or the conditioning pass plus two CFG steps,
or a VAE decode) at SD1.5's structure at half width, the torch profiler's self-CPU times are
grouped into GEMM-class ops (convolutions, linear layers, matmuls), attention kernels and the rest
(copies, layout changes, elementwise ops, norms, softmax outside an attention kernel), and the
`aten::copy_` calls are counted with the bytes they write. The counts are properties of the code;
the split of time depends on the machine, whose model and flags are printed with it.

    python -m benchmarks.op_profile --what unet            # one bf16 UNet call, 16 frames, CFG
    python -m benchmarks.op_profile --what steps --json    # conditioning + two CFG steps
    python -m benchmarks.op_profile --what decode          # VAE decode, 8 frames, 256x256

Run it from another checkout (`cd ../old && python -m benchmarks.op_profile ...`) to compare two
versions of the code on one machine: it imports aa_trt from the working directory first.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# Self time of these ops is the matrix work (oneDNN/MKL kernels) of convolutions and linear layers.
GEMM_OPS = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
            "aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
            "aten::addbmm", "aten::matmul", "aten::linear",
            "aten::_mkldnn_convolution", "aten::mkldnn_linear", "aten::_addmm_activation",
            "aten::_weight_int8pack_mm", "aten::einsum",
            "mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::_softmax_backward_data",
                 "aa_trt::attention", "aa_trt::motion_attention"}
# Pointwise kernels: each is one pass over its operands' memory.
ELEMENTWISE_OPS = {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::div",
                   "aten::div_", "aten::gelu", "aten::silu", "aten::silu_", "aten::sigmoid",
                   "aten::tanh", "aten::exp", "aten::clamp", "aten::where", "aten::neg",
                   "aten::rsqrt", "aten::pow", "aten::sin", "aten::cos", "aten::addcmul"}
COPY_OPS = {"aten::copy_"}


def _itemsize(dtype: str) -> int:
    name = dtype.lower()
    for key, size in (("double", 8), ("long", 8), ("int64", 8), ("float", 4), ("int", 4),
                      ("half", 2), ("bfloat16", 2), ("short", 2), ("bool", 1), ("char", 1), ("byte", 1)):
        if key in name:
            return size if not ("bfloat16" in name or "half" in name) else 2
    return 4


def summarize(prof) -> dict:
    """A profile's events -> times by class, copy counts and bytes, elementwise kernel count."""
    self_us = defaultdict(float)
    calls = defaultdict(int)
    copy_bytes = 0
    for e in prof.events():
        self_us[e.name] += e.self_cpu_time_total
        calls[e.name] += 1
        if e.name in COPY_OPS and e.input_shapes and e.input_shapes[0]:
            n = 1
            for s in e.input_shapes[0]:
                n *= s
            dtypes = getattr(e, "input_dtypes", None) or ["float"]
            copy_bytes += n * _itemsize(str(dtypes[0]))
    total = sum(self_us.values())
    gemm = sum(v for k, v in self_us.items() if k in GEMM_OPS)
    attn = sum(v for k, v in self_us.items() if k in ATTENTION_OPS)
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:15]
    return dict(
        total_self_s=total / 1e6, gemm_s=gemm / 1e6, attention_s=attn / 1e6,
        outside_s=(total - gemm - attn) / 1e6, gemm_share=gemm / total if total else 0.0,
        copy_calls=sum(calls[k] for k in COPY_OPS), copy_bytes=copy_bytes,
        elementwise_calls=sum(calls[k] for k in ELEMENTWISE_OPS),
        top_ops=[dict(op=k, self_s=v / 1e6, share=v / total, calls=calls[k]) for k, v in top],
        # where the time outside GEMMs and attention goes (what a fusion or kernel could remove)
        outside_ops=[dict(op=k, self_s=v / 1e6, calls=calls[k]) for k, v in sorted(
            ((k, v) for k, v in self_us.items() if k not in GEMM_OPS and k not in ATTENTION_OPS),
            key=lambda kv: -kv[1])[:12]],
    )


def profile(fn, warmup: int = 1) -> dict:
    """fn() under the profiler after `warmup` unprofiled calls; wall time included."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        fn()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return dict(summarize(prof), wall_s=wall)


# ---------------------------------------------------------------------------- workloads
def sd15_half_config():
    from aa_trt.config import PRESETS

    base = PRESETS["sd15"]
    return dataclasses.replace(
        base, name="sd15-half",
        unet=dataclasses.replace(base.unet, block_out_channels=(160, 320, 640, 640)),
        pose_guider=dataclasses.replace(base.pose_guider, embedding_channels=160),
        vae=dict(base.vae, block_out_channels=[64, 128, 256, 256]))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def animator(dtype: torch.dtype, with_vae: bool = True):
    """An Animator over random sd15-half weights in `dtype` (the VAE in the pipeline's own choice)."""
    from aa_trt.checkpoint import build_models
    from aa_trt.pipeline import Animator, vae_dtype_for

    models = build_models(sd15_half_config(), "cpu")
    for i, (name, module) in enumerate(models.components().items()):
        _randomize(module, i)
        module.eval().requires_grad_(False).to(vae_dtype_for(dtype) if name == "vae" else dtype)
    return Animator(models, "cpu", dtype)


def inputs(frames: int, size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ref = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    latents = torch.randn((1, 4, frames, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    return ref, poses, latents


def unet_call_work(anim, frames: int = 16, size: int = 256):
    """One denoising-UNet call with CFG over one window: 2 x frames rows."""
    ref, poses, latents = inputs(frames, size)
    cond = anim.prepare(ref, poses)
    step = anim.unet_step(cond)
    x = latents.to(anim.dtype)
    win = [list(range(frames))]
    return lambda: step(x, 500, win, ("uncond", "cond"))


def steps_work(anim, frames: int = 16, size: int = 256, steps: int = 2):
    """The conditioning pass and `steps` CFG denoising steps, as `run` does them."""
    ref, poses, latents = inputs(frames, size)

    def work():
        cond = anim.prepare(ref, poses)
        return anim.denoise(cond, latents, steps=steps, guidance=3.5, progress=False)
    return work


def decode_work(anim, frames: int = 8, size: int = 256):
    _, _, latents = inputs(frames, size)
    return lambda: anim.decode(latents, chunk=frames)


WORK = {"unet": unet_call_work, "steps": steps_work, "decode": decode_work}


def keep_freed_memory() -> bool:
    """malloc set as `aa-trt`'s own process sets it (aa_trt/host_memory.py), taken from this file's
    checkout whichever aa_trt the process imports: a baseline tree's process gets the same
    allocator, so the comparison is of the code alone."""
    spec = importlib.util.spec_from_file_location(
        "_aa_trt_host_memory", Path(__file__).resolve().parents[1] / "aa_trt" / "host_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_freed_memory()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=sorted(WORK), default="unet")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", type=int, default=256, help="frame size in pixels (square)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layout", choices=("nchw", "nhwc"), default=None,
                   help="force the UNet's activation layout (default: this machine's measured choice)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    import aa_trt

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    anim = animator(dtype)
    kw = dict(size=args.size)
    if args.frames:
        kw["frames"] = args.frames
    forced = contextlib.nullcontext()
    if args.layout:
        from aa_trt import autotune  # not in versions of the code without a measured layout
        forced = autotune.override({"layout:": args.layout})
    with torch.no_grad(), forced:
        result = profile(WORK[args.what](anim, **kw))
    from benchmarks.machine import describe

    result.update(what=args.what, dtype=args.dtype, aa_trt=aa_trt.__file__, machine=describe(),
                  keep_freed_memory=kept, **kw)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.what} {args.dtype} size {args.size}: wall {result['wall_s']:.2f} s, profiled self "
          f"{result['total_self_s']:.2f} s: GEMM {result['gemm_s']:.2f} s ({result['gemm_share']:.0%}), "
          f"attention {result['attention_s']:.2f} s, outside {result['outside_s']:.2f} s")
    print(f"copy_: {result['copy_calls']} calls, {result['copy_bytes'] / 2**20:.0f} MiB; "
          f"elementwise calls: {result['elementwise_calls']}")
    for row in result["top_ops"]:
        print(f"  {row['op']:<55} {row['self_s']:7.3f} s {row['share']:6.1%} {row['calls']:6d} calls")
    print("outside GEMMs and attention:")
    for row in result["outside_ops"]:
        print(f"  {row['op']:<55} {row['self_s']:7.3f} s {row['calls']:6d} calls")
    print(f"({result['machine']['cpu_model']}, {result['machine']['torch_threads']} threads, aa_trt from {result['aa_trt']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
