"""Score decoders on stored latents: a pairs file from `aa-trt data denoised` holds a model's final
latents beside the true frames, so checkpoints that share that model's networks and differ only in
the decoder (decoder-only fine-tunes) are scored by decoding alone, in seconds instead of a full
`aa-trt eval`. The numbers are eval's (same decode, same SSIM/PSNR/L1 per video, mean per split);
with --copy-root, copying each video's frame 0 is scored beside them.

    python tools/score_latents.py --ckpt A.safetensors B.safetensors --pairs p.npz \\
        [--copy-root data/synth128s1] [-o scores.json]
"""
import argparse
import json
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints whose decoders are scored")
    p.add_argument("--pairs", nargs="+", required=True, help="pairs files of `aa-trt data denoised`")
    p.add_argument("--copy-root", default=None, help="folder the pairs' video paths are relative to (for copy)")
    p.add_argument("-o", "--output", default=None, help="write the scores here as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import numpy as np
    import torch

    from aa_trt.files import write_json
    from aa_trt.pipeline import Animator
    from aa_trt.training.baselines import copy_reference
    from aa_trt.training.metrics import frame_metrics

    def mean(rows, key):
        return {k: round(float(np.mean([r[key][k] for r in rows])), 4) for k in ("ssim", "psnr", "l1")}

    out = {}
    for ckpt in args.ckpt:
        an = Animator.from_pretrained(ckpt, dtype=torch.float32)
        for f in args.pairs:
            with np.load(f) as p:
                lat, true_all, names = p["latents"], p["frames"], [str(v) for v in p["videos"]]
            n = len(lat) // len(names)  # each video's frames are one block
            splits = {}
            for i, name in enumerate(names):
                z = torch.from_numpy(lat[i * n:(i + 1) * n]) * an.config.latent_scale  # (n, c, h, w)
                pred = np.clip(np.round(an.decode(z.transpose(0, 1)[None]) * 255), 0, 255).astype(np.uint8)
                true = true_all[i * n:(i + 1) * n]
                row = {"video": name, "model": frame_metrics(pred, true)}
                if args.copy_root:
                    with np.load(Path(args.copy_root) / name) as v:
                        row["copy"] = frame_metrics(copy_reference(v["frames"][0], n), true)
                split = "test_characters" if "test_characters" in name else "test_motions"
                splits.setdefault(split, []).append(row)
            for split, rows in splits.items():
                r = {"videos": len(rows), "model": mean(rows, "model")}
                if args.copy_root:
                    r["copy"] = mean(rows, "copy")
                    r["model_ssim_above_copy"] = sum(x["model"]["ssim"] > x["copy"]["ssim"] for x in rows)
                out.setdefault(ckpt, {}).setdefault(Path(f).name, {})[split] = r
                print(ckpt, Path(f).name, split, json.dumps(r), flush=True)
    if args.output:
        write_json(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
