"""AnimateDiff "Vanilla" motion module (Moore's key names): attention over the frame axis.

Tokens stay in the temporal layout (b*h*w, f, c) from proj_in to proj_out: every op but the
attention is token-wise, so Moore's rearranges between (b f) d c and (b d) f c are not needed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from aa_trt import attention as attn_math
from aa_trt import fused
from aa_trt.layout import takes_nhwc_path
from aa_trt.models.layers import FeedForward


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """AnimateDiff's PositionalEncoding table (1, max_len, dim): sin on even, cos on odd channels."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        # Persistent: Moore's motion_module.pth stores it. Built on the meta device (a checkpoint
        # load) it is only a shape: computing it there runs torch's reference decompositions,
        # whose first use imports torch._dynamo (~1.2 s of every run).
        meta = torch.empty(0).is_meta
        self.register_buffer("pe", torch.empty(1, max_len, dim) if meta else sinusoidal_table(max_len, dim))

    def forward(self, x):  # x (n, f, c)
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"temporal window of {x.shape[1]} frames exceeds the motion modules' "
                             f"maximum of {self.pe.shape[1]}")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalAttention(nn.Module):
    """VersatileAttention in "Temporal" mode: self-attention over frames, positions added first."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x, residual: torch.Tensor | None = None):
        # x (b*h*w, f, c) -> (b*h*w, f, c), plus `residual` (same shape) when given; on the CPU's
        # packed path also channels-last tokens (b, f, h*w, c).
        if attn_math.kernels_for(x, self.heads):
            # The kernel adds pe W^T per frame as it loads q/k/v: exact for bias-free projections,
            # and one pass over the activations fewer than adding pe first.
            bq, bk, bv = self._folded_pe(x.shape[1], x.dtype)
            out = attn_math.temporal_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, bq, bk, bv)
        elif attn_math.packed_ok(x):
            # The CPU: one GEMM for q, k and v; pe W^T added while they are laid out head-major.
            w, bias = self._packed(x.shape[1], x.dtype)
            out = attn_math.packed_short_attention(fused.linear(x, w, None), self.heads, bias)
        else:
            x = self.pos_encoder(x)
            out = attn_math.attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads)
        return fused.layer(out, self.to_out[0], residual)

    def _packed(self, frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[W_q; W_k; W_v] (3c, c) and pe[:frames] W^T per projection as (3, heads, frames, d),
        cached until the weights or the shape change."""
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)

        def make():
            if frames > self.pos_encoder.pe.shape[1]:
                raise ValueError(f"temporal window of {frames} frames exceeds the motion modules' "
                                 f"maximum of {self.pos_encoder.pe.shape[1]}")
            c = ws[0].shape[0]
            table = self.pos_encoder.pe.reshape(-1, self.pos_encoder.pe.shape[-1])[:frames].float()
            bias = torch.stack([table @ w.float().t() for w in ws])  # (3, frames, c), in fp32
            bias = bias.view(3, frames, self.heads, c // self.heads).transpose(1, 2).contiguous().to(dtype)
            return torch.cat(ws).to(dtype).contiguous(), bias

        return fused.derived(self, "_packed_cache", ws + (self.pos_encoder.pe,), make, extra=(frames, dtype))

    def _folded_pe(self, frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """pe[:frames] W^T for q, k, v (frames, c), cached until the weights or the shape change."""
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)

        def make():
            from aa_trt.kernels.temporal_attention import fold_positional_encoding

            return fold_positional_encoding(self.pos_encoder.pe, ws, frames, dtype)

        return fused.derived(self, "_pe_cache", ws + (self.pos_encoder.pe,), make, extra=(frames, dtype))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, n_attn: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(n_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attn)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x):  # x (b*h*w, f, c), or (b, f, h*w, c) on the CPU's packed path
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(fused.layer_norm(x, norm), residual=x)
        return self.ff(fused.layer_norm(x, self.ff_norm), residual=x)


class TemporalTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, n_blocks: int, n_attn: int, max_len: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(ch, heads, n_attn, max_len) for _ in range(n_blocks)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        # x (b*f, c, h, w) -> (b*f, c, h, w). GroupNorm per frame, as Moore/AnimateDiff do.
        bf, c, hh, ww = x.shape
        b = bf // frames
        if takes_nhwc_path(x):
            return self._forward_nhwc(x, frames)
        h = self.norm(x)
        # (b, f, c, h, w) -> (b, h, w, f, c) -> (b*h*w, f, c)
        h = h.view(b, frames, c, hh * ww).permute(0, 3, 1, 2).reshape(b * hh * ww, frames, c)
        h = fused.linear(h, self.proj_in.weight, self.proj_in.bias)
        for block in self.transformer_blocks:
            h = block(h)
        h = fused.linear(h, self.proj_out.weight, self.proj_out.bias)
        h = h.view(b, hh, ww, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, hh, ww)
        return h + x

    def _norm_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        return attn_math.group_norm_silu(x, n.num_groups, n.weight, n.bias, n.eps, silu=False)

    def _forward_nhwc(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        # Channels-last x (b*f, c, h, w) is the token tensor (b, f, h*w, c) in memory. Every op
        # of the temporal transformer but the attention is token-wise, and the CPU's packed
        # attention reads the frames along axis 1 itself: nothing is transposed, and proj_out's
        # epilogue adds the residual.
        bf, c, hh, ww = x.shape
        b, p = bf // frames, hh * ww
        tokens = self._norm_nhwc(x).permute(0, 2, 3, 1).reshape(b, frames, p, c)  # a view
        if not attn_math.packed_ok(tokens):
            return self._forward_nhwc_transposed(x, frames)
        h = fused.linear(tokens, self.proj_in.weight, self.proj_in.bias)  # (b, f, p, c)
        for block in self.transformer_blocks:
            h = block(h)
        residual = x.permute(0, 2, 3, 1).reshape(b, frames, p, c)  # a view
        out = fused.linear_add(h, self.proj_out.weight, self.proj_out.bias, residual)
        return out.view(bf, hh, ww, c).permute(0, 3, 1, 2)  # channels-last (b*f, c, h, w)

    def _forward_nhwc_transposed(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        # Channels-last x (b*f, c, h, w) is the token tensor (b, f, h*w, c) in memory: the
        # token-wise projections run on it as it lies; only the attention's frame-major layout
        # (b*h*w, f, c) needs one transposing copy in and one out, and proj_out's epilogue adds
        # the residual.
        bf, c, hh, ww = x.shape
        b, p = bf // frames, hh * ww
        tokens = self._norm_nhwc(x).permute(0, 2, 3, 1).reshape(b, frames, p, c)  # a view
        h = fused.linear(tokens, self.proj_in.weight, self.proj_in.bias)  # (b, f, p, c)
        h = h.transpose(1, 2).reshape(b * p, frames, c)  # the one copy in
        for block in self.transformer_blocks:
            h = block(h)
        h = h.view(b, p, frames, c).transpose(1, 2).contiguous()  # the one copy out: (b, f, p, c)
        residual = x.permute(0, 2, 3, 1).reshape(b, frames, p, c)  # a view
        out = fused.linear_add(h, self.proj_out.weight, self.proj_out.bias, residual)
        return out.view(bf, hh, ww, c).permute(0, 3, 1, 2)  # channels-last (b*f, c, h, w)


class MotionModule(nn.Module):
    """`motion_modules.N` in Moore's files: a wrapper holding `temporal_transformer`."""

    def __init__(self, ch: int, heads: int, n_blocks: int = 1, n_attn: int = 2, max_len: int = 32,
                 groups: int = 32):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(ch, heads, n_blocks, n_attn, max_len, groups)

    def forward(self, x, frames: int):
        return self.temporal_transformer(x, frames)

    def zero_init(self):
        """AnimateDiff initialises proj_out to zero so a new module starts as the identity."""
        nn.init.zeros_(self.temporal_transformer.proj_out.weight)
        nn.init.zeros_(self.temporal_transformer.proj_out.bias)
