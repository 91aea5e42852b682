"""Pure attention math (no parameters), the single place where fast kernels plug in.

Every function takes and returns token tensors (b, n, c) with the heads folded into c, as the
projections produce them. The reference variants read one shared reference K/V (1, m, c) for every
frame of the batch: the plain version below expands it (a view) into a concatenation; the Triton
kernel of `aa_trt.kernels` reads it in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (b, n, h*d) -> (b, h, n, d)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (b, h, n, d) -> (b, n, h*d)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v.  q (b, n, c), k/v (b, m, c) -> (b, n, c)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads))
    return merge_heads(out)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_ref: torch.Tensor, v_ref: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention whose keys/values are the frame's own tokens followed by the reference's.

    q, k, v (b, n, c): the b frames' own projections; k_ref, v_ref (1, m, c): the reference K/V,
    shared by all b frames. Returns (b, n, c) = softmax(q [k; k_ref]^T / sqrt(d)) [v; v_ref].
    """
    b = q.shape[0]
    k_all = torch.cat([k, k_ref.to(k.dtype).expand(b, -1, -1)], dim=1)
    v_all = torch.cat([v, v_ref.to(v.dtype).expand(b, -1, -1)], dim=1)
    return attention(q, k_all, v_all, heads)
