"""Per-architecture launch limits, and the pruning the launchers apply to their tile candidates.

Every launcher in this package lists its tile configurations in order of preference
(`tile_candidates` in each kernel's module) and a shared-memory estimate for each
(`shared_estimate`). `choose` takes the first candidate whose estimate fits the device's limit, so
a configuration that cannot launch on a card (Triton raises "out of resource: shared memory") is
never tried there. `python -m aa_trt.kernels.aot` compiles every candidate for sm_80/sm_89/sm_90
without a GPU and checks the estimates against what Triton actually allocates
(`tests/test_kernels_aot.py`: an estimate below the compiled `metadata.shared` fails).

Registers are not estimated here: ptxas spills rather than exceed 255 a thread, so the spill
check is done on the compiled code (aot.py), and the candidates are ordered so that the shipped
first choice does not spill on any of the three architectures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import torch

# Maximum dynamic shared memory per block (the opt-in limit, bytes), by compute capability:
# CUDA C Programming Guide, "Technical Specifications per Compute Capability".
SHARED_LIMIT = {
    70: 98304,                   # V100: 96 KiB
    75: 65536,                   # T4: 64 KiB
    80: 167936,                  # A100: 163 KiB
    86: 101376, 89: 101376,      # A10 / RTX 30xx, L4 / L40 / RTX 40xx: 99 KiB
    87: 167936,                  # Orin: 163 KiB
    90: 232448,                  # H100 / H200: 227 KiB
    100: 232448, 103: 232448,    # B200 / B300: 227 KiB
    120: 101376, 121: 101376,    # RTX 50xx / DGX Spark: 99 KiB
}
DEFAULT_SHARED_LIMIT = 49152     # an architecture not in the table: the static 48 KiB every card has
MAX_REGISTERS = 255              # per thread, every architecture since sm_35
ARCHS = (80, 89, 90)             # what aot.py compiles for by default: A100, L4/L40, H100/H200

C = TypeVar("C")


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: the kernel's tile constexprs plus Triton's num_warps/num_stages."""
    block: tuple[tuple[str, int], ...]  # (("BLOCK_M", 128), ("BLOCK_N", 64)): the tile constexprs
    num_warps: int
    num_stages: int = 1

    @classmethod
    def of(cls, num_warps: int, num_stages: int = 1, **block: int) -> "Tiles":
        return cls(tuple(block.items()), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.block)[name]

    def replace(self, **block: int | None) -> "Tiles":
        """The same configuration with some tile sizes overridden (None keeps the value)."""
        new = dict(self.block)
        new.update({k: v for k, v in block.items() if v is not None})
        return Tiles(tuple(new.items()), self.num_warps, self.num_stages)

    def label(self) -> str:
        tiles = " ".join(f"{k.lower()}={v}" for k, v in self.block)
        return f"{tiles} w={self.num_warps} s={self.num_stages}"


def shared_limit(cc: int | None) -> int | None:
    """Bytes of shared memory one block may use on compute capability `cc` (e.g. 80); None: no
    limit (the CPU interpreter)."""
    if cc is None:
        return None
    return SHARED_LIMIT.get(int(cc), DEFAULT_SHARED_LIMIT)


def capability(device: torch.device | str | None) -> int | None:
    """Compute capability as major*10 + minor (86 for sm_86) of a CUDA device; None otherwise."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def prune(candidates: Iterable[C], estimate: Callable[[C], int], cc: int | None) -> list[C]:
    """The candidates whose shared-memory estimate fits compute capability `cc`, in their order
    (all of them when cc is None: no device limit applies)."""
    limit = shared_limit(cc)
    return [c for c in candidates if limit is None or estimate(c) <= limit]


def choose(candidates: Sequence[C], estimate: Callable[[C], int], cc: int | None) -> C:
    """The first candidate that fits `cc`; ValueError when none does (each kernel's candidate list
    ends with a configuration small enough for every supported card)."""
    fitting = prune(candidates, estimate, cc)
    if not fitting:
        raise ValueError(f"no tile configuration fits sm_{cc}'s {shared_limit(cc)} bytes of shared "
                         f"memory (estimates {[estimate(c) for c in candidates]})")
    return fitting[0]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()
