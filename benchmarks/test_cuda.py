"""On a CUDA GPU: the denoising step at sd15 widths, 512x768, 24 frames, CFG, bf16, aa-trt against
the Moore-style step; its MFU against this GPU's measured bf16 matmul rate; and one UNet call with
CUDA graphs on against off. Skipped, with the reason, where torch sees no CUDA device.
"""
import pytest
import torch

from aa_trt.config import PRESETS
from aa_trt.models.layers import ReferenceState
from aa_trt.models.reference_kv import compute_reference_kv
from aa_trt.pipeline import Animator

from .flops import count_flops
from .machine import matmul_rate
from .timing import PER_ROUND, compare
from .workloads import step_pair, unet_models


def _why_no_cuda() -> str | None:
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False"


pytestmark = pytest.mark.skipif(_why_no_cuda() is not None, reason=str(_why_no_cuda()))

DEVICE, DTYPE = "cuda", torch.bfloat16
SIZE = dict(frames=24, height=768, width=512)
LABEL = "sd15 widths, 512x768, 24 frames, CFG, CUDA bf16"


@pytest.fixture(scope="module")
def sd15_cuda():
    models = unet_models(PRESETS["sd15"], DEVICE, seed=0)
    models.denoising_unet.to(DTYPE)
    models.reference_unet.to(DTYPE)
    yield Animator(models, device=DEVICE, dtype=DTYPE)
    del models
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def bf16_rate(ledger) -> dict:
    rate = matmul_rate(DEVICE, DTYPE, n=8192, reps=10)
    ledger.machine["cuda_bf16_matmul"] = rate
    return rate


@pytest.mark.benchmark(group="step-sd15-cuda")
def test_denoising_step_cuda(benchmark, sd15_cuda, bf16_rate, rounds, record):
    pair = step_pair(sd15_cuda, **SIZE)
    s = compare(benchmark, pair.ours, pair.moore, max(rounds, 5), warmup=2, device=DEVICE).summary()
    meta = step_pair(Animator(unet_models(PRESETS["sd15"], "meta"), device="meta"), **SIZE)
    flops, moore_flops = count_flops(meta.ours)[0], count_flops(meta.moore)[0]
    rate = bf16_rate["best_flops_per_s"]  # best against best, as on CPU (timing.Timings.summary)
    mfu, moore_mfu = flops / s["ours_min_s"] / rate, moore_flops / s["baseline_min_s"] / rate
    info = dict(s, **pair.params, flops=flops, baseline_flops=moore_flops,
                bf16_matmul_flops_per_s=rate, mfu=mfu, baseline_mfu=moore_mfu)
    benchmark.extra_info.update(info)
    record(f"denoising step time ({LABEL}), median of {s['rounds']}", s["ours_median_s"], "s",
           baseline=s["baseline_median_s"], ratio=s["speedup_per_round"], ratio_of=PER_ROUND,
           details=info)
    record("MFU of that step (achieved / bf16 torch.mm rate)", mfu, "fraction", baseline=moore_mfu,
           ratio=mfu / moore_mfu, ratio_of="aa-trt / baseline")


def _capture(fn):
    """A CUDA graph of fn() and its static output; warm-up on a side stream first, as capture
    requires (allocator pools and kernel selection settle before recording)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.benchmark(group="cuda-graphs-sd15")
def test_cuda_graphs_on_off(benchmark, sd15_cuda, rounds, record):
    """One aa-trt UNet call (a 24-frame window, uncond + cond rows) replayed from a CUDA graph,
    against the same call run eagerly. Static shapes: every input is a fixed CUDA tensor."""
    anim, f = sd15_cuda, SIZE["frames"]
    unet, cfg = anim.models.denoising_unet, anim.config
    h, w = SIZE["height"] // 8, SIZE["width"] // 8
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(shape, generator=g).to(DEVICE, DTYPE)  # noqa: E731
    x, pose = rand(2 * f, 4, h, w), rand(2 * f, cfg.unet.block_out_channels[0], h, w) * 0.3
    clip = rand(1, 1, cfg.unet.cross_attention_dim)
    # One context row per frame row, so the call itself repeats nothing.
    ctx = torch.cat([torch.zeros_like(clip), clip]).repeat_interleave(f, dim=0)
    kv = compute_reference_kv(anim.models.reference_unet, unet, rand(1, 4, h, w), clip, cfg.bank_dtype)
    state = ReferenceState(kv=kv.pairs, runs=ReferenceState.row_runs([False, True], f))
    t = torch.tensor(949, device=DEVICE)

    @torch.no_grad()
    def eager():
        return unet(x, t, ctx, frames=f, pose=pose, ref=state)

    graph, static_out = _capture(eager)
    s = compare(benchmark, graph.replay, eager, max(rounds, 10), warmup=2, device=DEVICE).summary()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager(), rtol=2e-2, atol=2e-2)
    info = dict(s, frames=f, height=SIZE["height"], width=SIZE["width"])
    benchmark.extra_info.update(info)
    record(f"one UNet call, CUDA graph replay ({LABEL}); baseline = the same call eager, median of "
           f"{s['rounds']}", s["ours_median_s"], "s", baseline=s["baseline_median_s"],
           ratio=s["speedup_per_round"], ratio_of="eager / graph, median of per-round ratios: x faster",
           details=info)
