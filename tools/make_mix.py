"""Write a mixed training list: synth128's training videos (listed twice) plus the training videos of
further synthetic sets (other seeds: new characters, backgrounds and dances), with absolute paths.
Its test splits are synth128's, so evaluations stay comparable with the earlier models.

    python tools/make_mix.py [DATA_ROOT]                      # mix128 = synth128 x2 + synth128s1
    python tools/make_mix.py DATA_ROOT --extra synth128s1 synth128s2 --out mix128b
"""
import argparse
import json
import sys
from pathlib import Path

PATH_KEYS = ("video_path", "kps_path", "npz_path")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="data", help="folder holding synth128 and the extra sets (default ./data)")
    p.add_argument("--extra", nargs="+", default=["synth128s1"], help="sets added once each (default synth128s1)")
    p.add_argument("--out", default="mix128", help="output folder name under DATA_ROOT (default mix128)")
    return p


def absolute(src: Path, split: str) -> list[dict]:
    """The split's entries with their file paths made absolute (the list lives in another folder)."""
    meta = src / f"{split}.json"
    if not meta.is_file():
        raise SystemExit(f"{meta}: no such file (make the set with `aa-trt data synth --out {src}`)")
    entries = json.loads(meta.read_text())
    return [{**e, **{k: str(src / e[k]) for k in PATH_KEYS if k in e}} for e in entries]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from aa_trt.files import write_json

    root = Path(args.root).resolve()
    base, out = root / "synth128", root / args.out
    # synth128 twice: its characters keep a fixed share of the samples however large the extra sets are
    train = absolute(base, "train") * 2
    for name in args.extra:
        train += absolute(root / name, "train")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train.json", train)
    for split in ("test_characters", "test_motions"):
        write_json(out / f"{split}.json", absolute(base, split))
    print(f"{out / 'train.json'}: {len(train)} training entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
