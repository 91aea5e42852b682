"""Shared test utilities: random (never zero) weights, fixture paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURE = Path(os.environ.get("AA_TRT_FIXTURE",
                              Path(__file__).resolve().parents[1].parent / "shared/fixtures/moore_tiny"))
MOORE_KEYS = FIXTURE.parent.parent / "reference/moore_keys"

# The fixture lives in ../shared beside the checkout (CI lays it there too). Elsewhere point
# AA_TRT_FIXTURE at it; without it these tests skip, except under CI, where they must run.
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_dir() and not os.environ.get("CI"),
    reason=f"golden fixture not found at {FIXTURE} (set AA_TRT_FIXTURE)")


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Overwrite every parameter with random values of a sensible size (zero-initialised output
    layers included), so that a comparison can fail on any weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5)
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def random_meta_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """`randomize_` for a module built on the meta device: assigns fresh tensors, skipping the
    module's own (slow, discarded) initialisation of large models."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            sd[name] = torch.randn(p.shape, generator=g) * scale / p[0].numel() ** 0.5
        elif name.endswith("weight"):
            sd[name] = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            sd[name] = 0.1 * torch.randn(p.shape, generator=g)
    module.load_state_dict(sd, strict=False, assign=True)
    if any(t.is_meta for t in module.state_dict().values()):
        raise RuntimeError("meta buffers left after random_meta_")
    return module


def max_abs(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def save_tiny_checkpoint(path, seed_base: int = 0):
    """A tiny-preset checkpoint with random weights: component i gets seed seed_base + i."""
    from aa_trt.checkpoint import build_models, save_models
    from aa_trt.config import PRESETS

    models = build_models(PRESETS["tiny"])
    for i, module in enumerate(models.components().values()):
        randomize_(module, seed=seed_base + i)
    return save_models(path, models)


def threaded_ranks(world: int, work, timeout: float = 300) -> list:
    """`world` ranks in threads: work(rank, reduce) -> that rank's result, where `reduce(buf, err)`
    sums the ranks' buffers through a barrier (aa_trt.process_group.StepReduce's arithmetic without
    processes; a rank's error is re-raised here). Returns the results by rank."""
    import threading

    bufs, barrier, out, errors = [None] * world, threading.Barrier(world), [None] * world, []

    def reduce_for(rank):
        def reduce(buf, err):
            if err is not None:
                errors.append(err)
            bufs[rank] = buf.clone()
            barrier.wait()
            total = torch.stack(bufs).sum(0)
            barrier.wait()
            buf.copy_(total)
        return reduce

    def run(rank):
        try:
            out[rank] = work(rank, reduce_for(rank))
        except Exception as e:  # noqa: BLE001 -- reported by the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    if errors:
        raise errors[0]
    return out
