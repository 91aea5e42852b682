"""SampleOptions: every bad sampling value is refused the same way everywhere: one line and exit 2
from the CLI, a recorded error in a batch job (the other jobs still run), an InputError naming the
parameter from the Python API; and the library's other plumbing (files, dtype names, imports)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aa_trt.cli import main as cli
from aa_trt.errors import InputError, OptionError
from aa_trt.options import SampleOptions
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, stick_frames

# (field, bad value, what the message says). The tiny model trains on 1000 timesteps and its
# motion modules take windows of at most 32 frames: the last three are only bad for a model.
BAD = [
    ("steps", 0, "must be >= 1"),
    ("steps", 5000, "must be in 1..1000"),
    ("guidance", -1.0, "must be a finite number >= 0"),
    ("sampler", "euler", "expected one of ddim"),
    ("context_frames", 0, "must be >= 1"),
    ("context_frames", 33, "maximum window of 32 frames"),
    ("context_overlap", 8, "must be smaller than"),
    ("context_overlap", -1, "must be >= 0"),
    ("context_schedule", "spiral", "expected one of uniform, sliding"),
    ("window_batch", 0, "must be >= 1"),
    ("seed", -1, "must be in 0.."),
]
GOOD = dict(steps=1, context_frames=8, context_overlap=2)
IDS = [f"{k}={v}" for k, v, _ in BAD]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("options")
    return {"dir": d, "ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 500),
            "ref": make_reference(d / "ref.png", (32, 32)),
            "dance": make_video(d / "dance.mp4", stick_frames(4, (32, 32)), fps=10, audio=False)}


def _case(field, value) -> dict:
    kw = {**GOOD, field: value}
    if field == "context_overlap" and value == 8:
        kw["context_frames"] = 8
    return kw


# ---------------------------------------------------------------------------------- the value
def test_defaults_and_resolve():
    from aa_trt.config import preset

    s = SampleOptions()
    assert (s.steps, s.guidance, s.sampler, s.context_frames, s.context_overlap) == (None, None, "ddim", 24, 4)
    cfg = preset("tiny")
    r = s.resolve(cfg)
    assert r.guidance == cfg.guidance and r.replace(guidance=2).resolve(cfg).guidance == 2.0
    assert r.steps == cfg.steps == 20 and s.resolve(cfg.replace(steps=10)).steps == 10  # the model's steps
    assert SampleOptions.build(s, steps=4).steps == 4 and s.steps is None  # frozen: a new value
    with pytest.raises(OptionError, match="^colour='red': not a sampling option"):
        SampleOptions.build(colour="red")
    with pytest.raises(Exception):
        s.steps = 3  # frozen


@pytest.mark.parametrize("field,value,says", BAD, ids=IDS)
def test_the_options_name_the_parameter(field, value, says):
    from aa_trt.config import preset

    with pytest.raises(OptionError) as e:
        SampleOptions(**_case(field, value)).resolve(preset("tiny"))
    assert str(e.value).startswith(f"{field}={value!r}: ") and says in str(e.value)
    assert e.value.as_flag().startswith(f"--{field.replace('_', '-')} {value}: ")
    if field == "context_overlap" and value == 8:  # another parameter named in the problem: its flag
        assert str(e.value).endswith("smaller than `context_frames` (8)")
        assert e.value.as_flag().endswith("smaller than --context-frames (8)")


# ---------------------------------------------------------------------------------- the API
@pytest.mark.parametrize("field,value,says", BAD, ids=IDS)
def test_api_raises_input_error(files, field, value, says):
    from aa_trt.pipeline import Animator

    anim = Animator.from_pretrained(files["ckpt"])
    ref = Image.open(files["ref"])
    poses = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(InputError, match=f"^{field}=") as e:
        anim(ref, poses, progress=False, **_case(field, value))
    assert says in str(e.value)
    # denoise() refuses it the same way (before any UNet call)
    cond = anim.prepare(ref, poses)
    with pytest.raises(InputError, match=f"^{field}="):
        anim.denoise(cond, torch.randn(anim.latent_shape(cond)), progress=False, **_case(field, value))


# ---------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("field,value,says", BAD, ids=IDS)
def test_cli_one_line_exit_2(files, tmp_path, capsys, field, value, says):
    out = tmp_path / "o.mp4"
    flags = [a for k, v in _case(field, value).items() for a in (f"--{k.replace('_', '-')}", str(v))]
    rc = cli(["run", str(files["ref"]), str(files["dance"]), "-o", str(out), "--ckpt", str(files["ckpt"]),
              "--pose-video", "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.splitlines() == [f"aa-trt: error: --{field.replace('_', '-')} {value}: " + err.split(": ", 3)[-1]]
    assert says in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_sampling_field_is_one_flag_of_run_and_eval():
    """The sampling flags are declared once (aa_trt.commands.sample_flags): one per SampleOptions
    field, on `run` and `eval`, starting from SampleOptions' defaults, and mapped back onto
    SampleOptions by field name."""
    from aa_trt.cli import build_parser
    from aa_trt.commands.run import run_options
    from aa_trt.commands.sample_flags import SAMPLE_FLAGS, flag, sample_options

    assert list(SAMPLE_FLAGS) and set(SAMPLE_FLAGS) == set(SampleOptions.fields())
    defaults = SampleOptions.defaults()
    run = build_parser().parse_args(["run", "r.png", "d.mp4", "-o", "o.mp4"])
    ev = build_parser().parse_args(["eval", "--ckpt", "c", "--data", "d"])
    assert {n: getattr(run, n) for n in SAMPLE_FLAGS} == defaults
    assert {n: getattr(ev, n) for n in SAMPLE_FLAGS} == {**defaults, "seed": 0}  # video i: seed + i
    assert run_options(run).sample == SampleOptions() and sample_options(ev) == SampleOptions(seed=0)
    given = dict(steps=7, guidance=2.5, sampler="dpmpp_2m", context_frames=16, context_overlap=2,
                 context_schedule="sliding", window_batch=2, seed=5, guidance_interval=(100, 900),
                 timestep_power=2.0)
    argv = [a for k, v in given.items()
            for a in (flag(k), ",".join(map(str, v)) if isinstance(v, tuple) else str(v))]
    for command in (["run", "r.png", "d.mp4", "-o", "o.mp4"], ["eval", "--ckpt", "c", "--data", "d"]):
        assert sample_options(build_parser().parse_args([*command, *argv])) == SampleOptions(**given)


def test_the_page_starts_from_the_sample_options_defaults():
    from aa_trt.options import CONTEXT_SCHEDULES
    from aa_trt.ui import SCHEDULES, PageSettings

    page, defaults = PageSettings(), SampleOptions.defaults()
    shared = [n for n in SampleOptions.fields() if hasattr(page, n) and n != "seed"]  # the page: random_seed
    assert len(shared) >= 6 and all(getattr(page, n) == defaults[n] for n in shared)
    assert SCHEDULES == CONTEXT_SCHEDULES


# ---------------------------------------------------------------------------------- a batch
def test_batch_records_each_bad_value_and_runs_the_rest(files, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    base = {"ref": str(files["ref"]), "driving": str(files["dance"]), "pose_video": True}
    lines = [json.dumps({**base, "output": f"bad{i}.mp4", **_case(f, v)}) for i, (f, v, _) in enumerate(BAD)]
    lines.append(json.dumps({**base, "output": "good.mp4", **GOOD}))
    jobs.write_text("\n".join(lines) + "\n")
    rc = cli(["batch", str(jobs), "--ckpt", str(files["ckpt"]), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"]) == (1, len(BAD))
    assert (tmp_path / "good.mp4").is_file()
    for i, (field, value, says) in enumerate(BAD):
        status = json.loads((tmp_path / "jobs.jsonl.status" / f"job-{i:05d}.json").read_text())
        assert status["state"] == "failed" and "traceback" not in status, status
        assert f"{field}={value!r}: " in status["error"] and says in status["error"], status["error"]
        assert not (tmp_path / f"bad{i}.mp4").exists()


# ---------------------------------------------------------------------------------- plumbing
def test_dtype_names_one_table():
    from aa_trt.files import dtype_name, torch_dtype

    for short, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert torch_dtype(short) is dt and dtype_name(dt) == short
        assert torch_dtype(str(dt)) is dt and torch_dtype(str(dt).removeprefix("torch.")) is dt
    with pytest.raises(OptionError, match="^dtype='fp8': expected one of fp32, fp16, bf16"):
        torch_dtype("fp8")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    from aa_trt.files import atomic_output, remove_stale_partials, write_json

    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]
    stale = tmp_path / ".x.12345.partial.json"  # what a killed process leaves
    stale.write_text("{")
    remove_stale_partials(target)
    assert list(tmp_path.iterdir()) == [target]


def test_top_level_folders_import_in_a_plain_checkout(tmp_path):
    # Without the installed package-dir mapping (-S: no site-packages, so no editable finder),
    # aa_trt.export / .kernels / .training still resolve to the checkout's top-level folders.
    root = Path(__file__).resolve().parents[1]
    # kernels/ is a namespace subpackage (no __init__.py: kernels/README.md): its __path__ tells where.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import aa_trt.export, aa_trt.kernels, aa_trt.training;"
            "print(aa_trt.export.__file__, list(aa_trt.kernels.__path__)[0], aa_trt.training.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(root)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [Path(p) for p in out.stdout.split()]
    assert got == [root / "export" / "__init__.py", root / "kernels",
                   root / "training" / "__init__.py"]
