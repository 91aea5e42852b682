"""The process group and its failure protocol, for every torchrun job of aa-trt (`run`, `batch`,
`train`).

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) sets up the group: NCCL for
CUDA devices, gloo on CPUs. With WORLD_SIZE 1 (or no torchrun) no group starts, every helper here
answers as the one rank of a world of one, and the single-process code path runs unchanged.

Failures: a rank that fails takes part in the next collective with an error flag (`agree`, or the
flag `StepReduce` folds into a denoise step's all-reduce); every rank then raises the same
`RankFailure` carrying the failing rank's message, and all exit with the same code. A collective
that itself fails (a rank died, a timeout) raises `CommunicationError`; no more collectives follow.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from aa_trt.errors import AATrtError, OptionError

TIMEOUT_ENV = "AA_TRT_DIST_TIMEOUT"  # seconds a collective may wait (default 1800)


# ---------------------------------------------------------------------------------- processes
def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(name: str) -> torch.device:
    """`cuda` means this process's GPU (cuda:LOCAL_RANK) under torchrun; explicit indices are kept."""
    d = torch.device(name)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return d


def init_process_group(device: str = "cpu", backend: str | None = None, timeout_s: float = 1800,
                       timeout_env: str = TIMEOUT_ENV) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1: NCCL for a CUDA device, gloo otherwise
    (or `backend`); collectives wait at most $timeout_env or `timeout_s` seconds. True if this
    call started it (the caller then destroys it)."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dev = local_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", device, "no CUDA device is available to this torch build")
        if dev.index >= torch.cuda.device_count():
            raise OptionError("device", device, f"rank {os.environ.get('RANK')} wants {dev} but this node "
                              f"has {torch.cuda.device_count()} GPU(s); start at most that many "
                              f"processes per node (torchrun --nproc_per_node)")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=float(os.environ.get(timeout_env, timeout_s)))
    dist.init_process_group(backend, timeout=timeout)
    return True


_broken = False  # a collective failed: no more collectives (they would wait for the timeout)


def shutdown(started: bool) -> None:
    """Leave together (a barrier, unless the group is broken), so that torchrun does not see one
    rank exit first and signal the others mid-exit; then destroy the group."""
    if started and dist.is_initialized():
        if not _broken and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 -- leaving anyway
                pass
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- failures
class RankFailure(AATrtError):
    """Raised on every rank when any rank failed; the message is the failing rank's."""

    def __init__(self, message: str, failed_rank: int, exit_code: int = 2):
        super().__init__(f"rank {failed_rank}: {message}")
        self.failed_rank = failed_rank
        self.exit_code = exit_code


class CommunicationError(AATrtError):
    """A collective itself failed (a rank died, a timeout): nothing more can be agreed on."""

    exit_code = 1


def comm(fn, *args, **kw):
    global _broken
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 -- gloo/NCCL raise RuntimeError and friends
        _broken = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CommunicationError(f"rank {dist.get_rank()}: lost the other ranks in {fn.__name__} "
                                 f"({type(e).__name__}: {first[:300]})") from e


def _describe(err: BaseException) -> tuple[str, int]:
    if isinstance(err, RankFailure):
        return str(err).split(": ", 1)[1], err.exit_code
    if isinstance(err, AATrtError):
        return str(err), err.exit_code
    # A bug, not bad input: keep its traceback in this rank's log, send one line to the others.
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    return f"{type(err).__name__}: {err}", 1


def agree(err: BaseException | None = None) -> None:
    """Collective: every rank says whether it failed. If any did, every rank raises the same
    RankFailure with the message of the lowest failing rank. Without a group: raise err if any."""
    if not active():
        if err is not None:
            raise err
        return
    me, n = dist.get_rank(), dist.get_world_size()
    flag = torch.tensor([me if err is not None else n], dtype=torch.int64, device=_comm_device())
    comm(dist.all_reduce, flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    if first == n:
        return
    payload = [_describe(err) if me == first else None]
    comm(dist.broadcast_object_list, payload, src=first, device=_comm_device())
    message, code = payload[0]
    raise RankFailure(message, first, code) from (err if me == first else None)


@contextmanager
def collective_errors():
    """Wrap a rank's work between two collectives: a failure inside becomes an `agree` with the
    error (the other ranks wait at an `agree`), so every rank raises the same RankFailure."""
    try:
        yield
    except (RankFailure, CommunicationError):
        raise
    except Exception as e:  # noqa: BLE001 -- any failure must reach the other ranks
        agree(e)
        raise  # unreachable: agree(e) raises



# ---------------------------------------------------------------------------------- helpers
def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a group."""
    if not active():
        return [obj]
    out = [None] * world_size()
    comm(dist.all_gather_object, out, obj)
    return out


def broadcast_object(obj=None, src: int = 0):
    """rank `src`'s obj on every rank (obj is ignored elsewhere)."""
    if not active():
        return obj
    box = [obj]
    comm(dist.broadcast_object_list, box, src=src, device=_comm_device())
    return box[0]


def broadcast_tensors(tensors: list[torch.Tensor] | None, device, src: int = 0) -> list[torch.Tensor]:
    """rank `src`'s tensors on every rank (shapes and dtypes first, then the data); the other
    ranks pass None and receive them on `device`."""
    from aa_trt.files import dtype_name, torch_dtype

    header = None
    if rank() == src:
        tensors = [t.contiguous() for t in tensors]
        header = [(tuple(t.shape), dtype_name(t.dtype)) for t in tensors]
    header = broadcast_object(header, src)
    if rank() != src:
        tensors = [torch.empty(shape, dtype=torch_dtype(dt), device=device) for shape, dt in header]
    for t in tensors:
        comm(dist.broadcast, t, src=src)
    return tensors


class StepReduce:
    """The `reduce` hook of guidance.windowed_guidance across the ranks: one all-reduce (SUM) of
    the step's prediction sums with a failure flag as the last element; if any rank failed, every
    rank raises the same RankFailure. A failure reported between steps (`report`, e.g. a
    callback's) is sent with the next step."""

    def __init__(self):
        self.pending: list[BaseException] = []

    def report(self, err: BaseException) -> None:
        if not self.pending:
            self.pending.append(err)

    def __call__(self, buf: torch.Tensor, err: BaseException | None) -> None:
        err = err or (self.pending[0] if self.pending else None)
        if err is not None:
            buf[-1] = 1.0
        if active():
            comm(dist.all_reduce, buf)
        if buf[-1].item() > 0:
            agree(err)  # every rank is here: raises RankFailure everywhere
