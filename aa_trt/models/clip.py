"""CLIP's image tower with its projection (transformers' CLIPVisionModelWithProjection), written here.

Same parameter names and arithmetic as transformers' class (SDPA attention), so the checkpoints'
`image_encoder.*` tensors load unchanged and `image_embeds` match (tests/test_vae_clip.py holds
transformers as the oracle); a fresh model draws from the same distributions as transformers'
initialisation. Why not import transformers: its CLIP pulls in ~4 s of imports on these CPUs, on
every `aa-trt run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from aa_trt import fused


def _fast(x: torch.Tensor) -> bool:
    """Whether the tower runs its CPU fast path on x: bf16 only, where it equals the plain bf16
    tower (and so transformers') bit for bit; in fp32 oneDNN's GEMM blocking moves the last bits
    that the oracle test holds to 1e-5."""
    return x.dtype == torch.bfloat16 and fused.active(x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class CLIPConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, cfg: dict) -> "CLIPConfig":
        """A transformers CLIPVisionConfig dict (as ModelConfig.clip stores it) -> CLIPConfig, or a
        ValueError naming the setting this implementation does not have. transformers' generic
        config keys (return_dict, output_attentions...) do not change the network: not kept."""
        if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"clip.hidden_act={cfg['hidden_act']!r}: expected one of {sorted(ACTIVATIONS)}")
        for key in ("attention_dropout", "dropout"):
            if cfg.get(key, 0.0):
                raise ValueError(f"clip.{key}={cfg[key]}: only 0 is supported")
        names = set(cls.__dataclass_fields__)
        c = cls(**{k: v for k, v in cfg.items() if k in names})
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"clip.hidden_size={c.hidden_size} is not a multiple of "
                             f"num_attention_heads={c.num_attention_heads}")
        return c


class Embeddings(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        n = (c.image_size // c.patch_size) ** 2 + 1
        # Given its (uninitialised) weight, nn.Embedding skips its own normal_ init: init_weights
        # draws it, and on the meta device nothing must (see init_weights).
        self.position_embedding = nn.Embedding(n, c.hidden_size, _weight=torch.empty(n, c.hidden_size))
        # Not in the checkpoint: on the meta device only its shape (checkpoint.load_checkpoint
        # rebuilds it), since arange there goes through torch's slow-to-import decompositions.
        ids = torch.empty((1, n), dtype=torch.long) if torch.empty(0).is_meta else torch.arange(n).expand((1, -1))
        self.register_buffer("position_ids", ids, persistent=False)
        self.image_size = c.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (b, 3, s, s) -> (b, 1 + patches, d)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP expects {self.image_size}x{self.image_size} pixels, got "
                             f"{pixels.shape[-1]}x{pixels.shape[-2]}")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


class Attention(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        d = c.hidden_size
        self.heads, self.head_dim = c.num_attention_heads, d // c.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, l, d)
        if _fast(x):
            return self._forward_fused(x)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # (b, heads, l, hd)
        return self.out_proj(h.transpose(1, 2).reshape(*x.shape[:-1], -1).contiguous())

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # The CPU: q, k and v from one GEMM with their biases in its epilogue (a bf16 addmm first
        # copies each broadcast bias into its output); SDPA reads the heads as strided views of
        # it and writes token-major, so the heads merge by a view.
        b, l, d = x.shape
        w, bias = fused.stacked(self, (self.q_proj, self.k_proj, self.v_proj))
        qkv = fused.linear(x, w, bias).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim ** -0.5)
        return fused.linear(h.transpose(1, 2).reshape(b, l, d), self.out_proj.weight, self.out_proj.bias)


class MLP(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return self.fc2(self.act(self.fc1(x)))
        # The CPU: the biases in the GEMMs' epilogues; quick GELU's x * sigmoid(1.702 x) in place
        # on fc1's fresh output, in the same order of operations.
        h = fused.linear(x, self.fc1.weight, self.fc1.bias)
        h = h.mul_(torch.mul(h, 1.702).sigmoid_()) if self.act is quick_gelu else self.act(h)
        return fused.linear(h, self.fc2.weight, self.fc2.bias)


class EncoderLayer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(c.num_hidden_layers)])


class VisionTransformer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # transformers' spelling
        self.encoder = Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # -> pooled (b, d)
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0, :])


class CLIPVisionModelWithProjection(nn.Module):
    """`model(pixel_values=x).image_embeds`, (b, projection_dim), as transformers' class answers."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' CLIP initialisation: normal weights with per-layer scales, zero biases,
        unit LayerNorms (the same distributions, not the same draws). Skipped on the meta device
        (a checkpoint load), where normal_ runs torch's reference decompositions, whose first use
        imports torch._dynamo (~1.2 s)."""
        if self.visual_projection.weight.is_meta:
            return
        c, f = self.config, self.config.initializer_factor
        d = c.hidden_size
        emb = self.vision_model.embeddings
        nn.init.normal_(emb.class_embedding, std=d ** -0.5 * f)
        nn.init.normal_(emb.patch_embedding.weight, std=c.initializer_range * f)
        nn.init.normal_(emb.position_embedding.weight, std=c.initializer_range * f)
        in_std = d ** -0.5 * (2 * c.num_hidden_layers) ** -0.5 * f
        for layer in self.vision_model.encoder.layers:
            a, m = layer.self_attn, layer.mlp
            for lin, std in ((a.q_proj, in_std), (a.k_proj, in_std), (a.v_proj, in_std), (a.out_proj, d ** -0.5 * f),
                             (m.fc1, (2 * d) ** -0.5 * f), (m.fc2, in_std)):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.visual_projection.weight, std=d ** -0.5 * f)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:  # (b, 3, s, s), normalised
        return SimpleNamespace(image_embeds=self.visual_projection(self.vision_model(pixel_values)))
