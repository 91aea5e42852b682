"""`aa-trt build`: checkpoint -> checked ONNX graphs (+ TensorRT engines or OpenVINO graphs)."""
from __future__ import annotations

from pathlib import Path

from aa_trt.commands.common import imports_torch, remove_if_empty


def add_parser(sub) -> None:
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
    b.add_argument("--precision", choices=("auto", "bf16", "f32", "int8"), default=None,
                   help="OpenVINO precision (default auto: bf16 where the CPU lists BF16, else f32; int8: "
                   "the denoising UNet quantized with NNCF, calibrated on a render, on CPUs with AMX-INT8 "
                   "or VNNI, the rest as auto)")
    b.add_argument("--calibration-ref", default=None, metavar="IMAGE",
                   help="with --precision int8: the reference image the calibration render uses "
                   "(default: the bundled examples/ref.png)")
    b.add_argument("--calibration-video", default=None, metavar="VIDEO",
                   help="with --precision int8: the driving video the calibration render uses, its poses "
                   "extracted as `run` does (default: the bundled examples/dance.mp4)")
    b.add_argument("--calibration-pose-video", action="store_true",
                   help="the calibration video already is a pose rendering (as run's --pose-video)")
    b.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                   help="with --precision int8: DDIM steps of the calibration render, one sample per step "
                   "and UNet graph (default 8)")
    b.add_argument("--tensorrt", choices=("auto", "on", "off"), default=None,
                   help="older spelling: on = --backend tensorrt, off = --backend onnxruntime, "
                   "auto = TensorRT where available, else onnxruntime")
    b.add_argument("--overwrite", action="store_true",
                   help="build into a folder that has other files and no manifest.json (a build folder is "
                   "always updated: its matching graphs are reused)")
    b.set_defaults(func=handle)


@imports_torch
def handle(args) -> int:
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
                  tensorrt=args.tensorrt, backend=args.backend, precision=args.precision,
                  calibration=calibration_source(args))
    except OptionError as e:
        raise InputError(e.as_flag(CALIBRATION_FLAGS)) from None
    except ValueError as e:  # shapes, graph names, frames beyond the motion modules' table
        raise InputError(str(e)) from None
    except BaseException:
        if new_folder:  # a folder this build made: nothing of it stays when it holds no graph yet
            remove_if_empty(Path(args.output))
        raise
    extra = ""
    if m.get("openvino"):
        extra = f", OpenVINO {m['openvino']['precision']} ({m['openvino']['reason']})"
        q = m["openvino"].get("int8")
        if q:
            extra += (f" on {q['isa']}: {', '.join(q['quantized'])} in int8 (calibrated on "
                      f"{q['calibration'].get('samples', {}).get('unet_cond', '?')} samples), the rest {q['rest']}")
            fallback = [f"{g}: its unquantized nodes in {e['rest']}" for g, e in m["openvino"]["graphs"].items()
                        if e.get("rest")]
            if fallback:
                extra += f" ({'; '.join(fallback)})"
    elif m.get("engines"):
        extra = f", TensorRT engines ({m['precision']['engines']})"
    print(f"wrote {args.output}/manifest.json ({len(m['graphs'])} graphs{extra}) in {m['build_s']:.1f} s")
    return 0


# The CLI's names of build()'s calibration parameters (OptionError.as_flag).
CALIBRATION_FLAGS = {"calibration": "--calibration-ref/--calibration-video/--calibration-steps",
                     "calibration_steps": "--calibration-steps", "calibration_ref": "--calibration-ref",
                     "calibration_video": "--calibration-video"}


def calibration_source(args):
    """The int8 calibration the flags ask for; None when no calibration flag is given."""
    given = (args.calibration_ref, args.calibration_video, args.calibration_steps, args.calibration_pose_video)
    if given == (None, None, None, False):
        return None
    from aa_trt.export.int8 import DEFAULT_STEPS, CalibrationSource

    steps = DEFAULT_STEPS if args.calibration_steps is None else args.calibration_steps
    return CalibrationSource(args.calibration_ref, args.calibration_video, steps,
                             pose_video=args.calibration_pose_video)


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
