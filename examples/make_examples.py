"""Writes examples/ref.png and examples/dance.mp4 from the held-out splits of the synthetic data
the default model was evaluated on (docs/training.md): the reference is a character the model
never saw (test_characters), the dance a motion it never saw, performed by another character
(test_motions), so `aa-trt run` has to transfer the motion across characters as it does for users.

    aa-trt data synth --out data/synth128 --videos 320 --size 128 --frames 48 --seed 0
    python examples/make_examples.py data/synth128
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from aa_trt.video import write_video

CHARACTER_VIDEO = 0   # index in test_characters.json
DANCE_VIDEO = 1       # index in test_motions.json
FRAMES = 24           # one context window: the example runs in about a minute on 2 CPU cores


def main(data: str, out: str = str(Path(__file__).parent)) -> None:
    root = Path(data)
    ref_entry = json.loads((root / "test_characters.json").read_text())[CHARACTER_VIDEO]
    dance_entry = json.loads((root / "test_motions.json").read_text())[DANCE_VIDEO]
    with np.load(root / ref_entry["npz_path"]) as z:
        ref = z["frames"][0]
    with np.load(root / dance_entry["npz_path"]) as z:
        dance = z["frames"][:FRAMES]
    Image.fromarray(ref).save(Path(out) / "ref.png")
    write_video(Path(out) / "dance.mp4", dance, float(dance_entry["fps"]))
    print(f"ref.png from {ref_entry['npz_path']} (frame 0), dance.mp4 from {dance_entry['npz_path']} "
          f"(frames 0-{FRAMES - 1})")


if __name__ == "__main__":
    main(*sys.argv[1:])
