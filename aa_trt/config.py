"""Model configuration: frozen dataclasses and named presets.

A checkpoint carries its whole `ModelConfig` in its metadata (`to_dict` / `from_dict`), so nothing
is ever guessed from a folder name. The presets are `sd15` (Moore-AnimateAnyone v2 on SD1.5) and
`tiny` (the same structure at toy widths: the golden fixture's configuration).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """The 2D UNet family, named as diffusers' UNet2DConditionModel config (SD1.5 defaults)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # True: CrossAttn{Down,Up}Block, False: plain {Down,Up}Block. Down order; up blocks mirror it.
    down_block_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # diffusers' historical naming: "attention_head_dim" of SD1.5 is really the number of heads.
    num_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1

    @property
    def up_block_attention(self) -> tuple[bool, ...]:
        return tuple(reversed(self.down_block_attention))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "UNetConfig":
        """Map a diffusers UNet2DConditionModel (or Moore UNet3D) config.json onto ours."""
        unsupported = {
            "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
            "resnet_time_scale_shift": "default", "only_cross_attention": False,
            "dual_cross_attention": False, "upcast_attention": False, "center_input_sample": False,
        }
        for key, ok in unsupported.items():
            if cfg.get(key, ok) not in (ok, [ok] * len(cfg.get("block_out_channels", []))):
                raise ValueError(f"unet config: {key}={cfg[key]!r} is not supported (only {ok!r})")
        down = tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"unet config: per-block head counts {heads} are not supported")
            heads = heads[0]
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            down_block_attention=tuple(t.startswith("CrossAttn") for t in down),
            layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=int(heads),
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            downsample_padding=cfg.get("downsample_padding", 1),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers UNet2DConditionModel config (used by the oracle tests)."""
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                                   for a in self.down_block_attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                 for a in self.up_block_attention),
            layers_per_block=self.layers_per_block, attention_head_dim=self.num_heads,
            cross_attention_dim=self.cross_attention_dim, norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps, flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift, downsample_padding=self.downsample_padding,
        )


@dataclass(frozen=True)
class MotionConfig:
    """AnimateDiff "Vanilla" motion modules as Moore configures them (inference_v2.yaml)."""

    num_heads: int = 8
    num_transformer_blocks: int = 1
    num_attention_blocks: int = 2  # ("Temporal_Self", "Temporal_Self")
    max_len: int = 32  # length of the sinusoidal table, hence the longest context window
    # Moore gives down block i the resolution 2**i and up block i 2**(3-i) (it assumes 4 levels).
    resolutions: tuple[int, ...] = (1, 2, 4, 8)
    mid_block: bool = True
    decoder_only: bool = False
    # Moore never passes the UNet's group count through: always 32 groups, eps 1e-6.
    norm_num_groups: int = 32

    def down_enabled(self, i: int) -> bool:
        return (2**i in self.resolutions) and not self.decoder_only

    def up_enabled(self, i: int) -> bool:
        return 2 ** (3 - i) in self.resolutions


@dataclass(frozen=True)
class PoseGuiderConfig:
    """`moore`: Moore's PoseGuider (3x3 convs); `paper`: the paper's four 4x4 stride-2 convs."""

    variant: str = "moore"
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    # = the UNet's first block width; features are added right after conv_in.
    embedding_channels: int = 320

    def __post_init__(self):
        if self.variant not in ("moore", "paper"):
            raise ValueError(f"pose guider variant {self.variant!r}: expected 'moore' or 'paper'")


@dataclass(frozen=True)
class SchedulerConfig:
    """DDIM as Moore's inference_v2.yaml sets it (the names of diffusers' DDIMScheduler)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"  # Moore trained with scaled_linear; MusePose infers with it
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    timestep_spacing: str = "trailing"
    steps_offset: int = 1
    set_alpha_to_one: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("clip_sample", False) or d.get("thresholding", False):
            raise ValueError("scheduler: clip_sample/thresholding are not supported")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build every submodel of an aa-trt checkpoint."""

    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    pose_guider: PoseGuiderConfig = field(default_factory=PoseGuiderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # diffusers AutoencoderKL and transformers CLIPVisionConfig kwargs, as those libraries save them.
    vae: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    # Moore's pipeline hard-codes 0.18215 for encode and decode, whatever the VAE config says.
    latent_scale: float = 0.18215
    # Moore casts the reference bank to fp16 even in fp32 runs ("float32" keeps it exact).
    bank_dtype: str = "float16"
    # Output size used when the caller gives none (pixels; multiples of 8).
    default_size: tuple[int, int] = (512, 768)  # (width, height)
    # CFG scale used when the caller gives none. 3.5 is Moore's inference setting for its SD-sized
    # model; a model trained here may declare its own (how it was chosen: its provenance/docs).
    guidance: float = 3.5
    # DDIM steps used when the caller gives none: 20 (the paper's) unless the model says otherwise
    # (a distilled student, `aa-trt train --stage distill`, declares the steps it was made for).
    steps: int = 20

    def __post_init__(self):
        T = self.scheduler.num_train_timesteps
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= T:
            raise ValueError(f"{self.name}: default steps {self.steps!r} must be a whole number in 1..{T}")
        pg = self.pose_guider
        if self.vae and not (self.unet.in_channels == self.unet.out_channels == self.latent_channels):
            raise ValueError(f"{self.name}: the UNet maps {self.unet.in_channels} -> {self.unet.out_channels} "
                             f"channels but the VAE's latents have {self.latent_channels}")
        if self.vae and pg.variant == "moore" and 2 ** (len(pg.block_out_channels) - 1) != self.latent_factor:
            raise ValueError(f"{self.name}: the PoseGuider downsamples by {2 ** (len(pg.block_out_channels) - 1)} "
                             f"but the VAE by {self.latent_factor}; their feature maps would not line up")

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 ** (VAE levels - 1); SD's VAE gives 8."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1) if self.vae else 8

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents (SD's VAE: 4), which the UNet denoises."""
        return self.vae.get("latent_channels", 4) if self.vae else self.unet.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        def build(klass, sub):
            kw = {}
            for f in dataclasses.fields(klass):
                if f.name in sub:
                    v = sub[f.name]
                    kw[f.name] = tuple(v) if isinstance(v, list) else v
            return klass(**kw)

        return cls(
            name=d["name"],
            unet=build(UNetConfig, d.get("unet", {})),
            motion=build(MotionConfig, d.get("motion", {})),
            pose_guider=build(PoseGuiderConfig, d.get("pose_guider", {})),
            scheduler=build(SchedulerConfig, d.get("scheduler", {})),
            vae=dict(d.get("vae", {})),
            clip=dict(d.get("clip", {})),
            latent_scale=d.get("latent_scale", 0.18215),
            bank_dtype=d.get("bank_dtype", "float16"),
            default_size=tuple(d.get("default_size", (512, 768))),
            guidance=float(d.get("guidance", 3.5)),
            steps=d.get("steps", 20),
        )

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# sd-vae-ft-mse (AutoencoderKL) and ViT-L/14 with projection 768 (sd-image-variations' image_encoder).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], sample_size=256, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, num_channels=3,
)

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[8, 16, 16, 16], sample_size=64, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    patch_size=32, image_size=224, projection_dim=32, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, num_channels=3,
)

# The embedded default model's parts, trained here (stage 0): SD's VAE layout (8x) at a quarter
# of its widths with 16 latent channels (with SD's 4 even a perfect denoiser's output, the VAE's
# own reconstruction, scored below copying the reference: docs/training.md, "Earlier default models"), and a 64-pixel CLIP
# ViT with a 64-wide projection. The VAE keeps SD's 4 channels per norm group: with 2 (16 groups at width 32) a flat colour region leaves each
# group only a sign after normalisation, and stage 0 stalled with grey reconstructions.
SMALL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[32, 64, 128, 128], sample_size=128, scaling_factor=1.0,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
SMALL_CLIP = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    patch_size=8, image_size=64, projection_dim=64, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, num_channels=3,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(name="sd15", vae=SD_VAE, clip=CLIP_VIT_L14),
    # The golden fixture's configuration (../shared/fixtures/moore_tiny).
    "tiny": ModelConfig(
        name="tiny",
        unet=UNetConfig(block_out_channels=(32, 64), down_block_attention=(True, True),
                        layers_per_block=1, num_heads=8, cross_attention_dim=32, norm_num_groups=8),
        motion=MotionConfig(num_heads=2),
        pose_guider=PoseGuiderConfig(embedding_channels=32),
        vae=TINY_VAE,
        clip=TINY_CLIP,
        default_size=(64, 64),
    ),
    # The embedded default (aa_trt/assets/default.safetensors): 128x128 video (16x16 latents) at
    # about 40 ms per frame and UNet call on two CPU cores. latent_scale = 1/std of the trained
    # VAE's latents, measured by stage 0 and written into the checkpoint.
    "small": ModelConfig(
        name="small",
        unet=UNetConfig(in_channels=16, out_channels=16,
                        block_out_channels=(64, 128, 128), down_block_attention=(True, True, False),
                        layers_per_block=1, num_heads=2, cross_attention_dim=64, norm_num_groups=16),
        motion=MotionConfig(num_heads=2, norm_num_groups=16),
        pose_guider=PoseGuiderConfig(block_out_channels=(16, 32, 64, 128), embedding_channels=64),
        vae=SMALL_VAE,
        clip=SMALL_CLIP,
        latent_scale=1.0,
        bank_dtype="float32",
        default_size=(128, 128),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
