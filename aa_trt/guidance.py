"""Context windows and classifier-free guidance over them: the whole-video model the sampler calls.

`windowed_guidance` turns a per-window UNet step into `model(x, t)` for the whole video, Moore's
aggregation (per-frame sums over the windows, divided by the per-frame count, then CFG). Who
computes which (branch, window) units is a `Plan`: one process is the one-rank plan; under
torchrun each rank runs its share and a `reduce` hook (aa_trt.process_group.StepReduce) sums the shares
across ranks once per step. The arithmetic after the sum is the same for every plan, so 1, 2 or 3
ranks give the same latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from aa_trt.errors import OptionError
from aa_trt.options import PARALLEL_MODES, check_parallel_mode  # noqa: F401  (their home is options.py)


# ---------------------------------------------------------------------------------- windows
def uniform_windows(n: int, size: int = 24, overlap: int = 4, closed_loop: bool = True) -> list[list[int]]:
    """Moore's `uniform` context schedule at step 0 (the only way its pipeline calls it): windows
    start every size - overlap frames and wrap around the end (frame indices mod n)."""
    if n <= size:
        return [list(range(n))]
    stride = size - overlap
    if stride <= 0:
        raise OptionError("context_overlap", overlap, f"must be smaller than `context_frames` ({size})")
    stop = n if closed_loop else n - overlap
    return [[j % n for j in range(start, start + size)] for start in range(0, stop, stride)]


def sliding_windows(n: int, size: int = 24, overlap: int = 4) -> list[list[int]]:
    """Non-wrapping windows for clips that do not loop: the last window is shifted back so it ends
    on the last frame; every window has `size` frames, and the first and last frames never mix."""
    if n <= size:
        return [list(range(n))]
    stride = size - overlap
    if stride <= 0:
        raise OptionError("context_overlap", overlap, f"must be smaller than `context_frames` ({size})")
    starts = list(range(0, n - size, stride)) + [n - size]
    return [list(range(s, s + size)) for s in starts]


def context_windows(n: int, size: int, overlap: int, schedule: str = "uniform") -> list[list[int]]:
    if schedule == "uniform":
        return uniform_windows(n, size, overlap, closed_loop=True)
    if schedule == "sliding":
        return sliding_windows(n, size, overlap)
    raise OptionError("context_schedule", schedule, "expected one of uniform, sliding")


def window_counts(windows: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The windows as index tensors, and how many windows cover each frame (N,)."""
    idx = [torch.as_tensor(w, dtype=torch.long) for w in windows]
    counts = torch.zeros(max(max(w) for w in windows) + 1)
    for w in idx:
        counts.index_add_(0, w, torch.ones(len(w)))
    if (counts == 0).any():
        raise ValueError("context windows leave frames uncovered")
    return idx, counts


class WindowIndexCache:
    """The window indices (host int64 tensors) and per-frame window counts, copied to a device
    once per (device, dtype) and kept: a copy from pageable host memory per window and step makes
    the host wait for the GPU's queue to drain each time."""

    def __init__(self, idx: Sequence[torch.Tensor], counts: torch.Tensor):
        self.idx, self.counts = list(idx), counts
        self._copies: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._copies:
            self._copies[key] = ([w.to(x.device) for w in self.idx], self.counts.to(x.device, x.dtype))
        return self._copies[key]


# ---------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    """Which (branch, window) units this rank computes in every step."""

    mode: str                          # effective: "single", "window" or "guidance"
    world: int
    rank: int
    all_branches: tuple[str, ...]      # ("uncond", "cond") with CFG, else ("cond",)
    branches: tuple[str, ...]          # this rank's branches: all of them, or one
    windows: tuple[int, ...]           # indices into the window list
    groups: tuple[int, ...]            # ranks per branch group: (P,) or (uncond, cond)
    max_units: int                     # (branch, window) UNet units of the busiest rank per step

    def describe(self) -> str:
        if self.mode == "guidance":
            return f"guidance x window: {self.groups[0]} uncond + {self.groups[1]} cond ranks"
        return f"{self.mode}: {self.world} rank{'s' if self.world > 1 else ''}"


def _window_units(n_windows: int, world: int, nb: int) -> int:
    return nb * math.ceil(n_windows / world)


def _guidance_units(n_windows: int, world: int) -> int:
    n_uncond = world // 2
    return max(math.ceil(n_windows / n_uncond), math.ceil(n_windows / (world - n_uncond)))


def make_plan(n_windows: int, world: int = 1, rank: int = 0, cfg: bool = True, mode: str = "auto") -> Plan:
    """Share the step's (branch, window) units among `world` ranks (world 1: every unit here).

    - window: window i -> rank i % world, both branches batched in one UNet call;
    - guidance / both (the same plan: the group sizes decide whether windows are sharded too):
      uncond on ranks [0, P//2), cond on [P//2, P); window i -> the group's rank i % group size.
      With 2 ranks this is pure guidance parallel; with 4, 2 groups x 2 window shards; with 3,
      1 uncond rank + 2 cond ranks (cond is the dearer branch).
    - auto: the plan whose busiest rank has the fewest units (ties: window, which batches the
      two branches and has no uncond/cond imbalance).
    Without CFG (guidance <= 1) there is one branch, and every mode is window parallel.
    """
    check_parallel_mode(mode)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    all_b = ("uncond", "cond") if cfg else ("cond",)
    use_guidance = cfg and world >= 2 and (
        mode in ("guidance", "both")
        or (mode == "auto" and _guidance_units(n_windows, world) < _window_units(n_windows, world, 2)))
    if use_guidance:
        n_uncond = world // 2
        groups = (n_uncond, world - n_uncond)
        g = 0 if rank < n_uncond else 1
        shard, size = (rank, n_uncond) if g == 0 else (rank - n_uncond, world - n_uncond)
        mine = tuple(i for i in range(n_windows) if i % size == shard)
        return Plan("guidance", world, rank, all_b, (all_b[g],), mine, groups,
                    _guidance_units(n_windows, world))
    mine = tuple(i for i in range(n_windows) if i % world == rank)
    return Plan("single" if world == 1 else "window", world, rank, all_b, all_b, mine, (world,),
                _window_units(n_windows, world, len(all_b)))


# ---------------------------------------------------------------------------------- guidance
# reduce(buf, err): sums `buf` over the ranks in place (its last element is a failure flag);
# raises on every rank if any rank failed (err: this rank's failure, or None).
Reduce = Callable[[torch.Tensor, "BaseException | None"], None]


def windowed_guidance(unet_step: Callable, windows: Sequence[Sequence[int]], guidance: float,
                      window_batch: int = 1, on_windows: Callable[[int], None] | None = None, *,
                      plan: Plan | None = None, reduce: Reduce | None = None,
                      interval: tuple[int, int] | None = None) -> Callable:
    """A whole-video model from a per-window UNet step, Moore's aggregation:

    `unet_step(x_win, t, windows, branches)`: x_win (k, c, F, h, w) the latents of k windows,
    `windows` their k frame-index tensors (F,) in host memory (a step that indexes device data
    moves them; one that indexes host data, e.g. offloaded pose features, needs no device read),
    `branches` ("uncond", "cond") or ("cond",) -> predictions (len(branches) * k, c, F, h, w),
    rows [branch 0: k windows, branch 1: k windows]. Predictions are summed per frame over the
    windows and divided by the per-frame count, then combined: uncond + g * (cond - uncond).
    With guidance <= 1 only the cond branch runs (as Moore: no CFG). `on_windows(k)` is called
    after each UNet call with the number of windows it ran (progress reporting).

    plan: this rank's share (default: every unit, one process); reduce: how the shares' sums
    meet (required when the plan has more than one rank).
    interval: (lo, hi) timesteps, both included, where CFG applies (Kynkaanniemi et al. 2024); at
    any other t only the cond branch runs and the prediction is the cond average. Every plan
    gives the same: ranks that own the uncond branch run nothing at such a step and add zeros.
    """
    all_b = ("uncond", "cond") if guidance > 1.0 else ("cond",)
    idx, counts = window_counts(windows)
    if plan is None:
        plan = make_plan(len(idx), 1, 0, len(all_b) == 2)
    if plan.all_branches != all_b:
        raise ValueError("the plan's branches do not match the guidance scale")
    if plan.world > 1 and reduce is None:
        raise ValueError(f"a plan over {plan.world} ranks needs a reduce hook")
    nb = len(all_b)
    row = all_b.index(plan.branches[0])  # this rank's rows: row .. row + len(plan.branches)
    mine = [idx[i] for i in plan.windows]
    on_device = WindowIndexCache(mine, counts)

    def model(x: torch.Tensor, t: int) -> torch.Tensor:
        # x (1, c, N, h, w), identical on every rank -> guided prediction (1, c, N, h, w)
        shape = (nb,) + tuple(x.shape[1:])
        flag = 1 if reduce is not None else 0
        buf = torch.zeros(math.prod(shape) + flag, dtype=x.dtype, device=x.device)
        sums = buf[:math.prod(shape)].view(shape)
        dev_mine, dev_counts = on_device(x)
        guided = nb == 2 and (interval is None or interval[0] <= t <= interval[1])
        # outside the interval the uncond rows are not computed (they stay zero and are not used)
        branches = plan.branches if guided or nb == 1 else tuple(b for b in plan.branches if b == "cond")
        first = row if guided or nb == 1 else 1
        err = None
        try:
            for s in range(0, len(mine), window_batch):
                host = mine[s:s + window_batch]
                group = dev_mine[s:s + window_batch]
                if not branches:  # an uncond-only rank at an unguided step
                    if on_windows is not None:
                        on_windows(len(group))
                    continue
                x_win = torch.cat([x[:, :, w] for w in group])
                pred = unet_step(x_win, t, host, branches)
                pred = pred.view(len(branches), len(group), *pred.shape[1:])
                part = sums[first:first + len(branches)]
                for j, w in enumerate(group):
                    part.index_add_(2, w, pred[:, j])
                if on_windows is not None:
                    on_windows(len(group))
        except Exception as e:  # noqa: BLE001 -- with a reduce hook, every rank must hear of it
            if reduce is None:
                raise
            err = e
        if reduce is not None:
            reduce(buf, err)
        sums = sums / dev_counts.view(1, 1, -1, 1, 1)
        if nb == 1:
            return sums[0:1]
        if not guided:
            return sums[1:2]
        uncond, cond = sums[0:1], sums[1:2]
        return uncond + guidance * (cond - uncond)

    return model
