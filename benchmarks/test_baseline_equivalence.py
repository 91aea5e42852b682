"""The Moore-style baseline computes what aa-trt computes (and what Moore computed), so every
ratio in these benchmarks compares equal outputs. Plain pytest tests: no timing here."""
import json

import numpy as np
import pytest
import torch

from aa_trt.config import PRESETS
from aa_trt.models.layers import TransformerBlock
from aa_trt.models.reference_kv import quantize_bank
from aa_trt.pipeline import Animator

from .flops import count_flops
from .moore_baseline import (MooreConditioning, moore_animate, moore_attention, moore_banks,
                             moore_unet_step)
from .workloads import FIXTURE, max_abs, pipeline_pair, step_pair, unet_models, video_inputs

# Both sides are fp32 with the same fp16-rounded bank; only reduction order differs.
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_step_matches_aa_trt(tiny_animator):
    # 30 frames: two windows, the second wrapping around the end, with CFG.
    pair = step_pair(tiny_animator, frames=30, height=64, width=64)
    ours, moore = pair.ours(), pair.moore()
    assert ours.shape == moore.shape == (1, 4, 30, 8, 8)
    assert max_abs(ours, moore) < ATOL, max_abs(ours, moore)


def test_pipeline_matches_aa_trt(tiny_animator):
    # Animator.__call__ against moore_animate, and the staged runs the benchmarks time.
    ref, poses, latents = video_inputs(30, 64, 64)
    ours = tiny_animator(ref, poses, steps=2, latents=latents, progress=False)
    moore = moore_animate(tiny_animator, ref, poses, latents, steps=2)
    assert ours.shape == moore.shape == (30, 64, 64, 3)
    assert max_abs(ours, moore) < ATOL, max_abs(ours, moore)
    pair = pipeline_pair(tiny_animator, frames=30, height=64, width=64, steps=2)
    assert max_abs(pair.ours(), ours) < ATOL and max_abs(pair.moore(), ours) < ATOL


def test_uncond_half_ignores_bank_row_0(tiny_animator):
    """Moore computes reference attention for the uncond half and throws it away: noise on the
    bank's uncond row must change nothing (the fixture README checked the same on Moore)."""
    anim = tiny_animator
    g = torch.Generator().manual_seed(1)
    clip, lat = torch.randn(1, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    banks = moore_banks(anim, lat, clip)
    noisy = [torch.stack([b[0] + torch.randn(b[0].shape, generator=g), b[1]]) for b in banks]
    pose = torch.randn(24, 32, 8, 8, generator=g)
    x = torch.randn(1, 4, 24, 8, 8, generator=g)
    outs = [moore_unet_step(anim, MooreConditioning(clip, lat, bk, pose, 64, 64))(
        x, 500, [list(range(24))], ("uncond", "cond")) for bk in (banks, noisy)]
    assert torch.equal(outs[0], outs[1])


def test_moore_attention_restores_the_blocks(tiny_animator):
    unet = tiny_animator.models.denoising_unet
    from aa_trt import attention as attn_math

    before = attn_math.get_backend()
    with moore_attention(unet):
        assert all("self_attention" in b.__dict__ and "cross_attention" in b.__dict__
                   for b in unet.transformer_blocks())
        assert attn_math.get_backend() == "sdpa"
    assert not any("self_attention" in b.__dict__ or "cross_attention" in b.__dict__
                   for b in unet.transformer_blocks())
    assert attn_math.get_backend() == before


def test_meta_flop_count_equals_cpu_count():
    """The sd15-size FLOPs are counted on the meta device; on the tiny preset both counts agree."""
    counts = {}
    for device in ("cpu", "meta"):
        pair = step_pair(Animator(unet_models(PRESETS["tiny"], device), device=device), 30, 64, 64)
        counts[device] = (count_flops(pair.ours)[0], count_flops(pair.moore)[0])
    assert counts["cpu"] == counts["meta"]
    assert counts["cpu"][1] > counts["cpu"][0] > 0


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"golden fixture not found at {FIXTURE}")
def test_baseline_reproduces_moore_fixture(tmp_path):
    """With Moore's tiny weights and Moore's own recorded banks (both rows), one baseline UNet call
    per window gives Moore's recorded step-0 outputs (tolerance from the fixture's README)."""
    from aa_trt.convert import convert_moore

    ckpt = convert_moore(FIXTURE, FIXTURE, tmp_path / "moore_tiny.safetensors",
                         inference_config=FIXTURE / "inference.yaml", name="moore-tiny")
    anim = Animator.from_pretrained(ckpt)
    den = anim.models.denoising_unet
    path = {m.index: name for name, m in den.named_modules() if isinstance(m, TransformerBlock)}
    bank_file = np.load(FIXTURE / "ref_bank.npz")
    banks = [quantize_bank(torch.from_numpy(bank_file[path[i]]), "float16") for i in sorted(path)]
    load = lambda name: torch.from_numpy(np.load(FIXTURE / name))  # noqa: E731
    pose = load("pose_features.npy")[0].permute(1, 0, 2, 3)  # (N, C, h, w)
    cond = MooreConditioning(load("clip_embeds.npy"), load("ref_latent.npy"), banks, pose, 64, 64)
    step = moore_unet_step(anim, cond)
    init = load("init_latents.npy")
    want = load("noise_pred_step0_windows.npy")  # (window, [uncond, cond], c, F, h, w)
    windows = json.loads((FIXTURE / "windows.json").read_text())["windows"]
    for j, win in enumerate(windows):
        got = step(init[:, :, win], 999, [win], ("uncond", "cond"))
        assert max_abs(got, want[j]) < 5e-4, (j, max_abs(got, want[j]))
