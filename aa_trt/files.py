"""File plumbing used everywhere: outputs that appear only when complete, outputs that never
replace inputs, I/O failures as one line, content hashes, and the names of the precisions.

Every file aa-trt writes goes through `atomic_output`: the data goes to `.NAME.PID.partial.EXT`
beside the target and is renamed onto it when the block completes, so an interrupted or failed
write never leaves a half-written file under the name asked for (and the temporary is removed).
A write the system refuses (no space, read-only, permission denied, a vanished folder) ends in a
StorageError naming the file and the cause (`storage_error`).

Every command checks its outputs against its inputs before any work (`guard_outputs`): an output
that is an input (by resolved path or by device and inode: symlinks and hard links included),
lies inside an input folder or contains an input is refused, and so is a finished result already
there (a file, a non-empty folder) unless the user passes --overwrite.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from aa_trt.errors import InputError, OptionError, StorageError

# ---------------------------------------------------------------------------------- I/O failures
CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder (removed while in use?)",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.EFBIG: "file too large for this file system",
    errno.ESTALE: "stale file handle (network file system)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENXIO: "no such device",
    errno.ENODEV: "no such device",
}


def storage_error(e: OSError, path=None, *, tmp=None) -> StorageError:
    """One line for a failed read or write: the file (the OSError's own when it names one, the
    partial temporary `tmp` reported as its target `path`) and the cause, with the errno's name."""
    name = getattr(e, "filename", None) or path
    if name is not None and tmp is not None and str(name) == str(tmp):
        name = path
    cause = CAUSES.get(e.errno) or (e.strerror or str(e) or type(e).__name__)
    code = errno.errorcode.get(e.errno)
    where = f"{name}: " if name is not None else ""
    return StorageError(f"{where}{cause}" + (f" ({code})" if code else ""))


def check_output_folder(folder) -> None:
    """The folder an output goes to exists (InputError: a wrong path) and can be written to
    (StorageError: read-only file system, permission denied)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        read_only = False
        with contextlib.suppress(OSError, AttributeError):
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        code = errno.EROFS if read_only else errno.EACCES
        raise StorageError(f"{folder}: output folder is not writable: {CAUSES[code]} ({errno.errorcode[code]})")


def is_storage_failure(e: BaseException) -> bool:
    """An OSError from the system (it has an errno): not a file whose content is wrong."""
    return isinstance(e, OSError) and isinstance(getattr(e, "errno", None), int) and e.errno > 0


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, path.parent) from None
    if not path.parent.is_dir():  # checked before the work began: it vanished since
        raise StorageError(f"{path.parent}: output folder does not exist (removed while in use?) (ENOENT)")
    check_output_folder(path.parent)
    tmp = partial_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if not is_storage_failure(e):
            raise
        raise storage_error(e, path, tmp=tmp) from None
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


# ---------------------------------------------------------------------------------- outputs vs inputs
def _identity(path: Path):
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _chain(path) -> list[Path]:
    """The path (symlinks resolved as far as it exists) and its folders up to the root."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    with contextlib.suppress(OSError, RuntimeError):
        p = p.resolve()
    return [p, *p.parents]


def _same(a: Path, b: Path, id_b) -> bool:
    return a == b or (id_b is not None and _identity(a) == id_b)


def clash(output, input) -> str | None:
    """How `output` would clobber `input`: "is" (the same path, symlink or hard link), "lies
    inside" (a folder input), "contains" (a folder output), or None."""
    out, inp = _chain(output), _chain(input)
    id_out, id_in = _identity(out[0]), _identity(inp[0])
    if _same(out[0], inp[0], id_in):
        return "is"
    if any(_same(a, inp[0], id_in) for a in out[1:]):
        return "lies inside"
    if any(_same(a, out[0], id_out) for a in inp[1:]):
        return "contains"
    return None


def finished_result(path) -> bool:
    """Something a command would replace is there: a file (or link), or a non-empty folder."""
    path = Path(path)
    if path.is_dir():
        try:
            return any(path.iterdir())
        except OSError as e:
            raise storage_error(e, path) from None
    return path.exists() or path.is_symlink()


def guard_outputs(outputs, inputs, overwrite: bool = False) -> None:
    """Refuse, before any work, outputs that would clobber inputs or a finished result.

    outputs: [(path, finished)], `finished` True when what is at `path` is a result the command
    would replace (it is refused unless `overwrite`; a folder the command manages itself, as a
    build folder or a training folder under --resume, passes False). inputs: [(what, path)] with
    what naming the input ("driving video"); None paths are skipped. InputError (exit 2) naming
    both."""
    inputs = [(what, Path(p)) for what, p in inputs if p is not None]
    for out, finished in outputs:
        if out is None:
            continue
        out = Path(out)
        for what, inp in inputs:
            how = clash(out, inp)
            if how == "is":
                raise InputError(f"{out}: is the {what} ({inp}), by path or as a link to the same file; "
                                 f"an output never replaces an input: choose another output")
            if how == "lies inside":
                raise InputError(f"{out}: lies inside the {what} {inp}; outputs are written outside "
                                 f"the inputs: choose another output")
            if how == "contains":
                raise InputError(f"{out}: contains the {what} {inp}; outputs are written apart from "
                                 f"the inputs: choose another output")
        if finished and not overwrite:
            raise InputError(f"{out}: exists; pass --overwrite to replace it")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the finished folder `tmp` at `folder`, replacing what is there (an --overwrite): the old
    one is moved aside first and removed only once the new one is in place."""
    import shutil

    old = None
    if folder.exists() or folder.is_symlink():
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


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
