"""`aa-trt` command line. Each subcommand maps its flags onto a library call; errors a user can
act on (AATrtError) print as one line and exit 2, an interrupt exits 130."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _convert(args) -> int:
    from .convert import convert_moore

    t = time.perf_counter()
    out = convert_moore(args.moore, args.base, args.output, dtype=args.dtype,
                        inference_config=args.inference_config, name=args.name)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) in {time.perf_counter() - t:.1f} s")
    return 0


def _build(args) -> int:
    from .checkpoint import read_config
    from .errors import InputError
    from .export.build import build
    from .export.graphs import GRAPHS, BuildShapes

    width, height = read_config(args.ckpt).default_size
    try:
        shapes = BuildShapes(height=args.height or height, width=args.width or width,
                             frames=args.frames, windows=args.window_batch)
        graphs = tuple(args.graphs.split(",")) if args.graphs else GRAPHS
        m = build(args.ckpt, args.output, shapes, opset=args.opset, fp16=args.fp16, graphs=graphs,
                  tensorrt=args.tensorrt)
    except ValueError as e:  # shapes, graph names, frames beyond the motion modules' table
        raise InputError(str(e)) from None
    print(f"wrote {args.output}/manifest.json ({len(m['graphs'])} graphs) in {m['build_s']:.1f} s")
    return 0


def _add_clip_flags(p):
    p.add_argument("--frames", type=int, default=None, metavar="N", help="use at most N frames")
    p.add_argument("--stride", type=int, default=1, metavar="K",
                   help="take every K-th frame (the output fps is the source's divided by K)")
    p.add_argument("--start", type=int, default=0, metavar="S", help="skip the first S frames")


def _add_report_flags(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the closing summary as one JSON line")


def _report(args, result) -> int:
    from .run import as_json, summary_line

    print(as_json(result) if args.json else summary_line(result))
    return 0


def _run(args) -> int:
    from .run import RunOptions, run

    opts = RunOptions(**{k: getattr(args, k) for k in RunOptions.__dataclass_fields__
                         if hasattr(args, k) and k not in ("ref", "driving", "output")},
                      ref=args.ref, driving=args.driving, output=args.output)
    return _report(args, run(opts))


def _pose(args) -> int:
    from .run import pose_preview

    return _report(args, pose_preview(args.driving, args.output, args.ref, args.dwpose, args.frames,
                                      args.stride, args.start, args.quiet))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-trt", description="Fast Animate Anyone: pose-guided "
                                "character animation with Moore-AnimateAnyone's weights.")
    from . import __version__
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
    c.set_defaults(func=_convert)

    b = sub.add_parser("build", help="checkpoint -> checked ONNX graphs (+ TensorRT engines)",
                       description="Export every submodel to ONNX, check each graph (onnx.checker, "
                       "full) and measure it against PyTorch with onnxruntime on random inputs, and "
                       "record it all in DIR/manifest.json. Graphs whose manifest entry still matches "
                       "(checkpoint hash, shapes, opset, aa-trt version) are reused. TensorRT engines "
                       "are built too where TensorRT and a CUDA device are present.")
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
    b.add_argument("--tensorrt", choices=("auto", "on", "off"), default="auto",
                   help="build TensorRT engines: where available (auto), or fail without (on)")
    b.set_defaults(func=_build)

    r = sub.add_parser("run", help="reference picture + dance video -> mp4 of the character dancing",
                       description="Extract the dance video's poses, align them to the character, "
                       "render the animation (DDIM, classifier-free guidance, overlapping context "
                       "windows) and write an H.264 mp4 with the source's fps and audio.")
    r.add_argument("ref", type=Path, help="reference image of the character (png/jpg/webp...)")
    r.add_argument("driving", type=Path, help="dance video (mp4/mov/webm/mkv/gif) or a folder of frames")
    r.add_argument("-o", "--output", type=Path, required=True, help="mp4 to write")
    r.add_argument("--ckpt", type=Path, default=None, help="aa-trt checkpoint (default: the embedded model)")
    r.add_argument("--engine", type=Path, default=None, metavar="DIR",
                   help="run on the graphs of `aa-trt build` (TensorRT where available, else onnxruntime); "
                   "the DIR must have been built from --ckpt at the output size")
    r.add_argument("--pose-video", action="store_true",
                   help="the driving video already is a pose rendering (e.g. Moore's *_kps.mp4): use as is")
    r.add_argument("--dwpose", type=Path, default=None, metavar="DIR",
                   help="folder with DWPose's yolox_l.onnx and dw-ll_ucoco_384.onnx (default: the "
                   "built-in offline extractor)")
    r.add_argument("--no-align", dest="align", action="store_false",
                   help="do not rescale the driving skeleton to the reference's proportions")
    _add_clip_flags(r)
    r.add_argument("--seed", type=int, default=None, help="noise seed: the same seed gives the same video")
    r.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, as the paper)")
    r.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale (default 3.5)")
    r.add_argument("--context-frames", type=int, default=24, help="frames per context window (default 24, at most 32)")
    r.add_argument("--context-overlap", type=int, default=4, help="frames shared by neighbouring windows (default 4)")
    r.add_argument("--context-schedule", choices=("uniform", "sliding"), default="uniform",
                   help="uniform: Moore's closed-loop windows (wrap the end onto the start, for looping "
                   "dances); sliding: windows that never wrap (default uniform)")
    r.add_argument("--width", type=int, default=None, help="output width, a multiple of 8 (default: "
                   "the reference's aspect ratio with the model's short side, 512 for sd15)")
    r.add_argument("--height", type=int, default=None, help="output height, a multiple of 8")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="compute precision")
    _add_report_flags(r)
    r.set_defaults(func=_run)

    q = sub.add_parser("pose", help="render a video's extracted skeletons beside its frames, to check them",
                       description="Extract the poses of a dance video and write them side by side "
                       "with the source frames; with --ref, the skeletons are aligned to that character.")
    q.add_argument("driving", type=Path, help="dance video or folder of frames")
    q.add_argument("-o", "--output", type=Path, required=True, help="mp4 to write")
    q.add_argument("--ref", type=Path, default=None, help="reference image: show the aligned skeletons")
    q.add_argument("--dwpose", type=Path, default=None, metavar="DIR", help="DWPose ONNX folder")
    _add_clip_flags(q)
    _add_report_flags(q)
    q.set_defaults(func=_pose)
    return p


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    from .errors import AATrtError

    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the same cleanup (no partial outputs) runs for both.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except AATrtError as e:
        print(f"aa-trt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("aa-trt: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
