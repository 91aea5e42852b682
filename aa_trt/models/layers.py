"""Building blocks of the UNet family, with diffusers' state-dict names.

Everything here works on frames flattened into the batch: (b*f, c, h, w) images or (b*f, n, c)
tokens. Per-frame GroupNorm (Moore's "inflated" norm) is therefore plain GroupNorm, and the 2D UNet,
the ReferenceNet and the denoising UNet share one implementation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import nn

from aa_trt import attention as attn_math
from aa_trt import fused
from aa_trt.layout import takes_nhwc_path


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of diffusers' `get_timestep_embedding` (bit-equal).  t (b,) -> (b, dim) fp32.

    Written for the exported graphs' sake, with the same values: with one timestep (the graphs'
    `timestep` is (1,)) the product t * f and its sin/cos come before any reshape of t, and the
    halves are concatenated once in their final order (not concatenated and swapped). OpenVINO's
    CPU plugin runs a bf16 compile's shape ops (Unsqueeze, the swap's split) in bf16 even where
    the arithmetic around them is held in f32 (backends/openvino.keep_timestep_f32), and t = 999
    rounded to bf16 is 1000: sin(t * f) at the high frequencies becomes noise."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    one = t.ndim == 1 and t.shape[0] == 1
    arg = t.float() * freqs if one else t[:, None].float() * freqs[None, :]  # (half,) or (b, half)
    sin, cos = torch.sin(arg), torch.cos(arg)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb[None] if one else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)): one fused Triton kernel where the attention backend allows kernels (CUDA
    fp16/bf16 under "auto"; see aa_trt.attention), nn.GroupNorm's F.group_norm + F.silu otherwise.
    The module keeps its parameters, so state-dict keys do not change."""
    return attn_math.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x (n, c, h, w) in either memory layout (kept); temb (n, temb_ch), one row per frame, or
        # (1, temb_ch) when every row has the same timestep.
        if not fused.active(x):
            # Training (and other devices): diffusers' order of operations, so that autograd
            # accumulates gradients in the same order as it always has.
            h = self.conv1(norm_silu(self.norm1, x))
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(norm_silu(self.norm2, h))
            if self.conv_shortcut is not None:
                x = self.conv_shortcut(x)
            return x + h
        t = fused.linear(F.silu(temb), self.time_emb_proj.weight, self.time_emb_proj.bias)  # (n or 1, out_ch)
        h = norm_silu(self.norm1, x)
        if t.shape[0] == 1:
            h = fused.conv_bias(h, self.conv1, t[0])  # one timestep: the embedding is a bias
        else:
            h = self.conv1(h) + t[:, :, None, None]
        h = norm_silu(self.norm2, h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return fused.conv_add(h, self.conv2, x)  # conv2(h) + x, the add fused on the CPU


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # Nearest x2; `size` forces the skip connection's size when the input was not a multiple of 2**levels.
        dtype = x.dtype
        if dtype == torch.bfloat16 and not _bf16_upsample(x.device.type):
            x = x.float()  # upsample_nearest2d has no bf16 kernel on some builds
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None \
            else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))


@functools.cache
def _bf16_upsample(device: str) -> bool:
    """Whether this torch upsamples bf16 tensors on `device` itself (then no round trip via fp32:
    two copies of the upsampled tensor saved)."""
    try:
        F.interpolate(torch.ones(1, 1, 2, 2, dtype=torch.bfloat16, device=device), scale_factor=2.0, mode="nearest")
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Attention(nn.Module):
    """diffusers `Attention` names: to_q/to_k/to_v without bias, to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        # x (n, L, c), context (n, S, d) -> (n, L, c), plus `residual` (n, L, c) when given.
        ctx = x if context is None else context
        out = attn_math.attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)
        return self.project_out(out, residual)

    def project_out(self, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """to_out(out) (+ residual, fused on the CPU)."""
        return fused.layer(out, self.to_out[0], residual)

    def one_token(self, context: torch.Tensor) -> torch.Tensor:
        """`forward(x, context)` when the context is a single token, for any x: the softmax over
        one score is exactly 1, so every query receives that token's value. context (n, 1, d) ->
        (n, 1, dim), broadcast over the queries by the caller; no query projection, no attention."""
        return self.to_out[0](self.to_v(context))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        # x (n, L, dim) -> (n, L, inner). The projection's two halves run as two GEMMs: gelu on
        # the gate's output and the product with the other half are then their epilogues.
        inner = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        if fused.tracing():
            # An exported graph gets the two GEMMs too: OpenVINO then fuses the gelu and the
            # product into them, where the split of one wide output ran as its reference kernel
            # (half-width sd15 UNet call, bf16: split + gelu + product 12% of the graph's time).
            return F.linear(x, w[:inner], None if b is None else b[:inner]) * F.gelu(
                F.linear(x, w[inner:], None if b is None else b[inner:]))
        if not fused.active(x, w, b):
            h, gate = self.proj(x).chunk(2, dim=-1)
            return h * F.gelu(gate)
        gate = fused.linear(x, w[inner:], b[inner:], "gelu")
        return fused.linear_mul(x, w[:inner], b[:inner], gate)


# The feed-forward's inner activations are the largest tensors of a denoising step: at 512x768,
# a 24-frame window with CFG is 48 rows x 6144 tokens, and GEGLU's projection (2 x 1280 channels)
# alone is 1.5 GB in fp16, with its gelu and product on top. Rows are independent, so above this
# many inner elements the rows go through in chunks: the same result, a bounded peak.
FF_CHUNK_ELEMENTS = 1 << 27  # 256 MB of fp16 per inner buffer


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x, residual: torch.Tensor | None = None):
        # x (n, L, c) -> (n, L, c), plus `residual` (n, L, c) when given (fused on the CPU).
        per_row = x[0].numel() * self.net[0].proj.out_features // x.shape[-1]
        rows = max(1, FF_CHUNK_ELEMENTS // max(1, per_row))
        if x.shape[0] <= rows or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self._rows(x, residual)  # an exported graph keeps its batch axis dynamic
        out = torch.empty_like(x)  # chunks written in place: the output is held once
        for s in range(0, x.shape[0], rows):
            out[s:s + rows] = self._rows(x[s:s + rows], None if residual is None else residual[s:s + rows])
        return out

    def _rows(self, x, residual):
        return fused.layer(self.net[0](x), self.net[2], residual)


@dataclass
class ReferenceState:
    """What the spatial transformer blocks need to know about the reference in one UNet call.

    - `kv`: the reference K/V cache, one (k, v) pair (1, m, c) per transformer block, or None.
    - `runs`: (start, stop, use_reference) over the flattened frame rows, so that the uncond rows
      run plain self-attention and never touch the reference (Moore semantics).
    - `bank`: when not None, blocks append their norm1 output (the ReferenceNet's "write" mode).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    runs: list[tuple[int, int, bool]] = field(default_factory=list)
    bank: list[torch.Tensor] | None = None
    bank_limit: int | None = None

    def row_flags(self) -> tuple[bool, ...] | None:
        """Per frame row: does it read the reference? None when every row does. Host values: the
        plain path splits the batch by them without reading anything back from the device (no
        sync inside a CUDA graph capture, no graph break under torch.compile), and the kernel
        path's device copy is cached by `attention.reference_attention`."""
        if not self.runs or all(use for _, _, use in self.runs):
            return None
        return tuple(use for start, stop, use in self.runs for _ in range(stop - start))

    @staticmethod
    def row_runs(use_reference: list[bool] | tuple[bool, ...], frames: int) -> list[tuple[int, int, bool]]:
        runs, start = [], 0
        for flag, group in groupby(use_reference):
            n = len(list(group)) * frames
            runs.append((start, start + n, bool(flag)))
            start += n
        return runs


class BankComplete(Exception):
    """Raised by the last recording block: the ReferenceNet needs nothing after its last bank."""


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer norm, GEGLU) with reference attention in attn1."""

    def __init__(self, dim: int, heads: int, context_dim: int, index: int):
        super().__init__()
        self.index = index  # position among the UNet's transformer blocks: the bank/K/V slot
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def self_attention(self, x: torch.Tensor, ref: ReferenceState | None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
        # x (n, L, c) = norm1 output of n frames; the result plus `residual` when given.
        a = self.attn1
        if fused.active(x):
            # The CPU: q, k and v from one GEMM; they are column slices of its output, which
            # SDPA and `strided_attention` read in place (views, no copies)
            w, _ = fused.stacked(a, (a.to_q, a.to_k, a.to_v))
            q, k, v = fused.linear(x, w, None).split(a.to_q.out_features, dim=-1)
        else:
            q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
        if ref is None or ref.kv is None:
            return a.project_out(attn_math.attention(q, k, v, a.heads), residual)
        k_ref, v_ref = ref.kv[self.index]
        # One call for cond and uncond rows: the kernel skips the reference per row; the plain
        # path splits the batch into runs of equal flags.
        out = attn_math.reference_attention(q, k, v, k_ref, v_ref, a.heads, ref.row_flags())
        return a.project_out(out, residual)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ref: ReferenceState | None = None):
        # x (n, L, c) tokens, context (n, S, context_dim)
        h = fused.layer_norm(x, self.norm1)
        if ref is not None and ref.bank is not None:
            ref.bank.append(h)
            if ref.bank_limit is not None and len(ref.bank) >= ref.bank_limit:
                raise BankComplete
        x = self.self_attention(h, ref, residual=x)
        cross = self.cross_attention(x, context)
        # x is the fresh output of the self-attention's epilogue: add in place outside autograd.
        x = x + cross if torch.is_grad_enabled() else x.add_(cross)
        return self.ff(fused.layer_norm(x, self.norm3), residual=x)

    def cross_attention(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (n, L, c), context (n, S, d) -> (n, L, c), or (n, 1, c) to broadcast when S = 1.
        # Animate Anyone's context is one CLIP image token: attn2 is then the same vector for
        # every token of a frame (Attention.one_token), and its query projection, attention and
        # per-token output projection (2 L c^2 multiply-adds a row) are skipped. Under autograd
        # (training) the attention runs as written: to_q, to_k and norm2 then get their gradients
        # (zero), and the optimiser treats them as the training recipe always has (weight decay).
        if context.shape[1] == 1 and not torch.is_grad_enabled():
            return self.attn2.one_token(context)
        return self.attn2(self.norm2(x), context)


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel with conv (1x1) projections, one block deep (SD1.5)."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, index: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim, index)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ref: ReferenceState | None = None):
        # x (n, c, h, w) -> (n, c, h, w), in x's memory layout
        n, c, hh, ww = x.shape
        if takes_nhwc_path(x):
            return self._forward_nhwc(x, context, ref)
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
        for block in self.transformer_blocks:
            h = block(h, context, ref)
        h = h.reshape(n, hh, ww, c).permute(0, 3, 1, 2)
        return self.proj_out(h.contiguous()) + x

    def _forward_nhwc(self, x: torch.Tensor, context: torch.Tensor, ref: ReferenceState | None):
        # In channels-last memory x (n, c, h, w) is the token matrix (n, h*w, c): the 1x1
        # projections run as linear layers on it and nothing is permuted or copied.
        n, c, hh, ww = x.shape
        normed = attn_math.group_norm_silu(x, self.norm.num_groups, self.norm.weight, self.norm.bias,
                                           self.norm.eps, silu=False)
        tokens = normed.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # views
        pin, pout = self.proj_in, self.proj_out
        h = fused.linear(tokens, pin.weight.view(c, c), pin.bias)
        for block in self.transformer_blocks:
            h = block(h, context, ref)
        residual = x.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
        out = fused.linear_add(h, pout.weight.view(c, c), pout.bias, residual)
        return out.view(n, hh, ww, c).permute(0, 3, 1, 2)
