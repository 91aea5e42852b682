"""`aa-trt ui`: the animation in a web page (gradio, the optional extra `[ui]`).

The page is a front for `aa_trt.run`: Generate builds the same RunOptions as `aa-trt run` and calls
`run()` (no second pipeline), the pose preview calls `pose_preview()` as `aa-trt pose` does, and the
side-by-side grid is drawn by `run.grid_frames` from the run's own pose stage. The model is loaded
once per process (`make_animator` keeps it) and the device runs one job at a time: Generate and the
pose preview share one queue with a concurrency limit of 1, so two tabs cannot overrun its memory.
Errors a user can act on (AATrtError) show as one line in the page; anything else as one line too,
with the traceback only in the server's log.

Uploads reach the app as the uploaded files' paths, unopened (`path_components`): gradio's own
preprocessing would decode the picture first and answer a text file or a decompression bomb with a
generic error; here `run`'s readers open them and refuse them in their own one line, in the
Status line and to gradio's client alike. The API's parameters are named as the page's fields
(`reference_image`, `driving_video`, `steps`, ...).

`PageApp` holds what the page does without gradio (tested directly); `build()` lays out the page.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aa_trt.errors import AATrtError, InputError, OptionError
from aa_trt.options import CONTEXT_SCHEDULES, SampleOptions

log = logging.getLogger("aa_trt.ui")

# The bundled example (a source checkout's examples/, see examples/make_examples.py).
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_REF = EXAMPLES / "ref.png"
EXAMPLE_DANCE = EXAMPLES / "dance.mp4"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = CONTEXT_SCHEDULES
# The sampling fields' defaults (the page's fields start from them, as `run`'s flags do).
SAMPLE = SampleOptions.defaults()
KEEP_RUNS = 8  # result folders kept on disk per server (older ones are removed)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def gradio():
    """The gradio module, or an InputError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio as gr
    except ImportError:
        raise InputError('the web page needs gradio: pip install "aa-trt[ui]"') from None
    return gr


def examples_available() -> bool:
    return EXAMPLE_REF.is_file() and EXAMPLE_DANCE.is_file()


@dataclass(frozen=True)
class PageSettings:
    """What the page's fields hold, as gradio hands them over (numbers may be floats or None for an
    empty field). `options()` turns them into RunOptions keywords: an empty field is the run's
    default, so the library checks every value and names the bad one."""

    steps: float | None = SAMPLE["steps"]        # None (an empty field): the checkpoint's (a distilled student's fewer)
    guidance: float | None = SAMPLE["guidance"]  # None (an empty field): the checkpoint's
    sampler: str = SAMPLE["sampler"]
    timestep_power: float | None = SAMPLE["timestep_power"]  # None or 0: the checkpoint's spacing (Moore-exact)
    random_seed: bool = True
    seed: float | None = 0
    width: float | None = None      # None or 0: from the reference's aspect ratio
    height: float | None = None
    context_frames: float | None = SAMPLE["context_frames"]
    context_overlap: float | None = SAMPLE["context_overlap"]
    context_schedule: str = SAMPLE["context_schedule"]
    frames: float | None = None     # None or 0: all
    stride: float | None = 1
    start: float | None = 0
    align: bool = True
    dtype: str = "auto"
    fast: bool = False  # the measured fastest setting: steps, sampler and spacing fields are then ignored

    def options(self) -> dict:
        def whole(name, v, empty=None, zero_is_empty=False):
            if v is None or (zero_is_empty and v == 0):
                return empty
            if isinstance(v, float):
                if not v.is_integer():
                    raise OptionError(name, v, "must be a whole number")
                return int(v)
            return v

        kw = {"steps": whole("steps", self.steps), "sampler": self.sampler,
              "context_frames": whole("context_frames", self.context_frames, SAMPLE["context_frames"]),
              "context_overlap": whole("context_overlap", self.context_overlap, SAMPLE["context_overlap"]),
              "context_schedule": self.context_schedule,
              "width": whole("width", self.width, zero_is_empty=True),
              "height": whole("height", self.height, zero_is_empty=True),
              "frames": whole("frames", self.frames, zero_is_empty=True),
              "stride": whole("stride", self.stride, 1), "start": whole("start", self.start, 0),
              "align": bool(self.align), "dtype": self.dtype}
        if self.guidance is not None:
            kw["guidance"] = float(self.guidance)
        if self.timestep_power:
            kw["timestep_power"] = float(self.timestep_power)
        kw["seed"] = None if self.random_seed else whole("seed", self.seed, 0)
        if self.fast:  # the preset chooses these (a field given to it explicitly would win)
            for name in ("steps", "sampler", "timestep_power"):
                kw.pop(name, None)
            kw["fast"] = True
        return kw


def stage_table(seconds: dict) -> str:
    """The stage times as a Markdown table."""
    rows = "".join(f"| {name} | {s:.1f} s |\n" for name, s in seconds.items())
    total = sum(seconds.values())
    return f"| stage | time |\n|---|---|\n{rows}| **total** | **{total:.1f} s** |\n"


class PageApp:
    """What the page does, without gradio: one instance per server process."""

    def __init__(self, ckpt=None, engine=None, device: str = "cpu", workdir=None):
        from aa_trt.checkpoint import read_config
        from aa_trt.run import checkpoint_path

        self.ckpt = checkpoint_path(ckpt)
        self.config = read_config(self.ckpt)  # a bad --ckpt fails at start, not at the first click
        self.engine = Path(engine) if engine is not None else None
        if self.engine is not None and not self.engine.is_dir():
            raise InputError(f"{self.engine}: no such engine folder (make one with `aa-trt build`)")
        self.device = device
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="aa-trt-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._model = None
        self._model_key = None
        self.model_loads = 0
        self._lock = threading.Lock()
        self._count = 0

    # -- the model, once per process ---------------------------------------------------------
    def make_animator(self, ckpt, device, dtype):
        """run()'s `make_animator`: the loaded model, reused while (ckpt, device, dtype) stay."""
        from aa_trt.pipeline import Animator

        key = (str(Path(ckpt).resolve()), str(device), str(dtype))
        with self._lock:
            if self._model_key != key:
                self._model, self._model_key = None, None  # one model in memory at a time
                self._model = Animator.from_pretrained(ckpt, device=device, dtype=dtype)
                self._model_key = key
                self.model_loads += 1
            return self._model

    # -- one folder per job ------------------------------------------------------------------
    def _job_dir(self) -> Path:
        with self._lock:
            self._count += 1
            n = self._count
        d = self.workdir / f"job-{n:05d}"
        d.mkdir()
        old = sorted(p for p in self.workdir.glob("job-*") if p.is_dir())[:-KEEP_RUNS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return d

    @staticmethod
    def _inputs(ref, driving, need_ref: bool = True) -> tuple[Path | None, Path]:
        if need_ref and not ref:
            raise InputError("give a reference image (or click \"Use the bundled example\")")
        if not driving:
            raise InputError("give a driving video (or click \"Use the bundled example\")")
        return (Path(ref) if ref else None), Path(driving)

    def run_options(self, ref, driving, pose_video: bool, settings: PageSettings, output: Path):
        from aa_trt.run import RunOptions

        ref, driving = self._inputs(ref, driving)
        return RunOptions.create(ref=ref, driving=driving, output=output, pose_video=bool(pose_video),
                                 ckpt=self.ckpt, engine=self.engine, device=self.device, quiet=True,
                                 **settings.options())

    # -- the two buttons ---------------------------------------------------------------------
    def generate(self, ref, driving, pose_video: bool, settings: PageSettings, on_progress=None) -> dict:
        """run() on the page's inputs: {"video", "grid", "summary" (run's), "seconds", "loaded"}.
        Raises AATrtError for anything the user can fix.

        run() writes the reference | pose | result grid (`grid=True`, H.264 at crf 0); the page's
        two videos are made from it at the usual quality with the source's audio. The result is
        the grid's right third: the frames `aa-trt run` renders for the same options (the grid's
        panel and a grid=False render are identical before encoding), encoded from the lossless
        intermediate, so its only extra loss is a second pass through yuv420p's chroma."""
        from aa_trt.run import run

        job = self._job_dir()
        opts = self.run_options(ref, driving, pose_video, settings, job / "grid-lossless.mp4")
        opts = dataclasses.replace(opts, grid=True, crf=0)
        loads = self.model_loads
        summary = run(opts, make_animator=self.make_animator, on_progress=on_progress)
        t = time.perf_counter()
        video, grid = job / "result.mp4", job / "grid.mp4"
        w = summary["width"]
        split_grid(opts.output, video, grid, w)
        opts.output.unlink()
        seconds = {**summary["seconds"], "page videos": round(time.perf_counter() - t, 2)}
        return {"video": str(video), "grid": str(grid), "summary": summary, "seconds": seconds,
                "loaded": self.model_loads > loads}

    def preview(self, ref, driving, pose_video: bool, settings: PageSettings) -> dict:
        """The source beside its (aligned) skeletons, as `aa-trt pose` draws them."""
        from aa_trt.run import pose_preview

        ref, driving = self._inputs(ref, driving, need_ref=False)
        kw = settings.options()
        if pose_video:  # already a pose rendering: the model is driven by it as it is
            return {"video": str(driving), "note": "the driving video is a pose video: used as it is"}
        out = self._job_dir() / "pose.mp4"
        r = pose_preview(driving, out, ref if (ref is not None and kw["align"]) else None,
                         frames=kw["frames"], stride=kw["stride"], start=kw["start"], quiet=True)
        how = "aligned to the reference" if (ref is not None and kw["align"]) else "not aligned"
        found = r.get("frames_with_person", r["frames"])
        return {"video": str(out), "note": f"pose preview: {r['frames']} frames, a person in {found}, "
                f"skeletons {how} ({r['pose_source']})"}

    # -- messages ----------------------------------------------------------------------------
    @staticmethod
    def message(e: BaseException, *paths) -> str:
        """One line for the page: the error's own text, upload folders cut to the file's name."""
        if isinstance(e, AATrtError):
            text = str(e)
        else:
            log.exception("aa-trt ui: unexpected error")
            text = f"unexpected error ({type(e).__name__}: {e}); the server's log has the details"
        for p in paths:
            if p:
                text = text.replace(str(p), Path(p).name)
        return "Error: " + " ".join(text.split())


def _frames(path, columns: slice = slice(None)):
    """The frames of a video, one at a time, cut to `columns`."""
    import av

    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.video[0]):
            yield frame.to_ndarray(format="rgb24")[:, columns]


def split_grid(grid_in: Path, result: Path, grid: Path, width: int) -> None:
    """From run's grid (reference | pose | result, each `width` wide): the result panel alone and
    the whole grid, H.264 at video.DEFAULT_CRF, with the grid's audio (the source's)."""
    import av

    from aa_trt.video import write_video

    with av.open(str(grid_in)) as c:
        vs = c.streams.video[0]
        fps = float(vs.average_rate or vs.guessed_rate)
        if vs.width != 3 * width:
            raise AATrtError(f"{grid_in}: a grid {vs.width} wide, not 3 x {width}")
    write_video(result, _frames(grid_in, slice(2 * width, 3 * width)), fps, audio_from=grid_in)
    write_video(grid, _frames(grid_in), fps, audio_from=grid_in)


def summary_text(out: dict) -> str:
    s = out["summary"]
    seed = s["seed"]
    audio = "with the source's audio" if s["audio"] else "no audio in the source"
    model = "model loaded" if out["loaded"] else "model reused from the last run"
    return (f"Done: {s['frames']} frames {s['width']}x{s['height']} at {s['fps']:g} fps, {audio}; "
            f"seed {seed}; {'--fast: ' if s.get('fast') else ''}{s['steps']} {s['sampler']} steps"
            f"{', whole UNet every %d' % s['reuse_every'] if s.get('reuse_every', 1) > 1 else ''}, "
            f"guidance {s['guidance']:g}; "
            f"{'UNet %.3g TFLOP; ' % s['unet_tflop']['total'] if s.get('unet_tflop') else ''}"
            f"{s['precision']} ({s['precision_reason']}); {model}")


def path_components(gr):
    """gr.Image and gr.Video whose uploads reach the app as the uploaded file's path, unopened (the
    page looks and behaves as theirs: `is_template` keeps the base component's front end)."""
    from gradio import component_meta

    def preprocess(self, payload):
        return None if payload is None else payload.path

    # gradio writes a .pyi stub beside the module of every component class it sees defined; these
    # two need none (and the package folder may not be writable).
    stub_writer = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *a, **k: None
    try:
        return tuple(type(name, (base,), {"is_template": True, "preprocess": preprocess,
                                          "__module__": __name__, "__qualname__": name})
                     for name, base in (("PathImage", gr.Image), ("PathVideo", gr.Video)))
    finally:
        component_meta.create_or_modify_pyi = stub_writer


# The page's settings fields in the order of PageSettings (and of the API's named parameters).
SETTINGS = tuple(f.name for f in dataclasses.fields(PageSettings))


def build(app: PageApp):
    """The gradio Blocks of the page."""
    gr = gradio()
    from aa_trt.sampling import SAMPLERS

    PathImage, PathVideo = path_components(gr)

    with gr.Blocks(title="aa-trt: Animate Anyone", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# aa-trt: Animate Anyone\nA picture of a character and a dance video in, the "
                    "character dancing out. Check the skeleton with **Pose preview**, then **Generate**.")
        with gr.Row():
            with gr.Column(scale=1):
                ref = PathImage(label="Reference image (the character)", type="filepath",
                                image_mode=None, sources=["upload", "clipboard"], elem_id="aa-ref", height=260)
                driving = PathVideo(label="Driving video (the dance)", sources=["upload"],
                                    elem_id="aa-driving", height=260)
                with gr.Row():
                    pose_video = gr.Checkbox(label="the driving video already is a pose video (skeletons)",
                                             value=False, elem_id="aa-pose-video")
                    align = gr.Checkbox(label="align the skeleton to the character", value=True,
                                        elem_id="aa-align")
                example = gr.Button("Use the bundled example", elem_id="aa-example",
                                    visible=examples_available())
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        steps = gr.Number(label=f"steps (the model's: {app.config.steps})", value=app.config.steps,
                                          precision=0, minimum=1, elem_id="aa-steps")
                        guidance = gr.Number(label=f"guidance (the model's: {app.config.guidance:g})",
                                             value=app.config.guidance, minimum=0, elem_id="aa-guidance")
                        sampler = gr.Dropdown(list(SAMPLERS), value=SAMPLE["sampler"], label="sampler",
                                              elem_id="aa-sampler")
                        timestep_power = gr.Number(label="timestep power (0: the model's spacing; 2-3: fewer steps)",
                                                   value=0, minimum=0, elem_id="aa-timestep-power")
                        fast = gr.Checkbox(label="fast (the measured fastest setting; ignores steps, sampler, "
                                           "timestep power)", value=False, elem_id="aa-fast")
                    with gr.Row():
                        random_seed = gr.Checkbox(label="random seed", value=True, elem_id="aa-random")
                        seed = gr.Number(label="seed (when not random)", value=0, precision=0, elem_id="aa-seed")
                        dtype = gr.Dropdown(list(PRECISIONS), value="auto", label="precision",
                                            elem_id="aa-dtype")
                    with gr.Row():
                        width = gr.Number(label="width (0: from the reference's shape)", value=0,
                                          precision=0, elem_id="aa-width")
                        height = gr.Number(label="height (0: from the reference's shape)", value=0,
                                           precision=0, elem_id="aa-height")
                    with gr.Row():
                        context_frames = gr.Number(label="context frames", value=SAMPLE["context_frames"], precision=0,
                                                   elem_id="aa-context-frames")
                        context_overlap = gr.Number(label="context overlap", value=SAMPLE["context_overlap"],
                                                    precision=0, elem_id="aa-context-overlap")
                        context_schedule = gr.Dropdown(list(SCHEDULES), value=SAMPLE["context_schedule"],
                                                       label="context schedule", elem_id="aa-schedule")
                    with gr.Row():
                        frames = gr.Number(label="frames (0: all)", value=0, precision=0,
                                           elem_id="aa-frames")
                        stride = gr.Number(label="stride", value=1, precision=0, elem_id="aa-stride")
                        start = gr.Number(label="start", value=0, precision=0, elem_id="aa-start")
                with gr.Row():
                    preview_btn = gr.Button("Pose preview", elem_id="aa-preview")
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="aa-generate")
            with gr.Column(scale=1):
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="aa-status")
                result = gr.Video(label="Result", interactive=False, elem_id="aa-result", height=300)
                download = gr.File(label="Download", interactive=False, elem_id="aa-download")
                grid = gr.Video(label="Reference | pose | result", interactive=False,
                                elem_id="aa-grid", height=220)
                times = gr.Markdown(elem_id="aa-times")
                pose_out = gr.Video(label="Pose preview (source | skeleton)", interactive=False,
                                    elem_id="aa-pose", height=220)

        settings_inputs = [steps, guidance, sampler, timestep_power, random_seed, seed, width, height, context_frames,
                           context_overlap, context_schedule, frames, stride, start, align, dtype, fast]

        # Named parameters (not *values): gradio's API names each input after them.
        def on_generate(reference_image, driving_video, driving_is_pose_video, steps, guidance, sampler,
                        timestep_power, random_seed, seed, width, height, context_frames, context_overlap,
                        context_schedule, frames, stride, start, align, dtype, fast, progress=gr.Progress()):
            values = dict(locals())
            settings = PageSettings(**{k: values[k] for k in SETTINGS})
            progress(0.0, desc="reading, extracting the pose, loading the model")

            def on_progress(done, total):
                progress((done, total), desc="denoising", unit="UNet steps")

            try:
                out = app.generate(reference_image, driving_video, driving_is_pose_video, settings, on_progress)
            except Exception as e:  # noqa: BLE001 -- the page shows one line and keeps serving
                return app.message(e, reference_image, driving_video), None, None, None, ""
            return (summary_text(out), out["video"], out["video"], out["grid"],
                    "**Stage times**\n\n" + stage_table(out["seconds"]))

        def on_preview(reference_image, driving_video, driving_is_pose_video, steps, guidance, sampler,
                       timestep_power, random_seed, seed, width, height, context_frames, context_overlap,
                       context_schedule, frames, stride, start, align, dtype, fast):
            values = dict(locals())
            settings = PageSettings(**{k: values[k] for k in SETTINGS})
            try:
                out = app.preview(reference_image, driving_video, driving_is_pose_video, settings)
            except Exception as e:  # noqa: BLE001
                return app.message(e, reference_image, driving_video), None
            return out["note"], out["video"]

        def on_example():
            return str(EXAMPLE_REF), str(EXAMPLE_DANCE), False

        example.click(on_example, outputs=[ref, driving, pose_video], queue=False)
        # One queue for the device: a generate and a preview never run at the same time.
        generate_btn.click(on_generate, inputs=[ref, driving, pose_video, *settings_inputs],
                           outputs=[status, result, download, grid, times],
                           concurrency_limit=1, concurrency_id="device", api_name="generate")
        preview_btn.click(on_preview, inputs=[ref, driving, pose_video, *settings_inputs],
                          outputs=[status, pose_out], concurrency_limit=1, concurrency_id="device",
                          api_name="pose_preview")
    return demo


def theme():
    """The default look with the system's fonts: no font downloads (the page works offline)."""
    gr = gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def serve(ckpt=None, engine=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          device: str = "cpu", workdir=None) -> None:
    """Start the page and serve until interrupted (Ctrl-C / SIGTERM)."""
    gradio()  # the install hint before any model work
    app = PageApp(ckpt, engine, device, workdir)
    demo = build(app)
    demo.queue(default_concurrency_limit=1)
    allowed = [str(app.workdir)] + ([str(EXAMPLES)] if examples_available() else [])
    print(f"aa-trt ui: model {app.ckpt} on {device}; results in {app.workdir}", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, allowed_paths=allowed, show_error=False,
                    theme=theme(), footer_links=[], inbrowser=False, share=False)
    except OSError as e:  # the port is taken, the host is not ours...
        raise InputError(f"cannot serve on {host}:{port} ({e})") from None
    finally:
        if workdir is None:  # the results were copied into gradio's cache for the page
            shutil.rmtree(app.workdir, ignore_errors=True)
