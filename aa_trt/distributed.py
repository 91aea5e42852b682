"""Scale-out over torch.distributed: one video on several processes (GPUs), launched by torchrun.

`torchrun --nproc_per_node N -m aa_trt run ...` starts N processes; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) sets up the process group: NCCL for CUDA
devices, gloo on CPUs. With WORLD_SIZE 1 (or no torchrun) nothing here starts a group and the
single-process code path runs unchanged.

Inside one video two kinds of parallelism compose (see `make_plan`):

- window parallel: each rank denoises a share of the context windows (window i -> shard
  i % shards); the per-frame prediction sums are all-reduced once per step, then divided by the
  per-frame counts (static: every rank knows every window) exactly as `windowed_guidance` does;
- guidance parallel: with classifier-free guidance the ranks form two groups, uncond and cond
  (floor(P/2) and ceil(P/2) ranks: cond, with reference attention, is the dearer branch); each
  group shares its branch's windows. The same all-reduce brings both branches to every rank,
  where the CFG combination runs.

Rank 0 leads: it reads the inputs, extracts and renders the poses, computes the conditioning
(CLIP embedding, reference latent, reference K/V cache, PoseGuider features) and the initial
noise once, and broadcasts them (shapes first, then the tensors); the other ranks only load the
model. Every rank runs the same DDIM steps on identical latents (all-reduce results are the same
on every rank); only rank 0 decodes and writes.

Failures: a rank that fails takes part in the next collective with an error flag (`agree`, or a
flag folded into the per-step all-reduce); every rank then raises the same `RankFailure` carrying
the failing rank's message, rank 0 prints it, and all exit with the same code.
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .errors import AATrtError, InputError
from .pipeline import Animator, Conditioning
from .models.reference_kv import ReferenceKV
from .sampling import WindowIndexCache, context_windows, ddim_schedule, sample_ddim, window_counts

PARALLEL_MODES = ("auto", "window", "guidance", "both")
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
            raise InputError(f"--device {device}: no CUDA device is available to this torch build")
        if dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: rank {os.environ.get('RANK')} wants {dev} but this "
                             f"node has {torch.cuda.device_count()} GPU(s); start at most that many "
                             f"processes per node (--nproc_per_node)")
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


def _comm(fn, *args, **kw):
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
    _comm(dist.all_reduce, flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    if first == n:
        return
    payload = [_describe(err) if me == first else None]
    _comm(dist.broadcast_object_list, payload, src=first, device=_comm_device())
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


# ---------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    """Which (branch, window) units this rank computes in every step."""

    mode: str                          # effective: "single", "window" or "guidance"
    world: int
    rank: int
    all_branches: tuple[str, ...]      # ("uncond", "cond") with CFG, else ("cond",)
    branches: tuple[str, ...]          # this rank's branches: all of them, or one
    windows: tuple[int, ...]           # indices into the window list
    groups: tuple[int, ...]            # ranks per branch group: (P,) or (uncond, cond)
    max_units: int                     # (branch, window) UNet units of the busiest rank per step

    def describe(self) -> str:
        if self.mode == "guidance":
            return f"guidance x window: {self.groups[0]} uncond + {self.groups[1]} cond ranks"
        return f"{self.mode}: {self.world} rank{'s' if self.world > 1 else ''}"


def _window_units(n_windows: int, world: int, nb: int) -> int:
    return nb * math.ceil(n_windows / world)


def _guidance_units(n_windows: int, world: int) -> int:
    n_uncond = world // 2
    return max(math.ceil(n_windows / n_uncond), math.ceil(n_windows / (world - n_uncond)))


def make_plan(n_windows: int, world: int, rank_: int, cfg: bool, mode: str = "auto") -> Plan:
    """Share the step's (branch, window) units among `world` ranks.

    - window: window i -> rank i % world, both branches batched in one UNet call;
    - guidance / both (the same plan: the group sizes decide whether windows are sharded too):
      uncond on ranks [0, P//2), cond on [P//2, P); window i -> the group's rank i % group size.
      With 2 ranks this is pure guidance parallel; with 4, 2 groups x 2 window shards; with 3,
      1 uncond rank + 2 cond ranks (cond is the dearer branch).
    - auto: the plan whose busiest rank has the fewest units (ties: window, which batches the
      two branches and has no uncond/cond imbalance).
    Without CFG (guidance <= 1) there is one branch, and every mode is window parallel.
    """
    if mode not in PARALLEL_MODES:
        raise InputError(f"--parallel {mode}: expected one of {', '.join(PARALLEL_MODES)}")
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} outside a world of {world}")
    all_b = ("uncond", "cond") if cfg else ("cond",)
    use_guidance = cfg and world >= 2 and (
        mode in ("guidance", "both")
        or (mode == "auto" and _guidance_units(n_windows, world) < _window_units(n_windows, world, 2)))
    if use_guidance:
        n_uncond = world // 2
        groups = (n_uncond, world - n_uncond)
        g = 0 if rank_ < n_uncond else 1
        shard, size = (rank_, n_uncond) if g == 0 else (rank_ - n_uncond, world - n_uncond)
        mine = tuple(i for i in range(n_windows) if i % size == shard)
        return Plan("guidance", world, rank_, all_b, (all_b[g],), mine, groups,
                    _guidance_units(n_windows, world))
    mine = tuple(i for i in range(n_windows) if i % world == rank_)
    return Plan("single" if world == 1 else "window", world, rank_, all_b, all_b, mine, (world,),
                _window_units(n_windows, world, len(all_b)))


# ---------------------------------------------------------------------------------- guidance
def parallel_windowed_guidance(unet_step: Callable, windows: Sequence[Sequence[int]], guidance: float,
                               window_batch: int = 1, *, plan: Plan,
                               on_windows: Callable[[int], None] | None = None,
                               check: Callable[[], None] | None = None) -> Callable:
    """`sampling.windowed_guidance` across ranks; same contract (a whole-video model(x, t)).

    This rank runs `plan.branches` of the windows `plan.windows`; the prediction sums of both
    branches, with one extra element as an error flag, go through one all-reduce (SUM) per step;
    then, as in the single process, they are divided by the per-frame window counts and combined
    for CFG. A failure here (or in `check()`, run first) raises the same RankFailure on every rank.
    """
    all_b = plan.all_branches
    if (guidance > 1.0) != (len(all_b) == 2):
        raise ValueError("the plan's branches do not match the guidance scale")
    nb = len(all_b)
    row = all_b.index(plan.branches[0])  # this rank's rows: row .. row + len(plan.branches)
    idx, counts = window_counts(windows)
    mine = [idx[i] for i in plan.windows]
    on_device = WindowIndexCache(mine, counts)

    def model(x: torch.Tensor, t: int) -> torch.Tensor:
        # x (1, c, N, h, w), identical on every rank -> guided prediction (1, c, N, h, w)
        shape = (nb,) + tuple(x.shape[1:])
        buf = torch.zeros(math.prod(shape) + 1, dtype=x.dtype, device=x.device)
        sums = buf[:-1].view(shape)
        err = None
        try:
            if check is not None:
                check()
            dev_mine, dev_counts = on_device(x)
            for s in range(0, len(mine), window_batch):
                host = mine[s:s + window_batch]
                group = dev_mine[s:s + window_batch]
                x_win = torch.cat([x[:, :, w] for w in group])
                pred = unet_step(x_win, t, host, plan.branches)
                pred = pred.view(len(plan.branches), len(group), *pred.shape[1:])
                part = sums[row:row + len(plan.branches)]
                for j, w in enumerate(group):
                    part.index_add_(2, w, pred[:, j])
                if on_windows is not None:
                    on_windows(len(group))
        except Exception as e:  # noqa: BLE001 -- reported to every rank below
            err = e
            buf[-1] = 1.0
        if plan.world > 1:
            _comm(dist.all_reduce, buf)
        if buf[-1].item() > 0:
            agree(err)  # every rank is here: raises RankFailure everywhere
        sums = sums / dev_counts.view(1, 1, -1, 1, 1)
        if nb == 1:
            return sums[0:1]
        uncond, cond = sums[0:1], sums[1:2]
        return uncond + guidance * (cond - uncond)

    return model


# ---------------------------------------------------------------------------------- animator
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class DistributedAnimator(Animator):
    """An Animator whose denoising is shared among the ranks of the process group.

    Rank 0 calls it as any Animator (`anim(ref, poses, ...)`, or prepare/denoise/decode); the other
    ranks call `follow()`, which receives the conditioning and does their share of every step.
    Without a process group (or with one rank) it is the plain Animator, numerics included.
    """

    def __init__(self, models, device="cpu", dtype: torch.dtype = torch.float32, parallel: str = "auto"):
        super().__init__(models, device, dtype)
        if parallel not in PARALLEL_MODES:
            raise InputError(f"--parallel {parallel}: expected one of {', '.join(PARALLEL_MODES)}")
        self.parallel = parallel
        self.plan: Plan | None = None

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32,
                        parallel: str = "auto") -> "DistributedAnimator":
        anim = super().from_pretrained(path, device, dtype)
        if parallel not in PARALLEL_MODES:
            raise InputError(f"--parallel {parallel}: expected one of {', '.join(PARALLEL_MODES)}")
        anim.parallel = parallel
        return anim

    @classmethod
    def follower(cls, path, device="cpu", dtype: torch.dtype = torch.float32,
                 parallel: str = "auto") -> "DistributedAnimator":
        """For ranks > 0, which only run the denoising UNet (the conditioning comes from rank 0):
        the ReferenceNet, VAE, CLIP and PoseGuider are not loaded (about 2.5 GB of fp16 weights
        at SD1.5 size)."""
        from pathlib import Path

        from .checkpoint import load_checkpoint

        models = load_checkpoint(Path(path), device=device, dtype=dtype, components=("denoising_unet",))
        return cls(models, device, dtype, parallel)

    # ------------------------------------------------------------------ rank 0
    def denoise(self, cond: Conditioning, latents: torch.Tensor, steps: int = 20, guidance: float = 3.5,
                context_frames: int = 24, context_overlap: int = 4, context_schedule: str = "uniform",
                window_batch: int = 1, callback=None, progress: bool = True) -> torch.Tensor:
        if not active():
            self.plan = make_plan(1, 1, 0, guidance > 1.0)
            return super().denoise(cond, latents, steps, guidance, context_frames, context_overlap,
                                   context_schedule, window_batch, callback, progress)
        if rank() != 0:
            raise RuntimeError(f"rank {rank()}: only rank 0 calls denoise(); the others call follow()")
        params = dict(steps=int(steps), guidance=float(guidance), context_frames=int(context_frames),
                      context_overlap=int(context_overlap), context_schedule=str(context_schedule),
                      window_batch=int(window_batch))
        err = None
        try:
            self._check(params, cond.num_frames)
        except Exception as e:  # noqa: BLE001
            err = e
        agree(err)  # the others wait here (after loading the model) for the conditioning
        latents = latents.to(self.device, torch.float32)
        self._send(cond, latents, params)
        return self._denoise(cond, latents, params, callback, progress)

    # ------------------------------------------------------------------ ranks 1..P-1
    def follow(self, err: BaseException | None = None) -> torch.Tensor:
        """The non-leading ranks' side of `denoise`: wait for rank 0's conditioning (reporting
        `err`, e.g. a failure to load, to every rank instead), then do this rank's share of every
        step. Returns the final latents, the same on every rank as on rank 0."""
        agree(err)
        cond, latents, params = self._receive()
        return self._denoise(cond, latents, params, None, False)

    # ------------------------------------------------------------------ shared
    def _check(self, params: dict, n_frames: int) -> None:
        if params["context_frames"] > self.config.motion.max_len:
            raise InputError(f"context_frames={params['context_frames']} exceeds the motion modules' "
                             f"maximum window of {self.config.motion.max_len} frames")
        context_windows(n_frames, params["context_frames"], params["context_overlap"],
                        params["context_schedule"])
        ddim_schedule(self.config.scheduler, params["steps"])
        if params["window_batch"] < 1:
            raise InputError(f"window_batch={params['window_batch']}: must be >= 1")

    def _tensors(self, cond: Conditioning, latents: torch.Tensor) -> list[torch.Tensor]:
        return [latents, cond.clip_embeds, cond.ref_latent, cond.pose_features, *cond.reference_kv.flat()]

    def _send(self, cond: Conditioning, latents: torch.Tensor, params: dict) -> None:
        tensors = [t.contiguous() for t in self._tensors(cond, latents)]
        header = {"params": params, "width": cond.width, "height": cond.height,
                  "tensors": [(tuple(t.shape), str(t.dtype)) for t in tensors]}
        _comm(dist.broadcast_object_list, [header], src=0, device=_comm_device())
        for t in tensors:
            _comm(dist.broadcast, t, src=0)

    def _receive(self) -> tuple[Conditioning, torch.Tensor, dict]:
        box = [None]
        _comm(dist.broadcast_object_list, box, src=0, device=_comm_device())
        header = box[0]
        tensors = []
        for shape, dtype in header["tensors"]:
            t = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
            _comm(dist.broadcast, t, src=0)
            tensors.append(t)
        latents, clip, ref_latent, pose, *kv = tensors
        pairs = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        cond = Conditioning(clip, ref_latent, ReferenceKV(pairs), pose, header["width"], header["height"])
        return cond, latents, header["params"]

    def _denoise(self, cond: Conditioning, latents: torch.Tensor, params: dict, callback, progress) -> torch.Tensor:
        from tqdm.auto import tqdm

        windows = context_windows(cond.num_frames, params["context_frames"], params["context_overlap"],
                                  params["context_schedule"])
        guidance = params["guidance"]
        self.plan = make_plan(len(windows), world_size(), rank(), guidance > 1.0, self.parallel)
        schedule = ddim_schedule(self.config.scheduler, params["steps"])
        pending: list[BaseException] = []  # a callback's failure, reported at the next step

        def check():
            if pending:
                raise pending[0]

        def guarded(info):
            if callback is not None and not pending:
                try:
                    callback(info)
                except Exception as e:  # noqa: BLE001
                    pending.append(e)

        desc = f"denoise ({len(self.plan.windows)}/{len(windows)} windows/step, {self.plan.describe()})"
        with tqdm(total=len(schedule) * len(self.plan.windows), desc=desc, unit="window",
                  disable=not progress) as bar:
            model = parallel_windowed_guidance(self.unet_step(cond), windows, guidance,
                                               params["window_batch"], plan=self.plan,
                                               on_windows=bar.update, check=check)
            out = sample_ddim(model, latents, schedule, callback=guarded, disable=True)
        if pending:
            raise pending[0]
        return out


# ---------------------------------------------------------------------------------- aa-trt run
_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_parallel(opts, parallel: str = "auto", report: Callable[[dict], int] | None = None) -> int:
    """`aa-trt run` under torchrun: rank 0 runs `run.run` with a DistributedAnimator (reading,
    poses, conditioning, decoding, writing, the summary); the other ranks load the model and
    follow. Returns the exit code; a failure anywhere raises RankFailure on rank 0 (printed by the
    CLI) and returns its exit code silently on the others."""
    started = init_process_group(opts.device)
    try:
        if rank() == 0:
            return _lead(opts, parallel, report)
        return _follow(opts, parallel)
    finally:
        shutdown(started)


def _lead(opts, parallel: str, report) -> int:
    from .run import run

    made: list[DistributedAnimator] = []

    def make_animator(ckpt, device, dtype):
        anim = DistributedAnimator.from_pretrained(ckpt, device=local_device(str(device)), dtype=dtype,
                                                   parallel=parallel)
        made.append(anim)
        return anim

    with collective_errors():
        if opts.engine is not None:
            raise InputError("--engine runs in one process; under torchrun drop --engine (the torch "
                             "backend shares the windows among the ranks)")
        if parallel not in PARALLEL_MODES:
            raise InputError(f"--parallel {parallel}: expected one of {', '.join(PARALLEL_MODES)}")
        result = run(opts, make_animator=make_animator)
    agree(None)  # the others wait here until the video is written (or rank 0 failed)
    if made and made[0].plan is not None:
        result["parallel"] = made[0].plan.describe()
    result["world_size"] = world_size()
    return report(result) if report is not None else 0


def _follow(opts, parallel: str) -> int:
    from .run import checkpoint_path

    anim, err = None, None
    try:
        if opts.dtype not in _DTYPE_NAMES:
            raise InputError(f"--dtype {opts.dtype}: expected one of {', '.join(_DTYPE_NAMES)}")
        anim = DistributedAnimator.follower(checkpoint_path(opts.ckpt), device=local_device(opts.device),
                                            dtype=_DTYPE_NAMES[opts.dtype], parallel=parallel)
        anim.set_options(compile=opts.compile, cuda_graph=opts.cuda_graph)  # nothing to offload here
    except Exception as e:  # noqa: BLE001 -- reported to every rank by follow/agree
        err = e
    try:
        if anim is None:
            agree(err)
        anim.follow()
        agree(None)
    except RankFailure as e:
        return e.exit_code  # rank 0 prints the message
    return 0
