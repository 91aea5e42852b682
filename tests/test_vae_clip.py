"""aa_trt's own VAE and CLIP image encoder against their oracles, diffusers' AutoencoderKL and
transformers' CLIPVisionModelWithProjection: the same state-dict keys and shapes, the same outputs
on random weights and inputs (fp32 to float rounding, bf16 to bf16 rounding), a fresh VAE drawing
the very weights diffusers draws, configs outside the implemented subset refused by name, and a
run that no longer imports either library."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aa_trt.config import PRESETS
from aa_trt.models.clip import CLIPConfig, CLIPVisionModelWithProjection
from aa_trt.models.vae import AutoencoderKL, VAEConfig

# sd15's VAE at reduced widths (the structure of sd-vae-ft-mse: 2 layers a block, 4 levels),
# the tiny preset's, and the embedded model's (16 latent channels, 1 layer a block).
VAE_CONFIGS = {
    "sd15-narrow": dict(PRESETS["sd15"].vae, block_out_channels=[32, 64, 64, 64], norm_num_groups=8),
    "tiny": dict(PRESETS["tiny"].vae),
    "small": dict(PRESETS["small"].vae),
    "no-mid-attention": dict(PRESETS["tiny"].vae, mid_block_add_attention=False, use_quant_conv=False),
}
CLIP_CONFIGS = {
    "sd15-2-layers": dict(PRESETS["sd15"].clip, num_hidden_layers=2),
    "tiny": dict(PRESETS["tiny"].clip),
    "gelu": dict(PRESETS["small"].clip, hidden_act="gelu"),
}


def _diffusers_vae(cfg):
    from diffusers import AutoencoderKL as Oracle
    return Oracle(**cfg).eval()


def _transformers_clip(cfg):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as Oracle
    c = CLIPVisionConfig(**cfg)
    c._attn_implementation = "sdpa"
    return Oracle(c).eval(), c.to_dict()


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_matches_diffusers(name):
    cfg = VAE_CONFIGS[name]
    torch.manual_seed(0)
    ours = AutoencoderKL(VAEConfig.from_dict(cfg)).eval()
    torch.manual_seed(0)
    oracle = _diffusers_vae(cfg)
    a, b = ours.state_dict(), oracle.state_dict()
    assert list(a) == list(b) or sorted(a) == sorted(b)
    # Creation order follows diffusers', so a seeded fresh model is the same model.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Other weights than the init's (the init's zero-free biases are too regular to trust alone).
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("norm1.weight") else 0.0) for k, v in b.items()}
    ours.load_state_dict(sd)
    oracle.load_state_dict(sd)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        pa, pb = ours.encode(x).latent_dist, oracle.encode(x).latent_dist
        for what in ("mean", "std", "var", "logvar"):
            torch.testing.assert_close(getattr(pa, what), getattr(pb, what), rtol=1e-5, atol=1e-6)
        s1, s2 = pa.sample(torch.Generator().manual_seed(3)), pb.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
        z = torch.randn(pa.mean.shape, generator=g)
        torch.testing.assert_close(ours.decode(z).sample, oracle.decode(z).sample, rtol=1e-5, atol=1e-5)
        ours.to(torch.bfloat16), oracle.to(torch.bfloat16)
        zb = z.to(torch.bfloat16)
        torch.testing.assert_close(ours.decode(zb).sample.float(), oracle.decode(zb).sample.float(),
                                   rtol=1.6e-2, atol=1e-2)


def test_vae_trains_like_diffusers():
    # Stage 0 trains this module: the gradients must be diffusers' too.
    cfg = VAE_CONFIGS["tiny"]
    torch.manual_seed(0)
    ours = AutoencoderKL(VAEConfig.from_dict(cfg))
    torch.manual_seed(0)
    oracle = _diffusers_vae(cfg).train()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for m in (ours, oracle):
        d = m.encode(x).latent_dist
        (m.decode(d.mean + d.std).sample - x).square().mean().backward()
    go = dict(oracle.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, go[n].grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_clip_matches_transformers(name):
    oracle, saved = _transformers_clip(CLIP_CONFIGS[name])
    ours = CLIPVisionModelWithProjection(CLIPConfig.from_dict(saved)).eval()  # the config as convert stores it
    a, b = ours.state_dict(), oracle.state_dict()
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(b)
    size = saved["image_size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values=x).image_embeds, oracle(pixel_values=x).image_embeds,
                                   rtol=1e-5, atol=1e-6)
        ours.to(torch.bfloat16), oracle.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        torch.testing.assert_close(ours(pixel_values=xb).image_embeds.float(),
                                   oracle(pixel_values=xb).image_embeds.float(), rtol=1.6e-2, atol=1e-2)


def test_fresh_clip_draws_from_transformers_distributions():
    # Not the same draws (transformers initialises in another order), the same scales: a stage 0
    # from scratch starts where it started before.
    cfg = dict(PRESETS["sd15"].clip, num_hidden_layers=4)
    torch.manual_seed(0)
    oracle, saved = _transformers_clip(cfg)
    ours = CLIPVisionModelWithProjection(CLIPConfig.from_dict(saved))
    a, b = ours.state_dict(), oracle.state_dict()
    for k in a:
        if k.endswith("position_ids"):
            assert torch.equal(a[k], b[k])
            continue
        sa, sb = a[k].float().std().item() if a[k].numel() > 1 else 0.0, b[k].float().std().item() if b[k].numel() > 1 else 0.0
        assert sa == pytest.approx(sb, rel=0.1, abs=1e-6), k
        assert a[k].float().mean().item() == pytest.approx(b[k].float().mean().item(), abs=0.01), k


@pytest.mark.parametrize("cfg, message", [
    ({"down_block_types": ["DownBlock2D"], "block_out_channels": [8]}, r"^vae.down_block_types=\['DownBlock2D'\]"),
    ({"act_fn": "gelu"}, r"^vae.act_fn='gelu': only 'silu'"),
])
def test_vae_config_outside_the_subset_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict(cfg)


@pytest.mark.parametrize("cfg, message", [
    ({"hidden_act": "relu"}, r"^clip.hidden_act='relu'"),
    ({"attention_dropout": 0.1}, r"^clip.attention_dropout=0.1: only 0"),
    ({"hidden_size": 30, "num_attention_heads": 4}, r"^clip.hidden_size=30 is not a multiple"),
])
def test_clip_config_outside_the_subset_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        CLIPConfig.from_dict(cfg)


def test_clip_refuses_the_wrong_image_size():
    m = CLIPVisionModelWithProjection(CLIPConfig.from_dict(PRESETS["tiny"].clip))
    with pytest.raises(ValueError, match="CLIP expects 224x224 pixels, got 64x32"):
        m(pixel_values=torch.randn(1, 3, 32, 64))


def test_loading_and_running_imports_neither_library(tmp_path):
    # The reason these modules exist: diffusers and transformers cost ~5 s of imports per run.
    from aa_trt.checkpoint import build_models, save_models
    path = save_models(tmp_path / "tiny.safetensors", build_models(PRESETS["tiny"]))
    code = (
        "import sys, torch\n"
        "from aa_trt.checkpoint import load_checkpoint\n"
        f"m = load_checkpoint({str(path)!r})\n"
        "with torch.no_grad():\n"
        "    z = m.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean\n"
        "    m.vae.decode(z).sample\n"
        "    m.image_encoder(pixel_values=torch.randn(1, 3, 224, 224)).image_embeds\n"
        # Nor torch._dynamo (~1.2 s): drawing random numbers on the meta device imports it.
        "bad = [k for k in ('diffusers', 'transformers', 'torch._dynamo') if k in sys.modules]\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
