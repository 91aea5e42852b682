"""tools/: every script answers --help without a traceback, and the cheap ones do their job on tiny inputs
(tools/graft_decoder.py runs in tests/test_stage0.py)."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SCRIPTS = sorted(TOOLS.glob("*.py"))


def tool(name: str) -> dict:
    return runpy.run_path(str(TOOLS / f"{name}.py"))  # its globals; run_name is not __main__


def test_the_tools_are_there():
    assert {p.stem for p in SCRIPTS} >= {"ship_checkpoint", "graft_decoder", "make_mix", "sample_picture",
                                         "score_latents", "sampler_frontier"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help(script):
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_no_path_hacks(script):
    # tools run against the installed package: no sys.path edits, nothing from tests/, no patched models
    text = script.read_text()
    for needle in ("sys.path", "from tests", "import tests", "mock.patch", "monkeypatch"):
        assert needle not in text, (script.name, needle)


def write_set(root: Path, n_train: int):
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("test_characters", 1), ("test_motions", 1)):
        (root / f"{split}.json").write_text(json.dumps([{"npz_path": f"videos/{split}_{i}.npz"} for i in range(n)]))


def test_make_mix(tmp_path, capsys):
    write_set(tmp_path / "synth128", 3)
    write_set(tmp_path / "s1", 5)
    assert tool("make_mix")["main"]([str(tmp_path), "--extra", "s1", "--out", "mix"]) == 0
    train = json.loads((tmp_path / "mix" / "train.json").read_text())
    assert len(train) == 3 * 2 + 5
    assert train[0]["npz_path"] == str(tmp_path.resolve() / "synth128" / "videos/train_0.npz")
    test = json.loads((tmp_path / "mix" / "test_motions.json").read_text())
    assert test[0]["npz_path"].startswith(str(tmp_path.resolve() / "synth128"))
    with pytest.raises(SystemExit, match="no such file"):
        tool("make_mix")["main"]([str(tmp_path), "--extra", "missing"])


def test_ship_checkpoint_stores_fp16_and_the_declared_scale(tmp_path):
    import torch

    from aa_trt.checkpoint import build_models, load_checkpoint, read_config, save_models
    from aa_trt.config import preset

    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_models(src, build_models(preset("tiny")), provenance={"by": "test"})
    assert tool("ship_checkpoint")["main"]([str(src), str(dst), "--guidance", "1.5"]) == 0
    assert read_config(dst).guidance == 1.5
    a, b = load_checkpoint(src), load_checkpoint(dst)
    w_src = a.denoising_unet.state_dict()
    w_dst = b.denoising_unet.state_dict()
    k = next(iter(w_src))
    assert torch.equal(w_src[k].half().float(), w_dst[k].float())


def test_sampler_frontier_plans():
    from aa_trt.options import SampleOptions

    plan = tool("sampler_frontier")["plan"]
    frontier = plan("frontier", SampleOptions)
    assert len(frontier) == 57 and {c.guidance for c in frontier} == {1.0, 3.5}
    assert all(c.steps <= 4 for c in plan("few", SampleOptions) if c.sampler == "dpmpp_2m" and c.timestep_power != 3.0)
    with pytest.raises(SystemExit, match="--data"):
        tool("sampler_frontier")["main"](["heldout", "out.jsonl"])
