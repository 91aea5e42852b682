"""Which precision a run computes in, picked from what the machine has, and why.

`dtype="auto"` (the default of `aa-trt run`, `batch` and `eval`): fp16 on CUDA; bf16 on a CPU
whose instruction set multiplies bf16 natively (AMX-BF16 on Xeons from Sapphire Rapids on, or
AVX512-BF16 on Cooper Lake Xeons and AMD Zen 4 and later), where oneDNN runs bf16 matmuls and
convolutions several times faster than fp32; fp32 everywhere else (an AVX2-only CPU emulates bf16
and is slower in it than in fp32). `fp32` stays the Moore-exact path (the golden fixture's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aa_trt.files import DTYPE_NAMES

AUTO = "auto"
# /proc/cpuinfo flags that mean native bf16 arithmetic, best first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Machine:
    """What the precision choice looks at (tests build their own)."""

    cuda: bool
    cpu_model: str
    cpu_flags: frozenset[str]

    @classmethod
    def detect(cls) -> "Machine":
        import torch

        model, flags = "unknown", frozenset()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
        except OSError:
            pass  # not Linux: no flags known, so auto stays at fp32 on the CPU
        return cls(torch.cuda.is_available(), model, flags)


@dataclass(frozen=True)
class Precision:
    name: str    # fp32 / fp16 / bf16
    reason: str  # one phrase for the summary: what was asked, or what the machine has

    def torch_dtype(self):
        from aa_trt.files import torch_dtype

        return torch_dtype(self.name)


def choose(dtype: str, device: str = "cpu", machine: Machine | None = None) -> Precision:
    """The precision of a run on `device`: `dtype` itself when named, the machine's best for auto."""
    if dtype != AUTO:
        from aa_trt.files import dtype_name, torch_dtype

        return Precision(dtype_name(torch_dtype(dtype)), "asked for")
    machine = machine or Machine.detect()
    if str(device).startswith("cuda"):
        return Precision("fp16", "auto: CUDA device")
    have = [f for f in BF16_FLAGS if f in machine.cpu_flags]
    if have:
        return Precision("bf16", f"auto: the CPU has {have[0]}")
    return Precision("fp32", "auto: the CPU has no native bf16 (no amx_bf16 or avx512_bf16)")


def check_name(dtype: str, param: str = "dtype") -> str:
    """A dtype option's value: auto or one of DTYPE_NAMES (OptionError otherwise)."""
    from aa_trt.errors import OptionError
    from aa_trt.files import torch_dtype

    if dtype == AUTO:
        return dtype
    try:
        torch_dtype(dtype, param)
    except OptionError:
        raise OptionError(param, dtype, f"expected one of {', '.join(CHOICES)}") from None
    return dtype


CHOICES = (AUTO,) + DTYPE_NAMES
