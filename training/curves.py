"""Loss and metric curves of a training run as a self-contained SVG (no plotting library needed).

    python -m aa_trt.training.curves OUT.svg "stage 1=run1/log.jsonl:loss" "stage 2=run2/log.jsonl:loss"

Each series is `label=path.jsonl:key`; records without the key (events) are skipped. Values are
smoothed with a running mean over `--smooth` records and drawn against their step on a log y axis.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def read_series(path, key: str) -> list[tuple[float, float]]:
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if key in rec and "step" in rec and rec[key] is not None and rec[key] > 0:
            out.append((float(rec["step"]), float(rec[key])))
    return out


def smooth(points: list[tuple[float, float]], k: int) -> list[tuple[float, float]]:
    if k <= 1:
        return points
    return [(x, sum(v for _, v in points[max(0, i - k + 1):i + 1]) / len(points[max(0, i - k + 1):i + 1]))
            for i, (x, _) in enumerate(points)]


def svg(series: dict[str, list[tuple[float, float]]], title: str, width: int = 640, height: int = 320) -> str:
    pad = 48
    xs = [x for s in series.values() for x, _ in s]
    ys = [math.log10(y) for s in series.values() for _, y in s]
    if not xs:
        raise ValueError("no points to draw")
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    px = lambda x: pad + (x - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731
    py = lambda y: height - pad - (math.log10(y) - y0) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        y = 10 ** (y0 + frac * (y1 - y0))
        parts.append(f'<text x="{pad - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        x = x0 + frac * (x1 - x0)
        parts.append(f'<text x="{px(x):.1f}" y="{height - pad + 14}" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>')
    for i, (label, pts) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{pad + 8}" y="{pad + 14 + 14 * i}" fill="{c}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> None:
    smooth_k = 1
    if argv and argv[0].startswith("--smooth="):
        smooth_k = int(argv.pop(0).split("=", 1)[1])
    if len(argv) < 2 or argv[0] in ("-h", "--help") or any("=" not in s or ":" not in s for s in argv[1:]):
        sys.exit("usage: python -m aa_trt.training.curves [--smooth=K] OUT.svg LABEL=LOG.jsonl:KEY ...")
    out, *specs = argv
    series = {}
    for spec in specs:
        label, rest = spec.split("=", 1)
        path, key = rest.rsplit(":", 1)
        if not Path(path).is_file():
            sys.exit(f"{path}: no such log")
        series[label] = smooth(read_series(path, key), smooth_k)
    Path(out).write_text(svg(series, Path(out).stem.replace("_", " ")))


if __name__ == "__main__":
    main(sys.argv[1:])
