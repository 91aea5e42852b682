"""Freed host memory kept for the next tensor instead of handed back to the kernel (glibc malloc).

torch's CPU tensors come from malloc, and glibc serves every block above 32 MiB (less, before its
threshold adapts) with its own mmap and unmaps it on free. A VAE decode or a UNet window allocates
and frees such blocks op after op, so each new one is fresh pages: a page fault per 4 KiB and the
kernel zeroing it before the op writes it. On the machines measured that halves or worse the rate
of a memory-bound op (a 134 MB bf16 copy into a fresh tensor 7 GB/s, into a reused one 22 GB/s;
8 decoded frames 1.42 -> 1.10 s: docs/performance.md, "Host memory"). jemalloc or tcmalloc preloaded
do the same; this needs nothing installed.

`keep_freed_memory()` turns off malloc's mmap for large blocks (M_MMAP_MAX = 0: they come from the
heap) and its trimming of the heap's top (M_TRIM_THRESHOLD at its maximum), so a freed block is
reused by the next one. The cost: the process keeps its peak heap until it exits (what a render
reaches anyway, once). It is process-wide, so only the `aa-trt` process's own entry and the
benchmarks that time what it does call it; a program importing aa_trt keeps its allocator as it
was. `AA_TRT_KEEP_FREED_MEMORY=0` leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def enabled() -> bool:
    return os.environ.get("AA_TRT_KEEP_FREED_MEMORY", "1") not in ("0", "false", "off", "")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks (see the module docstring). True when it did;
    False where it was turned off or the C library is not glibc (nothing changes there)."""
    if not enabled() or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
