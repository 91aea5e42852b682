"""Peak resident memory of one pipeline run, in a fresh process; prints one JSON line.

    python -m benchmarks.peak_memory --impl aa-trt --frames 480

What is measured: the process's peak RSS (the kernel's VmHWM) during the run alone: the peak is
reset just before the run by writing "5" to /proc/self/clear_refs. RSS sees every byte torch's
CPU allocator holds (tracemalloc does not). Where the reset is refused, it falls back to
ru_maxrss, the peak over the process's whole life (then only runs bigger than the set-up are
measured right), and says so in "method". A fresh process per run, so no peak carries over.

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors
stay in its heap and count as RSS: the peak then grows with the number of big allocations, not
only with what is live (seen here: ~17 MB more between 480 and 960 frames, no tensor). By
default the threshold is pinned at 128 KiB (mallopt), so RSS follows the live tensors; pass
--glibc-default to measure with glibc's own policy instead.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import resource
from pathlib import Path

import torch

from aa_trt.config import PRESETS
from aa_trt.pipeline import Animator

from .workloads import full_models, pipeline_pair

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def pin_mmap_threshold(size: int = 128 * 1024) -> str:
    """Blocks >= size are mmapped and unmapped on free; setting it also stops glibc moving it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if libc.mallopt(M_MMAP_THRESHOLD, size) == 1:
            return f"glibc mmap threshold pinned at {size // 1024} KiB"
    except (OSError, AttributeError):
        pass
    return "allocator default (mallopt unavailable)"


def reset_peak() -> str:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss (peak reset refused)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=("aa-trt", "moore"), required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--size", type=int, default=64, help="width = height in pixels")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    # One thread keeps the runs short on a shared machine (see conftest.one_thread); per-thread
    # scratch buffers are small next to what is measured.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = "glibc default" if args.glibc_default else pin_mmap_threshold()

    animator = Animator(full_models(PRESETS[args.preset], seed=0))
    pair = pipeline_pair(animator, args.frames, args.size, args.size, steps=args.steps)
    run = pair.ours if args.impl == "aa-trt" else pair.moore
    gc.collect()
    method = reset_peak()
    before = _status_kib("VmRSS") * 1024
    out = run()
    peak = (_status_kib("VmHWM") if method.startswith("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    result = dict(impl=args.impl, frames=args.frames, size=args.size, steps=args.steps,
                  preset=args.preset, threads=args.threads, rss_before=before, peak_rss=peak,
                  run_peak=peak - before,
                  output_bytes=int(out.nbytes), method=method, allocator=allocator)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
