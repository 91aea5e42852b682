"""The training companion's commands: `aa-trt data` (synth, prepare, denoised), `aa-trt eval` and
`aa-trt train`, wired into the `aa-trt` parser by aa_trt.cli. Handlers import their library
lazily (`data synth` and `data prepare` start without torch)."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from aa_trt.commands.common import imports_torch, remove_if_empty
from aa_trt.commands.sample_flags import add_sample_flags, sample_options


def add_parsers(sub) -> None:
    add_data_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)


def add_data_parser(sub) -> None:
    d = sub.add_parser("data", help="make training data (synthetic dancing characters)",
                       description="Training data for `aa-trt train`, in Moore's meta-JSON format.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    s = dsub.add_parser("synth", help="synthetic characters dancing, with exact pose renderings",
                        description="Textured 2D puppets on the 18-point skeleton performing procedural "
                        "dances. Writes videos/ (mp4s in Moore's {video_path, kps_path} layout and/or "
                        "lossless npz with the keypoints), train.json, test_characters.json (held-out "
                        "characters), test_motions.json (held-out motions) and dataset.json. The same "
                        "seed gives the same data.")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")
    s.add_argument("--videos", required=True, type=int, metavar="N", help="videos in all splits together")
    s.add_argument("--size", required=True, type=int, metavar="S", help="frame width and height (multiple of 8)")
    s.add_argument("--frames", type=int, default=24, metavar="F", help="frames per video (default 24)")
    s.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    s.add_argument("--format", default="mp4,npz", help="mp4, npz or both (default mp4,npz)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_data_synth)
    pr = dsub.add_parser("prepare", help="real dance videos -> pose videos and train.json",
                         description="Extract one skeleton per frame of every video under a folder (the "
                         "pose extractor of `aa-trt run`) and write DIR/videos/<name>_kps.mp4 (renderings), "
                         "<name>_kps.npz (keypoints) and DIR/train.json in Moore's {video_path, kps_path} "
                         "format. Reruns skip videos already done.")
    pr.add_argument("src", type=Path, help="folder of videos (searched recursively)")
    pr.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")
    pr.add_argument("--dwpose", type=Path, default=None, metavar="DIR", help="DWPose ONNX folder")
    pr.add_argument("--max-frames", type=int, default=None, metavar="N", help="use at most N frames per video")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_data_prepare)
    dn = dsub.add_parser("denoised", help="a finished model's final latents beside the true frames",
                         description="Run a checkpoint's full inference path on videos of synthetic meta files "
                         "(reference = frame 0, the next F frames driven by their exact poses) and write each "
                         "generated frame's final latent beside its true frame: data for `aa-trt train --stage 0 "
                         "--decoder-only --denoised FILE`. Use splits the model never trained on and that "
                         "`aa-trt eval` does not score (e.g. another synthetic set's test splits).")
    dn.add_argument("meta", nargs="+", type=Path, help="meta JSON files (made by `aa-trt data synth`)")
    dn.add_argument("--ckpt", required=True, type=Path, help="aa-trt checkpoint")
    dn.add_argument("--out", required=True, type=Path, metavar="FILE", help=".npz to write")
    dn.add_argument("--videos", type=int, default=None, metavar="N", help="first N videos per meta file (default all)")
    dn.add_argument("--frames", type=int, default=24, metavar="F", help="target frames per video (default 24)")
    dn.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    dn.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    dn.add_argument("--seed", type=int, default=0, help="noise seed of the first video (+1 per video)")
    dn.add_argument("--quiet", action="store_true", help="no progress bar")
    dn.set_defaults(func=_data_denoised)


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="SSIM/PSNR/L1 on held-out synthetic videos, beside two baselines",
                       description="Run the model on the test splits of a data folder (reference = frame 0, "
                       "the next F frames driven by their exact poses) and score it against ground truth "
                       "with SSIM, PSNR and L1, beside copying the reference and warping it by the skeleton.")
    e.add_argument("--ckpt", required=True, type=Path, help="aa-trt checkpoint")
    e.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder made by `aa-trt data synth`")
    e.add_argument("--splits", default="test_characters,test_motions", help="comma-separated split names")
    e.add_argument("--videos", type=int, default=None, metavar="N", help="first N videos per split (default all)")
    e.add_argument("--frames", type=int, default=24, metavar="F", help="target frames per video (default 24)")
    # The sampling flags of `run` (each SampleOptions field); video i of a split uses seed + i.
    add_sample_flags(e, defaults={"seed": 0}, helps={"seed": "noise seed of the first video (+1 per video)"})
    e.add_argument("--agreement-steps", type=int, default=None, metavar="N",
                   help="also render each video with DDIM-N (same seed, same guidance, CFG at every step) "
                   "and score the model's frames against it: agreement with the converged render")
    e.add_argument("--agreement-ckpt", type=Path, default=None, metavar="FILE",
                   help="with --agreement-steps: render that reference with this checkpoint at its declared "
                   "guidance (a distilled student's teacher) instead of --ckpt")
    e.add_argument("--agreement-guidance", type=float, default=None, metavar="G",
                   help="with --agreement-ckpt: its CFG scale (default: that checkpoint's declared one)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="auto", metavar="auto|fp32|fp16|bf16",
                   help="compute precision (default auto, as `run`; fp32 for Moore-exact numbers)")
    e.add_argument("--engine", type=Path, default=None, metavar="DIR",
                   help="run the model on this `aa-trt build` folder (as `run --engine`: OpenVINO on CPU "
                        "where installed, else onnxruntime) instead of torch; --dtype is then unused")
    e.add_argument("--no-baselines", dest="baselines", action="store_false", help="score the model only")
    e.add_argument("--no-model", dest="model", action="store_false",
                   help="score the baselines (and --ceiling) only, without sampling the model")
    e.add_argument("--ceiling", action="store_true",
                   help="also score the VAE's reconstruction of the true frames (the ceiling through this VAE)")
    e.add_argument("-o", "--output", type=Path, default=None, help="write the full result as JSON here")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval)


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train stage 0, 1 or 2, or distil a checkpoint (single process or under torchrun)",
                       description="Stage 1: denoising UNet (without motion modules), ReferenceNet and "
                       "PoseGuider on single frames. Stage 2: motion modules only, on clips. v-prediction on "
                       "the checkpoint's zero-SNR schedule, min-SNR weighting, offset noise, unconditional "
                       "samples, AdamW. Distill: progressive distillation of --init's denoising UNet into a "
                       "student taking one DDIM step where the teacher took two (--student-steps N), CFG "
                       "folded in; the checkpoint declares N steps. Under `torchrun --nproc_per_node N` it trains with "
                       "DistributedDataParallel (--batch is per process). Writes DIR/train_state.pt "
                       "(resumable), DIR/log.jsonl and DIR/model.safetensors (an aa-trt checkpoint).")
    t.add_argument("--stage", type=_train_stage, required=True, metavar="0|1|2|distill",
                   help="0: the preset's small VAE and CLIP (for models that cannot ship SD's); "
                   "1: image level; 2: motion modules; distill: fewer-step student of --init (the teacher)")
    t.add_argument("--data", required=True, metavar="DIR", help="data folder (train.json) or a meta JSON file")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for the state, log and checkpoint")
    t0 = t.add_mutually_exclusive_group(required=True)
    t0.add_argument("--init", metavar="CKPT", help="start from this aa-trt checkpoint")
    t0.add_argument("--preset", metavar="NAME", help="start from scratch with this preset (e.g. tiny)")
    t.add_argument("--steps", type=int, default=1000, help="total optimiser steps (default 1000)")
    t.add_argument("--batch", type=int, default=4, help="samples per process and step (default 4)")
    t.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 1e-5, Moore's; stage 0: 1e-3)")
    t.add_argument("--crop", type=int, default=None, help="stage 0: VAE training crop in pixels (default 32)")
    t.add_argument("--ssim-weight", type=float, default=None, metavar="W",
                   help="stage 0: add W * (1 - SSIM) to the VAE's L1 + MSE reconstruction loss (default 0)")
    t.add_argument("--decoder-only", action="store_true", default=None,
                   help="stage 0 with --init: fine-tune the VAE decoder alone (latents, latent_scale and "
                   "the UNets stay valid)")
    t.add_argument("--denoised", metavar="FILE", default=None,
                   help="stage 0 with --decoder-only: also fit the decoder to a model's own latents, from "
                   "`aa-trt data denoised`")
    t.add_argument("--denoised-batch", type=int, default=None, metavar="N",
                   help="with --denoised: crops of the model's latents per step (default: --batch)")
    t.add_argument("--frames", type=int, default=None, help="clip length (stage 2 and distill; default 16)")
    t.add_argument("--stride", type=int, default=1, help="frame step within a clip (default 1)")
    t.add_argument("--size", type=int, default=None, help="train at SxS (default: the data's size)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order, noise and scratch weights")
    t.add_argument("--uncond-ratio", type=float, default=None, help="unconditional samples (default 0.1)")
    t.add_argument("--snr-gamma", type=float, default=None, help="min-SNR gamma, 0 = off (default 5)")
    t.add_argument("--noise-offset", type=float, default=None, help="offset noise (default 0.05; distill: 0)")
    t.add_argument("--student-steps", type=int, default=None, metavar="N",
                   help="distill: the student's DDIM steps (default 10); the exported checkpoint declares them")
    t.add_argument("--teacher-steps", type=int, default=None, metavar="M",
                   help="distill: the teacher's DDIM steps, a multiple of N (default 2N: progressive distillation)")
    t.add_argument("--guidance", type=float, default=None,
                   help="distill: the teacher's CFG scale, folded into the student's one branch when > 1 "
                   "(default: the teacher checkpoint's)")
    t.add_argument("--cross-ref", type=float, default=None, metavar="P",
                   help="distill: the probability that a sample's reference image is another video's "
                   "character, as in use (default 0)")
    t.add_argument("--on-trajectory", type=float, default=None, metavar="P",
                   help="distill: the probability that a sample starts where the student's own steps "
                   "from noise reach, not at noised data (default 0)")
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps (default 0)")
    t.add_argument("--lr-decay", choices=("constant", "cosine"), default=None,
                   help="after warm-up: constant LR (default) or cosine down to --lr-floor x LR at --steps")
    t.add_argument("--lr-floor", type=float, default=None, help="cosine decay's final LR fraction (default 0.1)")
    t.add_argument("--decay-steps", type=int, default=None, metavar="N",
                   help="with cosine: hold the LR, then decay over the last N steps only (default: all)")
    t.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                   help="mixed precision (CUDA only; default no)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--save-every", type=int, default=500, help="steps between resumable states")
    t.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    t.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also export DIR/snapshots/step_N.safetensors every N steps (for curves)")
    t.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt if present")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds an earlier training (its state and checkpoint "
                   "are replaced as the new one saves)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    t.add_argument("--quiet", action="store_true", help="no per-step output")
    t.set_defaults(func=_train)


TRAIN_FILES = ("model.safetensors", "train_state.pt", "log.jsonl")


def check_train_output(args) -> None:
    """The training folder holds none of the data or initial checkpoint (nor they it); a folder
    with an earlier training (its state, log or checkpoint) is continued with --resume (when it
    has a state to continue) and replaced only with --overwrite."""
    from aa_trt.files import guard_outputs

    out = Path(args.out)
    guard_outputs([(out, False)], [("training data", args.data), ("initial checkpoint", args.init),
                                   ("denoised latents", args.denoised)])
    if out.exists() and not out.is_dir():
        from aa_trt.errors import InputError
        raise InputError(f"{out}: is a file; --out is a folder for the state, log and checkpoint")
    continued = args.resume and (out / "train_state.pt").is_file()
    earlier = [n for n in TRAIN_FILES if (out / n).exists()]
    if earlier and not continued and not args.overwrite:
        from aa_trt.errors import InputError
        hint = "pass --resume to continue it or --overwrite to start over there" if (out / "train_state.pt").is_file() \
            else "pass --overwrite to start over there"
        raise InputError(f"{out}: holds an earlier training ({earlier[0]}); {hint}")


def _data_synth(args) -> int:
    from aa_trt.training.synthetic import synthesize

    t = time.perf_counter()
    meta = synthesize(args.out, args.videos, args.size, frames=args.frames, seed=args.seed,
                      formats=tuple(args.format.split(",")), progress=not args.quiet)
    counts = ", ".join(f"{len(v)} {k}" for k, v in meta.items())
    print(f"wrote {args.out} ({counts}) in {time.perf_counter() - t:.1f} s")
    return 0


def _data_prepare(args) -> int:
    from aa_trt.training.prepare import prepare

    entries = prepare(args.src, args.out, args.dwpose, args.max_frames, progress=not args.quiet)
    print(f"wrote {args.out / 'train.json'} ({len(entries)} videos)")
    return 0


@imports_torch
def _data_denoised(args) -> int:
    from aa_trt.training.denoised import sample_pairs

    t = time.perf_counter()
    out = sample_pairs(args.ckpt, args.meta, args.out, frames=args.frames, videos=args.videos, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - t:.1f} s")
    return 0


@imports_torch
def _eval(args) -> int:
    from aa_trt.files import write_json
    from aa_trt.training.evaluate import EvalOptions, evaluate, table

    opts = EvalOptions(ckpt=str(args.ckpt), data=str(args.data), splits=tuple(args.splits.split(",")),
                       videos=args.videos, frames=args.frames,
                       sample=sample_options(args),
                       agreement_steps=args.agreement_steps,
                       agreement_ckpt=str(args.agreement_ckpt) if args.agreement_ckpt else None,
                       agreement_guidance=args.agreement_guidance,
                       device=args.device, dtype=args.dtype, baselines=args.baselines,
                       ceiling=args.ceiling, model=args.model,
                       engine=str(args.engine) if args.engine else None)
    result = evaluate(opts, progress=not args.quiet)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, result)
    print(table(result))
    return 0


DISTILL_ONLY = (("--student-steps", "student_steps"), ("--teacher-steps", "teacher_steps"), ("--guidance", "guidance"),
                ("--cross-ref", "cross_ref"), ("--on-trajectory", "on_trajectory"))


def _train_stage(value: str):
    """--stage: 0, 1, 2 (ints, as before) or distill."""
    if value in ("0", "1", "2"):
        return int(value)
    if value == "distill":
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected 0, 1, 2 or distill")


def _train_distill(args) -> int:
    from aa_trt.errors import InputError
    from aa_trt.training.distill import DistillOptions, distill

    if args.preset is not None:
        raise InputError("--stage distill starts from its teacher: give --init TEACHER.safetensors, not --preset")
    other = [flag for flag, value in (("--uncond-ratio", args.uncond_ratio), ("--snr-gamma", args.snr_gamma))
             if value is not None]
    if other:
        raise InputError(f"{other[0]} belongs to stages 1 and 2, not --stage distill "
                         "(the student learns conditional samples, weighted by truncated SNR)")
    fields = [f.name for f in dataclasses.fields(DistillOptions) if f.init]
    opts = DistillOptions(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})
    check_train_output(args)
    path = distill(opts, progress=not args.quiet)
    if path is not None:
        print(f"wrote {path}")
    return 0


@imports_torch
def _train(args) -> int:
    new_folder = not Path(args.out).exists()
    try:
        return _train_stage_of(args)
    except BaseException:
        if new_folder:  # a training that failed before its first save leaves no folder
            remove_if_empty(Path(args.out))
        raise


def _train_stage_of(args) -> int:
    from aa_trt.errors import InputError

    if args.stage != "distill":
        given = [flag for flag, name in DISTILL_ONLY if getattr(args, name) is not None]
        if given:
            raise InputError(f"{given[0]} belongs to --stage distill, not --stage {args.stage}")
    stage0_only = [flag for flag, value in (("--decoder-only", args.decoder_only),
                                            ("--ssim-weight", args.ssim_weight), ("--crop", args.crop),
                                            ("--denoised", args.denoised),
                                            ("--denoised-batch", args.denoised_batch))
                   if value is not None]
    if stage0_only and args.stage != 0:
        raise InputError(f"{stage0_only[0]} belongs to stage 0 (the VAE), not --stage {args.stage}")
    if args.stage == "distill":
        return _train_distill(args)
    if args.stage == 0:
        from aa_trt.training.autoencoder import Stage0Options, train_stage0

        fields = Stage0Options.__dataclass_fields__
        opts = Stage0Options(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})
        check_train_output(args)
        print(f"wrote {train_stage0(opts, progress=not args.quiet)}")
        return 0
    from aa_trt.training.loop import TrainOptions, train

    opts = TrainOptions(**{k: getattr(args, k) for k in TrainOptions.__dataclass_fields__
                           if getattr(args, k, None) is not None})
    check_train_output(args)  # after the options' own checks, before any work
    path = train(opts, progress=not args.quiet)
    if path is not None:
        print(f"wrote {path}")
    return 0


