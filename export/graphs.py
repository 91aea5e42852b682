"""One declaration per exported graph: dynamic axes, engine profiles and sample inputs, on the tensor
names the runtimes read (aa_trt.backends.declarations) (NVIDIA's demo/Diffusion pattern, without
its 2,000-line files).

A shape is a tuple of ints (fixed) and axis names (dynamic). Every axis name has a (min, opt, max)
range in `GraphSpec.dims`; an `Axis` whose size is a function of other axes (the UNet's rows =
windows x frames, a K/V bank's tokens at its level) evaluates that function at each profile point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

# GRAPHS and declared_names are re-exported: the build and its callers name graphs from here.
from aa_trt.backends.declarations import GRAPH_REVISION, GRAPHS, declared_names, kv_name  # noqa: F401
from aa_trt.checkpoint import Models
from aa_trt.export import wrappers
from aa_trt.models.layers import TransformerBlock
from aa_trt.models.unet import UNet


@dataclass(frozen=True)
class BuildShapes:
    """What a build is for. Spatial sizes are fixed per build (one profile point: the fastest
    engines); window length and batch dimensions stay dynamic up to these maxima."""

    height: int = 512      # output pixels, multiple of 8
    width: int = 512
    frames: int = 24       # the longest context window (Moore's 24); shorter windows also run
    windows: int = 1       # context windows per UNet call (Animator's window_batch)
    decode_chunk: int = 8  # frames per VAE decoder call (Animator.decode's chunk)
    pose_chunk: int = 16   # frames per PoseGuider call (Animator.encode_poses' chunk)

    def __post_init__(self):
        if self.height % 8 or self.width % 8 or min(self.height, self.width) < 8:
            raise ValueError(f"size {self.width}x{self.height}: height and width must be multiples of 8")
        if min(self.frames, self.windows, self.decode_chunk, self.pose_chunk) < 1:
            raise ValueError("frames, windows and chunks must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Axis:
    """A dynamic axis whose size derives from other axes: `size(dims) -> int`."""

    name: str
    size: Callable[[dict[str, int]], int]


Dim = int | str | Axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    # Random sample values: ("normal", mean, std) or ("uniform", low, high). Never zeros: a zero
    # input hides wrong weights and wrong wiring alike.
    dist: tuple[str, float, float] = ("normal", 0.0, 1.0)

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            out.append(d if isinstance(d, int) else dims[d] if isinstance(d, str) else d.size(dims))
        return tuple(out)


@dataclass
class GraphSpec:
    name: str
    module: nn.Module                  # traceable wrapper: forward(*inputs in order) -> outputs
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, tuple[int, int, int]]  # named axis -> (min, opt, max)
    # ORT fp32 vs torch fp32: max |diff| <= tolerance * max(1, max |torch|). The measured errors are
    # ~1e-6 (tiny) to ~1e-5 (sd15); the margin absorbs thread-order noise of other CPUs.
    tolerance: float = 1e-4
    notes: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: every named axis of every input and output."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = {i: (d if isinstance(d, str) else d.name)
                    for i, d in enumerate(t.shape) if not isinstance(d, int)}
            if axes:
                out[t.name] = axes
        return out

    def point(self, which: str) -> dict[str, int]:
        """The named axes at one profile point: "min", "opt" or "max"."""
        i = ("min", "opt", "max").index(which)
        return {k: v[i] for k, v in self.dims.items()}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes: a TensorRT optimisation profile."""
        pts = [self.point(w) for w in ("min", "opt", "max")]
        return {t.name: tuple(t.resolve(p) for p in pts) for t in self.inputs}

    def sample_inputs(self, dims: dict[str, int] | str = "max", seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random inputs at a profile point (default "max", the trace point: a traced size of
        1 could be specialised into the graph, and max never is)."""
        dims = self.point(dims) if isinstance(dims, str) else dims
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            kind, a, b = t.dist
            shape = t.resolve(dims)
            x = torch.randn(shape, generator=g) * b + a if kind == "normal" \
                else torch.rand(shape, generator=g) * (b - a) + a
            out[t.name] = x
        return out

    def describe(self) -> dict:
        """JSON-able summary for the manifest."""
        return {
            "inputs": {t.name: [d if isinstance(d, (int, str)) else d.name for d in t.shape]
                       for t in self.inputs},
            "outputs": {t.name: [d if isinstance(d, (int, str)) else d.name for d in t.shape]
                        for t in self.outputs},
            "dims": {k: list(v) for k, v in self.dims.items()},
            "profile": {k: [list(s) for s in v] for k, v in self.profile().items()},
            "tolerance": self.tolerance,
            "notes": self.notes,
            "revision": GRAPH_REVISION,
        }


# ------------------------------------------------------------------------------ K/V layout
def block_levels(unet: UNet) -> list[int]:
    """The resolution level (0 = full latent size) of each transformer block, in K/V slot order:
    down block i sits at level i, the mid block at the last level, up block i at (last - i)."""
    last = len(unet.cfg.block_out_channels) - 1
    by_block = {}
    for name, module in unet.named_modules():
        if not isinstance(module, TransformerBlock):
            continue
        part = name.split(".")
        level = int(part[1]) if part[0] == "down_blocks" else last if part[0] == "mid_block" \
            else last - int(part[1])
        by_block[module.index] = level
    return [by_block[i] for i in range(unet.num_transformer_blocks)]


def _tokens(level: int) -> Callable[[dict[str, int]], int]:
    # Downsample is a 3x3 stride-2 conv with padding 1: each level has ceil(size / 2) rows/cols.
    def size(d):
        s = 2**level
        return -(-d["h"] // s) * -(-d["w"] // s)
    return size


def kv_specs(unet: UNet) -> list[TensorSpec]:
    """k0, v0, k1, v1, ...: (1, m_i, c_i), m_i the reference tokens at block i's level."""
    out = []
    for block, level in zip(unet.transformer_blocks(), block_levels(unet)):
        c = block.attn1.to_k.out_features
        axis = Axis(f"tokens{block.index}", _tokens(level))
        out += [TensorSpec(kv_name("k", block.index), (1, axis, c)), TensorSpec(kv_name("v", block.index), (1, axis, c))]
    return out


# ------------------------------------------------------------------------------ declarations
def graph_specs(models: Models, shapes: BuildShapes) -> dict[str, GraphSpec]:
    """Every graph of a build, keyed by name (GRAPHS order)."""
    cfg = models.config
    f = cfg.latent_factor
    h, w = shapes.height // f, shapes.width // f
    spatial = {"h": (h, h, h), "w": (w, w, w)}
    px = {"H": (shapes.height,) * 3, "W": (shapes.width,) * 3}
    clip_size = cfg.clip.get("image_size", 224)
    embed = cfg.clip.get("projection_dim", 768)
    ctx_dim = cfg.unet.cross_attention_dim
    c0 = cfg.unet.block_out_channels[0]
    lat = cfg.unet.in_channels
    if shapes.frames > cfg.motion.max_len:
        raise ValueError(f"frames={shapes.frames} exceeds the motion modules' "
                         f"maximum window of {cfg.motion.max_len} frames")
    rows = Axis("rows", lambda d: d["windows"] * d["frames"])
    unet_dims = {**spatial, "windows": (1, 1, shapes.windows), "frames": (1, shapes.frames, shapes.frames)}
    unet_inputs = (
        TensorSpec("latents", (rows, lat, "h", "w")),
        TensorSpec("timestep", (1,), ("uniform", 0.0, cfg.scheduler.num_train_timesteps - 1)),
        TensorSpec("pose", (rows, c0, "h", "w")),
        TensorSpec("context", ("windows", 1, ctx_dim)),
    )
    pred = (TensorSpec("prediction", (rows, cfg.unet.out_channels, "h", "w")),)
    unet = models.denoising_unet
    specs = [
        GraphSpec("clip", wrappers.ClipExport(models.image_encoder),
                  (TensorSpec("pixel_values", (1, 3, clip_size, clip_size)),),
                  (TensorSpec("image_embeds", (1, embed)),), {}),
        GraphSpec("vae_encoder", wrappers.VaeEncoderExport(models.vae, cfg.latent_scale),
                  (TensorSpec("image", (1, 3, "H", "W"), ("uniform", -1.0, 1.0)),),
                  (TensorSpec("latent", (1, lat, "h", "w")),), {**px, **spatial}),
        GraphSpec("vae_decoder", wrappers.VaeDecoderExport(models.vae, cfg.latent_scale),
                  (TensorSpec("latents", ("batch", lat, "h", "w")),),
                  (TensorSpec("image", ("batch", 3, "H", "W")),),
                  {"batch": (1, shapes.decode_chunk, shapes.decode_chunk), **spatial, **px}),
        GraphSpec("pose_guider", wrappers.PoseGuiderExport(models.pose_guider),
                  (TensorSpec("frames", ("batch", 3, "H", "W"), ("uniform", 0.0, 1.0)),),
                  (TensorSpec("features", ("batch", c0, "h", "w")),),
                  {"batch": (1, shapes.pose_chunk, shapes.pose_chunk), **px, **spatial}),
        GraphSpec("reference_kv", wrappers.ReferenceKVExport(models.reference_unet, unet, cfg.bank_dtype),
                  (TensorSpec("ref_latent", (1, lat, "h", "w")), TensorSpec("context", (1, 1, ctx_dim))),
                  tuple(kv_specs(unet)), dict(spatial),
                  # The bank is rounded to fp16 before the projection (Moore): a 1e-7 difference
                  # upstream can flip one rounding, a 1e-3 relative step, before to_k/to_v.
                  tolerance=1e-3 if cfg.bank_dtype != "float32" else 1e-4,
                  notes=f"bank cast to {cfg.bank_dtype} before projection, as Moore"),
        GraphSpec("unet_cond", wrappers.UNetStepExport(unet, with_reference=True),
                  unet_inputs + tuple(kv_specs(unet)), pred, dict(unet_dims)),
        GraphSpec("unet_uncond", wrappers.UNetStepExport(unet, with_reference=False),
                  unet_inputs, pred, dict(unet_dims)),
    ]
    n_kv = len(kv_specs(unet)) // 2
    for s in specs:
        s.module.eval()
        want_in, want_out = declared_names(s.name, n_kv)
        assert (tuple(s.input_names), tuple(s.output_names)) == (want_in, want_out), s.name
    return {s.name: s for s in specs}
