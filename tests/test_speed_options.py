"""The Animator's memory and speed options (`offload`, `compile`, `cuda_graph`; `aa-trt run
--offload/--compile/--cuda-graph`) against the plain eager path, tiny preset, random weights.

On CPU: offload is a no-op with bit-identical output; CUDA graphs are refused; a torch.compile
failure becomes one InputError. The compiled-vs-eager comparison is @slow (inductor compiles C++
for a minute or more). The memory and CUDA-graph checks need a CUDA GPU and skip without one.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from aa_trt import Animator
from aa_trt.errors import InputError
from aa_trt.guidance import context_windows
from helpers import max_abs, save_tiny_checkpoint

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("speed") / "tiny.safetensors", 300)


def _inputs(n=6, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    ref = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return ref, rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


KW = dict(steps=2, guidance=3.5, context_frames=4, context_overlap=1, seed=7, progress=False)


# ------------------------------------------------------------------------------ offload
def test_offload_on_cpu_is_a_noop_with_identical_output(ckpt):
    ref, poses = _inputs(n=4)
    plain = Animator.from_pretrained(ckpt)(ref, poses, **KW)
    anim = Animator.from_pretrained(ckpt, offload=True)
    assert np.array_equal(anim(ref, poses, **KW), plain)
    # What it moves on a GPU run: the ReferenceNet, CLIP and the VAE's encoder half, nothing the
    # denoising loop or the decoder reads.
    m, moved = anim.models, anim.conditioning_models()
    for mod in (m.reference_unet, m.image_encoder, m.vae.encoder):
        assert any(mod is x for x in moved)
    for mod in (m.denoising_unet, m.pose_guider, m.vae.decoder, m.vae.post_quant_conv):
        assert not any(mod is x for x in moved)
    assert not anim._offloaded


@needs_cuda
def test_offload_lowers_peak_memory_while_denoising(ckpt):
    """Peak allocated CUDA memory during denoising, same Animator with offload off, on, off
    again (the models come back for the next video): lower by at least half the offloaded
    weights' bytes, and the same latents every time."""
    anim = Animator.from_pretrained(ckpt, device="cuda")
    ref, poses = _inputs(n=8)
    moved = sum(p.numel() * p.element_size() for mod in anim.conditioning_models() for p in mod.parameters())

    def denoise_peak(offload: bool):
        anim.set_options(offload=offload)
        cond = anim.prepare(ref, poses)
        where = {p.device.type for mod in anim.conditioning_models() for p in mod.parameters()}
        assert where == {"cpu" if offload else "cuda"}
        # The pose features (the one conditioning tensor that grows with the video) stay on the host.
        assert cond.pose_features.device.type == ("cpu" if offload else "cuda")
        assert cond.pose_features.is_pinned() == offload
        latents = anim.initial_latents(cond, 0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = anim.denoise(cond, latents, steps=2, context_frames=4, context_overlap=1, progress=False)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), out.cpu()

    peak_on, out_on = denoise_peak(False)
    peak_off, out_off = denoise_peak(True)
    peak_back, out_back = denoise_peak(False)
    assert peak_off <= peak_on - moved // 2, (peak_on, peak_off, moved)
    assert max_abs(out_on, out_off) < 1e-6 and max_abs(out_on, out_back) < 1e-6


def test_feed_forward_in_row_chunks_equals_whole(monkeypatch):
    """Above layers.FF_CHUNK_ELEMENTS inner elements the feed-forward runs its rows in chunks
    (the step's largest buffers at 512x768): same result, rows independent."""
    from aa_trt.models import layers

    torch.manual_seed(0)
    ff = layers.FeedForward(24).eval()
    x = torch.randn(7, 13, 24)
    with torch.no_grad():
        whole = ff(x)
        monkeypatch.setattr(layers, "FF_CHUNK_ELEMENTS", 13 * 24 * 4 * 2 * 3)  # 3 rows a chunk
        chunked = ff(x)
    assert max_abs(chunked, whole) < 1e-6 and chunked.abs().max() > 0


def test_default_decode_chunk_shrinks_with_frame_size(ckpt):
    from aa_trt.pipeline import default_decode_chunk

    assert default_decode_chunk(128, 128) == 8 and default_decode_chunk(512, 512) == 4
    assert default_decode_chunk(768, 512) == 2 and default_decode_chunk(768, 768) == 1
    anim = Animator.from_pretrained(ckpt)
    z = torch.randn(1, anim.config.latent_channels, 5, 4, 6)
    # oneDNN picks its convolution algorithm by batch size: equal within fp32 rounding
    assert np.abs(anim.decode(z) - anim.decode(z, chunk=2)).max() < 1e-5


# ------------------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compiled_unet_equals_eager(ckpt):
    ref, poses = _inputs(n=5)
    kw = dict(KW, output="latent", window_batch=2)
    eager = Animator.from_pretrained(ckpt)(ref, poses, **kw)
    compiled = Animator.from_pretrained(ckpt, compile=True)(ref, poses, **kw)
    assert max_abs(compiled, eager) < 1e-4


def test_compile_failure_is_one_input_error(ckpt, monkeypatch):
    import torch._dynamo

    def broken_backend(module, **kw):
        def call(*a, **k):
            raise torch._dynamo.exc.TorchDynamoException("backend exploded\nC++ compile log ...")
        return call

    anim = Animator.from_pretrained(ckpt, compile=True)
    ref, poses = _inputs(n=2)
    monkeypatch.setattr(torch, "compile", broken_backend)
    with pytest.raises(InputError, match="^compile=True: torch.compile failed.*run without it") as e:
        anim(ref, poses, **KW)
    assert "\n" not in str(e.value) and "backend exploded" in str(e.value)
    assert e.value.as_flag().startswith("--compile: torch.compile failed")  # what the CLI prints

    def unsupported(module, **kw):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    anim.set_options(compile=False)
    anim.set_options(compile=True)  # a fresh compiled call
    with pytest.raises(InputError, match="not supported on this Python.*run without it"):
        anim(ref, poses, **KW)


# ------------------------------------------------------------------------------ CUDA graphs
def test_cuda_graph_refused_off_cuda(ckpt):
    with pytest.raises(InputError, match="^cuda_graph=True: needs a CUDA device"):
        Animator.from_pretrained(ckpt, cuda_graph=True)


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_cuda_graph_equals_eager(ckpt, dtype, tol):
    """Two videos of 9 frames, 3 windows a step in batches of 2 and 1: two graphs (one per shape),
    captured on the first video and replayed with the second one's reference K/V; final latents
    against eager within tol (fp16: the Triton kernels run inside the graph)."""
    eager = Animator.from_pretrained(ckpt, device="cuda", dtype=dtype)
    graphed = Animator.from_pretrained(ckpt, device="cuda", dtype=dtype, cuda_graph=True)
    kw = dict(steps=3, context_frames=4, context_overlap=1, window_batch=2, output="latent", progress=False)
    c, f = eager.config.latent_channels, eager.config.latent_factor
    for seed in (0, 1):
        ref, poses = _inputs(n=9, seed=seed)
        lat = torch.randn(1, c, 9, 32 // f, 48 // f, generator=torch.Generator().manual_seed(seed))
        a = eager(ref, poses, latents=lat, **kw)
        b = graphed(ref, poses, latents=lat, **kw)
        assert max_abs(a.cpu(), b.cpu()) < tol
    assert len(context_windows(9, 4, 1, "uniform")) == 3
    assert len(graphed.unet_call().graphs) == 2
