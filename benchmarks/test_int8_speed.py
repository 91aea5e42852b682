"""int8 on the CPU engine: `aa-trt build --backend openvino --precision int8` against the bf16
build of the same checkpoint, at SD1.5's structure (half widths, benchmarks/op_profile.py).

- The denoising UNet step (the cond graph, 16 frames at 256x256: 32x32 latents, the K/V cache
  at every level), int8 engine against the bf16 engine, round by round on the same inputs.
- The frames of a whole run on the int8 engine against aa-trt's fp32 torch path (PSNR; the target
  is >= 35 dB), and the bf16 engine's for comparison: random weights, random reference and
  pose frames (benchmarks/workloads.video_inputs), 4 DDIM steps, CFG 3.5, one 16-frame window.

The int8 build calibrates on the bundled example (examples/ref.png + dance.mp4) rendered at the
build's size for 4 DDIM steps (the workload's own), seed 0: 4 samples per UNet graph; the PSNR's
inputs are other ones. Builds (~25 min on 2 busy cores: export, checks, calibration render, NNCF
on two UNet graphs; ~14 GB of memory at the peak) happen outside the timed rounds. The results file records the CPU's model and flags
(machine.describe); the int8 unit found is in the details.
"""
import time

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'aa-trt[export]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'aa-trt[openvino]')")
pytest.importorskip("nncf", reason="nncf not installed (pip install 'aa-trt[openvino]')")

from aa_trt.backends import openvino as ovb  # noqa: E402
from aa_trt.pipeline import Animator  # noqa: E402

from .op_profile import sd15_half_config  # noqa: E402
from .timing import PER_ROUND, compare  # noqa: E402
from .workloads import full_models, video_inputs  # noqa: E402

SIZE = dict(frames=16, height=256, width=256, steps=4, guidance=3.5)
CALIBRATION_STEPS = 4


def _label() -> str:
    return ("sd15 half widths, {width}x{height}, {frames} frames, {steps} steps, CFG {guidance}, "
            "CPU, {threads} threads").format(**SIZE, threads=torch.get_num_threads())


def _psnr(frames, reference) -> float:
    diff = torch.as_tensor(frames - reference).double()
    return 10 * torch.log10(1 / (diff ** 2).mean()).item()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(checkpoint, fp32 models, {precision: (DIR, manifest)}) for bf16 and int8; the int8 build
    starts from a copy of the bf16 one (its ONNX graphs reused)."""
    import shutil

    from aa_trt.checkpoint import save_models
    from aa_trt.export.build import build
    from aa_trt.export.int8 import CalibrationSource

    if ovb.int8_support() is None:
        pytest.skip("this CPU has no int8 dot-product unit (amx_int8, avx512_vnni, avx_vnni)")
    if "BF16" not in ovb.cpu_capabilities():
        pytest.skip("this CPU does not list BF16: no bf16 engine to compare with")
    models = full_models(sd15_half_config(), seed=0)
    root = tmp_path_factory.mktemp("int8")
    ckpt = save_models(root / "sd15-half.safetensors", models)
    shapes = _shapes()
    out = {"bf16": (root / "bf16", build(ckpt, root / "bf16", shapes, backend="openvino", precision="bf16",
                                          log=lambda s: None))}
    shutil.copytree(root / "bf16", root / "int8")
    logs = []
    out["int8"] = (root / "int8", build(ckpt, root / "int8", shapes, backend="openvino", precision="int8",
                                        calibration=CalibrationSource(steps=CALIBRATION_STEPS), log=logs.append))
    print("\n".join(logs))
    return ckpt, models, out


@pytest.mark.benchmark(group="int8-sd15-half-cpu")
def test_unet_step_int8_vs_bf16(benchmark, builds, rounds, record):
    """One cond UNet call (16 frames, 32x32 latents, with the K/V cache): int8 engine vs bf16."""
    from aa_trt.export.graphs import graph_specs
    from aa_trt.checkpoint import load_checkpoint

    ckpt, _, out = builds
    spec = graph_specs(load_checkpoint(ckpt), _shapes())["unet_cond"]
    names = (tuple(spec.input_names), tuple(spec.output_names))
    graphs = {p: ovb.OvGraph.load(d / m["openvino"]["graphs"]["unet_cond"]["file"], names,
                                  m["openvino"]["graphs"]["unet_cond"]["precision"], torch.get_num_threads())
              for p, (d, m) in out.items()}
    inputs = spec.sample_inputs("opt", 3)
    t = compare(benchmark, lambda: graphs["int8"](**inputs), lambda: graphs["bf16"](**inputs), rounds)
    s = t.summary()
    m8 = out["int8"][1]["openvino"]
    details = dict(s, dims=spec.point("opt"), int8=m8["int8"],
                   rel_l2={p: {g: e.get("rel_l2") for g, e in m["openvino"]["graphs"].items()} for p, (_, m) in out.items()},
                   rel_l2_calibration={g: e.get("rel_l2_calibration") for g, e in m8["graphs"].items()})
    benchmark.extra_info.update(details)
    record(f"OpenVINO UNet step (unet_cond), int8 ({m8['int8']['isa']}, rest {m8['int8']['rest']}) vs bf16 "
           f"(sd15 half widths, 16 frames, 32x32 latents, CPU, {torch.get_num_threads()} threads)",
           s["ours_median_s"], "s", baseline=s["baseline_median_s"], ratio=s["speedup_per_round"],
           ratio_of=PER_ROUND, details=details)


def _shapes():
    from aa_trt.export.graphs import BuildShapes

    return BuildShapes(height=SIZE["height"], width=SIZE["width"], frames=SIZE["frames"])


@pytest.mark.benchmark(group="int8-sd15-half-cpu")
def test_int8_frames_psnr(benchmark, builds, record):
    """A whole run (4 steps, CFG 3.5, decode) on the int8 engine and on the bf16 engine against
    aa-trt's fp32 torch path: PSNR of the frames."""
    ckpt, models, out = builds
    ref, poses, latents = video_inputs(SIZE["frames"], SIZE["height"], SIZE["width"])
    kw = dict(steps=SIZE["steps"], guidance=SIZE["guidance"], context_frames=SIZE["frames"], progress=False)
    fp32 = Animator(models, "cpu", torch.float32)
    frames = {"fp32": fp32(ref, poses, latents=latents, **kw)}
    times = {}
    for p, (d, _) in out.items():
        anim = ovb.OvAnimator.from_dir(d, ckpt, threads=torch.get_num_threads())
        times[p] = []

        def run(anim=anim, p=p):
            frames[p] = anim(ref, poses, latents=latents, **kw)
        for _ in range(2):  # the first call warms the engine
            t = time.perf_counter()
            run()
            times[p].append(time.perf_counter() - t)
    benchmark.pedantic(lambda: None, rounds=1)
    psnr = {p: _psnr(frames[p], frames["fp32"]) for p in out}
    details = dict(psnr_vs_fp32_db=psnr, run_s=times, calibration=out["int8"][1]["openvino"]["int8"]["calibration"])
    benchmark.extra_info.update(details)
    label = _label()
    for p in ("int8", "bf16"):
        record(f"frames of the OpenVINO {p} engine against aa-trt fp32 torch, PSNR ({label})", psnr[p], "dB",
               details=details)
    record(f"whole run on the OpenVINO int8 engine, second call ({label})", times["int8"][-1], "s",
           baseline=times["bf16"][-1], ratio=times["bf16"][-1] / times["int8"][-1],
           ratio_of="bf16 engine / int8 engine, one run each: x faster", details=details)
    assert frames["int8"].shape == frames["fp32"].shape == (SIZE["frames"], SIZE["height"], SIZE["width"], 3)
