"""Feature reuse across denoising steps (DeepCache, Ma et al. 2024): the deep features of the last
whole step, kept per (CFG branch, context window) and handed to the shallow steps between.

Which steps are whole is a function of the step index alone (SampleOptions.full_step), and every
rank of a torchrun plan clears its store at the start of each whole step whether or not it runs
anything then, so a unit's features always come from the last whole step that computed it, on
every plan. A unit with no features (its branch did not run at the last whole step: the guidance
interval) runs whole until the next whole step, and what it makes is not kept: the store is a
function of the last whole step alone, which is what lets a resume rebuild it. Resuming: the input of the last whole step travels in the
sampler's carry ("reuse_x", "reuse_step"); a render resumed at a shallow step first reruns that
whole step's UNet calls on it, which rebuilds the store bit for bit.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

from aa_trt.models.unet import DeepFeatures

Unit = Hashable  # (branch, window frames): what one UNet row group computes


class FeatureStore:
    """The deep features of the last whole step, per unit, for one denoise."""

    def __init__(self, depth: int, full_step: Callable[[int], bool]):
        self.depth = depth
        self.full_step = full_step  # step index -> whether the UNet runs whole then
        self._full = True                                         # the current step's wholeness
        self._units: dict[Unit, torch.Tensor] = {}                # unit -> (f, C, h, w)
        self._groups: dict[tuple[Unit, ...], torch.Tensor] = {}  # units of one call -> their rows
        self.last_full: tuple[int, torch.Tensor] | None = None   # (step, the whole step's input x)

    def begin_step(self, i: int, x: torch.Tensor) -> None:
        """Called by every rank before step i's model call on input x."""
        self._full = self.full_step(i)
        if self._full:
            self._units.clear()
            self._groups.clear()
            self.last_full = (i, x)

    def carry(self) -> dict[str, torch.Tensor]:
        """What a resumed render needs to rebuild the store (see the module docstring)."""
        if self.last_full is None:
            return {}
        i, x = self.last_full
        return {"reuse_x": x, "reuse_step": torch.tensor(i, dtype=torch.int64)}

    def run(self, call: Callable, units: Sequence[Unit], rows: int) -> torch.Tensor:
        """call(positions, deep) -> predictions (len(positions) * rows, ...) for those of `units`
        (a list of positions into it) -> the predictions of all units, in their order, for the
        step `begin_step` opened."""
        units = list(units)
        full = self._full
        miss = [p for p, u in enumerate(units) if full or u not in self._units]
        hit = [p for p, u in enumerate(units) if not full and u in self._units]
        outs = {}
        if miss and full:
            deep = DeepFeatures(self.depth)
            outs["miss"] = call(miss, deep)
            self._put([units[p] for p in miss], deep.features, rows)
        elif miss:  # whole, and not kept: the store holds what the last whole step made, only
            outs["miss"] = call(miss, None)
        if hit:
            keys = tuple(units[p] for p in hit)
            feats = self._groups.get(keys)
            if feats is None:
                feats = torch.cat([self._units[k] for k in keys])
            outs["hit"] = call(hit, DeepFeatures(self.depth, feats))
        if not hit or not miss:
            return next(iter(outs.values()))
        first = outs["miss"]
        out = first.new_empty((len(units) * rows,) + tuple(first.shape[1:]))
        for name, positions in (("miss", miss), ("hit", hit)):
            for j, p in enumerate(positions):
                out[p * rows:(p + 1) * rows] = outs[name][j * rows:(j + 1) * rows]
        return out

    def _put(self, units: list[Unit], features: torch.Tensor, rows: int) -> None:
        # features (len(units) * rows, C, h, w); kept as views of the one tensor, which a shallow
        # call on the same units takes whole (no copy)
        stale = set(units)
        for keys in [k for k in self._groups if stale.intersection(k)]:
            del self._groups[keys]
        for j, u in enumerate(units):
            self._units[u] = features[j * rows:(j + 1) * rows]
        self._groups[tuple(units)] = features
