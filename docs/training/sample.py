"""The sample picture of docs/training.md from the README command's output.

    aa-trt run examples/ref.png examples/dance.mp4 -o out.mp4 --seed 0
    python docs/training/sample.py examples/ref.png examples/dance.mp4 out.mp4 docs/training/sample_v7.png

Top row: the reference, then output frames 0, 8, 16 and the last; bottom row: the reference and
the dance's frames at the same indices.
"""
import sys

import numpy as np
from PIL import Image

from aa_trt.video import read_clip

ref_path, dance_path, out_path, png = sys.argv[1:5]
out, dance = read_clip(out_path).frames, read_clip(dance_path).frames
h, w = out[0].shape[:2]
ref = np.asarray(Image.open(ref_path).convert("RGB").resize((w, h)))
idx = [0, 8, 16, len(out) - 1]
rows = [np.concatenate([ref] + [out[i] for i in idx], axis=1),
        np.concatenate([ref] + [np.asarray(Image.fromarray(dance[i]).resize((w, h))) for i in idx], axis=1)]
Image.fromarray(np.concatenate(rows, axis=0)).save(png)
