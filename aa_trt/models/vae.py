"""The KL autoencoder of Stable Diffusion (diffusers' AutoencoderKL), written here.

Same parameter names, shapes, initialisation and arithmetic as diffusers' class for the
configurations Animate Anyone uses (DownEncoderBlock2D / UpDecoderBlock2D, SiLU), so the
checkpoints' `vae.*` tensors load unchanged and the outputs match diffusers' (tests/test_vae_clip.py
holds diffusers as the oracle). Why not import diffusers: importing its AutoencoderKL pulls in the
whole diffusers model zoo and torch._dynamo, ~5 s of every `aa-trt run` on these CPUs, longer than
the whole denoising loop of the README's example at 10 steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from aa_trt import attention as attn_math
from aa_trt import fused
from aa_trt.layout import CHANNELS_LAST, choose_format, keep_conv_weights, takes_nhwc_path


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)), the activation in place outside autograd: one buffer fewer per block. On the
    CPU's channels-last path, the C kernel where it measured faster (attention.group_norm_silu)."""
    if takes_nhwc_path(x):
        return attn_math.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())

EPS = 1e-6  # diffusers' resnet_eps inside the VAE (GroupNorm eps of every block)

# The arguments of diffusers' AutoencoderKL.__init__; a saved config may hold more (`_class_name`...).
CONFIG_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
               "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
               "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> "VAEConfig":
        """A diffusers AutoencoderKL config (as ModelConfig.vae stores it) -> VAEConfig, or a
        ValueError naming the first setting this implementation does not have. Settings that only
        describe the latents (scaling_factor, shift_factor, latents_mean/std, force_upcast,
        sample_size) do not change the network and are not kept."""
        n = len(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = list(cfg.get(key, [want]))
            if got != [want] * n:
                raise ValueError(f"vae.{key}={got}: only {want} blocks are supported, one per block_out_channels")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae.act_fn={cfg['act_fn']!r}: only 'silu' is supported")
        kw = {k: cfg[k] for k in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                                  "norm_num_groups", "use_quant_conv", "use_post_quant_conv",
                                  "mid_block_add_attention") if k in cfg}
        return cls(block_out_channels=tuple(cfg.get("block_out_channels", (64,))), **kw)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: GN-SiLU-conv twice, 1x1 shortcut when
    the channel count changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        # Creation order is diffusers': it decides which random numbers a fresh init draws.
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, c, h, w), either layout (kept)
        h = self.conv1(norm_silu(self.norm1, x))
        h = norm_silu(self.norm2, h)
        if fused.active(h):
            if self.conv_shortcut is not None:
                x = self.conv_shortcut(x)
            return fused.conv_add(h, self.conv2, x)  # conv2(h) + x, the add fused on the CPU
        # Training (and other devices): diffusers' order of operations, so that autograd
        # accumulates gradients in the same order and they stay bit-identical to the oracle's.
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous())  # an upsampled x may come out channels-last
        return x + h


class SelfAttention(nn.Module):
    """The mid block's single-head spatial self-attention (diffusers' Attention with one head of
    all the channels, group norm in front, residual added)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, c, h, w)
        n, c, hh, ww = x.shape
        if takes_nhwc_path(x):
            # NHWC memory is already the token matrix (n, hw, c): no transposes, residual fused.
            tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(n, hh * ww, c)
            h = self._attend(tokens)
            out = fused.linear_add(h, self.to_out[0].weight, self.to_out[0].bias,
                                   x.permute(0, 2, 3, 1).reshape(n, hh * ww, c))
            return out.view(n, hh, ww, c).permute(0, 3, 1, 2)
        h = self.group_norm(x.view(n, c, hh * ww)).transpose(1, 2)  # (n, hw, c)
        if fused.active(h):
            h = self.to_out[0](self._attend(h))
        else:  # training: diffusers' order of operations (autograd accumulates in that order)
            q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (n, 1, hw, c)
            h = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return h.transpose(1, 2).reshape(n, c, hh, ww) + x

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        # h (n, hw, c) -> (n, hw, c): one head of all the channels, SDPA or chunked GEMMs as measured
        q, k, v = (fused.linear(h, p.weight, p.bias) for p in (self.to_q, self.to_k, self.to_v))
        return attn_math.attention(q, k, v, 1)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        first = ResnetBlock(channels, channels, groups)
        attn = SelfAttention(channels, groups) if attention else None  # diffusers keeps the empty slot
        self.attentions = nn.ModuleList([attn])
        self.resnets = nn.ModuleList([first, ResnetBlock(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (diffusers' padding=0 variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest upsampling of a channels-last input fails on large batches and past 2**31
        # output elements (diffusers' workarounds, kept for the same inputs).
        if x.shape[0] >= 64 or x.numel() * 2 > 2 ** 31:
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, down=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, 2c, H/f, W/f)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList()
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)  # created before the up blocks, as in diffusers
        for i in range(len(ch)):
            self.up_blocks.append(DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g,
                                               up=i < len(ch) - 1))
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (n, c, h, w) -> (n, 3, h*f, w*f)
        # The activations' layout, measured per machine and size (aa_trt.layout); blocks keep it.
        widths = [b.resnets[-1].conv2.out_channels for b in self.up_blocks]  # at 1x, 2x, 4x... the latents
        fmt = choose_format(z, widths, self.conv_norm_out.num_groups, scale=2.0)
        keep_conv_weights(self, fmt)
        if fmt == CHANNELS_LAST:
            z = z.contiguous(memory_format=fmt)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        out = self.conv_out(norm_silu(self.conv_norm_out, x))
        # NCHW out for the caller (3 channels: cheap), only where this call chose channels-last:
        # otherwise diffusers' own strides, which training's gradients depend on to the last bit.
        return out.contiguous() if fmt == CHANNELS_LAST else out


class Posterior:
    """The encoder's diagonal Gaussian (diffusers' DiagonalGaussianDistribution): mean, logvar
    clamped to [-30, 20], std, var."""

    def __init__(self, moments: torch.Tensor):  # (n, 2c, h, w)
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """`encode(x).latent_dist` -> Posterior; `decode(z).sample` -> pixels, as diffusers' class
    answers (the pipeline, the exported graphs and the trainer call it that way)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if config.use_quant_conv else None
        lc = config.latent_channels
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> SimpleNamespace:  # (n, 3, H, W) in [-1, 1]
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return SimpleNamespace(latent_dist=Posterior(h))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:  # (n, c, h, w), unscaled latents
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return SimpleNamespace(sample=self.decoder(z))
