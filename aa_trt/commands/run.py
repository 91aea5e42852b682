"""`aa-trt run`: reference picture + dance video -> the character dancing (aa_trt.run.run, or
under torchrun aa_trt.distributed.run_parallel)."""
from __future__ import annotations

from pathlib import Path

from aa_trt.commands.common import add_clip_flags, add_overwrite_flag, add_report_flags, imports_torch, report
from aa_trt.commands.sample_flags import add_sample_flags, sample_options


def add_parser(sub) -> None:
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
    add_clip_flags(r)
    add_sample_flags(r)
    r.add_argument("--width", type=int, default=None, help="output width, a multiple of 8 (default: "
                   "the reference's aspect ratio with the model's short side, 512 for sd15)")
    r.add_argument("--height", type=int, default=None, help="output height, a multiple of 8")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    r.add_argument("--dtype", default="auto", metavar="auto|fp32|fp16|bf16",
                   help="compute precision (default auto: fp16 on CUDA, bf16 on a CPU with AMX or "
                   "AVX512-BF16, else fp32; fp32 is the Moore-exact path). The summary says which and why")
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
    add_overwrite_flag(r, "the video (or, with --png, the folder's frames)")
    add_report_flags(r)
    r.set_defaults(func=handle)


def run_options(args):
    """The RunOptions of parsed `run` flags: the sampling flags through `sample_options`, the
    others by RunOptions field name."""
    from aa_trt.run import RunOptions

    kw = {k: getattr(args, k) for k in RunOptions.fields() if k != "sample" and hasattr(args, k)}
    return RunOptions.create(sample=sample_options(args), **kw)


@imports_torch
def handle(args) -> int:
    from aa_trt.process_group import launched_world_size
    from aa_trt.run import run

    opts = run_options(args)
    if launched_world_size() > 1:  # under torchrun: one video, its windows shared among the ranks
        from aa_trt.distributed import run_parallel
        return run_parallel(opts, lambda result: report(args, result))
    return report(args, run(opts))
