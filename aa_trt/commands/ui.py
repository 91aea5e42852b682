"""`aa-trt ui`: the animation in a web page (aa_trt.ui; gradio, the `[ui]` extra)."""
from __future__ import annotations

from pathlib import Path

from aa_trt.commands.common import imports_torch


def add_parser(sub) -> None:
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
    u.set_defaults(func=handle)


@imports_torch
def handle(args) -> int:
    from aa_trt.ui import serve

    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    serve(ckpt=args.ckpt, engine=args.engine, host=args.host, port=args.port, device=device)
    return 0
