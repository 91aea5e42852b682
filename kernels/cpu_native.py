"""The project's own CPU kernels (kernels/cpu/*.c): compiled once per machine, loaded with ctypes.

ATen has no single kernel for some of the UNet's small, memory-bound steps (the motion modules'
attention over 16 frames, GroupNorm + SiLU on channels-last bf16), and composing them from ATen
ops costs passes over memory and copies. These C files do each in one pass. They use no torch
headers (a compile takes ~1 s, not the minutes of a torch extension) and are built with the C
compiler found at first use (`$CC`, else cc/gcc/clang), `-O3 -march=native`: for this CPU's
vector units, so the library is cached per machine under `$AA_TRT_CACHE/native/` (default
`~/.cache/aa-trt`), keyed by the sources, the compiler and the CPU's model and flags.

No compiler, a failed build or `AA_TRT_NATIVE=0`: `library()` returns None, `why_not()` says
why, and every caller keeps its ATen path. Where the library loads, the callers still time it
against ATen per shape (aa_trt.autotune) and take it only where it is faster on this machine.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "cpu"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-strict-aliasing", "-fPIC", "-shared", "-fopenmp")
_why: list[str] = []


def enabled() -> bool:
    return os.environ.get("AA_TRT_NATIVE", "1") not in ("0", "false", "off", "")


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    from aa_trt.autotune import cache_file

    return cache_file().parent / "native"  # beside the measured choices, under $AA_TRT_CACHE


def _key(cc: str, sources: list[Path]) -> str:
    from aa_trt.precision import Machine

    h = hashlib.sha256()
    for src in sources:  # and the headers they include
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    m = Machine.detect()
    h.update(f"{version}|{' '.join(FLAGS)}|{m.cpu_model}|{' '.join(sorted(m.cpu_flags))}".encode())
    return h.hexdigest()[:16]


def build(target: Path, cc: str, sources: list[Path]) -> None:
    """Compile `sources` into the shared library `target` (written to a temporary name in the
    same folder and renamed when complete: a concurrent or interrupted build leaves no half file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, sources), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            first = next((ln.strip() for ln in lines if "error" in ln), lines[0].strip() if lines else "")
            raise RuntimeError(f"{Path(cc).name} exited with {proc.returncode}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library (its functions typed), or None (then `why_not()` says why)."""
    if not enabled():
        _why.append("AA_TRT_NATIVE=0")
        return None
    cc = _compiler()
    if cc is None:
        _why.append("no C compiler found (set CC, or install gcc or clang)")
        return None
    sources = sorted(SOURCES.glob("*.c"))
    headers = sorted(SOURCES.glob("*.h"))
    if not sources:
        _why.append(f"no kernel sources in {SOURCES}")
        return None
    try:
        target = _cache_dir() / f"aa_trt_cpu_{_key(cc, sources + headers)}.so"
        if not target.exists():
            build(target, cc, sources)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why.append(f"the CPU kernels did not build: {e}")
        return None
    _declare(lib)
    return lib


def why_not() -> str | None:
    """Why `library()` is None (None when it loaded or was not asked for yet)."""
    return _why[-1] if _why else None


def _declare(lib: ctypes.CDLL) -> None:
    L, P, F, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.aa_motion_attention.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, L, L, F, I, I]
    lib.aa_motion_attention.restype = I
    lib.aa_group_norm_silu_nhwc.argtypes = [P, P, P, P, L, L, L, L, F, I, I, I]
    lib.aa_group_norm_silu_nhwc.restype = I
    lib.aa_flash_attention.argtypes = [P, L, L, P, L, L, P, L, L, P, L, P, L, P, L, L, L, L, L, L, L, L, F, I]
    lib.aa_flash_attention.restype = I
    lib.aa_layer_norm.argtypes = [P, P, P, P, L, L, F, I, I]
    lib.aa_layer_norm.restype = I
    lib.aa_flash_attention_available.argtypes = []
    lib.aa_flash_attention_available.restype = I
    lib.aa_flash_attention_amx.argtypes = lib.aa_flash_attention.argtypes
    lib.aa_flash_attention_amx.restype = I
    lib.aa_flash_attention_amx_available.argtypes = []
    lib.aa_flash_attention_amx_available.restype = I
