"""File plumbing used everywhere: outputs that appear only when complete, content hashes, and the
names of the precisions.

Every file aa-trt writes goes through `atomic_output`: the data goes to `.NAME.PID.partial.EXT`
beside the target and is renamed onto it when the block completes, so an interrupted or failed
write never leaves a half-written file under the name asked for (and the temporary is removed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from aa_trt.errors import InputError, OptionError


# ---------------------------------------------------------------------------------- atomic writes
def partial_name(path: Path) -> Path:
    """The temporary a write to `path` goes through (the suffix kept: numpy and the video
    encoders pick their format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


@contextlib.contextmanager
def atomic_output(path, *, fsync: bool = False, make_parent: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes.
    fsync: flush the file to disk before the rename makes it visible (checkpoints, states)."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: output folder does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path.parent}: output folder is not writable")
    tmp = partial_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path, text: str, **kw) -> Path:
    with atomic_output(path, **kw) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj, indent: int | None = 1, **kw) -> Path:
    """A JSON file written atomically (sorted keys only when indent is None: one-line records)."""
    text = json.dumps(obj, indent=indent, sort_keys=indent is None) + "\n"
    return write_text(path, text, **kw)


def remove_stale_partials(path) -> None:
    """Remove the temporaries that killed writes to `path` left behind (any process's)."""
    path = Path(path)
    if path.parent.is_dir():
        for p in path.parent.glob(f".{path.stem}.*.partial{path.suffix}"):
            with contextlib.suppress(OSError):
                p.unlink()


# ---------------------------------------------------------------------------------- hashes
def file_sha256(path, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes; of a folder: of its files' names and hashes, in name order."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file():
                h.update(p.name.encode())
                h.update(file_sha256(p, chunk).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- precisions
# One table: the short names users type (and the manifests record), and the torch names that
# checkpoint metadata (bank_dtype) and tensors' own str() use.
DTYPE_NAMES = ("fp32", "fp16", "bf16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def torch_dtype(name: str, param: str = "dtype"):
    """'fp16' / 'float16' / 'torch.float16' -> torch.float16; anything else an OptionError."""
    import torch

    key = str(name).removeprefix("torch.")
    key = _ALIASES.get(key, key)
    dt = getattr(torch, key, None) if key in _ALIASES.values() else None
    if not isinstance(dt, torch.dtype):
        raise OptionError(param, name, f"expected one of {', '.join(DTYPE_NAMES)}")
    return dt


def dtype_name(dtype) -> str:
    """torch.float16 -> 'fp16' (the short name)."""
    key = str(dtype).removeprefix("torch.")
    for short, long in _ALIASES.items():
        if long == key:
            return short
    raise ValueError(f"no short name for {dtype}")
