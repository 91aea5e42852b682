"""The whole pipeline at SD1.5's structure (half widths), on the CPU: the Moore-style pipeline in
fp32 against aa-trt in fp32 and aa-trt at `--dtype auto` (what this machine picks: bf16 with
AMX-BF16 or AVX512-BF16, fp32 without), in one run, round by round.

Half widths (UNet 160/320/640/640, VAE 64/128/256/256; CLIP ViT-L/14 and everything else as
sd15) keep a round to minutes on 2 cores with the layout, kernels and attention shapes of SD1.5
(head dim 20 instead of 40: the attention is relatively dearer here than at full width). Random
weights; 256x256, 16 frames (one window), 4 DDIM steps, CFG 3.5. The results file records the
CPU's model and its bf16/AVX flags (machine.describe) and what auto chose.
"""
import copy
import dataclasses
import statistics

import pytest
import torch

from aa_trt.pipeline import Animator, vae_dtype_for
from aa_trt.precision import choose

from .moore_baseline import moore_animate
from .op_profile import sd15_half_config
from .timing import PER_ROUND, compare
from .workloads import full_models, video_inputs

SIZE = dict(frames=16, height=256, width=256, steps=4, guidance=3.5)


sd15_half = sd15_half_config  # SD1.5's structure at half widths (benchmarks/op_profile.py)


def _animator(models, dtype: torch.dtype) -> Animator:
    m = copy.deepcopy(models)
    for name, module in m.components().items():
        module.to(vae_dtype_for(dtype) if name == "vae" else dtype)
    return Animator(m, "cpu", dtype)


@pytest.fixture(scope="module")
def animators():
    models = full_models(sd15_half(), seed=0)
    auto = choose("auto", "cpu")
    fp32 = _animator(models, torch.float32)
    fast = fp32 if auto.name == "fp32" else _animator(models, auto.torch_dtype())
    return fp32, fast, auto


def _psnr(frames, reference) -> float:
    """PSNR (dB) of frames in [0, 1] against reference frames."""
    diff = torch.as_tensor(frames - reference).double()
    return 10 * torch.log10(1 / (diff ** 2).mean()).item()


def _label() -> str:
    return ("sd15 half widths, {width}x{height}, {frames} frames, {steps} steps, CFG {guidance}, "
            "CPU, {threads} threads").format(**SIZE, threads=torch.get_num_threads())


def _ours(animator, ref, poses, latents):
    def run():
        cond = animator.prepare(ref, poses)
        out = animator.denoise(cond, latents, steps=SIZE["steps"], guidance=SIZE["guidance"], progress=False)
        return animator.decode(out)
    return run


@pytest.mark.benchmark(group="pipeline-sd15-half-cpu")
def test_whole_pipeline_fp32_and_auto(benchmark, animators, rounds, record):
    fp32, fast, auto = animators
    ref, poses, latents = video_inputs(SIZE["frames"], SIZE["height"], SIZE["width"])
    frames = {}

    def moore():
        frames["moore"] = moore_animate(fp32, ref, poses, latents, steps=SIZE["steps"], guidance=SIZE["guidance"])

    ours_fp32, ours_auto = _ours(fp32, ref, poses, latents), _ours(fast, ref, poses, latents)

    def probe():  # aa-trt fp32, timed in the same round as the other two
        frames["fp32"] = ours_fp32()

    t = compare(benchmark, lambda: frames.__setitem__("auto", ours_auto()), moore, rounds, warmup=0,
                probe=probe)
    fp32_s = t.probe
    # fp32 is the same computation as the baseline (Moore-exact); auto is within bf16's error.
    assert abs(frames["fp32"] - frames["moore"]).max() < 1e-3
    psnr = _psnr(frames["auto"], frames["fp32"])
    s = t.summary()
    label = _label()
    per_round_fp32 = [b / o for b, o in zip(t.baseline, fp32_s)]
    details = dict(s, fp32_s=fp32_s, auto=dataclasses.asdict(auto), psnr_auto_vs_fp32_db=psnr)
    benchmark.extra_info.update(details)
    record(f"whole pipeline, aa-trt fp32 ({label})", statistics.median(fp32_s), "s",
           baseline=s["baseline_median_s"], ratio=statistics.median(per_round_fp32), ratio_of=PER_ROUND,
           details=details)
    record(f"whole pipeline, aa-trt --dtype auto = {auto.name} ({auto.reason}) ({label})",
           s["ours_median_s"], "s", baseline=s["baseline_median_s"], ratio=s["speedup_per_round"],
           ratio_of=PER_ROUND, details=details)
    record(f"frames of --dtype auto ({auto.name}) against fp32's, PSNR ({label})", psnr, "dB")


@pytest.fixture(scope="module")
def openvino_animator(animators, tmp_path_factory):
    """The same fp32 models saved as a checkpoint and built with `--backend openvino` at this
    benchmark's shapes (bf16 where the CPU lists BF16, else f32): ~5 min of export, check and
    compile on 2 cores, outside the timed rounds."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'aa-trt[openvino]')")
    from aa_trt.backends.openvino import OvAnimator
    from aa_trt.checkpoint import save_models
    from aa_trt.export.build import build
    from aa_trt.export.graphs import BuildShapes

    fp32 = animators[0]
    root = tmp_path_factory.mktemp("openvino")
    ckpt = save_models(root / "sd15-half.safetensors", fp32.models)
    shapes = BuildShapes(height=SIZE["height"], width=SIZE["width"], frames=SIZE["frames"])
    build(ckpt, root / "engine", shapes, backend="openvino", log=lambda s: None)
    return OvAnimator.from_dir(root / "engine", ckpt, threads=torch.get_num_threads())


@pytest.mark.benchmark(group="pipeline-sd15-half-cpu")
def test_whole_pipeline_openvino(benchmark, animators, openvino_animator, rounds, record):
    """`run --engine DIR` on CPU: the same pipeline on the OpenVINO graphs, against the Moore-style
    fp32 pipeline in the same rounds; its frames against aa-trt fp32's (PSNR)."""
    fp32, ov = animators[0], openvino_animator
    ref, poses, latents = video_inputs(SIZE["frames"], SIZE["height"], SIZE["width"])
    ours_ov, ours_fp32 = _ours(ov, ref, poses, latents), _ours(fp32, ref, poses, latents)
    frames = {"fp32": ours_fp32(), "openvino": ours_ov()}  # also the engine's warm-up call

    def moore():
        moore_animate(fp32, ref, poses, latents, steps=SIZE["steps"], guidance=SIZE["guidance"])

    t = compare(benchmark, ours_ov, moore, rounds, warmup=0)
    psnr = _psnr(frames["openvino"], frames["fp32"])
    s = t.summary()
    label = _label()
    details = dict(s, backend=ov.backend_name, backend_reason=ov.backend_reason,
                   psnr_openvino_vs_fp32_db=psnr)
    benchmark.extra_info.update(details)
    record(f"whole pipeline, aa-trt on the OpenVINO engine = {ov.backend_name} ({ov.backend_reason}) "
           f"({label})", s["ours_median_s"], "s", baseline=s["baseline_median_s"],
           ratio=s["speedup_per_round"], ratio_of=PER_ROUND, details=details)
    record(f"frames of the OpenVINO engine ({ov.backend_name}) against aa-trt fp32's, PSNR ({label})",
           psnr, "dB")
