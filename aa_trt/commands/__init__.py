"""The `aa-trt` subcommands, one module per job. Each module has `add_parser(sub)`, which declares
the command's flags on the subparsers of `aa_trt.cli.build_parser` and sets its handler; the
training companion's `data`, `train` and `eval` live beside the training code (aa_trt.training.cli).

- common.py: flags and helpers several commands share (--overwrite, the clip and report flags);
- sample_flags.py: the sampling flags, declared once and mapped by name onto SampleOptions;
- convert.py, build.py, run.py, batch.py, pose.py, ui.py: one command each.

Handlers import their library lazily, so `aa-trt --help` and `aa-trt pose` start without torch.
"""
