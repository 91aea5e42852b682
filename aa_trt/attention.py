"""Pure attention math (no parameters), the single place where fast kernels plug in.

Every attention function takes and returns token tensors (b, n, c) with the heads folded into c,
as the projections produce them. The reference variants read one shared reference K/V (1, m, c)
for every frame of the batch: the plain version below expands it (a view) into a concatenation;
the Triton kernel of `aa_trt.kernels` reads it in place. `group_norm_silu` (the resnets' norm +
activation) is dispatched here too, by the same backend rule.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from aa_trt import fused

# Which implementation runs the attention (and GroupNorm + SiLU) below (`set_backend`):
#   "auto":   the Triton kernels on CUDA fp16/bf16 tensors when triton imports and the head dim is
#             supported; SDPA (and F.group_norm + F.silu) otherwise, except `short_attention`
#             for short sequences on the CPU;
#   "sdpa":   never the kernels, and SDPA for every attention (not `short_attention` on the CPU);
#   "triton": the kernels for every call they support, on any device (CPU tensors need
#             TRITON_INTERPRET=1: the tests run whole blocks through the kernels that way).
# Autograd, tracing, torch.compile and ONNX export always take the plain path (the kernels are
# forward-only and opaque to tracers).
BACKENDS = ("auto", "sdpa", "triton")
_backend = "auto"
# Kernels that failed to compile or launch under "auto" ("reference", "temporal", "group_norm" ->
# the error): switched off for the rest of the process, so a GPU or Triton version the kernels were
# never built on costs one warning, not the run. Explicit "triton" raises instead.
_failed: dict[str, str] = {}
TEMPORAL_MAX_FRAMES = 32  # sequences this short go to the temporal kernel
# On the CPU ("auto"), attention with at most this many queries and keys (the motion modules'
# frames) runs as two batched matmuls and a softmax (`short_attention`): the flash SDPA kernel's
# blocking costs more than the work there (16 frames: 2.5-4x slower, docs/performance.md).
SHORT_SEQUENCE = 32


def set_backend(name: str) -> str:
    """Select the attention backend for the whole process; returns the previous one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, name
    return previous


def get_backend() -> str:
    return _backend


@functools.cache
def _kernels():
    """The kernel modules, or None where triton does not import (imported on first use only)."""
    try:
        from aa_trt.kernels import groupnorm_silu as gn_kernel
        from aa_trt.kernels import reference_attention as ref_kernel
        from aa_trt.kernels import temporal_attention as temporal_kernel
    except ImportError:
        return None
    return ref_kernel, temporal_kernel, gn_kernel


def _run_kernel(name: str, fn: Callable, *args):
    """fn(*args), the Triton kernel `name`; None where it failed under "auto" (the caller then
    takes the plain path, and so does every later call). Running out of GPU memory still raises."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 -- triton's compile/launch errors have no common base
        if _backend != "auto":
            raise
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        _failed[name] = f"{type(e).__name__}: {first_line}"
        warnings.warn(f"aa-trt: the Triton {name} kernel failed on this GPU ({_failed[name]}); "
                      f"the plain PyTorch path runs it for the rest of this process",
                      RuntimeWarning, stacklevel=3)
        return None


def failed_kernels() -> dict[str, str]:
    """The kernels switched off after failing under "auto", with their errors."""
    return dict(_failed)


_tracing = fused.tracing  # tracing, compiling or exporting: the graph keeps the plain form


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _backend_allows(x: torch.Tensor, *tensors: torch.Tensor | None, kernel: str = "") -> bool:
    """The rule every kernel obeys, before its own shape checks: whether the backend lets a kernel
    run on x (and the other operands, which only matter for autograd)."""
    if _backend == "sdpa" or (_backend == "auto" and not _on_gpu(x)):
        return False  # the CPU path stays exactly the plain code
    if _backend == "auto" and kernel in _failed:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return False
    if _tracing():
        return False
    if _backend == "auto":
        return x.dtype in (torch.float16, torch.bfloat16) and _kernels() is not None
    # "triton": explicit; unsupported shapes still fall back, a missing triton is an error
    if _kernels() is None:
        raise RuntimeError("attention backend 'triton' selected but triton does not import")
    if not x.is_cuda and not _kernels()[0].interpreting():
        raise RuntimeError("attention backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(set before the kernels are first imported)")
    return True


def _use_kernels(kernel: str, q: torch.Tensor, heads: int, *tensors: torch.Tensor | None) -> bool:
    d = q.shape[-1] // heads
    return (_backend_allows(q, *tensors, kernel=kernel) and 16 <= d <= 256
            and all(t.stride(-1) == 1 for t in (q, *tensors) if t is not None))


def kernels_for(x: torch.Tensor, heads: int) -> bool:
    """Whether temporal attention on tokens like x (positions, f, c) runs the Triton kernel: the
    motion modules then fold their positional encoding into per-frame biases (see below)."""
    return x.shape[1] <= TEMPORAL_MAX_FRAMES and _use_kernels("temporal", x, heads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (b, n, h*d) -> (b, h, n, d)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (b, h, n, d) -> (b, n, h*d)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The plain path: torch's SDPA.  q (b, n, c), k/v (b, m, c) -> (b, n, c)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads))
    return merge_heads(out)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`sdpa_attention` as matmul, softmax, matmul: faster on the CPU for a few queries and keys
    (SHORT_SEQUENCE); the (n, m) scores are materialised, so not for long sequences.
    q (b, n, c), k/v (b, m, c) -> (b, n, c)."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scores = (qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5  # (b, h, n, m)
    return merge_heads(scores.softmax(-1) @ vh)


def packed_short_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`short_attention` over axis 1 of a packed projection: qkv (b, n, [p,] 3c) = [q | k | v] (one
    GEMM with the three weights stacked), attention among the n entries of each (b, p), optional
    per-entry biases (3, heads, n, d) added on the way (the positional encoding folded through
    the projections). With p, the motion modules' frames attend to each other in the
    channels-last token layout (b, f, h*w, c) without first transposing it to (b*h*w, f, c).
    One copy lays q, k and v out head-major for the batched GEMMs (three separate head splits
    would each be cloned by matmul; the biases ride on it); the second GEMM writes the result
    token-major in place; the scale rides on the first GEMM.  -> (b, n, [p,] c).

    Where the project's C kernel (kernels/cpu/motion_attention.c) builds on this machine and
    measured faster for this shape (aa_trt.autotune), it does all of this in one pass instead."""
    if _motion_kernel_chosen(qkv, heads, bias):
        from aa_trt.kernels.cpu_motion_attention import motion_attention

        return motion_attention(qkv, heads, bias)
    return _packed_aten(qkv, heads, bias)


MOTION_CHOICES = ("aten", "native")


def _motion_kernel_chosen(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None) -> bool:
    """Whether `packed_short_attention` takes the C kernel: it supports the call and measured
    faster than the ATen composition on this machine for this shape (two rows of each kind)."""
    from aa_trt import autotune
    from aa_trt.kernels import cpu_motion_attention as native

    if not native.supported(qkv, heads, bias):
        return False
    shape = "x".join(map(str, qkv.shape[1:]))
    key = f"motion_attention:v2:{str(qkv.dtype).removeprefix('torch.')}:{shape}:h{heads}:b{int(bias is not None)}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        x = torch.randn((min(qkv.shape[0], 2),) + tuple(qkv.shape[1:]), generator=g).to(qkv.dtype)
        bb = None if bias is None else torch.randn(bias.shape, generator=g).to(bias.dtype)
        return {"aten": lambda: _packed_aten(x, heads, bb), "native": lambda: native.motion_attention(x, heads, bb)}

    return autotune.choose(key, MOTION_CHOICES, candidates) == "native"


def _packed_aten(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`packed_short_attention` composed of ATen ops."""
    if qkv.dim() == 3:
        return _packed_over_rows(qkv, heads, bias)
    b, n, p, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    src = qkv.view(b, n, p, 3, heads, d).permute(3, 0, 2, 4, 1, 5)  # (3, b, p, h, n, d), a view
    packed = torch.empty((3, b, p, heads, n, d), dtype=qkv.dtype, device=qkv.device)
    _pack_heads(packed, src, None if bias is None else bias[:, None, None])
    q, k, v = packed.view(3, b * p * heads, n, d).unbind(0)
    probs = _short_scores(q, k)
    probs, v = probs.view(b, p * heads, n, n), v.view(b, p * heads, n, d)
    out = torch.empty((b, n, p, c), dtype=qkv.dtype, device=qkv.device)
    for i in range(b):  # the second GEMM writes each (position, head) block token-major: no copy back
        torch.bmm(probs[i], v[i], out=out[i].view(n, p * heads, d).transpose(0, 1))
    return out


def _packed_over_rows(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`packed_short_attention` on qkv (b, n, 3c), b independent rows (the motion modules' NCHW
    path: b = batch x positions, thousands): each GEMM is one batched call over every (row,
    head), and one copy lays the result out token-major. (A GEMM per row costs a call per
    position; a GEMM per head writing its columns of the output in place takes bmm's slow
    strided-output path: 4x slower for these 16x16 blocks.)  -> (b, n, c)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    src = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d), a view
    packed = torch.empty((3, b, heads, n, d), dtype=qkv.dtype, device=qkv.device)
    _pack_heads(packed, src, None if bias is None else bias[:, None])
    q, k, v = packed.view(3, b * heads, n, d).unbind(0)
    heads_out = torch.bmm(_short_scores(q, k), v)  # (b*h, n, d)
    return heads_out.view(b, heads, n, d).transpose(1, 2).reshape(b, n, c)


def _short_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for q, k (B, n, d): the scale rides on the GEMM, the softmax runs
    in place.  -> (B, n, n)."""
    scores = torch.empty((q.shape[0], q.shape[1], k.shape[1]), dtype=q.dtype, device=q.device)
    torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=q.shape[-1] ** -0.5, out=scores)
    return softmax_(scores)


def _pack_heads(out: torch.Tensor, src: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = src + bias (bias broadcast; None: a copy) in one pass: out contiguous, src a permuted
    view of a packed projection. (A plain transposing copy followed by a contiguous add measured
    up to 2x faster for the pass itself at head dim 20, and no faster for a whole UNet call,
    while adding a copy of the whole projection: not taken.)"""
    if bias is None:
        out.copy_(src)
    else:
        torch.add(src, bias.to(out.dtype), out=out)


def packed_ok(x: torch.Tensor) -> bool:
    """Whether the motion modules on tokens x (positions, f, c) take `packed_short_attention`."""
    return _is_short(x, x) and fused.active(x)


def _is_short(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `_torch_attention` takes `short_attention`: CPU tensors under "auto", few queries
    and keys, and not while tracing or exporting (graphs keep SDPA's form)."""
    if _tracing() or fused.is_plain():
        return False
    return (_backend == "auto" and q.device.type == "cpu"
            and q.shape[1] <= SHORT_SEQUENCE and k.shape[1] <= SHORT_SEQUENCE)


# The scores one chunk of `chunked_attention` materialises: large enough for the GEMMs to run at
# their rate, small enough to stay in the last-level cache of a server CPU.
CHUNK_SCORE_BYTES = 16 << 20


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """x.softmax(-1) written over x (the same kernel and values): a fresh scores buffer that
    nothing else reads needs no second one, and the pass writes into memory already in cache."""
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _packed_source(parts: Sequence[torch.Tensor], heads: int) -> torch.Tensor | None:
    """parts (each (b, m, c)) as one head-major view (len(parts), b, heads, m, d) when they are
    consecutive column slices of one packed projection (q, k, v of one GEMM): one copy then lays
    them all out. None otherwise."""
    first = parts[0]
    b, m, c = first.shape
    step = c * first.element_size()
    for i, t in enumerate(parts):
        if (t.shape != first.shape or t.stride() != first.stride() or t.stride(-1) != 1
                or t.data_ptr() != first.data_ptr() + i * step):
            return None
    s0, s1 = first.stride(0), first.stride(1)
    return first.as_strided((len(parts), b, heads, m, c // heads), (c, s0, c // heads, s1, 1))


def _head_major(parts: Sequence[torch.Tensor], heads: int, extra: int = 0) -> torch.Tensor:
    """parts (each (b, m, c)) laid out head-major, (len(parts), b*heads, m + extra, d), by one copy
    where they are slices of one packed projection; `extra` rows per head left for shared keys."""
    b, m, c = parts[0].shape
    d = c // heads
    out = torch.empty((len(parts), b, heads, m + extra, d), dtype=parts[0].dtype, device=parts[0].device)
    src = _packed_source(parts, heads)
    if src is not None:
        out[:, :, :, :m].copy_(src)
    else:
        for i, t in enumerate(parts):
            out[i, :, :, :m].copy_(split_heads(t, heads))
    return out.view(len(parts), b * heads, m + extra, d)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None,
                      score_bytes: int = CHUNK_SCORE_BYTES) -> torch.Tensor:
    """`sdpa_attention` as batched GEMMs and an in-place softmax, over groups of one row's heads
    (or of queries, when one head's scores exceed `score_bytes`): the two GEMMs run at the
    machine's matmul rate, where the CPU flash kernel's blocking does not at head dims of 40 and
    more on some CPUs (chosen per shape by measuring, `cpu_attention`). q, k and v are laid out
    head-major by one copy when they are column slices of one packed projection (three
    otherwise); the second GEMM writes each group's heads into the token-major output in place
    (no copy back). k_ref, v_ref (1, m2, c): keys and values shared by every row, after its own
    (reference attention), copied once into the key buffer instead of concatenated per row.
    The scores are rounded to the inputs' dtype before the softmax (bf16: ~4x flash's error on
    the output).  q (b, n, c), k/v (b, m, c) -> (b, n, c)."""
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    m2 = 0 if k_ref is None else k_ref.shape[1]
    if m2 == 0 and m == n:
        qh, kh, vh = _head_major((q, k, v), heads).unbind(0)
    else:
        qh = _head_major((q,), heads)[0]
        kh, vh = _head_major((k, v), heads, extra=m2).unbind(0)
        for buf, shared in ((kh, k_ref), (vh, v_ref)) if m2 else ():
            buf.view(b, heads, m + m2, d)[:, :, m:].copy_(split_heads(shared, heads).expand(b, -1, -1, -1))
    kt = kh.transpose(1, 2)  # (bh, d, m): a transposed GEMM operand
    out = torch.empty(b, n, c, dtype=q.dtype, device=q.device)
    heads_out = out.view(b, n, heads, d)
    scale = d ** -0.5
    keys = m + m2
    per_head = n * keys * q.element_size()
    group = min(heads, score_bytes // per_head)
    if group >= 1:  # whole heads of one row at a time
        spans = [(i, h, min(heads, h + group), 0, n) for i in range(b) for h in range(0, heads, group)]
    else:  # one head at a time, its queries in chunks
        rows = max(1, score_bytes // (keys * q.element_size()))
        spans = [(i, h, h + 1, s, min(n, s + rows)) for i in range(b) for h in range(heads)
                 for s in range(0, n, rows)]
    for i, h0, h1, s0, s1 in spans:
        g0, g1 = i * heads + h0, i * heads + h1
        scores = torch.empty(h1 - h0, s1 - s0, keys, dtype=q.dtype, device=q.device)
        torch.baddbmm(scores, qh[g0:g1, s0:s1], kt[g0:g1], beta=0.0, alpha=scale, out=scores)  # q k^T / sqrt(d)
        torch.bmm(softmax_(scores), vh[g0:g1], out=heads_out[i, s0:s1, h0:h1].transpose(0, 1))
    return out


def strided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None,
                      score_bytes: int = CHUNK_SCORE_BYTES) -> torch.Tensor:
    """`sdpa_attention` as two plain GEMMs and an in-place softmax per (row, head, chunk of
    queries), each GEMM reading its operands where they lie: q, k and v may be column slices of
    one packed projection (any row stride, unit column stride), a head is a column slice of
    those, and the second GEMM writes the head's columns of the token-major output. Nothing is
    copied: no head-major layout in, none back (batched GEMMs would clone such operands).
    k_ref, v_ref (1, m2, c): keys and values shared by every row, read as if concatenated after
    each row's own (reference attention without the concatenation).
    q (b, n, c), k/v (b, m, c) -> (b, n, c) = softmax(q [k; k_ref]^T / sqrt(d)) [v; v_ref]."""
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    m2 = 0 if k_ref is None else k_ref.shape[1]
    out = torch.empty(b, n, c, dtype=q.dtype, device=q.device)
    rows = max(1, min(n, score_bytes // ((m + m2) * q.element_size())))
    buffer = torch.empty(rows, m + m2, dtype=q.dtype, device=q.device)
    scale = d ** -0.5
    for i in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            kh, vh = k[i, :, cols], v[i, :, cols]
            for s in range(0, n, rows):
                e = min(n, s + rows)
                qh, scores, o = q[i, s:e, cols], buffer[:e - s], out[i, s:e, cols]
                own = scores[:, :m]
                torch.addmm(own, qh, kh.t(), beta=0.0, alpha=scale, out=own)  # q k^T / sqrt(d)
                if m2:
                    shared = scores[:, m:]
                    torch.addmm(shared, qh, k_ref[0, :, cols].t(), beta=0.0, alpha=scale, out=shared)
                softmax_(scores)
                torch.mm(own, vh, out=o)
                if m2:
                    o.addmm_(scores[:, m:], v_ref[0, :, cols])
    return out


def _attention_candidates(q, m, heads):
    """Random work of q's shape with m keys (two rows at most: time grows with rows alike)."""
    g = torch.Generator().manual_seed(0)
    rows = min(q.shape[0], 2)
    qq = torch.randn((rows,) + tuple(q.shape[1:]), generator=g).to(q.dtype)
    kk = torch.randn((rows, m, q.shape[2]), generator=g).to(q.dtype)
    vv = torch.randn((rows, m, q.shape[2]), generator=g).to(q.dtype)
    work = {"sdpa": lambda: sdpa_attention(qq, kk, vv, heads),
            "gemm": lambda: chunked_attention(qq, kk, vv, heads),
            "strided": lambda: strided_attention(qq, kk, vv, heads)}
    for name in _kernel_choices(qq, kk, vv, heads):
        from aa_trt.kernels.cpu_flash_attention import flash_attention

        work[name] = lambda tiles=name == "amx": flash_attention(qq, kk, vv, heads, tiles=tiles)
    return work


# "flash" and "amx": the project's C kernel (kernels/cpu/flash_attention.c and its AMX build,
# flash_attention_amx.c), each where it builds and runs on this CPU.
CPU_CHOICES = ("sdpa", "gemm", "strided", "flash", "amx")


def _kernel_choices(q, k, v, heads, k_ref=None, v_ref=None) -> tuple[str, ...]:
    """Which of the C kernel's builds take these arguments here: () on CPUs without AVX-512 BF16."""
    from aa_trt.kernels import cpu_flash_attention

    return tuple(name for name in CPU_CHOICES[3:]
                 if cpu_flash_attention.supported(q, k, v, heads, k_ref, v_ref, tiles=name == "amx"))


def cpu_attention_key(dtype: torch.dtype, n: int, m: int, heads: int, d: int) -> str:
    """The measured choice's key for n queries over m keys (a results file reads it back)."""
    return f"attention:v4:{str(dtype).removeprefix('torch.')}:n{n}:m{m}:h{heads}:d{d}"


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  k_ref: torch.Tensor | None = None, v_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on the CPU by whichever of SDPA's flash kernel, `chunked_attention`,
    `strided_attention` and the project's own flash kernel (bf16 on CPUs with AVX-512 BF16; its
    AMX build where the CPU has AMX-BF16) measured fastest on this machine for this shape
    (aa_trt.autotune, once per machine).
    k_ref/v_ref (1, m2, c): keys shared by every row after its own (reference attention); only
    SDPA's path concatenates them."""
    from aa_trt import autotune

    n, d = q.shape[1], q.shape[2] // heads
    m = k.shape[1] + (0 if k_ref is None else k_ref.shape[1])
    key = cpu_attention_key(q.dtype, n, m, heads, d)
    kernels = _kernel_choices(q, k, v, heads, k_ref, v_ref)
    names = CPU_CHOICES[:3] + kernels
    choice = autotune.choose(key, names, lambda: _attention_candidates(q, m, heads))
    if choice in kernels:  # (a forced choice may name a build that cannot run here)
        from aa_trt.kernels.cpu_flash_attention import flash_attention

        return flash_attention(q, k, v, heads, k_ref, v_ref, tiles=choice == "amx")
    if choice == "strided":
        return strided_attention(q, k, v, heads, k_ref, v_ref)
    if choice == "gemm":
        return chunked_attention(q, k, v, heads, k_ref=k_ref, v_ref=v_ref)
    if k_ref is not None:
        k, v = _concat_reference(k, v, k_ref, v_ref)
    return sdpa_attention(q, k, v, heads)


def _concat_reference(k, v, k_ref, v_ref):
    b = k.shape[0]
    return (torch.cat([k, k_ref.to(k.dtype).expand(b, -1, -1)], dim=1),
            torch.cat([v, v_ref.to(v.dtype).expand(b, -1, -1)], dim=1))


def _torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    if _is_short(q, k):
        return short_attention(q, k, v, heads)
    if _backend == "auto" and fused.active(q):  # a CPU tensor outside tracing and `fused.plain()`
        return cpu_attention(q, k, v, heads)
    return sdpa_attention(q, k, v, heads)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v.  q (b, n, c), k/v (b, m, c) -> (b, n, c)."""
    if q.shape[1] == k.shape[1] <= TEMPORAL_MAX_FRAMES and _use_kernels("temporal", q, heads, k, v):
        out = _run_kernel("temporal", _kernels()[1].temporal_attention, q, k, v, heads)
        if out is not None:  # short sequences: motion modules
            return out
    return _torch_attention(q, k, v, heads)


@functools.lru_cache(maxsize=64)
def _flags_on(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """Per-row flags on the device, one copy per distinct flag pattern: no host-to-device copy
    per block and step (nor inside a CUDA graph capture, once a warm-up call has made it)."""
    return torch.tensor(flags, dtype=torch.int32, device=device)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_ref: torch.Tensor, v_ref: torch.Tensor, heads: int,
                        use_reference: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
    """Self-attention whose keys/values are the frame's own tokens followed by the reference's.

    q, k, v (b, n, c): the b frames' own projections; k_ref, v_ref (1, m, c): the reference K/V,
    shared by all b frames. Returns (b, n, c) = softmax(q [k; k_ref]^T / sqrt(d)) [v; v_ref].
    use_reference: optional (b,) flags; rows with a false flag (the uncond branch) attend to their
    own tokens only, as `attention(q, k, v)` would. None: every row uses the reference.
    """
    if _use_kernels("reference", q, heads, k, v, k_ref, v_ref):
        flags = use_reference
        if flags is not None and not isinstance(flags, torch.Tensor):
            flags = _flags_on(tuple(bool(u) for u in flags), q.device)
        out = _run_kernel("reference", _kernels()[0].reference_attention,
                          q, k, v, k_ref, v_ref, heads, flags)
        if out is not None:
            return out
    if use_reference is not None:
        flags = [bool(u) for u in (use_reference.tolist() if isinstance(use_reference, torch.Tensor)
                                   else use_reference)]
        if len(flags) != q.shape[0]:
            raise ValueError(f"use_reference has {len(flags)} entries for a batch of {q.shape[0]}")
        outs, start = [], 0
        for i in range(1, len(flags) + 1):  # runs of equal flags
            if i == len(flags) or flags[i] != flags[start]:
                s = slice(start, i)
                outs.append(reference_attention(q[s], k[s], v[s], k_ref, v_ref, heads) if flags[start]
                            else attention(q[s], k[s], v[s], heads))
                start = i
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    m = k.shape[1] + k_ref.shape[1]
    if (_backend == "auto" and fused.active(q)
            and not (q.shape[1] <= SHORT_SEQUENCE and m <= SHORT_SEQUENCE)):
        # The CPU: the measured choice, which may read the reference K/V without concatenating
        return cpu_attention(q, k, v, heads, k_ref.to(k.dtype), v_ref.to(v.dtype))
    k_all, v_all = _concat_reference(k, v, k_ref, v_ref)
    return attention(q, k_all, v_all, heads)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       bias_q: torch.Tensor | None = None, bias_k: torch.Tensor | None = None,
                       bias_v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the frame axis with optional per-frame biases (f, c) on q, k and v.

    q, k, v (positions, f, c). The biases are the positional encoding folded through the
    bias-free projections, (x + pe) W^T = x W^T + pe W^T (`aa_trt.kernels.temporal_attention.
    fold_positional_encoding`): the kernel adds them as it loads q/k/v, so the `x + pe` pass over
    the activations disappears. Without biases this is `attention(q, k, v, heads)`.
    """
    f = q.shape[1]
    if f <= TEMPORAL_MAX_FRAMES and _use_kernels("temporal", q, heads, k, v,
                                                 bias_q, bias_k, bias_v):
        out = _run_kernel("temporal", _kernels()[1].temporal_attention,
                          q, k, v, heads, bias_q, bias_k, bias_v)
        if out is not None:
            return out
    if bias_q is not None:
        q, k, v = q + bias_q[:f].to(q.dtype), k + bias_k[:f].to(k.dtype), v + bias_v[:f].to(v.dtype)
    return _torch_attention(q, k, v, heads)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) (plain group_norm when not `silu`), x (N, C, *spatial): the fused Triton
    kernel where the backend allows kernels and x is contiguous; on the CPU, for channels-last x,
    the project's C kernel (kernels/cpu/group_norm_silu.c) where it builds and measured faster for
    this shape; F.group_norm + F.silu otherwise."""
    if x.dim() >= 2 and x.is_contiguous() and _backend_allows(x, weight, bias, kernel="group_norm"):
        out = _run_kernel("group_norm", _kernels()[2].group_norm_silu,
                          x, num_groups, weight, bias, eps, silu)
        if out is not None:
            return out
    if _native_group_norm_chosen(x, num_groups, weight, bias, eps, silu):
        from aa_trt.kernels.cpu_group_norm_silu import group_norm_silu as native

        return native(x, num_groups, weight, bias, eps, silu)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    # In place outside autograd: the norm's output is a fresh buffer nothing else reads.
    return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y


GROUP_NORM_CHOICES = ("aten", "native")


def _native_group_norm_chosen(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, silu: bool) -> bool:
    """Whether `group_norm_silu` takes the CPU C kernel: the CPU fast paths apply (inference), the
    kernel supports x (channels-last) and it measured faster than ATen's for this shape on this
    machine (four images at most; the time grows with images alike)."""
    if not fused.active(x):
        return False
    from aa_trt import autotune
    from aa_trt.kernels import cpu_group_norm_silu as native

    if not native.supported(x, num_groups, weight, bias):
        return False
    n, c, h, w = x.shape
    key = f"group_norm_silu:v2:{str(x.dtype).removeprefix('torch.')}:c{c}:{h}x{w}:g{num_groups}:s{int(silu)}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        xx = torch.randn((min(n, 4), c, h, w), generator=g).to(x.dtype).contiguous(memory_format=torch.channels_last)
        ww = None if weight is None else torch.randn(c, generator=g).to(weight.dtype)
        bb = None if bias is None else torch.randn(c, generator=g).to(bias.dtype)

        def aten():
            y = F.group_norm(xx, num_groups, ww, bb, eps)
            return F.silu(y, inplace=True) if silu else y

        return {"aten": aten, "native": lambda: native.group_norm_silu(xx, num_groups, ww, bb, eps, silu)}

    return autotune.choose(key, GROUP_NORM_CHOICES, candidates) == "native"
