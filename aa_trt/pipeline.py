"""Animator: reference image + rendered poses -> video frames, Moore-exact.

Data flows one way: images -> conditioning (CLIP embedding, reference latent, reference K/V cache,
pose features; once per video) -> denoise (sampling.py) -> decode. Each stage's tensors carry their
shapes in the comments at its boundary.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aa_trt.checkpoint import Models, load_checkpoint
from aa_trt.errors import InputError, OptionError
from aa_trt.feature_reuse import FeatureStore
from aa_trt.flop_count import UNetCost
from aa_trt.guidance import Reduce, context_windows, make_plan, windowed_guidance
from aa_trt.models.external import clip_pixels
from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import ReferenceKV, compute_reference_kv
from aa_trt.models.unet import UNet
from aa_trt.options import SampleOptions
from aa_trt.pose.stage import PoseFrames, RenderedFrames
from aa_trt.sampling import SAMPLERS, sampling_schedule


@dataclass
class Conditioning:
    """Everything computed once per video."""

    clip_embeds: torch.Tensor    # (1, D) CLIP image_embeds of the reference
    ref_latent: torch.Tensor     # (1, c, h, w) VAE mean x latent_scale
    reference_kv: ReferenceKV    # per transformer block (k, v) (1, L, C)
    pose_features: torch.Tensor  # (N, C0, h, w) PoseGuider output, frames first
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return self.pose_features.shape[0]


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    # The SD VAE overflows in fp16 (diffusers' force_upcast); it runs in fp32 then.
    return torch.float32 if dtype == torch.float16 else dtype


# Pixels per VAE decoder call when the caller gives no chunk: the decoder's full-resolution
# activations dominate a run's peak (an 8-frame chunk at 512x768 in fp32 allocates ~9 GB, one
# frame ~1.2 GB; counted in benchmarks/test_device_memory.py), so the chunk shrinks as frames grow:
# 8 frames up to 362x362, 2 at 512x768, 1 at 768x768.
DECODE_PIXELS = 1 << 20


def default_decode_chunk(height: int, width: int) -> int:
    return max(1, min(8, DECODE_PIXELS // max(1, height * width)))


def _resize(img: Image.Image, width: int, height: int) -> Image.Image:
    # diffusers' VaeImageProcessor (what Moore's pipeline uses) resizes with Lanczos.
    return img if img.size == (width, height) else img.resize((width, height), Image.LANCZOS)


class Animator:
    def __init__(self, models: Models, device="cpu", dtype: torch.dtype = torch.float32, *,
                 offload: bool = False, compile: bool = False, cuda_graph: bool = False):
        self.models = models
        self.config = models.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype_for(dtype)
        self.last_seed: int | None = None
        self._offloaded = False  # the conditioning models are on the CPU (see `offload`)
        self.plan = None  # the last denoise's guidance.Plan (who computed which windows)
        self.unet_cost: UNetCost | None = None  # the last denoise's counted UNet FLOPs (this rank's)
        self.set_options(offload=offload, compile=compile, cuda_graph=cuda_graph)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32, **options) -> "Animator":
        """options: `offload`, `compile`, `cuda_graph` (see `set_options`)."""
        models = load_checkpoint(Path(path), device=device, dtype=dtype,
                                 component_dtypes={"vae": vae_dtype_for(dtype)})
        return cls(models, device, dtype, **options)

    def set_options(self, *, offload: bool = False, compile: bool = False, cuda_graph: bool = False) -> None:
        """Memory and speed options of the torch path; all off is the plain eager path.

        offload: once a video's conditioning is computed, move the ReferenceNet, the CLIP image
          encoder and the VAE encoder to the CPU (denoising never runs them; the VAE decoder and
          the PoseGuider stay). They come back for the next video. On a CPU device: nothing moves.
        compile: torch.compile the denoising UNet's call in the denoise loop (each new shape
          compiles on first use); a failure raises OptionError(compile) saying to run without it.
        cuda_graph: replay the denoising UNet's call from CUDA graphs, one per input shape
          (aa_trt.cuda_graph); CUDA only. With `compile` too, the compiled call is captured.
        """
        if cuda_graph and self.device.type != "cuda":
            raise OptionError("cuda_graph", True, f"needs a CUDA device (CUDA graphs replay GPU work); "
                              f"this run is on {self.device}")
        options = (bool(offload), bool(compile), bool(cuda_graph))
        if options != getattr(self, "_options", None):
            self._options = options
            self.offload, self.compile, self.cuda_graph = options
            self._unet_call = None  # built on first use

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_clip(self, ref_image: Image.Image) -> torch.Tensor:
        """(1, D) image_embeds. Moore: PIL bicubic resize to 224x224, then CLIP's rescale/normalise."""
        x = clip_pixels([ref_image], self.config.clip.get("image_size", 224))
        return self.models.image_encoder(pixel_values=x.to(self.device, self.dtype)).image_embeds

    @torch.no_grad()
    def encode_reference(self, ref_image: Image.Image, width: int, height: int) -> torch.Tensor:
        """(1, c, H/f, W/f), f = config.latent_factor (8 for SD's VAE): the VAE posterior mean of the
        reference at the output size."""
        img = _resize(ref_image.convert("RGB"), width, height)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0)
        x = x.permute(2, 0, 1)[None].to(self.device, self.vae_dtype)
        mean = self.models.vae.encode(x).latent_dist.mean
        return (mean * self.config.latent_scale).to(self.dtype)

    @torch.no_grad()
    def encode_poses(self, poses, chunk: int = 16, to_host: bool = False, size: tuple[int, int] | None = None) -> torch.Tensor:
        """poses: uint8 (N, H, W, 3), or pose.stage.PoseFrames (made chunk by chunk, never held
        whole) -> PoseGuider features (N, C0, H/f, W/f), u8/255 as Moore; `size` (width, height)
        resizes frames of another size first. to_host: each chunk's features go to host memory
        as they are made (see `prepare`). The features are the run's dtype: half precision in a
        bf16/fp16 run, which is what a long video costs per frame besides its latents."""
        frames = poses if isinstance(poses, PoseFrames) else RenderedFrames(poses)
        feats, s = None, 0  # filled chunk by chunk: the features are held once, not twice
        for images in frames.chunks(chunk):
            if size is not None and images.shape[1:3] != (size[1], size[0]):
                images = np.stack([np.asarray(_resize(Image.fromarray(p), *size)) for p in images])
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype) / 255.0
            f = self.models.pose_guider(x)
            if feats is None:
                shape = (len(frames),) + tuple(f.shape[1:])
                feats = (torch.empty(shape, dtype=f.dtype, pin_memory=self.device.type == "cuda")
                         if to_host else f.new_empty(shape))
            feats[s:s + len(f)] = f
            s += len(f)
        if s != len(frames):
            raise InputError(f"{len(frames)} pose frames announced, {s} made")
        return feats

    def prepare(self, ref_image: Image.Image, poses, width: int | None = None,
                height: int | None = None) -> Conditioning:
        """poses: uint8 (N, H, W, 3) pose renderings or pose.stage.PoseFrames (their size is the
        output size unless width/height are given)."""
        if not isinstance(poses, PoseFrames):
            poses = _check_poses(poses)
        elif len(poses) == 0:
            raise InputError("no pose frames")
        pw, ph = (poses.width, poses.height) if isinstance(poses, PoseFrames) else (poses.shape[2], poses.shape[1])
        width = (width or pw) // 8 * 8
        height = (height or ph) // 8 * 8
        self.check_size(width, height)
        self._place_conditioners(self.device)  # back from an earlier video's offload
        clip = self.encode_clip(ref_image)
        ref_latent = self.encode_reference(ref_image, width, height)
        kv = self.reference_kv(ref_latent, clip)
        if self.offload:
            self._place_conditioners(torch.device("cpu"))
        # The pose features are the one conditioning tensor that grows with the video (3.75 MB a
        # frame at 512x768 in fp16): with `offload` they stay in host memory and each window's
        # frames move to the device when the window runs, so device memory is flat in length.
        host = self.offload and self.device.type != "cpu"
        feats = self.encode_poses(poses, to_host=host, size=(width, height))
        return Conditioning(clip, ref_latent, kv, feats, width, height)

    def conditioning_models(self) -> list[torch.nn.Module]:
        """What `offload` moves off the device: the ReferenceNet, the CLIP image encoder and the
        VAE's encoder half (encoder, quant_conv); not the decoder, the PoseGuider or the UNet."""
        m = self.models
        vae = m.vae
        mods = [m.reference_unet, m.image_encoder, getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)]
        return [mod for mod in mods if isinstance(mod, torch.nn.Module)]

    def _place_conditioners(self, device: torch.device) -> None:
        if self.device.type == "cpu" or self._offloaded == (device.type == "cpu"):
            return  # on a CPU run everything already is on the CPU
        for mod in self.conditioning_models():
            mod.to(device)
        self._offloaded = device.type == "cpu"

    def check_size(self, width: int, height: int) -> None:
        """Refuse an output size this backend cannot run (engines override it)."""
        if width < 8 or height < 8:
            raise InputError(f"output size {width}x{height} is too small (at least 8x8)")

    def reference_kv(self, ref_latent: torch.Tensor, clip_embeds: torch.Tensor) -> ReferenceKV:
        """ref_latent (1, c, h, w), clip_embeds (1, D) -> the K/V cache (ReferenceNet, cond row)."""
        return compute_reference_kv(self.models.reference_unet, self.models.denoising_unet, ref_latent,
                                    clip_embeds[:, None], self.config.bank_dtype)

    # ------------------------------------------------------------------ denoising
    def unet_step(self, cond: Conditioning, reuse: FeatureStore | None = None, cost: UNetCost | None = None):
        """The per-window step for `windowed_guidance`: uncond rows without reference attention
        and with a zero CLIP context, cond rows with both; every row gets its pose features.
        reuse: feature reuse across steps (whole and shallow UNet calls, aa_trt.feature_reuse);
        cost: where each call's counted FLOPs are added."""
        call = self.unet_call()
        # torch.compile gets the timestep as a device tensor (an int would be a new constant per
        # step: a recompile); CUDA graphs fill their own device scalar from the int.
        t_tensor = self.compile and not self.cuda_graph
        clip = cond.clip_embeds[:, None].to(self.dtype)  # (1, 1, D)
        # Frame indices and timesteps as device tensors, made once and reused: on CUDA each copy
        # from pageable host memory would make the host wait for the queued work to finish.
        feats = cond.pose_features  # on the device, or on the host with `offload`
        pose_index: dict[tuple[int, ...], torch.Tensor] = {}
        timesteps: dict[int, torch.Tensor] = {}

        def frames_of(win) -> torch.Tensor:
            if feats.device.type == "cpu":  # host features (CPU run or offload): host indices
                return torch.as_tensor(win)
            key = tuple(torch.as_tensor(win).tolist())
            if key not in pose_index:
                pose_index[key] = torch.as_tensor(key, device=feats.device)
            return pose_index[key]

        def timestep(t: int):
            if not t_tensor:
                return t
            if t not in timesteps:
                timesteps[t] = torch.tensor(t, device=self.device)
            return timesteps[t]

        @torch.no_grad()
        def step(x_win: torch.Tensor, t: int, windows, branches) -> torch.Tensor:
            # x_win (k, c, F, h, w), windows: k frame-index tensors or lists (F,)
            #   -> (len(branches) * k, c, F, h, w)
            k, c, f, h, w = x_win.shape
            nb = len(branches)
            x = x_win.permute(0, 2, 1, 3, 4).reshape(k * f, c, h, w).to(self.dtype)
            pose = torch.cat([feats[frames_of(win)] for win in windows]).to(self.device, non_blocking=True)
            units = [(b, j) for b in branches for j in range(k)]  # the call's row groups, f rows each

            def run(positions, deep=None) -> torch.Tensor:
                # the units at `positions` -> their predictions (len(positions) * f, c, h, w)
                sel = [units[p] for p in positions]
                if len(sel) == len(units):
                    xs, ps = (x.repeat(nb, 1, 1, 1), pose.repeat(nb, 1, 1, 1)) if nb > 1 else (x, pose)
                else:
                    xs = torch.cat([x[j * f:(j + 1) * f] for _, j in sel])
                    ps = torch.cat([pose[j * f:(j + 1) * f] for _, j in sel])
                ctx = torch.cat([clip if b == "cond" else torch.zeros_like(clip) for b, _ in sel])
                state = ReferenceState(kv=cond.reference_kv.pairs,
                                       runs=ReferenceState.row_runs([b == "cond" for b, _ in sel], f))
                extra = {} if deep is None else {"deep": deep}
                shallow = deep is not None and deep.shallow
                out = call(xs, timestep(t), ctx, frames=f, pose=ps, ref=state, **extra)
                if cost is not None:
                    cost.add(xs, ctx, ps, state, f, deep, shallow)
                return out

            if reuse is None:
                out = run(range(len(units)))
            else:
                names = [tuple(torch.as_tensor(win).tolist()) for win in windows]
                out = reuse.run(run, [(b, names[j]) for b, j in units], f)
            return out.view(nb * k, f, c, h, w).permute(0, 2, 1, 3, 4).float()

        return step

    def feature_reuse_refusal(self) -> str | None:
        """Why this animator's UNet call cannot run part of the network (None: it can)."""
        if not isinstance(self.models.denoising_unet, UNet):
            return "this engine runs the denoising UNet as one whole graph; run without --engine"
        if self.cuda_graph:
            return "CUDA graphs replay whole UNet calls; run without cuda_graph"
        if self.compile:
            return "torch.compile'd UNet calls are whole-network; run without compile"
        return None

    def check_feature_reuse(self, sample: SampleOptions) -> None:
        """Refuse feature reuse (one OptionError line) where the UNet call cannot do it."""
        why = self.feature_reuse_refusal() if sample.reuses_features else None
        if why:
            raise OptionError("reuse_every", sample.reuse_every, f"feature reuse is not available: {why}")

    def unet_call(self):
        """The denoising UNet's call as the denoise loop runs it, `(x, t, context, frames=, pose=,
        ref=)`: the module itself, torch.compile'd (`compile`) and/or replayed from CUDA graphs
        (`cuda_graph`); built once per set of options."""
        if self._unet_call is None:
            call = self.models.denoising_unet
            if self.compile:
                call = _compiled(call)
            if self.cuda_graph:
                from aa_trt.cuda_graph import GraphedUNet
                call = GraphedUNet(call)
            self._unet_call = call
        return self._unet_call

    def latent_shape(self, cond: Conditioning) -> tuple[int, ...]:
        """(1, c, N, H/f, W/f): the latents a video with this conditioning is denoised in."""
        f = self.config.latent_factor
        return (1, self.config.latent_channels, cond.num_frames, cond.height // f, cond.width // f)

    def initial_latents(self, cond: Conditioning, seed: int | None = None) -> torch.Tensor:
        """(1, c, N, h, w) standard normal, drawn on the CPU so a seed gives the same video on
        every device (Moore draws with torch.Generator().manual_seed(seed) the same way)."""
        if seed is None:
            seed = secrets.randbits(63)
        self.last_seed = seed
        return torch.randn(self.latent_shape(cond), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)

    def sample_options(self, sample: SampleOptions | None = None, **overrides) -> SampleOptions:
        """`sample` (default SampleOptions()) with `overrides` (its field names), checked against
        this model: the options the loop runs (guidance resolved to a number)."""
        sample = SampleOptions.build(sample, **overrides).resolve(self.config)
        if sample.fast and sample.reuses_features and self.feature_reuse_refusal() is not None:
            sample = sample.replace(reuse_every=1)  # `fast` on a backend that runs whole UNets only
        return sample

    def denoise(self, cond: Conditioning, latents: torch.Tensor, sample: SampleOptions | None = None, *,
                callback=None, progress: bool = True, **overrides) -> torch.Tensor:
        """latents (1, c, N, h, w) float32 noise -> denoised latents, same shape. `overrides`:
        SampleOptions fields (`steps=4`) replacing those of `sample`."""
        return self.run_denoise(cond, latents, self.sample_options(sample, **overrides),
                                callback=callback, progress=progress)

    def run_denoise(self, cond: Conditioning, latents: torch.Tensor, sample: SampleOptions, *,
                    callback=None, progress: bool = True, start: int = 0, carry: dict | None = None,
                    world: int = 1, rank: int = 0, parallel: str = "auto",
                    reduce: Reduce | None = None) -> torch.Tensor:
        """The one denoise path, for resolved options: this rank's share of a `world`-rank plan
        (guidance.make_plan; one process: all of it), the shares summed by `reduce` each step.
        start/carry: continue a resumed render after step start - 1 (latents are then that step's
        output, carry what the sampler's callback handed out with it)."""
        from tqdm.auto import tqdm

        windows = context_windows(cond.num_frames, sample.context_frames, sample.context_overlap,
                                  sample.context_schedule)
        schedule = sampling_schedule(self.config.scheduler, sample.steps, sample.timestep_power)
        self.plan = make_plan(len(windows), world, rank, sample.cfg, parallel)
        mine = len(self.plan.windows)
        share = f"{mine}/{len(windows)} windows/step, {self.plan.describe()}" if world > 1 \
            else f"{len(windows)} windows/step"
        # One bar over steps x windows: a long video's step takes long enough to want finer ticks.
        # `progress` may instead be a function (done, total) of those units (a web page's bar).
        hook = progress if callable(progress) else None
        total, done = len(schedule) * mine, [start * mine]
        muted = [False]  # a resumed render's rebuilding call is not progress
        with tqdm(total=total, initial=done[0], desc=f"denoise ({share})", unit="window",
                  disable=not progress or hook is not None) as bar:
            def tick(k: int) -> None:
                if muted[0]:
                    return
                bar.update(k)
                done[0] += k
                if hook is not None:
                    hook(done[0], total)

            self.check_feature_reuse(sample)
            reuse = FeatureStore(sample.reuse_depth, sample.full_step) if sample.reuses_features else None
            self.unet_cost = UNetCost(self.config)
            model = windowed_guidance(self.unet_step(cond, reuse, self.unet_cost), windows, sample.guidance,
                                      sample.window_batch, tick, plan=self.plan, reduce=reduce,
                                      interval=sample.guidance_interval)
            carry = {k: v.to(self.device) for k, v in (carry or {}).items()}
            latents = latents.to(self.device, torch.float32)
            if reuse is not None:
                model, callback = self._reusing(model, reuse, schedule, callback, carry, start, muted)
            return SAMPLERS[sample.sampler](model, latents, schedule, callback=callback, disable=True,
                                            start=start, carry=carry)

    @staticmethod
    def _reusing(model, reuse: FeatureStore, schedule, callback, carry: dict, start: int, muted: list):
        """The whole-video model and the sampler's callback with feature reuse: each step opens
        with `reuse.begin_step`, and the carry handed out after a step holds the last whole step's
        input. Resumed at a shallow step: that whole step's calls run again first (not counted in
        the progress bar), rebuilding the features it kept."""
        steps = list(schedule.timesteps)

        def reusing_model(x, t, **kw):
            reuse.begin_step(steps.index(t), x)
            return model(x, t, **kw)

        def reusing_callback(info):
            if callback is not None:
                callback({**info, "carry": {**info["carry"], **reuse.carry()}})

        x_full, i_full = carry.pop("reuse_x", None), carry.pop("reuse_step", None)
        if start > 0 and not reuse.full_step(start):
            if x_full is None or i_full is None:
                raise ValueError(f"resuming at step {start} with feature reuse needs carry reuse_x/reuse_step "
                                 f"(the input of the last whole step)")
            muted[0] = True
            try:
                reusing_model(x_full, steps[int(i_full)])
            finally:
                muted[0] = False
        return reusing_model, reusing_callback

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, chunk: int | None = None, progress: bool = False):
        """latents (1, c, N, h, w) -> float32 frames (k, H, W, 3) in [0, 1], `chunk` frames a call
        (None: `default_decode_chunk` of the output size), yielded as they are decoded: a writer
        that takes them one chunk at a time never holds the video."""
        from tqdm.auto import tqdm

        z = latents[0].permute(1, 0, 2, 3)  # (N, c, h, w)
        if chunk is None:
            f = self.config.latent_factor
            chunk = default_decode_chunk(z.shape[-2] * f, z.shape[-1] * f)
        for s in tqdm(range(0, z.shape[0], chunk), desc="decode", disable=not progress):
            x = self.models.vae.decode((z[s:s + chunk] / self.config.latent_scale).to(self.vae_dtype)).sample
            yield (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def decode(self, latents: torch.Tensor, chunk: int | None = None, progress: bool = False) -> np.ndarray:
        """`decode_chunks` gathered: float32 frames (N, H, W, 3) in [0, 1]."""
        frames, s = None, 0  # filled chunk by chunk: the video is held once, not twice
        for x in self.decode_chunks(latents, chunk, progress):
            if frames is None:
                frames = np.empty((latents.shape[2],) + x.shape[1:], np.float32)
            frames[s:s + len(x)] = x
            s += len(x)
        return frames

    # ------------------------------------------------------------------ all together
    def __call__(self, ref_image: Image.Image, poses: np.ndarray, sample: SampleOptions | None = None, *,
                 latents: torch.Tensor | None = None, output: str = "np", width: int | None = None,
                 height: int | None = None, decode_chunk: int | None = None, progress: bool = True,
                 callback=None, start: int = 0, carry: dict | None = None, **overrides):
        """ref_image: PIL image; poses: uint8 (N, H, W, 3) pose renderings (their size is the output
        size unless width/height are given). `sample`: the SampleOptions (steps, guidance, windows,
        seed...), `overrides` any of their fields by name (`anim(ref, poses, steps=4, seed=1)`);
        guidance None is the checkpoint's declared scale (3.5 for Moore's). Returns float32
        (N, H, W, 3) in [0, 1], or with output="latent" the final latents (1, c, N, H/f, W/f).
        `start`/`carry` with `latents`: resume after step start - 1 (see run_denoise)."""
        sample = self.sample_options(sample, **overrides)
        if output not in ("np", "latent"):
            raise OptionError("output", output, "expected 'np' or 'latent'")
        cond = self.prepare(ref_image, poses, width, height)
        shape = self.latent_shape(cond)
        if latents is None:
            latents = self.initial_latents(cond, sample.seed)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents of shape {tuple(latents.shape)}; expected {shape}")
        out = self.run_denoise(cond, latents, sample, callback=callback, progress=progress, start=start,
                               carry=carry)
        if output == "latent":
            return out
        return self.decode(out, decode_chunk, bool(progress) and not callable(progress))


def _compile_error(e: BaseException) -> OptionError:
    lines = str(e).strip().splitlines()
    why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    return OptionError("compile", True, f"torch.compile failed ({why}); run without it")


def _compiled(unet: torch.nn.Module):
    """torch.compile(unet) (static shapes: each window shape compiles once, as CUDA graphs key
    them), whose compilation failures (at the first call of each shape) become one OptionError."""
    try:
        import torch._dynamo

        fn = torch.compile(unet, dynamic=False)
    except Exception as e:  # noqa: BLE001 -- e.g. a Python version dynamo does not support
        raise _compile_error(e) from e

    def call(*args, **kw):
        try:
            return fn(*args, **kw)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise _compile_error(e) from e

    return call


def _check_poses(poses) -> np.ndarray:
    poses = np.asarray(poses)
    if poses.ndim != 4 or poses.shape[-1] != 3:
        raise InputError(f"poses of shape {poses.shape}: expected (N, H, W, 3)")
    if poses.dtype != np.uint8:
        raise InputError(f"poses of dtype {poses.dtype}: expected uint8 renderings")
    if len(poses) == 0:
        raise InputError("no pose frames")
    return poses
