"""int8 for the OpenVINO build (`aa-trt build --backend openvino --precision int8`): the denoising
UNet's two graphs quantized by NNCF post-training quantization, calibrated on the checkpoint's own
render of a reference and a driving video at the build's size.

What is quantized (QUANTIZED): unet_cond and unet_uncond, the graphs that run steps x windows x 2
times a video. The others run once a video (CLIP, VAE encoder, PoseGuider, reference K/V) or once
a chunk of frames (VAE decoder) and stay at the build's other precision (`ovb.inference_hint`: bf16
where the CPU lists BF16, else f32): see docs/performance.md for what the VAE decoder measured. The
nodes a quantized graph leaves unquantized run in that precision too, unless the graph misses its
check so and is compiled again with them in f32 (export.openvino.compile_graphs).

Calibration (`record`): the torch path (fp32) renders `steps` DDIM steps of the first `frames`
frames of the calibration video (the build's window: one window, the graphs' "opt" point) at the
build's size, fixed seed, the checkpoint's guidance; every UNet call's inputs are recorded as the
exported graph receives them (the same split into cond and uncond graphs as the engine's runtime,
backends.graph_animator.UNetGraphs). One call per branch and step: `steps` samples per graph, each
a whole window (frames x h x w tokens per layer), at `steps` timesteps spread evenly over the
schedule (the trailing DDIM schedule of 8 steps runs t = 999 ... 124), so the ranges cover the
whole denoising trajectory, from pure noise to nearly clean latents. NNCF's activation ranges are
its default for per-tensor quantizers, the mean over the samples of each sample's min and max
(the global min and max measured no better: `quantize`). Defaults: the bundled example
(examples/ref.png + examples/dance.mp4), 8 steps, seed 0.

nncf is imported only here (`pip install nncf`, or the openvino extra).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aa_trt.errors import AATrtError, OptionError

QUANTIZED = ("unet_cond", "unet_uncond")
INSTALL_HINT = 'pip install nncf (or pip install "aa-trt[openvino]")'
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # a source checkout's bundled example
DEFAULT_STEPS = 8
DEFAULT_SEED = 0


def import_nncf():
    try:
        import nncf
    except ImportError:
        raise AATrtError(f"--precision int8 needs nncf, which is not installed: {INSTALL_HINT}") from None
    nncf.set_log_level(logging.ERROR)  # its per-node INFO lines would drown the build's log
    return nncf


def nncf_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class CalibrationSource:
    """What the int8 graphs are calibrated on: a reference image and a driving video (its poses
    extracted and aligned to the reference, as `aa-trt run` does; `pose_video`: it already is a
    pose rendering), rendered for `steps` DDIM steps with `seed`."""

    ref: Path | None = None
    video: Path | None = None
    steps: int = DEFAULT_STEPS
    seed: int = DEFAULT_SEED
    pose_video: bool = False

    def resolved(self) -> "CalibrationSource":
        """The same, the bundled example standing in for missing files; checked (OptionError)."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError("calibration_steps", self.steps, "must be a whole number >= 1")
        ref = Path(self.ref) if self.ref is not None else EXAMPLES / "ref.png"
        video = Path(self.video) if self.video is not None else EXAMPLES / "dance.mp4"
        for name, given, path in (("calibration_ref", self.ref, ref), ("calibration_video", self.video, video)):
            if not path.is_file():
                why = "no such file" if given is not None else \
                    "the bundled example is not here (a source checkout has examples/); give the file"
                raise OptionError(name, str(path), why)
        return CalibrationSource(ref, video, self.steps, self.seed, self.pose_video)

    def key(self) -> dict:
        """What must be equal for int8 graphs calibrated earlier to be reused (files by content)."""
        from aa_trt.files import file_sha256

        return {"ref_sha256": file_sha256(self.ref), "video_sha256": file_sha256(self.video),
                "steps": self.steps, "seed": self.seed, "pose_video": self.pose_video,
                "nncf": nncf_version(), "scheme": SCHEME}


@dataclass
class Calibration:
    """Recorded inputs per graph (dicts of float32 arrays by input name) and what they came from."""

    samples: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


class _Recorder:
    """A stand-in graph for UNetGraphs: records the feeds it is given, runs the exported module in
    torch (the very computation the graph was traced from)."""

    def __init__(self, spec, store: list):
        self.spec, self.store = spec, store
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, device="cpu", **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        sample = {}
        for name in self.spec.input_names:
            x = feeds[name].detach().float().contiguous()
            prev = self.last.get(name)
            # The pose features and the K/V cache are the same every step: held once.
            if prev is not None and prev.shape == x.shape and torch.equal(prev, x):
                x = prev
            self.last[name] = x
            sample[name] = x
        self.store.append({n: x.numpy() for n, x in sample.items()})
        with torch.no_grad():
            out = self.spec.module(*(sample[n] for n in self.spec.input_names))
        return {self.spec.output_names[0]: out}


def record(models, shapes, specs: dict, source: CalibrationSource,
           log: Callable[[str], None] = print) -> Calibration:
    """Render the calibration inputs with the torch path on `models` (fp32: the build's own, which
    `specs` wrap; not a second copy, which at sd15 is 3.5-7 GB more) and record every UNet call's
    inputs, per graph (module docstring)."""
    import time

    from aa_trt.backends.graph_animator import UNetGraphs
    from aa_trt.models.layers import TransformerBlock
    from aa_trt.pipeline import Animator
    from aa_trt.pose.stage import driving_poses, video_cache_key
    from aa_trt.video import open_clip, read_image

    t0 = time.perf_counter()
    samples: dict[str, list] = {"unet_cond": [], "unet_uncond": []}
    n_kv = sum(isinstance(m, TransformerBlock) for m in models.denoising_unet.modules())
    unet = UNetGraphs(_Recorder(specs["unet_cond"], samples["unet_cond"]),
                      _Recorder(specs["unet_uncond"], samples["unet_uncond"]), n_kv, 1, shapes.frames)

    class Recording(Animator):
        def unet_call(self):
            return unet

    ref_image = read_image(source.ref)
    clip = open_clip(source.video, 0, 1, shapes.frames)
    key = None if source.pose_video else video_cache_key(source.video, 0, 1, shapes.frames)
    poses, facts = driving_poses(clip, shapes.width, shapes.height, source=source.video,
                                 pose_video=source.pose_video, ref_image=ref_image, ref_source=source.ref,
                                 cache_key=key, progress=False)
    anim = Recording(models, "cpu", torch.float32)
    anim(ref_image, poses, steps=source.steps, seed=source.seed, context_frames=shapes.frames, context_overlap=0,
         window_batch=1, width=shapes.width, height=shapes.height, output="latent", progress=False)
    sample = anim.sample_options(steps=source.steps)
    if not samples["unet_uncond"]:
        # A checkpoint whose guidance skips the uncond branch (scale 1: no CFG) never calls it; its
        # graph is still built, and gets what that branch would be given: the same latents,
        # timesteps and poses with a zero context (Moore's uncond branch).
        samples["unet_uncond"] = [{n: (np.zeros_like(x) if n == "context" else x) for n, x in s.items()
                                   if n in specs["unet_uncond"].input_names} for s in samples["unet_cond"]]
    facts = {"ref": str(source.ref), "video": str(source.video), "frames": len(poses),
             "width": shapes.width, "height": shapes.height, "steps": source.steps, "seed": source.seed,
             "guidance": sample.guidance, "pose_source": facts.get("pose_source"),
             "samples": {g: len(s) for g, s in samples.items()}, "nncf": nncf_version(),
             "record_s": round(time.perf_counter() - t0, 2)}
    log(f"int8 calibration: {facts['frames']} frames of {source.video.name} on {source.ref.name}, "
        f"{source.steps} DDIM steps (seed {source.seed}): {facts['samples']['unet_cond']} samples per "
        f"UNet graph, recorded in {facts['record_s']:.1f} s")
    return Calibration(samples, facts)


# Inputs whose own nodes stay unquantized (with the nodes computed from them alone): one row per
# window, where int8 gains nothing.
UNQUANTIZED_INPUTS = ("timestep", "context")
# The motion modules' nodes (a regular expression over the exported graph's module paths).
MOTION_MODULES = r".*/motion_modules\.\d+/.*"


def unquantized_nodes(levels: int) -> tuple[str, ...]:
    """Node names (regular expressions over the exported graph's module paths) left unquantized in
    a UNet of `levels` resolution levels: the motion modules (temporal attention); the encoder's
    outermost level (down_blocks.0), the decoder's last two up blocks (the last upsampler writes
    the outermost level), conv_in and conv_out; the spatial transformers' proj_in / proj_out and
    feed-forward output GEMM (its input, GEGLU's product, is heavy-tailed) everywhere. Where the
    error per int8 FLOP was largest (quantize's docstring)."""
    up = "|".join(str(i) for i in sorted({max(levels - 2, 0), levels - 1}))
    return (MOTION_MODULES,
            r".*/down_blocks\.0/.*", rf".*/up_blocks\.({up})/.*", r".*/conv_(in|out)/.*",
            r".*/attentions\.\d+/proj_(in|out)/.*", r".*/attentions\.\d+/transformer_blocks\.\d+/ff/(MatMul|Add)")


def unet_levels(model) -> int:
    """The resolution levels of the UNet exported in the OpenVINO model `model` (its up blocks)."""
    import re

    found = [re.search(r"/up_blocks\.(\d+)/", n.get_friendly_name()) for n in model.get_ops()]
    indices = [int(m.group(1)) for m in found if m]
    if not indices:
        raise AATrtError("int8: the UNet graph has no up_blocks nodes (not an exported aa-trt UNet?)")
    return 1 + max(indices)


# What the quantization is (ignored nodes, NNCF settings): part of the calibration key, so that a
# build quantized under another scheme is quantized again, not reused.
SCHEME = "transformer-sq/motion-outer-io-unquantized/3"


def quantize(model, samples: list[dict[str, np.ndarray]]):
    """The OpenVINO model `model` quantized by NNCF's post-training quantization on `samples`
    (all of them), as OpenVINO's own diffusion notebooks quantize a UNet: model_type
    TRANSFORMER (SmoothQuant on the MatMuls, no quantizers on the attention's softmax path),
    default preset (asymmetric activations, symmetric per-channel int8 weights).

    Left unquantized: the nodes computed from the timestep or the CLIP context alone
    (UNQUANTIZED_INPUTS; ovb.timestep_nodes): the time MLP and the cross-attention's
    to_out(to_v(context)), vectors of one row per window (no time to gain). Quantized, they
    carried the calibration's context range into every check: the uncond branch's context is
    zero, so a quantizer calibrated on it clipped any other context to ~0 (tiny preset, random
    inputs: relative L2 to torch 51-53%; with these nodes unquantized: 18-37%, and 7-8% on the
    calibration inputs either way).

    Also left unquantized (bf16 where the CPU lists BF16): unquantized_nodes(levels). Measured at
    sd15 half widths (random weights, 16 frames, 32x32 latents, calibrated on the bundled
    example's 4-step render; held out: the 4 steps of a render of random reference and pose
    frames, seed 1; relative L2 to torch fp32 per graph, cond / uncond, mean over the 4 steps
    (benchmarks/int8_proxy.py `variant`); "frames": that render's frames, torch fp32 with the int8
    graphs as its UNet, PSNR against torch fp32; step: unet_cond call, bf16 / int8 time on the
    2-core EPYC with VNNI, no AMX, median of 3 alternating rounds):
      - everything quantized (the first scheme): 5.0% / 5.8%, frames 29.9 dB, step 1.23-1.42x;
      - the motion modules unquantized: 4.7% / 5.5%, frames 30.9 dB, step 1.19x;
      - and the outermost level (down_blocks.0, up_blocks.3), conv_in/out: 2.8% / 3.8%, 34.1 dB;
        and proj_in/out and the feed-forward output everywhere: 2.8% / 3.7%, 34.4 dB, 1.14x;
      - and up_blocks.2 (chosen): 2.0% / 3.0%, frames 36.5 dB, step 1.07x;
      - SmoothQuant alpha 0.5 or 0.25 instead of 0.95, SmoothQuant off, the global min/max as
        ranges, the attention's activation x activation MatMuls unquantized: within 0.5 dB / 0.3
        points of the motion-only scheme (none is the lever).
    Which layers: `int8_proxy sensitivity` rounds one group of layers at a time as int8 would
    (weights per channel, inputs per tensor to their calibration ranges), simulated in torch
    fp32: every layer int8 puts unet_cond 3.75% off (inputs alone 3.45%, weights alone 1.62%:
    the activations carry most of it), down_blocks.0 2.13% with 9.6% of the GEMM FLOPs,
    up_blocks.3 2.18% with 19.5%, up_blocks.2 1.55% with 23.5%, conv_in/out 1.19% with 0.1%,
    proj_in/out 1.44% with 3.9%, the feed-forward output 1.25% with 7.9%; the inner levels
    (down_blocks.1-3, mid, up_blocks.0-1) 0.03-0.93% with 47% of the FLOPs. Errors injected at
    the outermost resolution reach the output through the skip connections undamped."""
    from aa_trt.backends.openvino import timestep_nodes

    nncf = import_nncf()
    if not samples:
        raise AATrtError("int8 calibration recorded no samples")
    ignored = timestep_nodes(model, UNQUANTIZED_INPUTS)
    scope = nncf.IgnoredScope(names=sorted(ignored), patterns=list(unquantized_nodes(unet_levels(model))),
                              validate=False)
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(samples), ignored_scope=scope)


class Calibrator:
    """The calibration of one build, recorded on first use (`get`) only: a rebuild whose int8
    graphs are all reused (same graphs, same `key`) never renders."""

    def __init__(self, models, shapes, specs: dict, source: CalibrationSource,
                 log: Callable[[str], None] = print):
        self.models, self.shapes, self.specs, self.log = models, shapes, specs, log
        self.source = source.resolved()
        self.key = self.source.key()
        self._done: Calibration | None = None

    @property
    def recorded(self) -> Calibration | None:
        return self._done

    def get(self) -> Calibration:
        if self._done is None:
            import_nncf()  # before minutes of rendering, not after
            self._done = record(self.models, self.shapes, self.specs, self.source, self.log)
        return self._done
