"""Device memory of a run at SD1.5 size, counted from tensor allocations on the meta device
(benchmarks/device_memory.py): no GPU is needed, and none was lent when this was written, so
these are counts, not CUDA measurements. A count is the sum of live tensor storages
(`torch.cuda.memory_allocated`'s view); the CUDA context (~0.3-0.5 GB), cuDNN/cuBLAS workspaces
and the caching allocator's slack come on top.

The goal: a 512x768 run with 24-frame windows within 8 GB of GPU memory, whatever the
video's length (fp16 weights, `--offload`).
"""
import pytest
import torch
import torch.nn.functional as F

from aa_trt.checkpoint import build_models
from aa_trt.config import PRESETS
from aa_trt.pipeline import Animator

from .device_memory import GiB, AllocationCounter, count_moore_run, count_run, counting, module_bytes


# ---------------------------------------------------------------------------- the counter itself
def test_counter_follows_storages_not_views():
    w = torch.empty(1000, 1000, device="meta")  # made before counting: a weight, not counted
    c = AllocationCounter("meta")
    with counting(c):
        a = torch.empty(1000, 1000, device="meta")
        b = a + 1
        v, wt = b.view(-1), w.t()  # views allocate nothing
        assert c.current == 8_000_000
        del a
        d = b @ wt
        d.add_(1)  # in place: nothing new
        assert (c.current, c.peak) == (8_000_000, 8_000_000)
        del b  # its storage lives on in v
        assert c.current == 8_000_000
        del v
        assert c.current == 4_000_000
        del d, wt
    assert c.current == 0 and c.peak == 8_000_000


def test_counter_meta_equals_cpu_on_a_unet_call():
    """The same module call counted on real CPU tensors and on the meta device: equal."""
    from aa_trt.models import UNet

    cfg = PRESETS["tiny"]
    counts = {}
    for dev in ("cpu", "meta"):
        with torch.device(dev):
            unet = UNet(cfg.unet, cfg.motion).eval()
            x = torch.randn(4, cfg.unet.in_channels, 8, 8)
            ctx = torch.randn(4, 1, cfg.unet.cross_attention_dim)
        c = AllocationCounter(dev)
        with torch.no_grad(), counting(c):
            out = unet(x, 10, ctx, frames=2)
            del out
        counts[dev] = (c.peak, c.current)
    assert counts["cpu"] == counts["meta"] and counts["cpu"][0] > 0


def test_attention_counted_as_flash():
    """Counted as the flash kernel allocates (output + log-sum-exp), not as the meta device's
    math fallback (which would hold the n x m score matrix)."""
    q = torch.empty(2, 8, 4096, 64, device="meta", dtype=torch.float16)
    c = AllocationCounter("meta")
    with counting(c):
        out = F.scaled_dot_product_attention(q, q, q)
    assert tuple(out.shape) == tuple(q.shape)
    # output fp16 + log-sum-exp fp32 + the kernel's 24 bytes of RNG seed and offset
    assert c.peak == q.numel() * 2 + 2 * 8 * 4096 * 4 + 24


# ---------------------------------------------------------------------------- SD1.5-size runs
@pytest.fixture(scope="module")
def sd15_meta():
    models = build_models(PRESETS["sd15"], "meta")
    for name, module in models.components().items():
        # The VAE runs in fp32 in a fp16 run (Animator: SD's VAE overflows in fp16).
        module.to(torch.float32 if name == "vae" else torch.float16).eval().requires_grad_(False)
    return Animator(models, device="meta", dtype=torch.float16)


RUNS = [(512, 768, 24, True), (512, 768, 96, True), (512, 768, 240, True), (512, 768, 24, False),
        (512, 768, 240, False), (512, 512, 24, True), (768, 768, 24, True)]


def test_run_memory_against_length_and_size(sd15_meta, record):
    runs = {(w, h, n, off): count_run(sd15_meta, n, w, h, offload=off) for w, h, n, off in RUNS}
    m = sd15_meta.models
    weights = {name: module_bytes(mod) for name, mod in m.components().items()}
    for (w, h, n, off), r in runs.items():
        record(f"device memory of a run, counted (sd15 fp16, {w}x{h}, {n} frames, 24-frame windows, CFG, "
               f"{'--offload' if off else 'no offload'}): peak of conditioning / denoising / decoding = "
               + " / ".join(f"{r['peak'][k] / GiB:.2f}" for k in ("conditioning", "denoising", "decoding"))
               + f" GiB, decode chunk {r['decode_chunk']}", r["run_peak"], "bytes",
               details=dict(r, weights_by_component=weights))
    short, long = runs[512, 768, 24, True], runs[512, 768, 240, True]
    # Flat in length: with offload only latent-sized buffers (~0.4 MB a frame: the latents, the
    # two branch sums, DDIM's temporaries, fp32 at 96x64) grow with the video.
    for phase in ("denoising", "decoding"):
        growth = long["peak"][phase] - short["peak"][phase]
        record(f"device memory growth of the {phase} peak from 24 to 240 frames, 512x768, --offload "
               f"(counted)", growth, "bytes", details=dict(per_frame=growth / 216))
        assert growth < 216 * 0.5 * 2**20, (phase, growth)
    # The goal: within 8 GB counted, leaving room for the context and allocator slack.
    assert long["run_peak"] < 7 * GiB, long["peak"]


@pytest.fixture(scope="module")
def moore_meta():
    """Moore runs every model in its weight_dtype (fp16), the VAE included."""
    models = build_models(PRESETS["sd15"], "meta")
    for module in models.components().values():
        module.to(torch.float16).eval().requires_grad_(False)
    animator = Animator(models, device="meta", dtype=torch.float16)
    animator.vae_dtype = torch.float16
    return animator


@pytest.mark.parametrize("frames", [24, 240])
def test_run_memory_against_moore_style(sd15_meta, moore_meta, frames, record):
    ours = count_run(sd15_meta, frames, 512, 768, offload=True)
    moore = count_moore_run(moore_meta, frames, 512, 768)
    record(f"device memory of a run, counted (sd15 fp16, 512x768, {frames} frames, 24-frame windows, CFG; "
           f"aa-trt --offload vs Moore-style, all models resident)", ours["run_peak"], "bytes",
           baseline=moore["run_peak"], ratio=moore["run_peak"] / ours["run_peak"],
           ratio_of="baseline / aa-trt: x less", details=dict(ours=ours, baseline=moore))
    assert moore["run_peak"] > ours["run_peak"]
