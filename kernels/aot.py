"""Compile every Triton kernel of aa_trt.kernels for A100 / L4 / H100 without a GPU, and check what
each compiled program needs: registers, spills, shared memory.

    python -m aa_trt.kernels.aot [--arch sm_80,sm_89,sm_90] [--json] [--out FILE] [--markdown]

For every launch shape of one SD1.5 step (`sd15_shapes.sd15_shapes()`), fp16 and bf16, and every
target architecture, the launcher's own `plan` runs on meta tensors with that architecture's
compute capability: that gives the kernel, its runtime arguments, constexprs and
num_warps/num_stages exactly as a launch on that card would pass them, after the shared-memory
pruning of `resources.choose`. Every tile candidate that survives the pruning is compiled (the
launcher's first choice is marked `chosen`; the others are the fallbacks it would take on a card
with less shared memory) with

    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                   options={"num_warps": w, "num_stages": s})

where signature and attrs follow Triton's own specialisation of those arguments (`specialize`:
integers equal to 1 become constexprs, integers divisible by 16 and tensors get the 16-byte
divisibility hint). Shared memory is the compiled `metadata.shared`; registers and spills come
from `ptxas -v` run on the PTX with the assembler Triton itself uses for that architecture
(its bundled CUDA 12.9 `ptxas` below sm_90, `ptxas-blackwell` from sm_90 on), and the same
flags (`--regAllocOptLevel=2`). (Triton's compiled object has n_regs / n_spills only once its
cubin is loaded by a driver; on a GPU of the target's architecture they are added as
`driver_registers` / `driver_spills`, a cross-check of the ptxas figures.)

A configuration `ok` compiles, does not spill, fits the architecture's shared memory
(`resources.SHARED_LIMIT`) and the launcher's estimate (`shared_estimate`, what the pruning
trusts) is not below what Triton allocated. The exit status is 1 when a chosen configuration is
not ok.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import torch

from aa_trt.kernels import resources
from aa_trt.kernels.resources import Tiles
from aa_trt.kernels.sd15_shapes import DTYPES, Shape, sd15_shapes

KERNELS = ("reference_attention", "temporal_attention", "groupnorm_silu")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}


# ------------------------------------------------------------------------------------ modules
def compilable_module(name: str) -> ModuleType:
    """aa_trt.kernels.<name>, with @triton.jit kernels that can be compiled.

    Under TRITON_INTERPRET=1 (the CPU tests set it before importing the kernels) the imported
    module's kernels are interpreter objects that `triton.compile` cannot take; then a private
    copy of the module is loaded from the same file with the interpreter off."""
    mod = importlib.import_module(f"aa_trt.kernels.{name}")
    if not mod.interpreting():
        return mod
    private = f"aa_trt.kernels._aot_{name}"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.spec_from_file_location(private, mod.__file__)
    copy = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        sys.modules[private] = copy
        spec.loader.exec_module(copy)
    except BaseException:
        sys.modules.pop(private, None)
        raise
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if copy.interpreting():
        raise RuntimeError(f"{name}: kernels still interpreted with TRITON_INTERPRET=0")
    return copy


# ------------------------------------------------------------------------- launches by shape
def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def plan_shape(shape: Shape, dtype: torch.dtype, cc: int | None, tiles: Tiles | None = None):
    """The launcher's Launch for `shape` on compute capability `cc` (meta tensors), with `tiles`
    replacing its choice when given (to compile the other candidates)."""
    mod = compilable_module(shape.kernel)
    s = shape.sizes
    if shape.kernel == "reference_attention":
        q, k, v = (_meta(s["batch"], s["tokens"], s["channels"], dtype=dtype) for _ in range(3))
        kr, vr = (_meta(1, s["ref_tokens"], s["channels"], dtype=dtype) for _ in range(2))
        flags = _meta(s["batch"], dtype=torch.int32)
        launch = mod.plan(q, k, v, kr, vr, s["heads"], flags, cc=cc)
    elif shape.kernel == "temporal_attention":
        q, k, v = (_meta(s["positions"], s["frames"], s["channels"], dtype=dtype) for _ in range(3))
        biases = [_meta(s["frames"], s["channels"], dtype=dtype) for _ in range(3)]
        launch = mod.plan(q, k, v, s["heads"], *biases, cc=cc)
    elif shape.kernel == "groupnorm_silu":
        x = _meta(s["batch"], s["channels"], s["h"], s["w"], dtype=dtype)
        w, b = _meta(s["channels"], dtype=dtype), _meta(s["channels"], dtype=dtype)
        launch = mod.plan(x, s["groups"], w, b, 1e-5, True, cc=cc)
    else:
        raise ValueError(f"unknown kernel {shape.kernel}")
    if tiles is not None and tiles != launch.meta["tiles"]:
        launch.constexprs.update(dict(tiles.block))
        launch.num_warps, launch.num_stages = tiles.num_warps, tiles.num_stages
        launch.meta["tiles"] = tiles
    return mod, launch


def candidates(mod: ModuleType, shape: Shape, dtype: torch.dtype, cc: int) -> tuple[list[Tiles], Any]:
    """(the candidates that survive pruning on cc, the estimate function)."""
    s = shape.sizes
    if shape.kernel == "reference_attention":
        d = s["channels"] // s["heads"]
        cands, est = mod.tile_candidates(d, s["tokens"]), lambda t: mod.shared_estimate(d, dtype, t)
    elif shape.kernel == "temporal_attention":
        d = s["channels"] // s["heads"]
        cands, est = mod.tile_candidates(s["frames"], d), lambda t: mod.shared_estimate(d, dtype, t)
    else:
        n_elem = s["channels"] // s["groups"] * s["h"] * s["w"]
        cands, est = mod.tile_candidates(n_elem), lambda t: mod.shared_estimate(dtype, t)
    return resources.prune(cands, est, cc), est


# ---------------------------------------------------------------------- signature and attrs
def specialize(arg: Any) -> tuple[str, Any]:
    """(type, specialisation) of one runtime argument, as Triton's launcher derives them: tensors
    are pointers with the 16-byte alignment hint ("D"; torch allocations are aligned); integers
    equal to 1 become constexprs; other integers are i32 (i64 beyond 2**31 - 1) with "D" when
    divisible by 16; floats are fp32 and bools u1, never specialised."""
    if isinstance(arg, torch.Tensor):
        return "*" + _TRITON_TYPES[arg.dtype], "D"
    if isinstance(arg, bool):
        return "u1", None
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", 1
        ty = "i32" if -2 ** 31 <= arg < 2 ** 31 else ("u64" if arg >= 2 ** 63 else "i64")
        return ty, "D" if arg % 16 == 0 else ""
    if isinstance(arg, float):
        return "fp32", None
    raise TypeError(f"cannot specialise a {type(arg).__name__}")


def signature_of(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource from a Launch."""
    kernel = launch.kernel
    params = kernel.params
    runtime = [p for p in params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{kernel.__name__}: {len(launch.args)} arguments for {len(runtime)} parameters")
    values = dict(zip((p.name for p in runtime), launch.args))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.is_constexpr:
            if p.name not in launch.constexprs:
                raise ValueError(f"{kernel.__name__}: constexpr {p.name} not given")
            signature[p.name] = "constexpr"
            constexprs[p.name] = launch.constexprs[p.name]
            continue
        ty, spec = specialize(values[p.name])
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# -------------------------------------------------------------------------------- ptxas
def ptxas_for(cc: int) -> Path:
    """The assembler Triton uses for compute capability cc (so the report describes the cubin it
    would load): its bundled ptxas below sm_90, ptxas-blackwell from sm_90 on."""
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(cc).path)
    except Exception:  # older / newer Triton: ptxas-blackwell takes every PTX version
        return bin_dir / "ptxas-blackwell"


def sm_arch(cc: int) -> str:
    """ptxas's --gpu-name: Triton targets the arch-specific sm_90a (wgmma) from sm_90 on."""
    return f"sm_{cc}{'a' if cc >= 90 else ''}"


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def parse_ptxas(text: str) -> dict[str, int | str | None]:
    """Registers, spills and static shared memory from a `ptxas -v` report (one entry function:
    the largest figure when several functions are listed)."""
    regs = [int(m) for m in _USED.findall(text)]
    spills = [tuple(map(int, m)) for m in _SPILL.findall(text)]
    smem = [int(m) for m in _SMEM.findall(text)]
    entry = _ENTRY.search(text)
    if not regs:
        raise ValueError(f"no 'Used N registers' in the ptxas report:\n{text}")
    return {
        "entry": entry.group(1) if entry else None,
        "registers": max(regs),
        "stack_bytes": max((s[0] for s in spills), default=0),
        "spill_store_bytes": max((s[1] for s in spills), default=0),
        "spill_load_bytes": max((s[2] for s in spills), default=0),
        "static_shared_bytes": max(smem, default=0),
    }


def run_ptxas(ptx: str, cc: int) -> dict:
    tool = ptxas_for(cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(tool), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch(cc)}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tool.name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = parse_ptxas(proc.stderr + proc.stdout)
    report["ptxas"] = tool.name
    return report


# ------------------------------------------------------------------------------- compile
_COMPILED: dict[str, dict] = {}


def compile_launch(launch, cc: int) -> dict:
    """Compile one Launch for compute capability cc; the resources it needs (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = signature_of(launch)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    key = repr((launch.kernel.__name__, sorted(signature.items()), sorted(constexprs.items()),
                sorted(attrs), sorted(options.items()), cc))
    if key in _COMPILED:
        return dict(_COMPILED[key], cached=True)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"compiled": False}
    try:
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        md = compiled.metadata
        out.update(compiled=True, shared_bytes=int(md.shared), num_warps=int(md.num_warps),
                   num_stages=int(md.num_stages), ptx_version=_ptx_version(compiled.asm["ptx"]))
        report = run_ptxas(compiled.asm["ptx"], cc)
        out.update(registers=report["registers"],
                   spill_bytes=report["spill_store_bytes"] + report["spill_load_bytes"],
                   spill_store_bytes=report["spill_store_bytes"],
                   spill_load_bytes=report["spill_load_bytes"], stack_bytes=report["stack_bytes"],
                   ptxas=report["ptxas"])
        out.update(_driver_resources(compiled, cc))
    except Exception as e:  # a compile error is a result: reported, not raised
        root = e
        while root.__cause__ is not None:  # Triton wraps the cause in the source excerpt
            root = root.__cause__
        text = f"{type(e).__name__}: {str(e).strip()[-1500:]}"
        out["error"] = text if root is e else f"{type(root).__name__}: {str(root).strip()[:500]} | {text}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    _COMPILED[key] = out
    return dict(out, cached=False)


def _driver_resources(compiled, cc: int) -> dict:
    """On a GPU of compute capability cc, load the cubin and add what the driver reports
    (n_regs, n_spills: a cross-check of the ptxas figures); nothing elsewhere."""
    try:
        if not torch.cuda.is_available() or resources.capability(torch.device("cuda")) != cc:
            return {}
        compiled._init_handles()
        return {"driver_registers": int(compiled.n_regs), "driver_spills": int(compiled.n_spills)}
    except Exception as e:  # a load failure is worth seeing, not fatal here
        return {"driver_error": f"{type(e).__name__}: {str(e)[:300]}"}


def _ptx_version(ptx: str) -> str | None:
    m = re.search(r"^\.version (\S+)", ptx, flags=re.MULTILINE)
    return m.group(1) if m else None


def parse_archs(text: str) -> list[int]:
    """'sm_80,sm_90' / '80,90' / 'sm_90a' -> [80, 90]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_").rstrip("a")
        if part:
            out.append(int(part))
    return out


def check(rec: dict) -> list[str]:
    """What is wrong with one compiled configuration (empty: nothing)."""
    if not rec.get("compiled"):
        return [f"compile error: {rec.get('error')}"]
    problems = []
    if rec.get("spill_bytes"):
        problems.append(f"spills {rec['spill_bytes']} bytes")
    if rec.get("registers", 0) > resources.MAX_REGISTERS:
        problems.append(f"{rec['registers']} registers")
    if rec["shared_bytes"] > rec["shared_limit"]:
        problems.append(f"shared {rec['shared_bytes']} > {rec['shared_limit']}")
    if rec["shared_bytes"] > rec["shared_estimate"]:
        problems.append(f"shared {rec['shared_bytes']} above the pruning estimate {rec['shared_estimate']}")
    return problems


@dataclass
class Target:
    shape: Shape
    dtype: torch.dtype
    cc: int


def targets(shapes: Iterable[Shape] | None = None, archs: Iterable[int] = resources.ARCHS,
            dtypes: Iterable[torch.dtype] = DTYPES) -> list[Target]:
    shapes = list(sd15_shapes() if shapes is None else shapes)
    return [Target(s, dt, cc) for s in shapes for dt in dtypes for cc in archs]


def interpreter_on() -> bool:
    """Whether this process runs Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def run(tgts: Iterable[Target], *, all_candidates: bool = True, progress=None,
        isolate: bool | None = None, only: Tiles | None = None) -> list[dict]:
    """Compile each target's chosen configuration (and, with all_candidates, every other one that
    survives pruning); one record per compiled configuration. `only`: compile that configuration
    instead (for experiments and tests).

    isolate (default: when TRITON_INTERPRET=1 is set here, as when the tests run on a CPU): compile
    in a fresh Python process without it. A process that has run interpreted kernels cannot
    compile reliably any more (the interpreter patches triton.language while kernels run; a
    compile afterwards fails with "'value' object has no attribute 'data'")."""
    tgts = list(tgts)
    if isolate is None:
        isolate = interpreter_on()
    if isolate:
        return _run_in_child(tgts, all_candidates, only)
    records = []
    for t in tgts:
        mod, chosen = plan_shape(t.shape, t.dtype, t.cc)
        fitting, estimate = candidates(mod, t.shape, t.dtype, t.cc)
        tiles_list = [only] if only else fitting if all_candidates else [chosen.meta["tiles"]]
        for tiles in tiles_list:
            _, launch = plan_shape(t.shape, t.dtype, t.cc, tiles)
            rec = {"kernel": t.shape.kernel, "shape": t.shape.label, "sizes": t.shape.sizes,
                   "arch": f"sm_{t.cc}", "dtype": DTYPE_NAMES[t.dtype], "config": tiles.label(),
                   "chosen": tiles == chosen.meta["tiles"], "num_warps": launch.num_warps,
                   "num_stages": launch.num_stages, "grid": list(launch.grid),
                   "shared_limit": resources.shared_limit(t.cc), "shared_estimate": estimate(tiles)}
            rec.update(compile_launch(launch, t.cc))
            rec.setdefault("registers", None)
            rec.setdefault("spill_bytes", None)
            rec.setdefault("shared_bytes", None)
            rec["problems"] = check(rec)
            rec["ok"] = not rec["problems"]
            records.append(rec)
            if progress:
                progress(rec)
    return records


def _run_in_child(tgts: list[Target], all_candidates: bool, only: Tiles | None) -> list[dict]:
    import pickle
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", "from aa_trt.kernels.aot import _child; _child()"],
                          input=pickle.dumps((tgts, all_candidates, only)), capture_output=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"the compile process failed ({proc.returncode}):\n"
                           f"{proc.stderr.decode(errors='replace')[-4000:]}")
    return pickle.loads(proc.stdout)


def _child() -> None:
    import pickle
    tgts, all_candidates, only = pickle.loads(sys.stdin.buffer.read())
    records = run(tgts, all_candidates=all_candidates, isolate=False, only=only)
    sys.stdout.buffer.write(pickle.dumps(records))


# ---------------------------------------------------------------------------------- report
def _cell(rec: dict | None) -> str:
    if rec is None:
        return "-"
    if not rec["compiled"]:
        return "**error**"
    spill = f" **spill {rec['spill_bytes']} B**" if rec["spill_bytes"] else ""
    sh = rec["shared_bytes"]
    shared = f"{sh} B" if sh < 1024 else f"{sh / 1024:g} KiB"
    return f"{rec['registers']} / {shared}{spill}"


def markdown(records: list[dict], archs: list[int]) -> str:
    """One row per (kernel, shape, dtype, chosen config): registers / shared KiB per arch."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["chosen"]:
            rows.setdefault((r["kernel"], r["shape"], r["dtype"]), {})[r["arch"]] = r
    head = ["kernel", "shape", "dtype", "config (chosen)"] + [f"sm_{a} regs / shared" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, shape, dtype), by_arch in rows.items():
        first = next(iter(by_arch.values()))["config"]  # the first arch's; others noted if they differ
        cells = []
        for a in archs:
            r = by_arch.get(f"sm_{a}")
            cells.append(_cell(r) + (f" ({r['config']})" if r is not None and r["config"] != first else ""))
        lines.append("| " + " | ".join([kernel, shape, dtype, first] + cells) + " |")
    return "\n".join(lines)


def summary(records: list[dict], archs: list[int]) -> str:
    out = []
    for a in archs:
        rs = [r for r in records if r["arch"] == f"sm_{a}"]
        ch = [r for r in rs if r["chosen"]]
        comp = [r for r in rs if r["compiled"]]
        out.append(
            f"sm_{a}: {len(ch)} launches (chosen), {len(rs)} configurations compiled, "
            f"{len(rs) - len(comp)} errors, max registers {max((r['registers'] for r in comp), default=0)}, "
            f"spilling {sum(1 for r in comp if r['spill_bytes'])}, max shared "
            f"{max((r['shared_bytes'] for r in comp), default=0)} B (limit {resources.shared_limit(a)}), "
            f"not ok {sum(1 for r in rs if not r['ok'])} ({sum(1 for r in ch if not r['ok'])} chosen)")
    return "\n".join(out)


def _table_line(r: dict) -> str:
    state = "ok" if r["ok"] else "; ".join(r["problems"])[:80]
    regs = "-" if r["registers"] is None else r["registers"]
    shared = "-" if r["shared_bytes"] is None else r["shared_bytes"]
    spill = "-" if r["spill_bytes"] is None else r["spill_bytes"]
    mark = "*" if r["chosen"] else " "
    return (f"{r['kernel']:<20} {r['arch']:<6} {r['dtype']:<5} {mark}{r['config']:<34} "
            f"{regs!s:>4} {spill!s:>6} {shared!s:>7} {r['shape']:<48} {state}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aa_trt.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(f"sm_{a}" for a in resources.ARCHS),
                    help="comma-separated targets (default sm_80,sm_89,sm_90)")
    ap.add_argument("--kernel", default=",".join(KERNELS), help="comma-separated kernels")
    ap.add_argument("--dtype", default="fp16,bf16")
    ap.add_argument("--chosen-only", action="store_true",
                    help="compile only the launcher's choice, not the fallback candidates")
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration on stdout")
    ap.add_argument("--out", help="write all records (and the environment) as one JSON file")
    ap.add_argument("--markdown", action="store_true", help="print the docs table (chosen configs)")
    args = ap.parse_args(argv)

    import triton
    archs = parse_archs(args.arch)
    kernels = [k.strip() for k in args.kernel.split(",") if k.strip()]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        ap.error(f"unknown kernels {sorted(unknown)}")
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    dtypes = [by_name[d.strip()] for d in args.dtype.split(",")]
    shapes = [s for s in sd15_shapes() if s.kernel in kernels]
    t0 = time.perf_counter()
    if not args.json:
        print(f"{'kernel':<20} {'arch':<6} {'dtype':<5} {' config (*: chosen)':<35} {'regs':>4} "
              f"{'spill':>6} {'shared':>7} {'shape':<48} state", flush=True)

    def progress(rec):
        print(json.dumps(rec) if args.json else _table_line(rec), flush=True)

    records = run(targets(shapes, archs, dtypes), all_candidates=not args.chosen_only, progress=progress)
    elapsed = time.perf_counter() - t0
    text = summary(records, archs) + f"\n{len(records)} configurations in {elapsed:.0f} s"
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.markdown:
        print(markdown(records, archs))
    if args.out:
        env = {"triton": triton.__version__, "torch": torch.__version__,
               "ptxas": {f"sm_{a}": ptxas_for(a).name for a in archs},
               "command": "python -m aa_trt.kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": round(elapsed, 1)}
        Path(args.out).write_text(json.dumps({"environment": env, "configs": records}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in records if r["chosen"]) else 1


if __name__ == "__main__":
    sys.exit(main())
