"""Timing aa-trt against its baseline in the same run, round by round.

The machines these run on are shared: a neighbour's job can slow one half of a comparison and not
the other. So the baseline runs in pytest-benchmark's per-round `setup` (untimed by it, timed here)
right before each timed aa-trt round, so both see the same stretch of load. Bursts still land
on single rounds (3x swings were seen here), hence the per-round ratios of `Timings.summary`.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work and not the launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes: a
    benchmark that runs the CLI as a subprocess spends its CPU time there."""
    children = os.times()  # clock-tick resolution: fine for whole processes
    return time.process_time() + children.children_user + children.children_system


def timed(fn: Callable, device="cpu", cpu_times: list[float] | None = None) -> float:
    """Wall-clock seconds of fn(); with `cpu_times`, also appends the CPU seconds of the process
    and the children it waited for (`cpu_seconds`): time spent descheduled by a neighbour's job
    does not count there."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    fn()
    synchronize(device)
    if cpu_times is not None:
        cpu_times.append(cpu_seconds() - cpu_start)
    return time.perf_counter() - start


PER_ROUND = "baseline / aa-trt, median of per-round ratios: x faster"


@dataclass
class Timings:
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    ours_cpu: list[float] = field(default_factory=list)
    baseline_cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """Times and ratios. `speedup_per_round` is the one to quote: each round runs both sides
        back to back, so its ratio shares that moment's load, and the median over rounds drops
        the rounds that a neighbour's burst hit on one side only (3x swings were seen here). The
        ratio of medians (`speedup`) and of minimums (`speedup_best`) are kept to show the spread;
        the minimum is the least disturbed estimate of each side's own time.
        `cpu_speedup_per_round` is the same on process CPU time, a cross-check on a CPU that
        others share (meaningless for GPU work, where the CPU mostly waits)."""
        ours, base = statistics.median(self.ours), statistics.median(self.baseline)
        per_round = [b / o for b, o in zip(self.baseline, self.ours)]
        cpu_per_round = [b / o for b, o in zip(self.baseline_cpu, self.ours_cpu)]
        return dict(ours_s=self.ours, baseline_s=self.baseline, ours_median_s=ours,
                    ours_min_s=min(self.ours), baseline_median_s=base, baseline_min_s=min(self.baseline),
                    speedup_per_round=statistics.median(per_round), per_round_speedup=per_round,
                    speedup=base / ours, speedup_best=min(self.baseline) / min(self.ours),
                    ours_cpu_s=self.ours_cpu, baseline_cpu_s=self.baseline_cpu,
                    cpu_speedup_per_round=statistics.median(cpu_per_round) if cpu_per_round else None,
                    rounds=len(self.ours))


def compare(benchmark, ours: Callable, baseline: Callable, rounds: int, warmup: int = 1,
            device="cpu", probe: Callable | None = None) -> Timings:
    """pytest-benchmark times `ours`; `baseline` runs just before each of its rounds, and so does
    `probe` (e.g. a matmul whose rate is the denominator of utilisation: same load, same time)."""
    t = Timings()
    for _ in range(warmup):  # first calls pay for allocator growth and kernel selection
        baseline()
        ours()
    if probe is not None:
        probe()

    def setup():
        t.baseline.append(timed(baseline, device, t.baseline_cpu))
        if probe is not None:
            t.probe.append(timed(probe, device))

    synchronize(device)
    benchmark.pedantic(lambda: t.ours.append(timed(ours, device, t.ours_cpu)), setup=setup,
                       rounds=rounds, iterations=1)
    return t
