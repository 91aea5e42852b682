"""Reading DIR/manifest.json, what an `aa-trt build` holds and what it was built from: the format
the runtimes check before they load anything. The exporter (aa_trt.export.manifest) writes it with
these names; this side never imports the exporter.
"""
from __future__ import annotations

import json
from pathlib import Path

from aa_trt import __version__
from aa_trt.errors import InputError

MANIFEST = "manifest.json"
FORMAT = "aa-trt-engines"
FORMAT_VERSION = 1


def read_manifest(out_dir) -> dict | None:
    """The manifest, or None when there is none or it is unreadable (a build then starts afresh)."""
    path = Path(out_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def files_intact(out_dir, entry: dict) -> bool:
    """Every file the entry records is there at its recorded size."""
    for name, size in entry.get("files", {}).items():
        p = Path(out_dir) / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return bool(entry.get("files"))


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
