"""`aa-trt batch`: many videos, one JSON line per job (any `run` option by name), shared among
torchrun ranks, resumable (aa_trt.batch)."""
from __future__ import annotations

import sys
from pathlib import Path

from aa_trt.commands.common import add_report_flags, imports_torch


def add_parser(sub) -> None:
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
    bt.add_argument("--fast", action="store_true", default=None,
                    help="jobs that do not say \"fast\": false use the measured fastest setting (as `run --fast`)")
    bt.add_argument("--status", type=Path, default=None, metavar="DIR",
                    help="folder for the per-job status files (default: JOBS.status beside the jobs file)")
    bt.add_argument("--overwrite", action="store_true", default=None,
                    help="render again the jobs whose output exists but that this batch's status does not "
                    "record as its own finished job (without it they are skipped; finished jobs always are)")
    add_report_flags(bt)
    bt.set_defaults(func=handle)


@imports_torch
def handle(args) -> int:
    import os

    from aa_trt.batch import run_batch, summary_line
    from aa_trt.errors import AATrtError
    from aa_trt.run import as_json

    defaults = {"ckpt": args.ckpt, "device": args.device, "dtype": args.dtype, "resume": args.resume,
                "fast": args.fast}
    lead = int(os.environ.get("RANK", "0")) == 0
    try:
        s = run_batch(args.jobs, defaults, args.status, print_fn=(lambda *a: None) if args.quiet else print,
                      overwrite=args.overwrite)
    except AATrtError as e:
        from aa_trt.process_group import CommunicationError
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
