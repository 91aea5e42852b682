"""`aa-trt` command line. Each subcommand maps its flags onto a library call; errors a user can
act on (AATrtError) print as one line and exit 2 (bad input) or 3 (a file the system could not
read or write: disk full, read-only, permission denied, vanished or changed), an interrupt exits
130."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path


def _convert(args) -> int:
    from aa_trt.convert import convert_moore

    t = time.perf_counter()
    out = convert_moore(args.moore, args.base, args.output, dtype=args.dtype,
                        inference_config=args.inference_config, name=args.name, overwrite=args.overwrite)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) in {time.perf_counter() - t:.1f} s")
    return 0


def _build(args) -> int:
    from aa_trt.checkpoint import read_config
    from aa_trt.errors import InputError, OptionError
    from aa_trt.export.build import build
    from aa_trt.export.graphs import GRAPHS, BuildShapes

    check_build_output(args)
    width, height = read_config(args.ckpt).default_size
    new_folder = not Path(args.output).exists()
    try:
        shapes = BuildShapes(height=args.height or height, width=args.width or width,
                             frames=args.frames, windows=args.window_batch)
        graphs = tuple(args.graphs.split(",")) if args.graphs else GRAPHS
        m = build(args.ckpt, args.output, shapes, opset=args.opset, fp16=args.fp16, graphs=graphs,
                  tensorrt=args.tensorrt, backend=args.backend, precision=args.precision)
    except OptionError as e:
        raise InputError(e.as_flag()) from None
    except ValueError as e:  # shapes, graph names, frames beyond the motion modules' table
        raise InputError(str(e)) from None
    except BaseException:
        if new_folder:  # a folder this build made: nothing of it stays when it holds no graph yet
            _remove_if_empty(Path(args.output))
        raise
    extra = ""
    if m.get("openvino"):
        extra = f", OpenVINO {m['openvino']['precision']} ({m['openvino']['reason']})"
    elif m.get("engines"):
        extra = f", TensorRT engines ({m['precision']['engines']})"
    print(f"wrote {args.output}/manifest.json ({len(m['graphs'])} graphs{extra}) in {m['build_s']:.1f} s")
    return 0


def check_build_output(args) -> None:
    """A build folder is the build's own (its graphs are reused): a new or empty folder, or one
    with a manifest, is written into; any other folder with files in it only with --overwrite."""
    from aa_trt.errors import InputError
    from aa_trt.files import finished_result, guard_outputs

    out = Path(args.output)
    guard_outputs([(out, False)], [("checkpoint", args.ckpt)])
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; `build` writes a folder of graphs")
    foreign = finished_result(out) and not (out / "manifest.json").is_file()
    if foreign and not args.overwrite:
        raise InputError(f"{out}: exists and is not a build folder (no manifest.json); pass --overwrite "
                         f"to build into it anyway")


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder a failed command made, if it holds nothing but empty files."""
    import contextlib

    with contextlib.suppress(OSError):
        if folder.is_dir() and all(p.is_file() and p.stat().st_size == 0 for p in folder.iterdir()):
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()


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


def _add_overwrite_flag(p, what: str = "the output"):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it exists (never an input; by default a finished result "
                   "is kept and the command refused)")


def _add_clip_flags(p):
    p.add_argument("--frames", type=int, default=None, metavar="N", help="use at most N frames")
    p.add_argument("--stride", type=int, default=1, metavar="K",
                   help="take every K-th frame (the output fps is the source's divided by K)")
    p.add_argument("--start", type=int, default=0, metavar="S", help="skip the first S frames")


def _add_report_flags(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the closing summary as one JSON line")


def _report(args, result) -> int:
    from aa_trt.run import as_json, summary_line

    print(as_json(result) if args.json else summary_line(result))
    return 0


def _run(args) -> int:
    from aa_trt.dist import launched_world_size
    from aa_trt.options import SampleOptions
    from aa_trt.run import RunOptions, run

    names = set(RunOptions.fields()) | set(SampleOptions.fields())
    opts = RunOptions.create(**{k: v for k, v in vars(args).items() if k in names})
    if launched_world_size() > 1:  # under torchrun: one video, its windows shared among the ranks
        from aa_trt.distributed import run_parallel
        return run_parallel(opts, lambda result: _report(args, result))
    return _report(args, run(opts))


def _batch(args) -> int:
    import os

    from aa_trt.batch import run_batch, summary_line
    from aa_trt.errors import AATrtError
    from aa_trt.run import as_json

    defaults = {"ckpt": args.ckpt, "device": args.device, "dtype": args.dtype, "resume": args.resume}
    lead = int(os.environ.get("RANK", "0")) == 0
    try:
        s = run_batch(args.jobs, defaults, args.status, print_fn=(lambda *a: None) if args.quiet else print,
                      overwrite=args.overwrite)
    except AATrtError as e:
        from aa_trt.dist import CommunicationError
        if lead or isinstance(e, CommunicationError):
            raise
        return e.exit_code  # every rank failed the same way; rank 0 says it
    if lead:
        print(as_json(s) if args.json else summary_line(s))
        for f in s["failures"]:
            print(f"aa-trt: job {f['job']} (line {f['line']}) failed: {f['error']}", file=sys.stderr)
    if any(f.get("storage") for f in s["failures"]):
        return 3  # a file could not be written or read: the same exit code as `run`'s
    return 1 if s["failed"] else 0


def _pose(args) -> int:
    from aa_trt.run import pose_preview

    return _report(args, pose_preview(args.driving, args.output, args.ref, args.dwpose, args.frames,
                                      args.stride, args.start, args.quiet, overwrite=args.overwrite))


def _ui(args) -> int:
    from aa_trt.ui import serve

    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    serve(ckpt=args.ckpt, engine=args.engine, host=args.host, port=args.port, device=device)
    return 0


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


def _data_denoised(args) -> int:
    from aa_trt.training.denoised import sample_pairs

    t = time.perf_counter()
    out = sample_pairs(args.ckpt, args.meta, args.out, frames=args.frames, videos=args.videos, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - t:.1f} s")
    return 0


def _eval(args) -> int:
    from aa_trt.files import write_json
    from aa_trt.options import SampleOptions
    from aa_trt.training.evaluate import EvalOptions, evaluate, table

    opts = EvalOptions(ckpt=str(args.ckpt), data=str(args.data), splits=tuple(args.splits.split(",")),
                       videos=args.videos, frames=args.frames,
                       sample=SampleOptions(steps=args.steps, guidance=args.guidance, seed=args.seed,
                                            sampler=args.sampler, guidance_interval=args.guidance_interval,
                                            timestep_power=args.timestep_power),
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


def _train(args) -> int:
    new_folder = not Path(args.out).exists()
    try:
        return _train_stage_of(args)
    except BaseException:
        if new_folder:  # a training that failed before its first save leaves no folder
            _remove_if_empty(Path(args.out))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-trt", description="Fast Animate Anyone: pose-guided "
                                "character animation with Moore-AnimateAnyone's weights.")
    from aa_trt import __version__
    p.add_argument("--version", action="version", version=f"aa-trt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("convert", help="Moore's released weight files -> one aa-trt checkpoint",
                       description="Merge Moore-AnimateAnyone's denoising_unet.pth, reference_unet.pth, "
                       "motion_module.pth and pose_guider.pth with the base models' VAE and CLIP "
                       "into one .safetensors checkpoint. .pth files are read with weights_only=True.")
    c.add_argument("--moore", required=True, metavar="DIR",
                   help="folder holding Moore's four .pth files")
    c.add_argument("--base", required=True, metavar="DIR",
                   help="folder with unet/config.json, vae/ and image_encoder/ (diffusers/transformers "
                   "layout: e.g. the SD1.5 unet config, sd-vae-ft-mse, sd-image-variations' image_encoder)")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="checkpoint to write (.safetensors)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="store the weights in this precision (default: as Moore stores them, fp32)")
    c.add_argument("--inference-config", metavar="YAML", default=None,
                   help="Moore's inference yaml (motion-module heads, scheduler); default: inference_v2")
    c.add_argument("--name", default="moore-v2", help="model name recorded in the checkpoint")
    _add_overwrite_flag(c, "the checkpoint")
    c.set_defaults(func=_convert)

    b = sub.add_parser("build", help="checkpoint -> checked ONNX graphs (+ TensorRT engines or OpenVINO graphs)",
                       description="Export every submodel to ONNX, check each graph (onnx.checker, "
                       "full) and measure it against PyTorch with onnxruntime on random inputs, and "
                       "record it all in DIR/manifest.json. Graphs whose manifest entry still matches "
                       "(checkpoint hash, shapes, opset, aa-trt version) are reused. Per --backend, "
                       "TensorRT engines (CUDA) or OpenVINO compiled graphs (CPU, bf16 where the CPU "
                       "lists BF16) are built and checked against PyTorch too.")
    b.add_argument("--ckpt", required=True, metavar="FILE", help="aa-trt checkpoint (.safetensors)")
    b.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for graphs and manifest")
    b.add_argument("--height", type=int, default=None,
                   help="output height in pixels (default: the checkpoint's default size)")
    b.add_argument("--width", type=int, default=None,
                   help="output width in pixels (default: the checkpoint's default size)")
    b.add_argument("--frames", type=int, default=24,
                   help="longest context window in frames (default 24; shorter windows also run)")
    b.add_argument("--window-batch", type=int, default=1, metavar="N",
                   help="context windows per UNet call the graphs accept (default 1)")
    b.add_argument("--fp16", action="store_true",
                   help="fp16 TensorRT engines (the ONNX graphs stay fp32)")
    b.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    b.add_argument("--graphs", default=None, metavar="LIST",
                   help="comma-separated subset of: clip, vae_encoder, vae_decoder, pose_guider, "
                   "reference_kv, unet_cond, unet_uncond (default: all)")
    b.add_argument("--backend", choices=("auto", "openvino", "onnxruntime", "tensorrt"), default=None,
                   help="what to compile the graphs for: auto (default: TensorRT on CUDA where importable, "
                   "OpenVINO on CPU where installed, else the ONNX graphs for onnxruntime alone)")
    b.add_argument("--precision", choices=("auto", "bf16", "f32"), default=None,
                   help="OpenVINO precision (default auto: bf16 where the CPU lists BF16, else f32)")
    b.add_argument("--tensorrt", choices=("auto", "on", "off"), default=None,
                   help="older spelling: on = --backend tensorrt, off = --backend onnxruntime, "
                   "auto = TensorRT where available, else onnxruntime")
    b.add_argument("--overwrite", action="store_true",
                   help="build into a folder that has other files and no manifest.json (a build folder is "
                   "always updated: its matching graphs are reused)")
    b.set_defaults(func=_build)

    r = sub.add_parser("run", help="reference picture + dance video -> mp4 of the character dancing",
                       description="Extract the dance video's poses, align them to the character, "
                       "render the animation (DDIM, classifier-free guidance, overlapping context "
                       "windows) and write a video (H.264 mp4/mov/mkv or VP9 webm, by the output's "
                       "extension) with the source's fps and audio, or numbered PNG frames.")
    r.add_argument("ref", type=Path, help="reference image of the character (png/jpg/webp...)")
    r.add_argument("driving", type=Path, help="dance video (mp4/mov/webm/mkv/gif) or a folder of frames")
    r.add_argument("-o", "--output", type=Path, required=True,
                   help="video to write: .mp4, .mov, .mkv (H.264) or .webm (VP9); with --png a new or "
                   "empty folder for numbered PNG frames")
    r.add_argument("--png", action="store_true", help="write numbered PNG frames (00000.png...) into -o DIR")
    r.add_argument("--crf", type=int, default=None, metavar="N",
                   help="video quality, lower is better and larger (default 18; 0..51 H.264, 0..63 VP9)")
    r.add_argument("--grid", action="store_true",
                   help="write reference | pose | result side by side (as Moore-AnimateAnyone does)")
    r.add_argument("--resume", action="store_true",
                   help="keep the latents after each denoising step beside the output (one latent tensor "
                   "on disk: 2.4 MB for 24 frames at 512x768) and, when a killed run of the same inputs "
                   "and options left them, continue from its last step: the same video as an "
                   "uninterrupted run. Removed when the output is written")
    r.add_argument("--ckpt", type=Path, default=None, help="aa-trt checkpoint (default: the embedded model)")
    r.add_argument("--engine", type=Path, default=None, metavar="DIR",
                   help="run on the graphs of `aa-trt build`: TensorRT on CUDA, OpenVINO on the CPU where "
                   "the build compiled for it, else onnxruntime (the summary says which and why); the "
                   "DIR must have been built from --ckpt at the output size")
    r.add_argument("--pose-video", action="store_true",
                   help="the driving video already is a pose rendering (e.g. Moore's *_kps.mp4): use as is")
    r.add_argument("--dwpose", type=Path, default=None, metavar="DIR",
                   help="folder with DWPose's yolox_l.onnx and dw-ll_ucoco_384.onnx (default: the "
                   "built-in offline extractor)")
    r.add_argument("--no-align", dest="align", action="store_false",
                   help="do not rescale the driving skeleton to the reference's proportions")
    _add_clip_flags(r)
    r.add_argument("--seed", type=int, default=None, help="noise seed: the same seed gives the same video")
    r.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the checkpoint's; 20, as the paper, unless it is a distilled student)")
    r.add_argument("--sampler", default="ddim", metavar="ddim|dpmpp_2m",
                   help="sampling method: ddim (default; Moore's), dpmpp_2m (DPM-Solver++(2M): a little "
                   "closer to the many-step render at few steps without CFG, not with it; docs/samplers.md)")
    r.add_argument("--timestep-power", type=float, default=None, metavar="P",
                   help="space the steps as round(1000 (1 - i/steps)^P) - 1: P > 1 takes smaller steps "
                   "at low noise; 2 makes 10 steps closer to the converged render than 20 default ones "
                   "(default: the checkpoint's spacing, Moore's; docs/samplers.md)")
    r.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's; 3.5 for Moore's)")
    r.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="apply CFG only at UNet timesteps LO..HI (0..999); other steps run the cond "
                   "branch alone, one UNet evaluation instead of two (default: CFG at every step)")
    r.add_argument("--context-frames", type=int, default=24, help="frames per context window (default 24, at most 32)")
    r.add_argument("--context-overlap", type=int, default=4, help="frames shared by neighbouring windows (default 4)")
    r.add_argument("--context-schedule", default="uniform", metavar="uniform|sliding",
                   help="uniform: Moore's closed-loop windows (wrap the end onto the start, for looping "
                   "dances); sliding: windows that never wrap (default uniform)")
    r.add_argument("--width", type=int, default=None, help="output width, a multiple of 8 (default: "
                   "the reference's aspect ratio with the model's short side, 512 for sd15)")
    r.add_argument("--height", type=int, default=None, help="output height, a multiple of 8")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    r.add_argument("--dtype", default="auto", metavar="auto|fp32|fp16|bf16",
                   help="compute precision (default auto: fp16 on CUDA, bf16 on a CPU with AMX or "
                   "AVX512-BF16, else fp32; fp32 is the Moore-exact path). The summary says which and why")
    r.add_argument("--window-batch", type=int, default=1, metavar="N",
                   help="context windows per UNet call (default 1; more can be faster on a GPU)")
    r.add_argument("--offload", action="store_true",
                   help="move the ReferenceNet, CLIP and the VAE encoder to the CPU once the reference "
                   "is encoded: less GPU memory while denoising (nothing moves on --device cpu)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the denoising UNet (the first steps of each window shape compile)")
    r.add_argument("--cuda-graph", action="store_true",
                   help="replay the denoising UNet from CUDA graphs, one per input shape (CUDA only)")
    r.add_argument("--parallel", default="auto", metavar="auto|window|guidance|both",
                   help="under torchrun: share each step's context windows among the ranks (window), "
                   "put the uncond and cond branches on two groups of ranks (guidance; both: the same, "
                   "windows sharded inside each group), or pick the plan with the least work on the "
                   "busiest rank (auto, default). Ignored in a single process")
    _add_overwrite_flag(r, "the video (or, with --png, the folder's frames)")
    _add_report_flags(r)
    r.set_defaults(func=_run)

    bt = sub.add_parser("batch", help="many videos: one JSON line per job, shared among torchrun ranks, resumable",
                        description="Run the jobs of JOBS (one JSON object per line: ref, driving, output and "
                        "any `run` option by name, e.g. {\"ref\": \"a.png\", \"driving\": \"d.mp4\", "
                        "\"output\": \"a.mp4\", \"steps\": 20, \"pose_video\": true}; relative paths from the "
                        "jobs file's folder). Under torchrun job i runs on rank i % world. Jobs whose output "
                        "exists are skipped, so a stopped batch resumes where it was; each job's state is "
                        "kept in JOBS.status/. A failing job is recorded and the batch goes on; the exit "
                        "code is 1 if any job failed.")
    bt.add_argument("jobs", type=Path, help="jobs file (.jsonl)")
    bt.add_argument("--ckpt", type=Path, default=None, help="checkpoint for jobs that name none")
    bt.add_argument("--device", default=None, help="device for jobs that name none (cuda: each rank its GPU)")
    bt.add_argument("--dtype", default=None, metavar="auto|fp32|fp16|bf16",
                    help="precision for jobs that name none (default auto, as `run`)")
    bt.add_argument("--resume", action="store_true", default=None,
                    help="every job keeps its latents after each step and continues them after a kill "
                    "(as `run --resume`; a job may also say \"resume\": true)")
    bt.add_argument("--status", type=Path, default=None, metavar="DIR",
                    help="folder for the per-job status files (default: JOBS.status beside the jobs file)")
    bt.add_argument("--overwrite", action="store_true", default=None,
                    help="render again the jobs whose output exists but that this batch's status does not "
                    "record as its own finished job (without it they are skipped; finished jobs always are)")
    _add_report_flags(bt)
    bt.set_defaults(func=_batch)

    q = sub.add_parser("pose", help="render a video's extracted skeletons beside its frames, to check them",
                       description="Extract the poses of a dance video and write them side by side "
                       "with the source frames; with --ref, the skeletons are aligned to that character.")
    q.add_argument("driving", type=Path, help="dance video or folder of frames")
    q.add_argument("-o", "--output", type=Path, required=True, help="mp4 to write")
    q.add_argument("--ref", type=Path, default=None, help="reference image: show the aligned skeletons")
    q.add_argument("--dwpose", type=Path, default=None, metavar="DIR", help="DWPose ONNX folder")
    _add_clip_flags(q)
    _add_overwrite_flag(q, "the video")
    _add_report_flags(q)
    q.set_defaults(func=_pose)

    u = sub.add_parser("ui", help="the animation in a web page (gradio: pip install \"aa-trt[ui]\")",
                       description="Serve a web page for `run`: a reference image and a dance video "
                       "(or the bundled example), the settings, a pose preview, a progress bar, and the "
                       "result to play and download beside a reference | pose | result grid. One run at "
                       "a time on the device (a queue); the model is loaded once. Open the printed "
                       "address in a browser; Ctrl-C stops it.")
    u.add_argument("--ckpt", type=Path, default=None, help="aa-trt checkpoint (default: the embedded model)")
    u.add_argument("--engine", type=Path, default=None, metavar="DIR",
                   help="run on the graphs of `aa-trt build` (as `run --engine`)")
    u.add_argument("--device", default="auto", help="torch device (default auto: cuda if available, else cpu)")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only). --host 0.0.0.0 exposes "
                   "the page, with no login, to everyone on the network: only as your explicit choice")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.set_defaults(func=_ui)

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

    e = sub.add_parser("eval", help="SSIM/PSNR/L1 on held-out synthetic videos, beside two baselines",
                       description="Run the model on the test splits of a data folder (reference = frame 0, "
                       "the next F frames driven by their exact poses) and score it against ground truth "
                       "with SSIM, PSNR and L1, beside copying the reference and warping it by the skeleton.")
    e.add_argument("--ckpt", required=True, type=Path, help="aa-trt checkpoint")
    e.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder made by `aa-trt data synth`")
    e.add_argument("--splits", default="test_characters,test_motions", help="comma-separated split names")
    e.add_argument("--videos", type=int, default=None, metavar="N", help="first N videos per split (default all)")
    e.add_argument("--frames", type=int, default=24, metavar="F", help="target frames per video (default 24)")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's; 20 for most)")
    e.add_argument("--sampler", default="ddim", metavar="ddim|dpmpp_2m", help="sampling method (default ddim)")
    e.add_argument("--timestep-power", type=float, default=None, metavar="P",
                   help="space the steps as round(1000 (1 - i/steps)^P) - 1 (default: the checkpoint's spacing)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's; 3.5 for Moore's)")
    e.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="apply CFG only at UNet timesteps LO..HI (default: every step)")
    e.add_argument("--agreement-steps", type=int, default=None, metavar="N",
                   help="also render each video with DDIM-N (same seed, same guidance, CFG at every step) "
                   "and score the model's frames against it: agreement with the converged render")
    e.add_argument("--agreement-ckpt", type=Path, default=None, metavar="FILE",
                   help="with --agreement-steps: render that reference with this checkpoint at its declared "
                   "guidance (a distilled student's teacher) instead of --ckpt")
    e.add_argument("--agreement-guidance", type=float, default=None, metavar="G",
                   help="with --agreement-ckpt: its CFG scale (default: that checkpoint's declared one)")
    e.add_argument("--seed", type=int, default=0, help="noise seed of the first video (+1 per video)")
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


# The commands that import torch (the others, `pose` and `data synth/prepare`, start without it).
USES_TORCH = frozenset({_convert, _build, _run, _batch, _eval, _train, _ui, _data_denoised})


def entry() -> int:
    """The `aa-trt` process (the console script and `python -m aa_trt`): `main`, with the objects
    that live as long as the process kept out of the garbage collector's way.

    `import torch` leaves ~10^5 objects that live until exit. Every full collection walks them
    all: during the run, and once more at interpreter exit. Frozen (gc.freeze: moved to a
    generation the collector never visits), they are still freed as usual, but not walked: the
    README command's 5-step preset measured 3.93 -> 3.63 s whole-process on 2 AMD EPYC cores
    (docs/performance.md, "Start-up and exit"). Only the process's own entry does this: a program calling `main` many
    times keeps its collector as it was."""
    import gc

    args = build_parser().parse_args()
    if args.func in USES_TORCH:
        import torch  # noqa: F401  (the command's first import: done here, so that it is frozen)
        gc.freeze()
    rc = dispatch(args)
    gc.freeze()  # what is left is freed at exit without one last walk over it
    return rc


if __name__ == "__main__":
    sys.exit(entry())
