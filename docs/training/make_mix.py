"""Write a mixed training list: synth128's training videos (listed twice) plus the training videos
of further synthetic sets (other seeds: new characters, backgrounds and dances), with absolute
paths. Its test splits are synth128's, so evaluations stay comparable with the earlier models.

    python docs/training/make_mix.py [DATA_ROOT]                    # v6: mix128 = synth128 x2 + synth128s1
    python docs/training/make_mix.py DATA_ROOT --extra synth128s1 synth128s2 --out mix128b
"""
import argparse
import json
from pathlib import Path

from aa_trt.files import write_json

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("root", nargs="?", default="data", help="folder holding synth128 and the extra sets (default ./data)")
ap.add_argument("--extra", nargs="+", default=["synth128s1"], help="sets added once each (default synth128s1)")
ap.add_argument("--out", default="mix128", help="output folder name under DATA_ROOT (default mix128)")
args = ap.parse_args()
root = Path(args.root).resolve()
base, out = root / "synth128", root / args.out


def absolute(src: Path, split: str) -> list[dict]:
    meta = src / f"{split}.json"
    if not meta.is_file():
        raise SystemExit(f"{meta}: no such file (make the set with `aa-trt data synth --out {src}`)")
    entries = json.loads(meta.read_text())
    return [{**e, **{k: str(src / e[k]) for k in ("video_path", "kps_path", "npz_path") if k in e}} for e in entries]


train = absolute(base, "train") * 2
for name in args.extra:
    train += absolute(root / name, "train")
out.mkdir(parents=True, exist_ok=True)
write_json(out / "train.json", train)
for split in ("test_characters", "test_motions"):
    write_json(out / f"{split}.json", absolute(base, split))
print(f"{out / 'train.json'}: {len(train)} training entries")
