"""DIR/manifest.json: what a build holds and what it was built from.

A graph is reused only when its entry's key (checkpoint sha256, build shapes, opset, aa-trt version,
the graph's declared names and axes) equals the key the current build would write, and its files are
still there at their recorded sizes. Anything else is rebuilt. The runtime refuses a DIR whose
manifest does not match the checkpoint, the sizes or the aa-trt it is asked to run with.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from aa_trt import __version__
from aa_trt.errors import InputError
from aa_trt.files import write_text

MANIFEST = "manifest.json"
FORMAT = "aa-trt-engines"
FORMAT_VERSION = 1
_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "polygraphy", "tensorrt", "diffusers",
              "transformers", "numpy")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def graph_key(checkpoint_sha256: str, shapes: dict, opset: int, described: dict) -> dict:
    """What must be equal for an existing graph to be reused."""
    return {"checkpoint_sha256": checkpoint_sha256, "shapes": shapes, "opset": opset,
            "aa_trt_version": __version__, "graph": described}


def read_manifest(out_dir) -> dict | None:
    """The manifest, or None when there is none or it is unreadable (then everything rebuilds)."""
    path = Path(out_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def write_manifest(out_dir, manifest: dict) -> Path:
    """Atomic: a temporary name, then rename, so a crashed build never leaves half a manifest."""
    path = Path(out_dir) / MANIFEST
    write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def files_intact(out_dir, entry: dict) -> bool:
    for name, size in entry.get("files", {}).items():
        p = Path(out_dir) / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return bool(entry.get("files"))


def reusable(out_dir, entry: dict | None, key: dict) -> bool:
    return entry is not None and entry.get("key") == key and files_intact(out_dir, entry)


def load_for_run(out_dir, checkpoint_sha256: str | None = None, required: tuple[str, ...] = ()) -> dict:
    """The manifest of a finished build, or one InputError line saying why this DIR cannot run."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    if m is None:
        raise InputError(f"{out_dir}: no aa-trt build here (no readable {MANIFEST}); "
                         f"create one with `aa-trt build`")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{out_dir}: build format {m['format_version']} is newer than this aa-trt "
                         f"understands; upgrade aa-trt or rebuild")
    if m.get("aa_trt_version") != __version__:
        raise InputError(f"{out_dir}: built by aa-trt {m.get('aa_trt_version')}, this is aa-trt "
                         f"{__version__}; rebuild it with `aa-trt build`")
    if checkpoint_sha256 is not None and m.get("checkpoint", {}).get("sha256") != checkpoint_sha256:
        raise InputError(f"{out_dir}: built from another checkpoint "
                         f"({m.get('checkpoint', {}).get('path')}); rebuild it with `aa-trt build`")
    if not m.get("complete"):
        raise InputError(f"{out_dir}: the build did not finish; run `aa-trt build` again")
    missing = [g for g in required if g not in m.get("graphs", {})]
    if missing:
        raise InputError(f"{out_dir}: the build has no {', '.join(missing)} graph; run `aa-trt build` "
                         f"without --graphs")
    for name, entry in m.get("graphs", {}).items():
        if not files_intact(out_dir, entry):
            raise InputError(f"{out_dir}: graph {name} is missing or truncated; run `aa-trt build` again")
    return m
