"""The UNet family: SD1.5's 2D UNet, the ReferenceNet, and the denoising UNet with motion modules.

One class, three roles, diffusers/Moore state-dict names throughout:
- `UNet(cfg)`: diffusers' UNet2DConditionModel (the oracle tests compare them);
- `UNet(cfg, with_output=False)`: Moore's ReferenceNet (no conv_norm_out/conv_out); `reference_bank`
  records the norm1 output of each spatial transformer block;
- `UNet(cfg, motion)`: Moore's denoising UNet3DConditionModel: per-frame GroupNorm (frames live in
  the batch), PoseGuider features added after conv_in, motion modules after each resnet(+attention).

Feature reuse across steps (`DeepFeatures`; DeepCache, Ma et al. 2024): a full call can hand out
the features that enter the outermost `depth` up blocks, and a later "shallow" call runs only
conv_in, the outermost `depth` down blocks, those up blocks and conv_out on them: the deep levels,
where features change slowly between neighbouring steps, are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aa_trt import autotune, fused
from aa_trt.config import MotionConfig, UNetConfig
from aa_trt.layout import CHANNELS_LAST, choose_format, keep_conv_weights
from aa_trt.models.layers import (BankComplete, Downsample, ReferenceState, ResnetBlock, SpatialTransformer,
                     TimestepEmbedding, TransformerBlock, Upsample, norm_silu, timestep_embedding)
from aa_trt.models.motion import MotionModule


class _Counter:
    """Hands out transformer-block indices in execution order (down, mid, up)."""

    def __init__(self):
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n - 1


@dataclass
class DeepFeatures:
    """One call's part in feature reuse. depth: how many of the outermost resolution levels a
    shallow call runs (1 = the full-resolution level only). features None: a full call, which
    fills them with the input of up block `len(up_blocks) - depth`, (b*f, C, h', w'); given: a
    shallow call on them (the same rows, from an earlier full call)."""

    depth: int
    features: torch.Tensor | None = None

    @property
    def shallow(self) -> bool:
        return self.features is not None


def _motion(ch: int, m: MotionConfig) -> MotionModule:
    return MotionModule(ch, m.num_heads, m.num_transformer_blocks, m.num_attention_blocks,
                        m.max_len, m.norm_num_groups)


class DownBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, cfg: UNetConfig, has_attn, add_down, motion, counter):
        super().__init__()
        n = cfg.layers_per_block
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, temb_ch, g, eps) for j in range(n)])
        if has_attn:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.num_heads, cfg.cross_attention_dim, g, counter())
                 for _ in range(n)])
        else:
            self.attentions = None
        if motion is not None:
            self.motion_modules = nn.ModuleList([_motion(out_ch, motion) for _ in range(n)])
        else:
            self.motion_modules = None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if add_down else None

    def forward(self, x, temb, context, frames, ref, downsample: bool = True):
        # downsample False: stop before the downsampler (a shallow call needs only the skips)
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ref)
            if self.motion_modules is not None:
                x = self.motion_modules[j](x, frames)
            skips.append(x)
        if self.downsamplers is not None and downsample:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, ch, temb_ch, cfg: UNetConfig, motion, counter):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, cfg.num_heads, cfg.cross_attention_dim, g, counter())])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_ch, g, eps) for _ in range(2)])
        self.motion_modules = nn.ModuleList([_motion(ch, motion)]) if motion is not None else None

    def forward(self, x, temb, context, frames, ref):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, ref)
        if self.motion_modules is not None:
            x = self.motion_modules[0](x, frames)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, cfg: UNetConfig, has_attn, add_up, motion,
                 counter):
        super().__init__()
        n = cfg.layers_per_block + 1
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        resnets = []
        for j in range(n):
            skip_ch = in_ch if j == n - 1 else out_ch
            res_in = prev_ch if j == 0 else out_ch
            resnets.append(ResnetBlock(res_in + skip_ch, out_ch, temb_ch, g, eps))
        self.resnets = nn.ModuleList(resnets)
        if has_attn:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.num_heads, cfg.cross_attention_dim, g, counter())
                 for _ in range(n)])
        else:
            self.attentions = None
        self.motion_modules = nn.ModuleList([_motion(out_ch, motion) for _ in range(n)]) \
            if motion is not None else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_up else None

    def forward(self, x, skips, temb, context, frames, ref, up_size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ref)
            if self.motion_modules is not None:
                x = self.motion_modules[j](x, frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, motion: MotionConfig | None = None, with_output: bool = True):
        super().__init__()
        self.cfg = cfg
        self.motion_cfg = motion
        boc = cfg.block_out_channels
        temb_ch = cfg.time_embed_dim
        counter = _Counter()
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(boc[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        out_ch = boc[0]
        for i, has_attn in enumerate(cfg.down_block_attention):
            in_ch, out_ch = out_ch, boc[i]
            mm = motion if motion is not None and motion.down_enabled(i) else None
            self.down_blocks.append(
                DownBlock(in_ch, out_ch, temb_ch, cfg, has_attn, i < len(boc) - 1, mm, counter))

        mm = motion if motion is not None and motion.mid_block else None
        self.mid_block = MidBlock(boc[-1], temb_ch, cfg, mm, counter)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(boc))
        out_ch = rev[0]
        for i, has_attn in enumerate(cfg.up_block_attention):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(boc) - 1)]
            mm = motion if motion is not None and motion.up_enabled(i) else None
            self.up_blocks.append(UpBlock(in_ch, prev_ch, out_ch, temb_ch, cfg, has_attn,
                                          i < len(boc) - 1, mm, counter))

        if with_output:
            self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps)
            self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)
        else:
            self.conv_norm_out = None
            self.conv_out = None
        self.num_transformer_blocks = counter.n

    # ------------------------------------------------------------------ structure
    def transformer_blocks(self) -> list[TransformerBlock]:
        """Spatial transformer blocks by index (execution order): the bank / K/V slots."""
        blocks = [m for m in self.modules() if isinstance(m, TransformerBlock)]
        return sorted(blocks, key=lambda b: b.index)

    def motion_modules(self) -> list[MotionModule]:
        return [m for m in self.modules() if isinstance(m, MotionModule)]

    # ------------------------------------------------------------------ forward
    def time_embed(self, timestep, batch: int, frames: int, device, dtype) -> torch.Tensor:
        """(batch * frames, temb) rows, or (1, temb) when every row has the same timestep (the
        resnets then fold it into their convolution's bias on the CPU)."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        emb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                 self.cfg.freq_shift)
        if t.shape[0] == 1 and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            return self.time_embedding(emb.to(dtype))  # (1, temb), broadcast over the rows
        # The embedding of t, then its rows to the batch (t has one entry or `batch` of them).
        emb = emb.expand(batch, -1).to(dtype)
        emb = self.time_embedding(emb)  # (b, temb)
        return emb.repeat_interleave(frames, dim=0) if frames > 1 else emb

    def max_reuse_depth(self) -> int:
        """The deepest feature reuse this UNet allows: every level but the innermost."""
        return len(self.up_blocks) - 1

    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor, *, frames: int = 1,
                pose: torch.Tensor | None = None, ref: ReferenceState | None = None,
                deep: DeepFeatures | None = None) -> torch.Tensor:
        """x (b*f, c_in, h, w); timestep scalar or (b,); context (b, S, D) or (b*f, S, D);
        pose (b*f, C0, h, w) or None  ->  (b*f, c_out, h, w), or the last features without conv_out.
        deep: feature reuse (DeepFeatures): a full call records into it, a shallow one reads it."""
        n = x.shape[0]
        b = n // frames
        temb = self.time_embed(timestep, b, frames, x.device, x.dtype)
        if context.shape[0] != n:
            context = context.repeat_interleave(frames, dim=0)
        if deep is None:
            return self._call_in_measured_layout(
                x, ref, lambda fmt: self._layers(x, temb, context, frames, pose, ref, fmt)[0])
        if not 1 <= deep.depth <= self.max_reuse_depth():
            raise ValueError(f"feature reuse depth {deep.depth}: this UNet allows 1..{self.max_reuse_depth()}")
        # The winner's own output and features (the timed first call runs both layouts).
        out, features = self._call_in_measured_layout(
            x, ref, lambda fmt: self._layers(x, temb, context, frames, pose, ref, fmt, deep),
            tag=f":d{deep.depth}" if deep.shallow else "")
        deep.features = features
        return out

    def _call_in_measured_layout(self, x: torch.Tensor, ref: ReferenceState | None, run, tag: str = ""):
        """run(fmt) in the activations' memory layout that is fastest for this call's shape on this
        machine (aa_trt.layout; every block keeps the layout it is given). The first call at a
        shape is timed whole in both layouts (one call's worth extra, once per machine: a model of
        the network, its convolutions and norms alone, mispredicted on some CPUs) and returns the
        winner's own output; the ReferenceNet's recording pass, which stops early, uses the model."""
        if not fused.active(x) or (ref is not None and ref.bank is not None):
            return run(choose_format(x, self.cfg.block_out_channels, self.cfg.norm_num_groups, token_copies=2))
        n, _, h, w = x.shape
        key = (f"layout:unet-call:{str(x.dtype).removeprefix('torch.')}:"
               f"c{'-'.join(map(str, self.cfg.block_out_channels))}:{n}x{h}x{w}:m{int(self.motion_cfg is not None)}{tag}")
        formats = {"nchw": torch.contiguous_format, "nhwc": CHANNELS_LAST}
        outs = {}

        def make():
            return {name: (lambda name=name, fmt=fmt: outs.__setitem__(name, run(fmt)))
                    for name, fmt in formats.items()}

        choice = autotune.choose(key, tuple(formats), make)
        return outs[choice] if choice in outs else run(formats[choice])

    def _layers(self, x, temb, context, frames, pose, ref, fmt, deep: DeepFeatures | None = None):
        """-> (output, the features entering up block len(up_blocks) - deep.depth, or None)."""
        keep_conv_weights(self, fmt)
        if fmt is not torch.contiguous_format:
            x = x.contiguous(memory_format=fmt)
        if pose is not None and fused.active(x):
            h = fused.conv_add(x, self.conv_in, pose.contiguous(memory_format=fmt))
        else:
            h = self.conv_in(x)
            if pose is not None:
                h = h + pose
        skips = [h]
        shallow = deep is not None and deep.shallow
        # A shallow call runs the outermost `depth` down blocks, the last one without its
        # downsampler (whose skip feeds a deep up block), then the outermost up blocks on the
        # recorded deep features: the skips it makes are exactly those they consume.
        first_up = len(self.up_blocks) - deep.depth if deep is not None else None
        down = self.down_blocks[:deep.depth] if shallow else self.down_blocks
        for i, block in enumerate(down):
            h, s = block(h, temb, context, frames, ref, downsample=not (shallow and i == deep.depth - 1))
            skips.extend(s)
        features = None
        if shallow:
            h = features = deep.features.contiguous(memory_format=fmt)
        else:
            h = self.mid_block(h, temb, context, frames, ref)
        for i, block in enumerate(self.up_blocks):
            if shallow and i < first_up:
                continue
            if i == first_up and not shallow:
                features = h
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            up_size = skips[-1].shape[-2:] if skips else None
            h = block(h, block_skips, temb, context, frames, ref, up_size)
        if self.conv_out is None:
            return h, features
        out = self.conv_out(norm_silu(self.conv_norm_out, h))
        # NCHW out (c_out is small)
        return (out.contiguous() if fmt != torch.contiguous_format else out), features

    def reference_bank(self, x: torch.Tensor, timestep, context: torch.Tensor) -> list[torch.Tensor]:
        """ReferenceNet mode: the norm1 output of every transformer block, (b, L_i, C_i) each.
        Stops right after the last block's norm1: nothing later reaches the denoising UNet."""
        state = ReferenceState(bank=[], bank_limit=self.num_transformer_blocks)
        try:
            self.forward(x, timestep, context, ref=state)
        except BankComplete:
            pass
        return state.bank
