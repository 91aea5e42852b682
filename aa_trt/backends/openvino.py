"""OpenVINO backend: an `aa-trt build` DIR's graphs, compiled by `aa-trt build --backend openvino`
for this CPU and cached in DIR as OpenVINO's own compiled blobs, behind the same calls as the torch
modules (see backends/graph_animator.py).

openvino is imported only inside functions (`pip install "aa-trt[openvino]"`). The precision is
decided in one place, `choose_precision`: bf16 where the CPU lists BF16 among OpenVINO's
OPTIMIZATION_CAPABILITIES, f32 elsewhere; int8 only when asked for (it needs a calibration render,
aa_trt.export.int8) and only on a CPU with int8 dot-product instructions (`int8_support`). The build
and the run both ask it, and a DIR compiled for another precision, another OpenVINO or other graphs
is refused with one line.

An int8 build quantizes some graphs (the denoising UNet's) and compiles the rest as a build of its
`inference_hint` would (bf16 where the CPU lists BF16, else f32); the nodes an int8 graph leaves
unquantized run in that precision too. Each graph's manifest entry records the precision it was
compiled for, and `run` loads it in that one.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from aa_trt.backends.graph_animator import GRAPHS, GraphAnimator, bind_check
from aa_trt.errors import AATrtError, InputError, OptionError

INSTALL_HINT = 'pip install "aa-trt[openvino]"'
PRECISIONS = ("bf16", "f32", "int8")
# The CPU flags of int8 dot-product units, best first (AMX tiles, AVX-512 VNNI, AVX-VNNI).
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
DEVICE = "CPU"


def import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise AATrtError(f"openvino is not installed: {INSTALL_HINT}") from None
    return ov


def available() -> bool:
    """Whether openvino imports here (without importing it twice)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    return import_openvino().__version__


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (e.g. BF16, FP32, INT8, FP16)."""
    ov = import_openvino()
    return tuple(str(c) for c in ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def int8_support() -> str | None:
    """The CPU's int8 dot-product unit, as its flag (INT8_FLAGS: "amx_int8", "avx512_vnni",
    "avx_vnni"), where OpenVINO also lists INT8 among its OPTIMIZATION_CAPABILITIES; None
    elsewhere (OpenVINO runs int8 graphs on any x86 CPU, but without these units an int8 matmul
    is emulated with 16-bit multiply-adds and is no faster than bf16 or f32)."""
    from aa_trt.precision import Machine

    if "INT8" not in cpu_capabilities():
        return None
    flags = Machine.detect().cpu_flags
    return next((f for f in INT8_FLAGS if f in flags), None)


def inference_hint(precision: str) -> str:
    """The CPU plugin's INFERENCE_PRECISION_HINT for graphs of a `precision` build: itself for
    bf16 and f32; for int8 the precision of what is not quantized: bf16 where the CPU lists BF16,
    else f32. An int8 graph whose check fails with a bf16 rest is compiled again with an f32 rest
    (`INT8_REST_FALLBACK`, recorded per graph as "rest"): on an AMX-INT8 CPU (OpenVINO 2026.4) the
    tiny preset's unet_cond with a bf16 rest came out at relative L2 0.257 on calibration inputs
    against 0.07-0.08 on a VNNI CPU, while the sd15 half-width graphs pass with it."""
    if precision != "int8":
        return precision
    return "bf16" if "BF16" in cpu_capabilities() else "f32"


# The rest an int8 graph is compiled with again when its check fails with the build's own.
INT8_REST_FALLBACK = "f32"


def choose_precision(precision: str | None = None, built: tuple[str, str] | None = None) -> tuple[str, str]:
    """(precision, why): the precision OpenVINO compiles (build) or runs (run) the graphs in, and a
    short reason. precision: None or "auto", "bf16", "f32" or "int8". Auto at build time: bf16
    where the CPU lists BF16 in OPTIMIZATION_CAPABILITIES, else f32 (never int8: it needs a
    calibration render). int8 needs a CPU with an int8 dot-product unit (`int8_support`). At run
    time `built` is the build's (precision, why): auto keeps it where this CPU can run it (a bf16
    build on a CPU without BF16, or an int8 build on one without int8 units, gets f32 or bf16,
    which the build then does not match)."""
    if precision not in (None, "auto", *PRECISIONS):
        raise OptionError("precision", precision, "expected auto, bf16, f32 or int8")
    caps = cpu_capabilities()
    if precision == "bf16" and "BF16" not in caps:
        raise OptionError("precision", precision, f"this CPU does not list BF16 (it lists {', '.join(caps)})")
    if precision == "int8" and int8_support() is None:
        raise OptionError("precision", precision, f"this CPU has no int8 dot-product unit (none of "
                          f"{', '.join(INT8_FLAGS)} among its flags, or OpenVINO does not list INT8: it "
                          f"lists {', '.join(caps)}); build with --precision bf16 or f32")
    if precision in PRECISIONS:
        return precision, "asked for"
    runs = {"f32": True, "bf16": "BF16" in caps, "int8": int8_support() is not None}
    if built is not None and runs.get(built[0]):
        return built[0], built[1] if built[1] != "asked for" else f"built for {built[0]}"
    if "BF16" in caps:
        return "bf16", "CPU lists BF16"
    return "f32", "CPU does not list BF16"


def compile_config(precision: str, threads: int | None = None, rest: str | None = None) -> dict:
    """The CPU plugin's settings: the precision stated explicitly (OpenVINO's own default is bf16
    on BF16 CPUs; an int8 graph's unquantized nodes: `rest`, else `inference_hint`), one stream,
    latency-first."""
    hint = rest if precision == "int8" and rest else inference_hint(precision)
    cfg = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def blob_name(graph: str, precision: str) -> str:
    """The compiled graph's file in DIR (the OpenVINO version is in the manifest's key)."""
    return f"{graph}.openvino-{precision}.blob"


# Which nodes a bf16 compile keeps in f32 (recorded in the build's manifest: a build made under
# another rule is recompiled). "/2": with the graphs of backends.declarations.GRAPH_REVISION 2, whose
# timestep embedding has no reshape of t before sin/cos (a bf16 build under "timestep" alone
# still rounded t in the plugin's bf16 Unsqueeze, and is refused).
KEEP_F32 = "timestep/2"


def keep_f32(precision: str) -> str | None:
    """The KEEP_F32 rule a `precision` build is compiled under (None: nothing runs in bf16)."""
    return KEEP_F32 if inference_hint(precision) == "bf16" else None


def timestep_nodes(model, inputs: tuple[str, ...] = ("timestep",)) -> set[str]:
    """Friendly names of the nodes computed from the `timestep` input alone (with constants and
    shapes): the sinusoidal embedding and the time MLP. (`inputs`: other inputs counted with it;
    an int8 build leaves the nodes of timestep and context unquantized, aa_trt.export.int8.)

    Why they must stay f32: the CPU plugin runs every node of a bf16 compile in bf16 except the
    graph's tail, and bf16 holds 8 significant bits, so t = 999 is rounded to a multiple of 4 and
    sin(t * f) at the high frequencies comes out as noise. Measured on the half-width sd15 UNet
    step (16 rows, 32x32, relative L2 to torch fp32): 5.0% at t = 999, 1.8% at t = 500 in plain
    bf16; 1.9% and 1.1% with these nodes in f32, torch's own bf16 (which computes the embedding
    in f32) 1.9% and 1.1%. They are vectors of one row: keeping them f32 costs nothing measurable.
    (With f16-stored weights the plugin still runs the time MLP's matmuls in bf16; the argument
    t * f and its sin/cos, what bf16 broke, run in f32: tests/test_openvino.py.)

    The mark holds on arithmetic, not on shape ops: the plugin ran the Unsqueeze of t (and the
    split of diffusers' sin/cos swap) in bf16 whatever the mark, so t reached t * f as 1000. The
    UNet's embedding is therefore written with t * f and sin/cos before any reshape
    (models.layers.timestep_embedding); with that, the half-width sd15 UNet step on a real
    pipeline's inputs went from 3.6% / 4.8% relative L2 (t = 999 / 499) to 1.1% / 1.2%, torch's
    own bf16 1.2% / 1.3%."""
    dep: dict[str, bool | None] = {}  # True: depends on the timestep; None: constant/shape only
    out = set()
    for n in model.get_ordered_ops():
        name, kind = n.get_friendly_name(), n.get_type_name()
        if kind == "Parameter":
            dep[name] = bool(set(inputs) & set(n.output(0).get_names()))
            continue
        if kind in ("Constant", "ShapeOf"):
            dep[name] = None
            continue
        ins = [dep.get(i.get_source_output().get_node().get_friendly_name(), False) for i in n.inputs()]
        if all(x is None for x in ins):
            dep[name] = None
        elif all(x is not False for x in ins):
            dep[name] = True
            out.add(name)
        else:
            dep[name] = False
    return out


def keep_timestep_f32(core, model):
    """The model with its timestep-only nodes (`timestep_nodes`) marked to keep f32 under a bf16
    compile. The mark is OpenVINO's DisablePrecisionConversion runtime attribute (what
    `ov::disable_fp16_compression` sets in C++; the CPU plugin keeps a node so marked in its
    original precision under any inference precision). Python cannot build that attribute, so it
    is written into the IR and the IR read back."""
    import tempfile
    import xml.etree.ElementTree as ET

    names = timestep_nodes(model)
    if not names:
        return model
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="aa-trt-ov-") as d:
        xml = Path(d) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        tree = ET.parse(xml)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in names:
                rt = layer.find("rt_info")
                if rt is None:
                    rt = ET.SubElement(layer, "rt_info")
                ET.SubElement(rt, "attribute", name="DisablePrecisionConversion", version="0",
                              value="dynamic:f16")
        tree.write(xml)
        # Read into memory, not mapped: the folder goes before the model is compiled.
        reader = ov.Core()
        reader.set_property({"ENABLE_MMAP": False})
        return reader.read_model(str(xml))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class OvGraph:
    """One OpenVINO compiled model called with torch tensors by input name -> {output name:
    tensor}. Built from an ONNX file (compiled now) or from a blob that `compile` exported."""

    def __init__(self, compiled, names: tuple[tuple[str, ...], tuple[str, ...]], path=None):
        self.compiled, self.path = compiled, path
        self.request = compiled.create_infer_request()
        # OpenVINO may give a port several names (an input that feeds a Cast directly also carries
        # the Cast's output name): bind each declared name to the port that has it.
        self.inputs = {n: self._port(compiled.inputs, n) for n in names[0]}
        self.outputs = {n: self._port(compiled.outputs, n) for n in names[1]}
        self.input_names, self.output_names = list(self.inputs), list(self.outputs)

    def _port(self, ports, name):
        for p in ports:
            if name in p.get_names():
                return p
        raise InputError(f"{self.path}: the compiled graph has no tensor named {name!r}; rebuild it "
                         f"with `aa-trt build --backend openvino`")

    @classmethod
    def compile(cls, onnx_path, names, precision: str, threads: int | None = None,
                f16_weights: bool = False, quantize=None, rest: str | None = None) -> "OvGraph":
        """Compile an ONNX graph. f16_weights: store the weights in f16 (what `ov.save_model`'s
        compress_to_fp16 does; values beyond f16's range stay f32), which halves the compiled
        blob; for bf16 compute this costs nothing measurable (half-width sd15 UNet step: relative
        L2 to torch 1.02% either way, same time a call). quantize: for an int8 graph, a function
        of the read model returning it quantized (aa_trt.export.int8.quantize). rest: an int8
        graph's unquantized precision when not `inference_hint("int8")`."""
        ov = import_openvino()
        core = ov.Core()
        model = core.read_model(str(onnx_path))
        if quantize is not None:
            model = quantize(model)
        if compile_config(precision, rest=rest)["INFERENCE_PRECISION_HINT"] == "bf16":  # KEEP_F32
            model = keep_timestep_f32(core, model)
        if f16_weights:
            from openvino._offline_transformations import compress_model_transformation

            compress_model_transformation(model)
        compiled = core.compile_model(model, DEVICE, compile_config(precision, threads, rest))
        return cls(compiled, names, onnx_path)

    @classmethod
    def load(cls, blob_path, names, precision: str, threads: int | None = None,
             rest: str | None = None) -> "OvGraph":
        ov = import_openvino()
        compiled = ov.Core().import_model(io.BytesIO(Path(blob_path).read_bytes()), DEVICE,
                                          compile_config(precision, threads, rest))
        return cls(compiled, names, blob_path)

    def export(self, path) -> int:
        """Write the compiled model (atomically) to `path`; its size in bytes."""
        from aa_trt.files import atomic_output

        buf = io.BytesIO()
        self.compiled.export_model(buf)
        with atomic_output(path) as tmp:
            Path(tmp).write_bytes(buf.getbuffer())
        return Path(path).stat().st_size

    def __call__(self, device="cpu", **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        bind_check(str(self.path), self.input_names, inputs)
        feeds = {self.inputs[n]: _np(x) for n, x in inputs.items()}
        res = self.request.infer(feeds)
        # infer() copies the outputs out of the request's buffers (share_outputs=False): each
        # returned tensor owns its memory.
        return {n: torch.from_numpy(np.asarray(res[p])).to(device) for n, p in self.outputs.items()}


def check_build(engine_dir, manifest: dict, precision: str, why: str) -> dict:
    """The build's OpenVINO section, when it was compiled for `precision` by this OpenVINO from
    the graphs the build holds; otherwise one InputError line saying what differs."""
    rebuild = "rebuild it with `aa-trt build --backend openvino`"
    ov_part = manifest.get("openvino")
    if not ov_part or not ov_part.get("graphs"):
        raise InputError(f"{engine_dir}: the build has no OpenVINO graphs; {rebuild}")
    version = openvino_version()
    if ov_part.get("version") != version:
        raise InputError(f"{engine_dir}: compiled by OpenVINO {ov_part.get('version')}, this is "
                         f"OpenVINO {version}; {rebuild}")
    if ov_part.get("precision") != precision:
        raise InputError(f"{engine_dir}: compiled for {ov_part.get('precision')}, this run wants "
                         f"{precision} ({why}); {rebuild}")
    keep = keep_f32(precision)
    if precision == "int8" and (ov_part.get("int8") or {}).get("rest") != inference_hint(precision):
        raise InputError(f"{engine_dir}: its int8 graphs run their other nodes in "
                         f"{(ov_part.get('int8') or {}).get('rest')}, this CPU in {inference_hint(precision)}; {rebuild}")
    if ov_part.get("keep_f32") != keep:
        raise InputError(f"{engine_dir}: compiled by an older aa-trt (its bf16 graphs compute the "
                         f"timestep embedding in bf16); {rebuild}")
    for g in GRAPHS:
        entry, graph = ov_part["graphs"].get(g), manifest["graphs"][g]
        if entry is None:
            raise InputError(f"{engine_dir}: no OpenVINO graph for {g}; {rebuild}")
        if entry.get("graph_key") != graph["key"] or entry.get("graph_files") != graph["files"]:
            raise InputError(f"{engine_dir}: the OpenVINO graph {g} was compiled from other ONNX "
                             f"graphs; {rebuild}")
        blob = Path(engine_dir) / entry["file"]
        if not blob.is_file() or blob.stat().st_size != entry["size"]:
            raise InputError(f"{engine_dir}: {entry['file']} is missing or truncated; {rebuild}")
    return ov_part


class OvAnimator(GraphAnimator):
    backend_name = "openvino"
    backend_reason = "the build's OpenVINO graphs"

    @classmethod
    def from_dir(cls, engine_dir, checkpoint=None, precision: str | None = None,
                 threads: int | None = None, reason: str | None = None) -> "OvAnimator":
        """As OrtAnimator.from_dir, on the DIR's compiled OpenVINO graphs. precision: None/"auto"
        (the build's, where this CPU runs it: choose_precision), "bf16", "f32" or "int8"; a DIR compiled
        for another precision, by another OpenVINO, or from other graphs is refused (InputError,
        one line). reason: why this backend was chosen, put before the precision's reason."""
        from aa_trt.backends import manifest as mf
        from aa_trt.backends.declarations import declared_names
        from aa_trt.backends.graph_animator import check_declarations
        from aa_trt.files import file_sha256

        import_openvino()
        sha = file_sha256(checkpoint) if checkpoint is not None else None
        m = mf.load_for_run(engine_dir, sha, GRAPHS)
        n_kv = check_declarations(engine_dir, m)
        recorded = m.get("openvino") or {}
        built = (recorded["precision"], recorded.get("reason", "")) if recorded.get("precision") else None
        precision, why = choose_precision(precision, built)
        part = check_build(engine_dir, m, precision, why)
        threads = threads or torch.get_num_threads()
        # An int8 build's graphs were each compiled for their own precision (int8 or the rest's).
        graphs = {g: OvGraph.load(Path(engine_dir) / part["graphs"][g]["file"], declared_names(g, n_kv),
                                  part["graphs"][g].get("precision", precision), threads,
                                  part["graphs"][g].get("rest")) for g in GRAPHS}
        anim = cls(engine_dir, m, graphs, "cpu")
        anim.backend_name = f"openvino {precision}"
        anim.backend_reason = f"{reason}; {why}" if reason else why
        anim.precision = precision
        return anim
