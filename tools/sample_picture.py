"""Draw the sample picture of docs/training.md from the README command's output.

    aa-trt run examples/ref.png examples/dance.mp4 -o out.mp4 --seed 0
    python tools/sample_picture.py examples/ref.png examples/dance.mp4 out.mp4 sample.png

Top row: the reference, then output frames 0, 8, 16 and the last; bottom row: the reference and the
driving video's frames at the same indices.
"""
import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref", help="the reference image given to `aa-trt run`")
    p.add_argument("driving", help="the driving video given to `aa-trt run`")
    p.add_argument("output", help="the video `aa-trt run` wrote")
    p.add_argument("png", help="where to write the picture")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import numpy as np
    from PIL import Image

    from aa_trt.video import read_clip

    out, dance = read_clip(a.output).frames, read_clip(a.driving).frames
    h, w = out[0].shape[:2]
    ref = np.asarray(Image.open(a.ref).convert("RGB").resize((w, h)))
    idx = [i for i in (0, 8, 16) if i < len(out)] + [len(out) - 1]
    rows = [np.concatenate([ref] + [out[i] for i in idx], axis=1),
            np.concatenate([ref] + [np.asarray(Image.fromarray(dance[min(i, len(dance) - 1)]).resize((w, h)))
                                    for i in idx], axis=1)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(a.png)
    print(f"{a.png}: {len(idx)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
