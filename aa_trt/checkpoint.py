"""The aa-trt checkpoint: one .safetensors holding every submodel, config in its metadata.

Keys are `<component>.<diffusers/Moore key>` for the five components below. The metadata holds
`format` ("aa-trt"), `format_version`, `config` (ModelConfig as JSON) and free-form `provenance`.
Loading builds every module on the meta device and assigns the file's tensors (memory-mapped by
safetensors) into it, so a model never exists twice in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from aa_trt.config import ModelConfig
from aa_trt.errors import CheckpointError, first_keys
from aa_trt.files import atomic_output
from aa_trt.models import PoseGuider, UNet
from aa_trt.models.external import build_clip, build_vae, restore_nonpersistent_buffers

FORMAT = "aa-trt"
FORMAT_VERSION = 1
COMPONENTS = ("denoising_unet", "reference_unet", "pose_guider", "vae", "image_encoder")


@dataclass
class Models:
    config: ModelConfig
    denoising_unet: UNet
    reference_unet: UNet
    pose_guider: PoseGuider
    vae: nn.Module
    image_encoder: nn.Module

    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}


def build_models(config: ModelConfig, device: str | torch.device = "cpu",
                 components: tuple[str, ...] = COMPONENTS) -> Models:
    """Submodels with fresh (library-default) weights; device="meta" allocates nothing. Components
    not asked for are None (and their libraries are not imported: diffusers/transformers are slow
    to import, and a follower rank needs only the UNet)."""
    builders = {
        "denoising_unet": lambda: UNet(config.unet, config.motion),
        "reference_unet": lambda: UNet(config.unet, with_output=False),
        "pose_guider": lambda: PoseGuider(config.pose_guider),
        "vae": lambda: build_vae(config.vae),
        "image_encoder": lambda: build_clip(config.clip),
    }
    with torch.device(device):
        return Models(config=config, **{c: builders[c]() if c in components else None for c in COMPONENTS})


def check_state_dict(path, component: str, module: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Same keys, same shapes, or one CheckpointError naming the file and the first offenders."""
    own = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {first_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {first_keys(unexpected)}")
        raise CheckpointError(f"{path}: {component} does not match its config; " + "; ".join(parts))
    kind = [k for k in expected if sd[k].is_floating_point() != own[k].is_floating_point()]
    if kind:
        k = sorted(kind)[0]
        raise CheckpointError(f"{path}: {component}: {len(kind)} tensors of the wrong dtype kind, first "
                              f"{k}: {sd[k].dtype} in the file")
    bad = [k for k in expected if tuple(sd[k].shape) != expected[k]]
    if bad:
        k = sorted(bad)[0]
        raise CheckpointError(f"{path}: {component}: {len(bad)} tensors of the wrong shape, first "
                              f"{k}: {tuple(sd[k].shape)} in the file, {expected[k]} expected")


def save_checkpoint(path, config: ModelConfig, state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
                    dtype: torch.dtype | None = None, provenance: dict | None = None) -> Path:
    """Write atomically: a temporary name in the same folder, renamed when complete."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for comp in COMPONENTS:
        if comp not in state_dicts:
            raise ValueError(f"state dict for {comp} missing")
        for k, v in state_dicts[comp].items():
            v = v.detach()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            tensors[f"{comp}.{k}"] = v.contiguous()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": config.to_json(),
            "provenance": json.dumps(provenance or {}, sort_keys=True)}
    with atomic_output(path, fsync=True, make_parent=True) as tmp:  # on disk before it is visible
        save_file(tensors, str(tmp), metadata=meta)
        # safetensors creates its file owner-only (0600); a checkpoint gets the mode any new file
        # would (0644 under the usual umask), so other users and containers can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return path


def save_models(path, models: Models, dtype=None, provenance=None) -> Path:
    return save_checkpoint(path, models.config,
                           {c: m.state_dict() for c, m in models.components().items()}, dtype, provenance)


def read_metadata(path) -> dict:
    """The checkpoint's metadata, or a CheckpointError saying why the file is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an aa-trt checkpoint (no format=aa-trt metadata; "
                              f"convert Moore's weights with `aa-trt convert`)")
    try:
        version = int(meta.get("format_version", 0))
    except ValueError:
        raise CheckpointError(f"{path}: unreadable format_version {meta['format_version']!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this "
                              f"aa-trt understands ({FORMAT_VERSION}); upgrade aa-trt")
    return meta


def read_config(path) -> ModelConfig:
    meta = read_metadata(path)
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable config metadata ({e})") from None


def load_checkpoint(path, device="cpu", dtype: torch.dtype = torch.float32,
                    components: tuple[str, ...] = COMPONENTS,
                    component_dtypes: Mapping[str, torch.dtype] | None = None) -> Models:
    """Build on the meta device, then assign the file's tensors (cast to dtype where floating;
    `component_dtypes` overrides it per component). Components not asked for are None."""
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    try:
        models = build_models(config, "meta", components)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its config cannot build the models ({e})") from None
    device = torch.device(device)
    grouped: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            stray = [k for k in keys if k.split(".", 1)[0] not in grouped]
            if stray:
                raise CheckpointError(f"{path}: keys outside the five components: {first_keys(stray)}")
            for k in keys:
                comp, name = k.split(".", 1)
                if comp in components:
                    grouped[comp][name] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e}); the file may be truncated") from None

    for comp in components:
        module = getattr(models, comp)
        sd = grouped[comp]
        check_state_dict(path, comp, module, sd)
        cdtype = (component_dtypes or {}).get(comp, dtype)
        sd = {k: (v.to(device=device, dtype=cdtype) if v.is_floating_point() else v.to(device))
              for k, v in sd.items()}
        module.load_state_dict(sd, strict=True, assign=True)
        restore_nonpersistent_buffers(module, device)
        module.eval().requires_grad_(False)
    return models
