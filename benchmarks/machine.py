"""The machine a result came from, and its measured matmul rate (the denominator of utilisation).

Utilisation is reported against what torch.mm achieves on this machine in the same run rather
than against a datasheet peak: a shared 2-core VM, turbo clocks and BLAS choices all move the
achievable rate, and the step shares those conditions.
"""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

from .timing import timed


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _cpu_flags() -> list[str]:
    """The flags that decide the CPU's fast paths (bf16/fp16/int8 matrix units, vector widths)."""
    from aa_trt.precision import Machine

    keep = ("amx", "avx512", "avx2", "avx_vnni", "fma", "f16c")
    return sorted(f for f in Machine.detect().cpu_flags if f.startswith(keep))


def _cpu_kernels() -> dict:
    """Whether the project's CPU kernels (kernels/cpu/) built here, and the flash one with them."""
    from aa_trt.kernels import cpu_flash_attention, cpu_native

    lib = cpu_native.library()
    return dict(built=lib is not None, why_not=cpu_native.why_not(),
                flash_attention=lib is not None and cpu_flash_attention.available(),
                flash_attention_amx=lib is not None and cpu_flash_attention.available(tiles=True))


def describe() -> dict:
    from aa_trt.precision import choose

    auto = choose("auto", "cuda" if torch.cuda.is_available() else "cpu")
    info = dict(
        cpu_model=_cpu_model(),
        cpu_flags=_cpu_flags(),
        dtype_auto={"name": auto.name, "reason": auto.reason},
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        memory_gib=_memory_gib(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        # Other jobs on a shared machine slow everything; the ratios are measured round by round
        # under the same load, the absolute times and utilisation are not immune to it.
        loadavg_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        cuda=None,
        cpu_kernels=_cpu_kernels(),
    )
    if torch.cuda.is_available():
        info["cuda"] = dict(device=torch.cuda.get_device_name(0), runtime=torch.version.cuda,
                            capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def tag(info: dict) -> str:
    """A short file-name-safe label: the GPU if there is one, else the CPU model and thread count."""
    name = info["cuda"]["device"] if info.get("cuda") else f"{info['cpu_model']}-{info['torch_threads']}t"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def matmul(device="cpu", dtype=torch.float32, n: int = 4096):
    """(fn, flops): fn() runs one n x n x n torch.mm, which does 2 n^3 FLOPs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * n**3


def rate(times: list[float], flops: int, **about) -> dict:
    return dict(about, reps=len(times), median_flops_per_s=flops / statistics.median(times),
                best_flops_per_s=flops / min(times))


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 4096, reps: int = 5) -> dict:
    """FLOP/s of torch.mm at n x n x n, median and best over `reps` after a warm-up."""
    fn, flops = matmul(device, dtype, n)
    fn()
    times = [timed(fn, device) for _ in range(reps)]
    return rate(times, flops, n=n, dtype=str(dtype).removeprefix("torch."), device=str(device))
