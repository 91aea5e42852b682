"""`aa-trt pose`: a video's extracted skeletons beside its frames, to check them (no torch)."""
from __future__ import annotations

from pathlib import Path

from aa_trt.commands.common import add_clip_flags, add_overwrite_flag, add_report_flags, report


def add_parser(sub) -> None:
    q = sub.add_parser("pose", help="render a video's extracted skeletons beside its frames, to check them",
                       description="Extract the poses of a dance video and write them side by side "
                       "with the source frames; with --ref, the skeletons are aligned to that character.")
    q.add_argument("driving", type=Path, help="dance video or folder of frames")
    q.add_argument("-o", "--output", type=Path, required=True, help="mp4 to write")
    q.add_argument("--ref", type=Path, default=None, help="reference image: show the aligned skeletons")
    q.add_argument("--dwpose", type=Path, default=None, metavar="DIR", help="DWPose ONNX folder")
    add_clip_flags(q)
    add_overwrite_flag(q, "the video")
    add_report_flags(q)
    q.set_defaults(func=handle)


def handle(args) -> int:
    from aa_trt.run import pose_preview

    return report(args, pose_preview(args.driving, args.output, args.ref, args.dwpose, args.frames,
                                     args.stride, args.start, args.quiet, overwrite=args.overwrite))
