"""Writing DIR/manifest.json, what a build holds and what it was built from (the format and its
reading are the runtimes': aa_trt.backends.manifest).

A graph is reused only when its entry's key (checkpoint sha256, build shapes, opset, aa-trt version,
the graph's declared names and axes) equals the key the current build would write, and its files are
still there at their recorded sizes. Anything else is rebuilt. The runtime refuses a DIR whose
manifest does not match the checkpoint, the sizes or the aa-trt it is asked to run with.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from aa_trt import __version__
from aa_trt.backends.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, files_intact, load_for_run,  # noqa: F401
                                     read_manifest)
from aa_trt.files import write_text

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


def write_manifest(out_dir, manifest: dict) -> Path:
    """Atomic: a temporary name, then rename, so a crashed build never leaves half a manifest."""
    path = Path(out_dir) / MANIFEST
    write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def reusable(out_dir, entry: dict | None, key: dict) -> bool:
    return entry is not None and entry.get("key") == key and files_intact(out_dir, entry)
