"""The reference K/V cache: the ReferenceNet's banks, projected once per video.

Moore repeats each bank for every frame and recomputes its K/V projection in every frame, window and
step. The projection is linear and bias-free, so projecting the bank once with the denoising block's
attn1.to_k / to_v gives the same keys and values: the cache holds one (k, v) pair (1, m, c) per
transformer block, and reference attention reads it for every frame (see aa_trt.attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aa_trt.files import torch_dtype

from aa_trt.models.unet import UNet



@dataclass
class ReferenceKV:
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # per transformer block: k, v (1, m, c)

    def __len__(self):
        return len(self.pairs)

    def to(self, *args, **kw) -> "ReferenceKV":
        return ReferenceKV([(k.to(*args, **kw), v.to(*args, **kw)) for k, v in self.pairs])

    def flat(self) -> list[torch.Tensor]:
        """k0, v0, k1, v1, ...: the order of the exported graphs' inputs/outputs."""
        return [t for pair in self.pairs for t in pair]


def quantize_bank(bank: torch.Tensor, bank_dtype: str) -> torch.Tensor:
    """Moore stores the bank in fp16 (even in fp32 runs) and concatenation promotes it back."""
    return bank.to(torch_dtype(bank_dtype, "bank_dtype")).to(bank.dtype)


def project_banks(denoiser: UNet, banks: list[torch.Tensor], bank_dtype: str = "float16") -> ReferenceKV:
    """banks: (1, m_i, c_i) per block, in `transformer_blocks()` order -> ReferenceKV."""
    blocks = denoiser.transformer_blocks()
    if len(blocks) != len(banks):
        raise ValueError(f"{len(banks)} reference banks for {len(blocks)} transformer blocks")
    pairs = []
    for block, bank in zip(blocks, banks):
        bank = quantize_bank(bank, bank_dtype).to(block.attn1.to_k.weight.dtype)
        pairs.append((block.attn1.to_k(bank), block.attn1.to_v(bank)))
    return ReferenceKV(pairs)


@torch.no_grad()
def compute_reference_kv(refnet: UNet, denoiser: UNet, ref_latent: torch.Tensor,
                         context: torch.Tensor, bank_dtype: str = "float16") -> ReferenceKV:
    """ReferenceNet at t=0 on the reference latent (1, c, h, w) with its CLIP context (1, 1, D),
    cond branch only (Moore's uncond row of the bank is never read), then the projection."""
    banks = refnet.reference_bank(ref_latent, 0, context)
    return project_banks(denoiser, banks, bank_dtype)
