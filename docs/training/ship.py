"""Store a trained checkpoint as the embedded default: fp16 weights, and optionally the CFG scale
the model declares (config.guidance, chosen on the training split; see docs/training.md).

    python docs/training/ship.py SRC DST [--guidance G]
"""
import argparse
import json

import torch

from aa_trt.checkpoint import load_checkpoint, read_metadata, save_models

p = argparse.ArgumentParser()
p.add_argument("src")
p.add_argument("dst")
p.add_argument("--guidance", type=float, default=None)
a = p.parse_args()
prov = json.loads(read_metadata(a.src)["provenance"])
prov["stored_as"] = "float16 (trained in float32; aa-trt loads it back in the run's dtype)"
models = load_checkpoint(a.src, dtype=torch.float32)
if a.guidance is not None:
    models.config = models.config.replace(guidance=a.guidance)
    prov["guidance"] = f"{a.guidance}: the best SSIM of a CFG sweep on the training split (docs/training.md)"
save_models(a.dst, models, dtype=torch.float16, provenance=prov)
