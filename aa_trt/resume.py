"""`--resume`: a render that survives a crash, a kill or a lost machine.

While denoising, the latents after each completed step (and whatever else the sampler carries
between steps, see aa_trt.sampling) are written next to the output, atomically, as
`.NAME.EXT.resume.safetensors`, with what they belong to: the checkpoint's and the inputs' hashes,
the frame selection and output size, the sampling options and seed, the precision, the backend,
the step index and the aa-trt version. A rerun with `--resume` and the same of all these continues
after the last completed step and gives the same latents, bit for bit on the same machine and
precision, as an uninterrupted run; a rerun that differs in any of them is refused with one line
naming what differs. The state is removed once the output is written. It costs one latent tensor
on disk (4 bytes x channels x frames x H/8 x W/8: 2.4 MB for 24 frames at 512x768).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from aa_trt import __version__
from aa_trt.errors import InputError

STATE_VERSION = 1


def state_path(output) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.resume.safetensors")


def identity(*, checkpoint, ref, driving, start: int, stride: int, frames, pose_video: bool, align: bool,
             dwpose, width: int, height: int, sample: dict, precision: str, backend: str) -> dict:
    """What a saved state belongs to; every value JSON-plain, so that it compares exactly."""
    from aa_trt.files import file_sha256

    return {
        "aa_trt": __version__,
        "checkpoint": file_sha256(checkpoint),
        "ref": file_sha256(ref),
        "driving": file_sha256(driving),
        "frame selection": {"start": start, "stride": stride, "frames": frames},
        "poses": {"pose_video": pose_video, "align": align, "dwpose": str(dwpose) if dwpose else None},
        "size": [width, height],
        "sampling options": dict(sample),
        "precision": precision,
        "backend": backend,
    }


@dataclass
class Saved:
    step: int                    # the last completed step (0-based)
    latents: torch.Tensor        # (1, c, N, h, w) float32, after that step
    carry: dict[str, torch.Tensor]
    seed: int


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


class ResumeState:
    """The saved state of one output: `load` what an earlier run left, `save` after each step (the
    sampler's callback), `remove` when the output is complete."""

    def __init__(self, output, ident: dict):
        from aa_trt.files import remove_stale_partials

        self.path = state_path(output)
        self.ident = ident
        remove_stale_partials(self.path)  # a write that a kill interrupted

    def load(self) -> Saved | None:
        """The saved state, None if there is none; an InputError naming what differs if it belongs
        to another render. A seed of None in the identity takes the saved run's seed."""
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            saved_ident = json.loads(meta["identity"])
            step, version = int(meta["step"]), int(meta["version"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable aa-trt resume state ({type(e).__name__}); "
                             f"delete it to start over") from None
        if version != STATE_VERSION:
            raise InputError(f"{self.path}: resume state format {version}, this aa-trt writes "
                             f"{STATE_VERSION}; delete it to start over")
        now = json.loads(json.dumps(self.ident))
        seed = saved_ident.get("sampling options", {}).get("seed")
        if now["sampling options"].get("seed") is None:  # no seed asked for: continue the saved one
            now["sampling options"]["seed"] = seed
        diff = _differences(saved_ident, now)
        if diff:
            raise InputError(f"{self.path}: the saved render differs in {', '.join(diff)}; run without "
                             f"--resume (or delete the file) to start over")
        self.ident = now
        carry = {k.removeprefix("carry."): v for k, v in tensors.items() if k.startswith("carry.")}
        return Saved(step, tensors["latents"], carry, int(seed))

    def save(self, info: dict) -> None:
        """The sampler's callback: {"i", "x", "carry", ...} after step i."""
        from safetensors.torch import save_file

        from aa_trt.files import atomic_output

        tensors = {"latents": info["x"].detach().to("cpu", torch.float32).contiguous()}
        for k, v in (info.get("carry") or {}).items():
            tensors[f"carry.{k}"] = v.detach().cpu().contiguous()
        meta = {"identity": json.dumps(self.ident, sort_keys=True), "step": str(int(info["i"])),
                "version": str(STATE_VERSION)}
        with atomic_output(self.path, fsync=True) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
