"""`aa-trt convert`: Moore's released weight files -> one aa-trt checkpoint."""
from __future__ import annotations

import time

from aa_trt.commands.common import add_overwrite_flag, imports_torch


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="Moore's released weight files -> one aa-trt checkpoint",
                       description="Merge Moore-AnimateAnyone's denoising_unet.pth, reference_unet.pth, "
                       "motion_module.pth and pose_guider.pth with the base models' VAE and CLIP "
                       "into one .safetensors checkpoint. .pth files are read with weights_only=True.")
    c.add_argument("--moore", required=True, metavar="DIR",
                   help="folder holding Moore's four .pth files")
    c.add_argument("--base", required=True, metavar="DIR",
                   help="folder with unet/config.json, vae/ and image_encoder/ (diffusers/transformers "
                   "layout: e.g. the SD1.5 unet config, sd-vae-ft-mse, sd-image-variations' image_encoder)")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="checkpoint to write (.safetensors)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="store the weights in this precision (default: as Moore stores them, fp32)")
    c.add_argument("--inference-config", metavar="YAML", default=None,
                   help="Moore's inference yaml (motion-module heads, scheduler); default: inference_v2")
    c.add_argument("--name", default="moore-v2", help="model name recorded in the checkpoint")
    add_overwrite_flag(c, "the checkpoint")
    c.set_defaults(func=handle)


@imports_torch
def handle(args) -> int:
    from aa_trt.convert import convert_moore

    t = time.perf_counter()
    out = convert_moore(args.moore, args.base, args.output, dtype=args.dtype,
                        inference_config=args.inference_config, name=args.name, overwrite=args.overwrite)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) in {time.perf_counter() - t:.1f} s")
    return 0
