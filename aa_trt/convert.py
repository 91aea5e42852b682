"""Moore-AnimateAnyone's released weights -> one aa-trt checkpoint.

Moore's four `.pth` files already use the names of our modules (diffusers names, `motion_modules`
inside the blocks), so conversion is a merge: denoising_unet.pth + motion_module.pth -> the
denoising UNet; reference_unet.pth -> the ReferenceNet; pose_guider.pth -> the PoseGuider. The base
folder supplies the UNet config (unet/config.json), the VAE (vae/) and CLIP (image_encoder/), in the
layout diffusers and transformers save. Every tensor is checked against the module it lands in.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch

from aa_trt.checkpoint import build_models, check_state_dict, save_checkpoint
from aa_trt.config import ModelConfig, MotionConfig, PoseGuiderConfig, SchedulerConfig, UNetConfig
from aa_trt.errors import CheckpointError, InputError, first_keys
from aa_trt.files import torch_dtype

MOORE_FILES = ("denoising_unet.pth", "reference_unet.pth", "motion_module.pth", "pose_guider.pth")


def load_pth(path) -> dict[str, torch.Tensor]:
    """A torch pickle of tensors, read with weights_only=True: a file that tries to run code, or
    holds anything but tensors and containers, is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch's first line is generic advice ("re-running with weights_only=False will likely
        # succeed"); the reason (e.g. "unsupported GLOBAL posix.system") is on the next one.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines[1:] if not ln.startswith("Check the documentation")),
                     lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: refused: this pickle holds more than tensors (it may try to "
                              f"run code); weights_only loading said: {first}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch weight file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def pose_guider_config(sd: Mapping[str, torch.Tensor]) -> PoseGuiderConfig:
    """Moore's PoseGuider widths, read off its weights (conv_in, the stride-2 blocks, conv_out)."""
    try:
        widths = [sd["conv_in.weight"].shape[0]]
        i = 1
        while f"blocks.{i}.weight" in sd:
            widths.append(sd[f"blocks.{i}.weight"].shape[0])
            i += 2
        return PoseGuiderConfig(variant="moore", conditioning_channels=sd["conv_in.weight"].shape[1],
                                block_out_channels=tuple(widths),
                                embedding_channels=sd["conv_out.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"pose_guider.pth: not a Moore PoseGuider (no {e.args[0]})") from None


def read_inference_config(path) -> tuple[MotionConfig, SchedulerConfig]:
    """Moore's configs/inference/inference_v2.yaml: motion-module and scheduler settings."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read the inference config ({e})") from None
    unet = cfg.get("unet_additional_kwargs", {}) or {}
    mk = unet.get("motion_module_kwargs", {}) or {}
    if unet.get("motion_module_type", "Vanilla") != "Vanilla":
        raise InputError(f"{path}: motion_module_type {unet['motion_module_type']!r} is not supported")
    if not unet.get("use_inflated_groupnorm", True):
        raise InputError(f"{path}: use_inflated_groupnorm=false is not supported (Moore v2 uses true)")
    blocks = mk.get("attention_block_types", ["Temporal_Self", "Temporal_Self"])
    if any(b != "Temporal_Self" for b in blocks):
        raise InputError(f"{path}: attention_block_types {blocks} (only Temporal_Self is supported)")
    motion = MotionConfig(
        num_heads=mk.get("num_attention_heads", 8),
        num_transformer_blocks=mk.get("num_transformer_block", 1),
        num_attention_blocks=len(blocks),
        max_len=mk.get("temporal_position_encoding_max_len", 32),
        resolutions=tuple(unet.get("motion_module_resolutions", (1, 2, 4, 8))),
        mid_block=unet.get("motion_module_mid_block", True),
        decoder_only=unet.get("motion_module_decoder_only", False),
    )
    sched = SchedulerConfig.from_dict(cfg.get("noise_scheduler_kwargs", {}) or {})
    return motion, sched


def split_moore(files: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Moore's four state dicts -> our three UNet-side components (keys unchanged)."""
    den, mm = dict(files["denoising_unet.pth"]), files["motion_module.pth"]
    overlap = den.keys() & mm.keys()
    if overlap:
        raise CheckpointError(f"denoising_unet.pth and motion_module.pth both hold {first_keys(overlap)}")
    stray = [k for k in mm if "motion_modules" not in k]
    if stray:
        raise CheckpointError(f"motion_module.pth: keys that are not motion modules: {first_keys(stray)}")
    den.update(mm)
    return {"denoising_unet": den, "reference_unet": dict(files["reference_unet.pth"]),
            "pose_guider": dict(files["pose_guider.pth"])}


def _load_base(base: Path):
    from aa_trt.extras import require

    require("convert", "convert")  # one line naming the extra, not an ImportError
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    unet_cfg = base / "unet" / "config.json"
    for p in (unet_cfg, base / "vae" / "config.json", base / "image_encoder" / "config.json"):
        if not p.is_file():
            raise InputError(f"{p}: missing (the base folder needs unet/config.json, vae/ and "
                             f"image_encoder/ as diffusers/transformers save them)")
    try:
        unet = UNetConfig.from_diffusers(json.loads(unet_cfg.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise InputError(f"{unet_cfg}: {e}") from None
    try:
        vae, vae_info = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True,
                                                      output_loading_info=True)
    except Exception as e:
        raise InputError(f"{base / 'vae'}: cannot load the VAE ({type(e).__name__}: {e})") from None
    try:
        clip, clip_info = CLIPVisionModelWithProjection.from_pretrained(
            base / "image_encoder", local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise InputError(f"{base / 'image_encoder'}: cannot load CLIP ({type(e).__name__}: {e})") from None
    for where, info in ((base / "vae", vae_info), (base / "image_encoder", clip_info)):
        for what in ("missing_keys", "mismatched_keys"):  # extra tensors are only ignored
            bad = [k if isinstance(k, str) else k[0] for k in info.get(what) or ()]
            if bad:
                raise InputError(f"{where}: the weights do not match its config.json; "
                                 f"{len(bad)} {what.replace('_', ' ')}: {first_keys(bad)}")
    vae_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()
               if not k.startswith("_")}
    clip_cfg = {k: v for k, v in clip.config.to_dict().items()}
    return unet, vae, vae_cfg, clip, clip_cfg


def convert_moore(moore_dir, base_dir, out, dtype: str | None = None, inference_config=None,
                  name: str = "moore-v2", overwrite: bool = False) -> Path:
    """Moore's four .pth files + the base models -> one checkpoint at `out` (a checkpoint already
    there is replaced only with `overwrite`; `out` is never one of the inputs nor inside them)."""
    from aa_trt.files import finished_result, guard_outputs

    moore_dir, base_dir, out = Path(moore_dir), Path(base_dir), Path(out)
    guard_outputs([(out, False)], [("Moore weights folder", moore_dir), ("base models folder", base_dir),
                                   ("inference config", inference_config)])
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name such as {out / 'moore_v2.safetensors'}")
    guard_outputs([(out, finished_result(out))], [], overwrite)
    if not moore_dir.is_dir():
        raise InputError(f"{moore_dir}: not a folder (expected Moore's {', '.join(MOORE_FILES)})")
    if not base_dir.is_dir():
        raise InputError(f"{base_dir}: not a folder (expected unet/config.json, vae/, image_encoder/)")
    missing = [f for f in MOORE_FILES if not (moore_dir / f).is_file()]
    if missing:
        raise InputError(f"{moore_dir}: missing {', '.join(missing)}")
    torch_dtype_ = torch_dtype(dtype) if dtype is not None else None  # OptionError(dtype) if unknown
    files = {f: load_pth(moore_dir / f) for f in MOORE_FILES}
    motion, sched = read_inference_config(inference_config) if inference_config else (MotionConfig(), SchedulerConfig())
    unet, vae, vae_cfg, clip, clip_cfg = _load_base(base_dir)
    pg = pose_guider_config(files["pose_guider.pth"])
    if pg.embedding_channels != unet.block_out_channels[0]:
        raise CheckpointError(f"{moore_dir / 'pose_guider.pth'}: outputs {pg.embedding_channels} channels, "
                              f"the UNet's conv_in gives {unet.block_out_channels[0]}")
    config = ModelConfig(name=name, unet=unet, motion=motion, pose_guider=pg, scheduler=sched,
                         vae=vae_cfg, clip=clip_cfg)
    sds = split_moore(files)
    sds["vae"] = vae.state_dict()
    sds["image_encoder"] = clip.state_dict()
    skeleton = build_models(config, "meta")
    sources = {"denoising_unet": "denoising_unet.pth + motion_module.pth",
               "reference_unet": "reference_unet.pth", "pose_guider": "pose_guider.pth",
               "vae": base_dir / "vae", "image_encoder": base_dir / "image_encoder"}
    for comp, module in skeleton.components().items():
        check_state_dict(moore_dir / sources[comp] if comp in ("reference_unet", "pose_guider")
                         else sources[comp], comp, module, sds[comp])
    provenance = {"source": "Moore-AnimateAnyone", "moore_dir": str(moore_dir.resolve()),
                  "base_dir": str(base_dir.resolve()), "dtype": dtype or "as stored"}
    return save_checkpoint(out, config, sds, torch_dtype_, provenance)
