"""`aa-trt` command line: the parser, wired from one module per command (aa_trt/commands/; the
training companion's `data`, `eval` and `train` in training/cli.py), and the dispatch.
Each subcommand maps its flags onto a library call; errors a user can act on (AATrtError) print
as one line and exit 2 (bad input) or 3 (a file the system could not read or write: disk full,
read-only, permission denied, vanished or changed), an interrupt exits 130."""
from __future__ import annotations

import argparse
import signal
import sys

from aa_trt.commands import batch, build, convert, pose, run, ui


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-trt", description="Fast Animate Anyone: pose-guided "
                                "character animation with Moore-AnimateAnyone's weights.")
    from aa_trt import __version__
    p.add_argument("--version", action="version", version=f"aa-trt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (convert, build, run, batch, pose, ui):  # aa_trt/commands/: one module per command
        command.add_parser(sub)
    from aa_trt.training.cli import add_parsers  # the training companion's data, eval and train

    add_parsers(sub)
    return p


# Library parameters whose flag is not `--` + the name with dashes.
FLAGS = {"ckpt": "--ckpt", "output": "-o/--output", "align": "--no-align"}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The command line as a function (tests, other programs): parse `argv`, run the command,
    return its exit code."""
    return dispatch(build_parser().parse_args(argv))


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command: errors a user can act on print as one line (exit 2), an interrupt
    exits 130."""
    from aa_trt.errors import AATrtError, OptionError

    # SIGTERM unwinds like Ctrl-C, so the same cleanup (no partial outputs) runs for both.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored: a
    # `kill -INT` would do nothing. Take it back, so it cleans up like Ctrl-C.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except OptionError as e:  # the library names the parameter; the user typed its flag
        print(f"aa-trt: error: {e.as_flag(FLAGS)}", file=sys.stderr)
        return e.exit_code
    except AATrtError as e:
        print(f"aa-trt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a read or write the system refused (disk full, read-only, vanished...)
        from aa_trt.files import is_storage_failure, storage_error

        if not is_storage_failure(e):
            raise
        err = storage_error(e, getattr(args, "output", None) or getattr(args, "out", None))
        print(f"aa-trt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("aa-trt: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def entry() -> int:
    """The `aa-trt` process (the console script and `python -m aa_trt`): `main`, with the objects
    that live as long as the process kept out of the garbage collector's way.

    `import torch` leaves ~10^5 objects that live until exit. Every full collection walks them
    all: during the run, and once more at interpreter exit. Frozen (gc.freeze: moved to a
    generation the collector never visits), they are still freed as usual, but not walked: the
    README command's 5-step preset measured 3.93 -> 3.63 s whole-process on 2 AMD EPYC cores
    (docs/performance.md, "Start-up and exit"). Likewise malloc is set to keep freed memory for
    reuse (aa_trt.host_memory). Only the process's own entry does these: a program calling `main`
    many times keeps its collector and allocator as they were."""
    import gc

    args = build_parser().parse_args()
    if getattr(args.func, "imports_torch", False):  # not `pose`, `data synth` or `data prepare`
        from aa_trt.host_memory import keep_freed_memory

        keep_freed_memory()  # large freed tensors reused, not unmapped and faulted in again
        import torch  # noqa: F401  (the command's first import: done here, so that it is frozen)
        gc.freeze()
    rc = dispatch(args)
    gc.freeze()  # what is left is freed at exit without one last walk over it
    return rc


if __name__ == "__main__":
    sys.exit(entry())
