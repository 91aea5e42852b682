"""`--dtype auto`: the precision picked from what the machine has (faked here), and said."""
from __future__ import annotations

import json

import pytest
import torch

from aa_trt.cli import main as cli
from aa_trt.errors import OptionError
from aa_trt.precision import Machine, choose
from helpers import save_tiny_checkpoint
from media import make_reference, make_video, stick_frames

SAPPHIRE_RAPIDS = Machine(False, "Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}))
ZEN4 = Machine(False, "AMD EPYC 9654", frozenset({"avx2", "avx512f", "avx512_bf16"}))
ZEN3 = Machine(False, "AMD EPYC 7763", frozenset({"avx2", "fma"}))


@pytest.mark.parametrize("machine,device,want,why", [
    (SAPPHIRE_RAPIDS, "cpu", "bf16", "amx_bf16"),
    (ZEN4, "cpu", "bf16", "avx512_bf16"),
    (ZEN3, "cpu", "fp32", "no native bf16"),
    (ZEN3, "cuda", "fp16", "CUDA"),
    (SAPPHIRE_RAPIDS, "cuda:1", "fp16", "CUDA"),
])
def test_auto_picks_from_the_machine(machine, device, want, why):
    p = choose("auto", device, machine)
    assert p.name == want and why in p.reason and p.reason.startswith("auto")
    assert p.torch_dtype() == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[want]


def test_named_precisions_are_kept():
    for name in ("fp32", "fp16", "bf16"):
        assert choose(name, "cpu", SAPPHIRE_RAPIDS).name == name
        assert choose(name, "cpu", ZEN3).reason == "asked for"
    assert choose("float16", "cpu", ZEN3).name == "fp16"


def test_this_machine_is_read():
    m = Machine.detect()
    assert m.cuda == torch.cuda.is_available()
    p = choose("auto", "cpu")
    assert p.name == ("bf16" if m.cpu_flags & {"amx_bf16", "avx512_bf16"} else "fp32")


def test_bad_name_is_refused_with_auto_listed():
    from aa_trt.run import RunOptions

    with pytest.raises(OptionError, match="^dtype='fp8': expected one of auto, fp32, fp16, bf16"):
        RunOptions.create(ref="r.png", driving="d.mp4", output="o.mp4", dtype="fp8")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    return {"ckpt": save_tiny_checkpoint(d / "tiny.safetensors", 700),
            "ref": make_reference(d / "ref.png", (32, 32)),
            "dance": make_video(d / "dance.mp4", stick_frames(3, (32, 32)), fps=10, audio=False)}


@pytest.mark.parametrize("machine,want", [(ZEN3, "fp32"), (ZEN4, "bf16")])
def test_run_says_which_and_why(files, tmp_path, capsys, monkeypatch, machine, want):
    import aa_trt.precision

    monkeypatch.setattr(aa_trt.precision.Machine, "detect", classmethod(lambda cls: machine))
    args = ["run", str(files["ref"]), str(files["dance"]), "--ckpt", str(files["ckpt"]), "--pose-video",
            "--steps", "1", "--quiet"]
    assert cli([*args, "-o", str(tmp_path / "a.mp4"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["precision"] == want and result["precision_reason"] == choose("auto", "cpu", machine).reason
    assert cli([*args, "-o", str(tmp_path / "b.mp4")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f" in {want} (auto: the CPU " in line
