"""Our 2D UNet against diffusers' UNet2DConditionModel, on random weights, same state dict."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from aa_trt.config import PRESETS
from aa_trt.models import UNet
from helpers import max_abs, random_meta_


def _pair(cfg, seed=0):
    with torch.device("meta"):
        ours = UNet(cfg)
    ours = random_meta_(ours, seed).eval()
    with torch.device("meta"):  # skip diffusers' own random init: every tensor is assigned below
        ref = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)  # same names, same shapes
    return ours, ref


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])  # (6, 10): not a multiple of 2**levels
def test_tiny_unet_matches_diffusers(hw):
    cfg = PRESETS["tiny"].unet
    ours, ref = _pair(cfg)
    x = torch.randn(3, 4, *hw)
    ctx = torch.randn(3, 1, cfg.cross_attention_dim)
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, ctx).sample
    assert a.shape == b.shape
    assert max_abs(a, b) < 1e-5, max_abs(a, b)


def test_sd15_widths_unet_matches_diffusers():
    # SD1.5 widths and depth (4 levels, 2 layers, 8 heads, 768 context) at a 16x16 latent.
    cfg = PRESETS["sd15"].unet
    ours, ref = _pair(cfg, seed=1)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 1, 768)
    with torch.no_grad():
        a = ours(x, 321, ctx)
        b = ref(x, 321, ctx).sample
    scale = b.abs().max().item()
    assert max_abs(a, b) < 1e-4 * max(1.0, scale), (max_abs(a, b), scale)


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("dim,shift", [(320, 0.0), (321, 1.0)])
def test_timestep_embedding_equals_diffusers(flip, dim, shift):
    # Bit-equal, not close: the embedding is written as one concatenation in its final order
    # (no swap, for OpenVINO's sake) and must still be diffusers' get_timestep_embedding exactly.
    from diffusers.models.embeddings import get_timestep_embedding

    from aa_trt.models.layers import timestep_embedding

    t = torch.cat([torch.tensor([999.0, 0.0]), torch.rand(6) * 1000])
    assert torch.equal(timestep_embedding(t, dim, flip, shift), get_timestep_embedding(t, dim, flip, shift))
    for one in (t[:1], t[-1:]):  # one timestep: the exported graphs' path (product before reshape)
        assert torch.equal(timestep_embedding(one, dim, flip, shift), get_timestep_embedding(one, dim, flip, shift))
