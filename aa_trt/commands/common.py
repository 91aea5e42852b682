"""What several commands share: the --overwrite, clip and report flags, the closing summary, and
the clean-up of a folder a failed command made."""
from __future__ import annotations

import contextlib
from pathlib import Path


def imports_torch(handler):
    """Mark a command's handler as one that imports torch: the process entry (aa_trt.cli.entry)
    imports it first, so that it is frozen out of the garbage collector's way."""
    handler.imports_torch = True
    return handler


def add_overwrite_flag(p, what: str = "the output"):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it exists (never an input; by default a finished result "
                   "is kept and the command refused)")


def add_clip_flags(p):
    p.add_argument("--frames", type=int, default=None, metavar="N", help="use at most N frames")
    p.add_argument("--stride", type=int, default=1, metavar="K",
                   help="take every K-th frame (the output fps is the source's divided by K)")
    p.add_argument("--start", type=int, default=0, metavar="S", help="skip the first S frames")


def add_report_flags(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the closing summary as one JSON line")


def report(args, result) -> int:
    from aa_trt.run import as_json, summary_line

    print(as_json(result) if args.json else summary_line(result))
    return 0


def remove_if_empty(folder: Path) -> None:
    """Remove a folder a failed command made, if it holds nothing but empty files."""
    with contextlib.suppress(OSError):
        if folder.is_dir() and all(p.is_file() and p.stat().st_size == 0 for p in folder.iterdir()):
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
