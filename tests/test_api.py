"""The Python API as documented: Animator.from_pretrained(...) and anim(ref, poses, ...)."""
import numpy as np
import pytest
import torch
from PIL import Image

from aa_trt import Animator
from aa_trt.errors import InputError
from helpers import max_abs, save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny.safetensors", 100)


@pytest.fixture(scope="module")
def anim(ckpt):
    return Animator.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def _inputs(n=6, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    ref = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return ref, poses


def test_call_shapes_and_seed(anim):
    ref, poses = _inputs()
    a = anim(ref, poses, steps=2, guidance=3.5, context_frames=4, context_overlap=1, seed=7, progress=False)
    assert a.shape == (6, 32, 48, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    b = anim(ref, poses, steps=2, guidance=3.5, context_frames=4, context_overlap=1, seed=7, progress=False)
    assert np.array_equal(a, b)  # same seed, same video
    c = anim(ref, poses, steps=2, guidance=3.5, context_frames=4, context_overlap=1, seed=8, progress=False)
    assert not np.array_equal(a, c)
    lat = anim(ref, poses, steps=2, context_frames=4, context_overlap=1, seed=7, output="latent", progress=False)
    assert tuple(lat.shape) == (1, 4, 6, 4, 6)


def test_latents_argument_and_window_batching(anim):
    ref, poses = _inputs(n=9)
    latents = torch.randn(1, 4, 9, 4, 6)
    kw = dict(steps=2, context_frames=4, context_overlap=2, latents=latents, output="latent", progress=False)
    one = anim(ref, poses, window_batch=1, **kw)
    many = anim(ref, poses, window_batch=3, **kw)
    assert max_abs(one, many) < 1e-5  # batching windows changes nothing but speed
    sliding = anim(ref, poses, context_schedule="sliding", **kw)
    assert sliding.shape == one.shape and max_abs(sliding, one) > 0


def test_guidance_one_runs_cond_only(anim):
    ref, poses = _inputs(n=3)
    lat = torch.randn(1, 4, 3, 4, 6)
    g1 = anim(ref, poses, steps=1, guidance=1.0, latents=lat, output="latent", progress=False)
    g3 = anim(ref, poses, steps=1, guidance=3.5, latents=lat, output="latent", progress=False)
    assert torch.isfinite(g1).all() and max_abs(g1, g3) > 1e-4


def test_width_height_resize_the_poses(anim):
    ref, poses = _inputs(n=2, h=30, w=50)
    out = anim(ref, poses, steps=1, width=40, height=24, seed=0, progress=False)
    assert out.shape == (2, 24, 40, 3)
    out = anim(ref, poses, steps=1, seed=0, progress=False)  # 30x50 rounds down to 24x48
    assert out.shape == (2, 24, 48, 3)


def test_half_precision_runs(ckpt):
    anim16 = Animator.from_pretrained(ckpt, dtype=torch.bfloat16)
    ref, poses = _inputs(n=2)
    out = anim16(ref, poses, steps=1, seed=0, progress=False)
    assert out.shape == (2, 32, 48, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("bad,match", [
    (lambda p: p.astype(np.float32), "uint8"),
    (lambda p: p[..., :2], r"\(N, H, W, 3\)"),
    (lambda p: p[:0], "no pose frames"),
])
def test_bad_poses(anim, bad, match):
    ref, poses = _inputs(n=2)
    with pytest.raises(InputError, match=match):
        anim(ref, bad(poses), steps=1, progress=False)


def test_bad_latents_and_window(anim):
    ref, poses = _inputs(n=2)
    with pytest.raises(InputError, match="latents of shape"):
        anim(ref, poses, steps=1, latents=torch.randn(1, 4, 3, 4, 6), progress=False)
    with pytest.raises(InputError, match="maximum window"):
        anim(ref, poses, steps=1, context_frames=33, progress=False)


def test_guidance_defaults_to_the_checkpoints_declared_scale(anim, monkeypatch):
    ref, poses = _inputs(n=4)
    kw = dict(steps=2, context_frames=4, context_overlap=1, seed=3, progress=False)
    assert anim.config.guidance == 3.5  # a checkpoint that declares nothing: Moore's setting
    at_2 = anim(ref, poses, guidance=2.0, **kw)
    assert not np.array_equal(at_2, anim(ref, poses, **kw))  # the default is 3.5, not 2.0
    monkeypatch.setattr(anim, "config", anim.config.replace(guidance=2.0))
    assert np.array_equal(anim(ref, poses, **kw), at_2)


def test_progress_function_gets_steps_times_windows(anim):
    ref, poses = _inputs(n=5)
    seen = []
    anim(ref, poses, steps=3, context_frames=4, context_overlap=1, seed=1, output="latent",
         progress=lambda done, total: seen.append((done, total)))
    # 5 frames in windows of 4 overlapping by 1: 2 windows; CFG batches both branches per call
    assert seen == [(i, 6) for i in range(1, 7)]
