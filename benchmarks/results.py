"""Benchmark results: a ledger filled by the tests, written as JSON with the machine beside it,
and rendered as the Markdown table of docs/performance.md.

`python -m benchmarks.results benchmarks/results/FILE.json` prints that table.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class Record:
    name: str                 # what was measured, with its size
    value: float              # aa-trt's number
    unit: str
    command: str              # how to reproduce it
    baseline: float | None = None   # the Moore-style baseline's number, same run, same unit
    ratio: float | None = None      # see ratio_of
    ratio_of: str = ""              # e.g. "baseline / aa-trt (higher: aa-trt faster)"
    details: dict = field(default_factory=dict)


@dataclass
class Ledger:
    machine: dict
    invocation: str = ""  # the pytest command line of the run
    records: list[Record] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def add(self, record: Record) -> Record:
        self.records.append(record)
        return record

    def to_json(self) -> dict:
        return dict(started=self.started, invocation=self.invocation, machine=self.machine,
                    records=[asdict(r) for r in self.records])

    def write(self, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = self.started.replace(":", "").replace("-", "")
        path = folder / f"{stamp}-{name}.json"
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")
        return path


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x:.3g} s"
    if unit == "FLOP":
        return f"{x / 1e12:.4g} TFLOP"
    if unit == "FLOP/s":
        return f"{x / 1e9:.4g} GFLOP/s"
    if unit == "bytes":
        return f"{x / 2**20:.1f} MiB"
    if unit == "fraction":
        return f"{100 * x:.1f}%"
    return f"{x:.4g} {unit}".strip()


def markdown(results: dict) -> str:
    m = results["machine"]
    machine = f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}"
    if m.get("cuda"):
        machine = f"{m['cuda']['device']}, torch {m['torch']}"
    lines = ["| number | aa-trt | baseline (Moore-style) | ratio | command | machine |",
             "|---|---|---|---|---|---|"]
    for r in results["records"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}x ({r['ratio_of']})"
        lines.append(f"| {r['name']} | {_fmt(r['value'], r['unit'])} | {_fmt(r['baseline'], r['unit'])} "
                     f"| {ratio} | `{r['command']}` | {machine} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(markdown(json.loads(Path(arg).read_text())))
