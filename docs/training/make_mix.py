"""Write data/mix128/: a training list of synth128's training videos (listed twice) plus synth128s1's
(seed 1: new characters, backgrounds and dances), with absolute paths; its test splits are synth128's,
so evaluations stay comparable with the earlier models.

    python docs/training/make_mix.py [DATA_ROOT]      # DATA_ROOT defaults to ./data
"""
import json
import sys
from pathlib import Path

from aa_trt.training.data import write_json

root = Path(sys.argv[1] if len(sys.argv) > 1 else "data").resolve()
a, b, out = root / "synth128", root / "synth128s1", root / "mix128"


def absolute(src: Path, split: str) -> list[dict]:
    entries = json.loads((src / f"{split}.json").read_text())
    return [{**e, **{k: str(src / e[k]) for k in ("video_path", "kps_path", "npz_path") if k in e}} for e in entries]


out.mkdir(parents=True, exist_ok=True)
train = absolute(a, "train") * 2 + absolute(b, "train")
write_json(out / "train.json", train)
for split in ("test_characters", "test_motions"):
    write_json(out / f"{split}.json", absolute(a, split))
print(f"{out / 'train.json'}: {len(train)} training entries")
