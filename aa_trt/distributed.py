"""One video on several processes (GPUs), launched by torchrun: `torchrun --nproc_per_node N -m
aa_trt run ...`.

Rank 0 leads: it runs `aa_trt.run.run` as one process would (reading, poses, conditioning,
decoding, writing, the summary) with a `DistributedAnimator`, which broadcasts the conditioning
(CLIP embedding, reference latent, reference K/V cache, PoseGuider features), the initial noise
and the SampleOptions once; the other ranks only load the denoising UNet and `follow`. Every rank
then runs the single-process denoise path (`Animator.run_denoise`) on its share of a
`guidance.Plan` (window parallel, guidance parallel or both), the shares summed by one all-reduce
per step (`process_group.StepReduce`), so every rank holds the same latents as one process would. Only
rank 0 decodes and writes. The process group and the failure protocol live in aa_trt.process_group.
"""
from __future__ import annotations

from typing import Callable

import torch

from aa_trt import process_group as D
from aa_trt.errors import OptionError
from aa_trt.options import check_parallel_mode
from aa_trt.models.reference_kv import ReferenceKV
from aa_trt.options import SampleOptions
from aa_trt.pipeline import Animator, Conditioning


class DistributedAnimator(Animator):
    """An Animator whose denoising is shared among the ranks of the process group.

    Rank 0 calls it as any Animator (`anim(ref, poses, ...)`, or prepare/denoise/decode); the other
    ranks call `follow()`, which receives the conditioning and does their share of every step.
    Without a process group (or with one rank) it is the plain Animator, numerics included.
    """

    def __init__(self, models, device="cpu", dtype: torch.dtype = torch.float32, parallel: str = "auto",
                 **options):
        super().__init__(models, device, dtype, **options)
        self.parallel = check_parallel_mode(parallel)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32, parallel: str = "auto",
                        **options) -> "DistributedAnimator":
        anim = super().from_pretrained(path, device, dtype, **options)
        anim.parallel = check_parallel_mode(parallel)
        return anim

    @classmethod
    def follower(cls, path, device="cpu", dtype: torch.dtype = torch.float32, parallel: str = "auto",
                 **options) -> "DistributedAnimator":
        """For ranks > 0, which only run the denoising UNet (the conditioning comes from rank 0):
        the ReferenceNet, VAE, CLIP and PoseGuider are not loaded (about 2.5 GB of fp16 weights
        at SD1.5 size)."""
        from pathlib import Path

        from aa_trt.checkpoint import load_checkpoint

        models = load_checkpoint(Path(path), device=device, dtype=dtype, components=("denoising_unet",))
        return cls(models, device, dtype, parallel, **options)

    # ------------------------------------------------------------------ rank 0
    def sample_options(self, sample: SampleOptions | None = None, **overrides) -> SampleOptions:
        # Checked on rank 0 only: a bad value must also release the ranks waiting in follow().
        try:
            return super().sample_options(sample, **overrides)
        except Exception as e:  # noqa: BLE001
            if not D.active():
                raise
            D.agree(e)  # raises RankFailure here and on every follower
            raise

    def run_denoise(self, cond: Conditioning, latents: torch.Tensor, sample: SampleOptions, *,
                    callback=None, progress: bool = True, start: int = 0, carry: dict | None = None,
                    **_) -> torch.Tensor:
        if not D.active():
            return super().run_denoise(cond, latents, sample, callback=callback, progress=progress,
                                       start=start, carry=carry)
        if D.rank() != 0:
            raise RuntimeError(f"rank {D.rank()}: only rank 0 calls denoise(); the others call follow()")
        D.agree(None)  # the others wait here (after loading the model) for the conditioning
        latents = latents.to(self.device, torch.float32)
        carry = dict(carry or {})
        D.broadcast_object({"sample": sample.to_dict(), "size": (cond.width, cond.height), "start": start,
                            "carry": sorted(carry)})
        D.broadcast_tensors(_tensors(cond, latents) + [carry[k] for k in sorted(carry)], self.device)
        return self._shared(cond, latents, sample, callback, progress, start, carry)

    # ------------------------------------------------------------------ ranks 1..P-1
    def follow(self, err: BaseException | None = None) -> torch.Tensor:
        """The non-leading ranks' side of `denoise`: wait for rank 0's conditioning (reporting
        `err`, e.g. a failure to load, to every rank instead), then do this rank's share of every
        step. Returns the final latents, the same on every rank as on rank 0."""
        D.agree(err)
        header = D.broadcast_object()
        sample, (width, height) = SampleOptions(**header["sample"]), header["size"]
        tensors = D.broadcast_tensors(None, self.device)
        n_carry = len(header["carry"])
        carry = dict(zip(header["carry"], tensors[len(tensors) - n_carry:]))
        latents, clip, ref_latent, pose, *kv = tensors[:len(tensors) - n_carry]
        pairs = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        cond = Conditioning(clip, ref_latent, ReferenceKV(pairs), pose, width, height)
        return self._shared(cond, latents, sample, None, False, header["start"], carry)

    # ------------------------------------------------------------------ every rank
    def _shared(self, cond: Conditioning, latents: torch.Tensor, sample: SampleOptions, callback,
                progress: bool, start: int = 0, carry: dict | None = None) -> torch.Tensor:
        reduce = D.StepReduce()

        def guarded(info):  # a callback's failure reaches the other ranks with the next step
            if callback is not None and not reduce.pending:
                try:
                    callback(info)
                except Exception as e:  # noqa: BLE001
                    reduce.report(e)

        out = super().run_denoise(cond, latents, sample, callback=guarded, progress=progress, start=start,
                                  carry=carry, world=D.world_size(), rank=D.rank(), parallel=self.parallel,
                                  reduce=reduce)
        if reduce.pending:  # after the last step: rank 0 raises, collective_errors tells the others
            raise reduce.pending[0]
        return out


def _tensors(cond: Conditioning, latents: torch.Tensor) -> list[torch.Tensor]:
    return [latents, cond.clip_embeds, cond.ref_latent, cond.pose_features, *cond.reference_kv.flat()]


# ---------------------------------------------------------------------------------- aa-trt run
def run_parallel(opts, report: Callable[[dict], int] | None = None) -> int:
    """`aa-trt run` under torchrun: rank 0 runs `run.run` with a DistributedAnimator (reading,
    poses, conditioning, decoding, writing, the summary); the other ranks load the model and
    follow. Returns the exit code; a failure anywhere raises RankFailure on rank 0 (printed by the
    CLI) and returns its exit code silently on the others."""
    started = D.init_process_group(opts.device)
    try:
        if D.rank() == 0:
            return _lead(opts, report)
        return _follow(opts)
    finally:
        D.shutdown(started)


def _lead(opts, report) -> int:
    from aa_trt.run import run

    made: list[DistributedAnimator] = []

    def make_animator(ckpt, device, dtype):
        anim = DistributedAnimator.from_pretrained(ckpt, device=D.local_device(str(device)), dtype=dtype,
                                                   parallel=opts.parallel)
        made.append(anim)
        return anim

    with D.collective_errors():
        if opts.engine is not None:
            raise OptionError("engine", str(opts.engine), "an engine runs in one process; under torchrun "
                              "the torch backend shares the windows among the ranks")
        result = run(opts, make_animator=make_animator)
    D.agree(None)  # the others wait here until the video is written (or rank 0 failed)
    if made and made[0].plan is not None:
        result["parallel"] = made[0].plan.describe()
    result["world_size"] = D.world_size()
    return report(result) if report is not None else 0


def _follow(opts) -> int:
    from aa_trt.precision import choose
    from aa_trt.run import checkpoint_path

    anim, err = None, None
    try:
        anim = DistributedAnimator.follower(checkpoint_path(opts.ckpt), device=D.local_device(opts.device),
                                            dtype=choose(opts.dtype, opts.device).torch_dtype(),
                                            parallel=opts.parallel,
                                            compile=opts.compile, cuda_graph=opts.cuda_graph)
    except Exception as e:  # noqa: BLE001 -- reported to every rank by follow/agree
        err = e
    try:
        if anim is None:
            D.agree(err)
        anim.follow()
        D.agree(None)
    except D.RankFailure as e:
        return e.exit_code  # rank 0 prints the message
    return 0
