"""A fast proxy for the int8 engine's quantization choices at sd15 half widths (random weights, 16
frames, 256x256: benchmarks/test_int8_speed.py's setting), minutes a variant instead of that
benchmark's 21. Run from the repository root:

    python -m benchmarks.int8_proxy prepare DIR            # export the UNet graphs, record samples
    python -m benchmarks.int8_proxy variant DIR NAME...    # quantize, held-out relative L2
    python -m benchmarks.int8_proxy frames DIR NAME...     # frames PSNR with the int8 UNet graphs
    python -m benchmarks.int8_proxy speed DIR NAME...      # unet_cond call, bf16 / int8
    python -m benchmarks.int8_proxy sensitivity DIR        # error per group of layers, FLOPs

`prepare` exports unet_cond / unet_uncond once (DIR/graphs), records the calibration the build
records (the bundled example rendered for 4 DDIM steps, seed 0, CFG 3.5: DIR/cal/ex4.*.npz) and
held-out samples with their torch fp32 outputs (the 4 steps of a render of random reference and
pose frames, benchmarks.workloads.video_inputs seed 1: DIR/cal/held1.*.npz, and its frames).
`variant` quantizes both graphs with NNCF as export.int8.quantize does, changed as VARIANTS says,
compiles them as the build does (DIR/var/NAME.GRAPH.blob) and appends to DIR/variants.jsonl the
relative L2 to torch fp32 per held-out sample and of the guided prediction u + 3.5 (c - u).
`frames` runs the torch fp32 pipeline on the held-out inputs with the int8 graphs as its UNet and
gives the frames' PSNR against torch fp32 (DIR/frames.jsonl); `speed` times one unet_cond call of
each variant against a bf16 compile, alternating rounds (DIR/speed.jsonl). Peak ~12 GB (NNCF on
one graph).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

FRAMES, SIZE, STEPS, GUIDANCE = 16, 256, 4, 3.5
GRAPH_NAMES = ("unet_cond", "unet_uncond")


def _variants() -> dict:
    """name -> (calibration sets, nncf.quantize keyword changes, extra ignored-name patterns)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as AQP
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters as SQ
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as RE

    from aa_trt.export.int8 import MOTION_MODULES as MOTION

    # the outermost level of sd15's 4 (down_blocks.0, up_blocks.3) and conv_in / conv_out
    outer = (MOTION, r".*/down_blocks\.0/.*", r".*/up_blocks\.3/.*", r".*/conv_in/.*", r".*/conv_out/.*")
    # the spatial transformers' proj_in / proj_out and feed-forward output (its input, GEGLU's
    # product, is heavy-tailed) at every level
    io = (r".*/attentions\.\d+/proj_(in|out)/.*", r".*/attentions\.\d+/transformer_blocks\.\d+/ff/MatMul")
    return {
        # the former scheme: export.int8.quantize before the motion modules were left unquantized
        "former": (("ex4",), {}, ()),
        # what export.int8.quantize does now (outer_io and up_blocks.2)
        "landed": (("ex4",), {}, "LANDED"),
        # the scheme landed before: the motion modules alone unquantized
        "motion": (("ex4",), {}, (MOTION,)),
        "minmax": (("ex4",), {"advanced_parameters": AQP(activations_range_estimator_params=RE.MINMAX)}, ()),
        "sq_off": (("ex4",), {"advanced_parameters": AQP(smooth_quant_alphas=SQ(matmul=-1))}, ()),
        "histogram": (("ex4",), {"advanced_parameters": AQP(activations_range_estimator_params=RE.HISTOGRAM)}, ()),
        "bmm": (("ex4",), {}, "BMM"),
        # `motion` with the spatial transformers' attention (self, reference, cross) unquantized
        "attn_bf16": (("ex4",), {}, (MOTION, r".*/transformer_blocks\.\d+/(to_q|to_k|to_v|to_v_1|to_out\.0)/.*",
                                     r".*/attentions\.\d+/transformer_blocks\.\d+/MatMul(_\d+)?")),
        # `motion` with weaker SmoothQuant: random weights have no outlier channels, so alpha 0.95
        # mostly moves the activations' range into the weights' rounding
        **{f"sq{round(a * 100):03d}": (("ex4",), {"advanced_parameters": AQP(smooth_quant_alphas=SQ(matmul=a))},
                                       (MOTION,)) for a in (0.25, 0.5, 0.75)},
        # `motion` and the outermost level: `sensitivity` put most of the error per FLOP there
        "outer_bf16": (("ex4",), {}, outer),
        "outer_io": (("ex4",), {}, outer + io),
        # `motion` with full (not fast) bias correction
        "fbc_off": (("ex4",), {"fast_bias_correction": False}, (MOTION,)),
    }


def _models():
    from benchmarks.op_profile import sd15_half_config
    from benchmarks.workloads import full_models

    return full_models(sd15_half_config(), seed=0)


def _specs(models):
    from aa_trt.export.graphs import BuildShapes, graph_specs

    return graph_specs(models, BuildShapes(height=SIZE, width=SIZE, frames=FRAMES))


def _n_kv(models) -> int:
    from aa_trt.models.layers import TransformerBlock

    return sum(isinstance(m, TransformerBlock) for m in models.denoising_unet.modules())


class _Recorder:
    """A stand-in for one UNet graph: records its feeds and torch fp32's output."""

    def __init__(self, spec, store: list):
        self.spec, self.store = spec, store

    def __call__(self, device="cpu", **feeds):
        sample = {n: feeds[n].detach().float().contiguous() for n in self.spec.input_names}
        with torch.no_grad():
            out = self.spec.module(*(sample[n] for n in self.spec.input_names))
        self.store.append(({n: x.numpy() for n, x in sample.items()}, out.numpy().copy()))
        return {self.spec.output_names[0]: out}


def _animator(models, unet):
    from aa_trt.pipeline import Animator

    class WithGraphs(Animator):
        def unet_call(self):
            return unet

    return WithGraphs(models, "cpu", torch.float32)


def _record(models, specs, ref, poses, seed, latents=None, decode=False):
    from aa_trt.backends.graph_animator import UNetGraphs

    samples = {g: [] for g in GRAPH_NAMES}
    unet = UNetGraphs(_Recorder(specs["unet_cond"], samples["unet_cond"]),
                      _Recorder(specs["unet_uncond"], samples["unet_uncond"]), _n_kv(models), 1, FRAMES)
    out = _animator(models, unet)(ref, poses, steps=STEPS, seed=seed, latents=latents, guidance=GUIDANCE,
                                  context_frames=FRAMES, context_overlap=0, window_batch=1, width=SIZE,
                                  height=SIZE, output="np" if decode else "latent", progress=False)
    return samples, out


def _save(path: Path, samples: dict):
    for g, items in samples.items():
        arrays = {}
        for i, (inputs, out) in enumerate(items):
            arrays.update({f"{i}/{n}": x for n, x in inputs.items()})
            arrays[f"{i}/__out"] = out
        np.savez(f"{path}.{g}.npz", **arrays)


def _load(path: Path, graph: str) -> list[tuple[dict, np.ndarray]]:
    z = np.load(f"{path}.{graph}.npz")
    count = 1 + max(int(k.split("/")[0]) for k in z.files)
    return [({k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}/") and not k.endswith("__out")},
             z[f"{i}/__out"]) for i in range(count)]


def prepare(root: Path):
    from aa_trt.export.int8 import EXAMPLES
    from aa_trt.export.onnx_io import export_graph, share_weights
    from aa_trt.pose.stage import driving_poses, video_cache_key
    from aa_trt.video import open_clip, read_image
    from benchmarks.workloads import video_inputs

    models = _models()
    specs = _specs(models)
    graphs, cal = root / "graphs", root / "cal"
    graphs.mkdir(parents=True, exist_ok=True)
    cal.mkdir(parents=True, exist_ok=True)
    for g in GRAPH_NAMES:
        export_graph(specs[g], graphs / f"{g}.onnx")
    share_weights([graphs / f"{g}.onnx" for g in GRAPH_NAMES], graphs / "unet.weights")
    ref, poses, latents = video_inputs(FRAMES, SIZE, SIZE, 1)
    samples, frames = _record(models, specs, ref, poses, 1, latents=latents, decode=True)
    _save(cal / "held1", samples)
    np.save(cal / "held1.frames.npy", frames)
    ref_path, video = EXAMPLES / "ref.png", EXAMPLES / "dance.mp4"
    ref_image = read_image(ref_path)
    poses, _ = driving_poses(open_clip(video, 0, 1, FRAMES), SIZE, SIZE, source=video, pose_video=False,
                             ref_image=ref_image, ref_source=ref_path,
                             cache_key=video_cache_key(video, 0, 1, FRAMES), progress=False)
    samples, _ = _record(models, specs, ref_image, poses, 0)
    _save(cal / "ex4", samples)


def _quantize(model, samples, kwargs: dict, extra):
    import nncf

    from aa_trt.backends.openvino import timestep_nodes
    from aa_trt.export import int8

    names = set(timestep_nodes(model, int8.UNQUANTIZED_INPUTS))
    patterns = []
    if extra == "LANDED":
        patterns = list(int8.unquantized_nodes(int8.unet_levels(model)))
    elif extra == "BMM":  # MatMuls of two activations (attention scores and their product with V)
        weights = ("Constant", "Convert", "FakeQuantize")
        names |= {n.get_friendly_name() for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"
                  and all(i.get_source_output().get_node().get_type_name() not in weights for i in n.inputs())}
    else:
        patterns = list(extra)
    scope = nncf.IgnoredScope(names=sorted(names), patterns=patterns, validate=False)
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(samples), ignored_scope=scope, **kwargs)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def variant(root: Path, name: str):
    from aa_trt.backends import openvino as ovb
    from aa_trt.export.int8 import import_nncf

    import_nncf()
    cal_sets, kwargs, extra = _variants()[name]
    (root / "var").mkdir(exist_ok=True)
    result, outputs = {"name": name}, {}
    for g in GRAPH_NAMES:
        t = time.perf_counter()
        samples = [inputs for c in cal_sets for inputs, _ in _load(root / "cal" / c, g)]
        names = (tuple(samples[0]), ("prediction",))
        graph = ovb.OvGraph.compile(root / "graphs" / f"{g}.onnx", names, "int8", torch.get_num_threads(),
                                    f16_weights=True, quantize=lambda m: _quantize(m, samples, kwargs, extra))
        graph.export(root / "var" / f"{name}.{g}.blob")
        quantize_s = time.perf_counter() - t
        del samples
        gc.collect()
        outputs[g] = [(graph(**{n: torch.from_numpy(x) for n, x in inputs.items()})["prediction"].numpy(), out)
                      for inputs, out in _load(root / "cal" / "held1", g)]
        errors = [_rel(a, b) for a, b in outputs[g]]
        result[g] = {"rel_l2": errors, "mean": float(np.mean(errors)), "quantize_s": round(quantize_s, 1)}
        del graph
        gc.collect()
    result["guided_rel_l2"] = [_rel(u8 + GUIDANCE * (c8 - u8), u + GUIDANCE * (c - u))
                               for (c8, c), (u8, u) in zip(outputs["unet_cond"], outputs["unet_uncond"])]
    _append(root / "variants.jsonl", result)


def frames(root: Path, names: list[str]):
    from aa_trt.backends import openvino as ovb
    from aa_trt.backends.graph_animator import UNetGraphs
    from benchmarks.workloads import video_inputs

    models = _models()
    specs = _specs(models)
    ref, poses, latents = video_inputs(FRAMES, SIZE, SIZE, 1)
    kw = dict(steps=STEPS, guidance=GUIDANCE, context_frames=FRAMES, progress=False)
    reference = np.load(root / "cal" / "held1.frames.npy")
    for name in names:
        graphs = [ovb.OvGraph.load(root / "var" / f"{name}.{g}.blob",
                                   (tuple(specs[g].input_names), tuple(specs[g].output_names)), "int8",
                                   torch.get_num_threads()) for g in GRAPH_NAMES]
        got = _animator(models, UNetGraphs(*graphs, _n_kv(models), 1, FRAMES))(ref, poses, latents=latents, **kw)
        mse = ((got.astype(np.float64) - reference) ** 2).mean()
        _append(root / "frames.jsonl", {"name": name, "psnr_db": float(10 * np.log10(1 / mse))})


def speed(root: Path, names: list[str], rounds: int = 3):
    from aa_trt.backends import openvino as ovb

    inputs, _ = _load(root / "cal" / "held1", "unet_cond")[0]
    io_names = (tuple(inputs), ("prediction",))
    bf16 = root / "var" / "bf16.unet_cond.blob"
    if not bf16.exists():
        ovb.OvGraph.compile(root / "graphs" / "unet_cond.onnx", io_names, "bf16", torch.get_num_threads(),
                            f16_weights=True).export(bf16)
    graphs = {"bf16": ovb.OvGraph.load(bf16, io_names, "bf16", torch.get_num_threads())}
    for name in names:
        graphs[name] = ovb.OvGraph.load(root / "var" / f"{name}.unet_cond.blob", io_names, "int8",
                                        torch.get_num_threads())
    feeds = {n: torch.from_numpy(x) for n, x in inputs.items()}
    for g in graphs.values():
        g(**feeds)
    times = {n: [] for n in graphs}
    for _ in range(rounds):
        for n, g in graphs.items():
            t = time.perf_counter()
            g(**feeds)
            times[n].append(time.perf_counter() - t)
    median = {n: float(np.median(v)) for n, v in times.items()}
    _append(root / "speed.jsonl", {"median_s": median, "bf16_over": {n: median["bf16"] / v for n, v in median.items()},
                                   "threads": torch.get_num_threads()})


# Groups for `sensitivity`, as regular expressions over the graph's torch module paths: the UNet's
# blocks, and the kinds of layer across all blocks. The motion modules are left out of both (the
# landed scheme keeps them unquantized).
SENSITIVITY_GROUPS = {
    **{name: rf"unet\.{name}\..*" for name in
       [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]},
    "conv_in/out": r"unet\.conv_(in|out)",
    "resnet convs": r".*\.resnets\.\d+\.conv(1|2|_shortcut)",
    "up/down samplers": r".*\.(up|down)samplers\.\d+\.conv",
    "proj_in/out": r".*\.attentions\.\d+\.proj_(in|out)",
    "q/k/v/out": r".*\.attn\d\.(to_q|to_k|to_v|to_out\.0)",
    "ff in (GEGLU)": r".*\.attentions\.\d+\..*\.ff\.net\.0\..*",
    "ff out": r".*\.attentions\.\d+\..*\.ff\.net\.2",
}


def _rtn_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding to nearest (what OpenVINO's int8 weights are)."""
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (w / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape)


def _fake_u8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-tensor asymmetric 8-bit rounding of an activation to the range [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zero = round(-lo / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


class _Gemms(torch.overrides.TorchFunctionMode):
    """Sees every F.linear / F.conv2d call on the named weights (the UNet under fused.plain(),
    where each layer runs as one of those): records its FLOPs and its input's min and max, and
    rounds the inputs of the layers in `quantized` to their u8 ranges."""

    def __init__(self, weights: dict):
        super().__init__()
        self.names = {id(w): n for n, w in weights.items()}
        self.flops: dict[str, float] = {}
        self.ranges: dict[str, list] = {}
        self.unmapped = 0.0
        self.quantized: dict[str, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch.nn.functional.conv2d):
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            name = self.names.get(id(w))
            if name in self.quantized:
                args = (_fake_u8(x, *self.quantized[name]),) + tuple(args[1:])
            out = func(*args, **kwargs)
            flop = 2.0 * w[0].numel() * out.numel()
            if name is None:
                self.unmapped += flop
            else:
                self.flops[name] = flop
                self.ranges.setdefault(name, []).append((float(x.min()), float(x.max())))
            return out
        return func(*args, **kwargs)


def sensitivity(root: Path, steps=(0, 2)):
    """Per group of SENSITIVITY_GROUPS: the relative L2 to torch fp32 of each UNet graph on the
    held-out samples `steps` with only that group's Linear / Conv2d layers rounded as int8 runs
    them: their weights (per-channel symmetric), their inputs (per-tensor asymmetric, ranges the
    mean over the calibration samples of each sample's min and max, NNCF's default), and both;
    and those layers' GEMM FLOPs in one call: which groups give the most int8 FLOPs for the least
    error (DIR/sensitivity.jsonl). No SmoothQuant: this ranks groups, the `variant` measures.
    Runs the plain computation (fused.plain(): every layer one F.linear / F.conv2d)."""
    import re

    from aa_trt import fused

    models = _models()
    specs = _specs(models)
    for g in GRAPH_NAMES:
        module = specs[g].module.eval()
        names = specs[g].input_names
        layers = {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                  and ".motion_modules." not in n and "time_emb" not in n}
        gemms = _Gemms({n: m.weight for n, m in layers.items()})

        def call(inputs):
            with torch.no_grad(), fused.plain(), gemms:
                return module(*(torch.from_numpy(inputs[n]) for n in names)).numpy()

        calibration = _load(root / "cal" / "ex4", g)
        for inputs, _ in calibration:
            call(inputs)
        layers = {n: m for n, m in layers.items() if n in gemms.ranges}  # attn1's to_k/to_v: not with a K/V cache
        bounds = {n: tuple(np.mean(gemms.ranges[n], axis=0)) for n in layers}
        total = sum(gemms.flops.values())
        held = _load(root / "cal" / "held1", g)
        samples = [held[i] for i in steps]
        _append(root / "sensitivity.jsonl", {"graph": g, "group": "all (no motion modules)", "layers": len(layers),
                                             "gflop": round(total / 1e9, 2),
                                             "unmapped_gflop": round(gemms.unmapped / 1e9 / len(calibration), 2),
                                             "plain": [round(_rel(call(i), out), 5) for i, out in samples]})
        for group, pattern in {"all": ".*", **SENSITIVITY_GROUPS}.items():
            chosen = {n: m for n, m in layers.items() if re.fullmatch(pattern, n)}
            line = {"graph": g, "group": group, "layers": len(chosen),
                    "gflop": round(sum(gemms.flops[n] for n in chosen) / 1e9, 2),
                    "flop_share": round(sum(gemms.flops[n] for n in chosen) / total, 4)}
            for kind in ("weights", "inputs", "both"):
                kept = {n: m.weight.data.clone() for n, m in chosen.items()}
                if kind != "inputs":
                    for m in chosen.values():
                        m.weight.data = _rtn_int8(m.weight.data)
                gemms.quantized = {n: bounds[n] for n in chosen} if kind != "weights" else {}
                line[kind] = [round(_rel(call(inputs), out), 5) for inputs, out in samples]
                gemms.quantized = {}
                for n, m in chosen.items():
                    m.weight.data = kept[n]
            _append(root / "sensitivity.jsonl", line)


def _append(path: Path, line: dict):
    print(json.dumps(line), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("prepare", "variant", "frames", "speed", "sensitivity"))
    p.add_argument("dir", type=Path, help="the proxy's folder (graphs, samples, blobs, results)")
    p.add_argument("names", nargs="*", help="variants (_variants(): landed is what the build does)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dir)
    elif args.command == "variant":
        for name in args.names:
            variant(args.dir, name)
    elif args.command == "frames":
        frames(args.dir, args.names)
    elif args.command == "sensitivity":
        sensitivity(args.dir)
    else:
        speed(args.dir, args.names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
