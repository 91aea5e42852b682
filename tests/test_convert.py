"""Moore-AnimateAnyone's .pth files -> one aa-trt checkpoint (aa_trt.convert and `aa-trt convert`).

Uses Moore's own tiny random weights (shared/fixtures/moore_tiny) for real conversions, and the key
lists of Moore's full SD1.5-size files (shared/reference/moore_keys) for the full layouts.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aa_trt import cli
from aa_trt.checkpoint import COMPONENTS, build_models, check_state_dict, load_checkpoint, read_config, read_metadata
from aa_trt.config import PRESETS, PoseGuiderConfig
from aa_trt.convert import MOORE_FILES, convert_moore, load_pth, pose_guider_config, split_moore
from aa_trt.errors import CheckpointError, InputError
from helpers import FIXTURE, MOORE_KEYS, needs_fixture

pytestmark = needs_fixture

F = FIXTURE
INFER = F / "inference.yaml"
BASE_PIECES = ("unet", "vae", "image_encoder")
# Where each Moore file lands in the checkpoint.
PREFIX = {"denoising_unet.pth": "denoising_unet", "motion_module.pth": "denoising_unet",
          "reference_unet.pth": "reference_unet", "pose_guider.pth": "pose_guider"}
BASE_WEIGHTS = {"vae": F / "vae" / "diffusion_pytorch_model.safetensors",
                "image_encoder": F / "image_encoder" / "model.safetensors"}


# ------------------------------------------------------------------------------------- helpers

def moore_copy(tmp_path: Path, replace: dict | None = None, drop=()) -> Path:
    """A Moore folder: symlinks to the fixture's four .pth files, except those in `replace`
    (name -> callable(path) writing the file) and those in `drop` (absent)."""
    d = tmp_path / "moore"
    d.mkdir()
    for name in MOORE_FILES:
        if name in drop:
            continue
        if replace and name in replace:
            replace[name](d / name)
        else:
            (d / name).symlink_to(F / name)
    return d


def base_copy(tmp_path: Path, drop=(), replace: dict | None = None) -> Path:
    """A base folder: symlinks to the fixture's unet/, vae/, image_encoder/, less `drop`; a piece
    in `replace` (name -> callable(folder)) is a real folder that the callable fills."""
    b = tmp_path / "base"
    b.mkdir()
    for piece in BASE_PIECES:
        if piece in drop:
            continue
        if replace and piece in replace:
            (b / piece).mkdir()
            replace[piece](b / piece)
        else:
            (b / piece).symlink_to(F / piece)
    return b


@functools.lru_cache(maxsize=None)
def _moore_sd(name: str) -> dict[str, torch.Tensor]:
    return dict(torch.load(F / name, map_location="cpu", weights_only=True))


def moore_sd(name: str) -> dict[str, torch.Tensor]:
    """The fixture's `name` as a fresh dict (shared tensors: edit by replacing, not in place)."""
    return dict(_moore_sd(name))


def write_edited(name: str, edit):
    """A writer for moore_copy: the fixture's `name` with `edit(sd)` applied, saved by torch.save."""
    def write(path: Path):
        sd = moore_sd(name)
        edit(sd)
        torch.save(sd, path)
    return write


def assert_nothing_written(out: Path):
    assert not out.exists(), f"{out} was written despite the error"
    if out.parent.exists():
        assert list(out.parent.iterdir()) == [], list(out.parent.iterdir())


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    """shared/reference/moore_keys/<name>.txt: `key<TAB>(shape)` per line, in file order."""
    out = {}
    for line in (MOORE_KEYS / f"{name}.txt").read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split("\t")
        assert key not in out, f"duplicate key {key} in {name}.txt"
        out[key] = tuple(ast.literal_eval(shape))
    return out


class _RunsCode:
    """Pickles as a call to os.system: a .pth holding it runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.cmd = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def write_malicious(name: str, marker: Path, legacy: bool = False):
    """The fixture's tensors of `name` plus a payload that would `touch marker` if unpickled."""
    def write(path: Path):
        sd = moore_sd(name)
        sd["payload"] = _RunsCode(marker)
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return write


# ------------------------------------------------------------------------- a real conversion

@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "m.safetensors"
    path = convert_moore(F, F, out, inference_config=INFER)
    assert Path(path) == out
    return out


@pytest.fixture(scope="module")
def converted_tensors(converted) -> dict[str, torch.Tensor]:
    with safe_open(str(converted), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_convert_writes_an_aa_trt_checkpoint(converted):
    assert converted.is_file()
    assert [p.name for p in converted.parent.iterdir()] == ["m.safetensors"]  # no temporary left
    meta = read_metadata(converted)
    assert meta["format"] == "aa-trt"
    prov = json.loads(meta["provenance"])
    assert prov["source"] == "Moore-AnimateAnyone" and prov["dtype"] == "as stored"
    assert Path(prov["moore_dir"]) == F.resolve()
    # The fixture is the `tiny` preset: the config is read off the files and inference.yaml.
    cfg = read_config(converted)
    tiny = PRESETS["tiny"]
    assert cfg.name == "moore-v2"
    assert cfg.unet == tiny.unet
    assert cfg.motion == tiny.motion  # num_heads 2 comes from inference.yaml, not the default 8
    assert cfg.pose_guider == tiny.pose_guider
    assert cfg.scheduler == tiny.scheduler
    models = load_checkpoint(converted)
    assert all(getattr(models, c) is not None for c in COMPONENTS)


def test_every_moore_tensor_lands_unchanged(converted_tensors):
    expected_keys = {c: set() for c in ("denoising_unet", "reference_unet", "pose_guider")}
    for name in MOORE_FILES:
        sd = moore_sd(name)
        prefix = PREFIX[name]
        assert len(sd) > 0
        for k, v in sd.items():
            key = f"{prefix}.{k}"
            expected_keys[prefix].add(key)
            assert key in converted_tensors, f"{name}: {k} is not in the checkpoint as {key}"
            got = converted_tensors[key]
            assert got.dtype == v.dtype, key
            assert torch.equal(got, v), f"{name}: {k} changed in conversion"
    for prefix, keys in expected_keys.items():
        have = {k for k in converted_tensors if k.startswith(prefix + ".")}
        assert have == keys, f"{prefix}: extra {sorted(have - keys)[:5]}, missing {sorted(keys - have)[:5]}"


def test_base_vae_and_clip_land_unchanged(converted_tensors):
    for comp, path in BASE_WEIGHTS.items():
        sd = load_file(str(path))
        have = {k.split(".", 1)[1] for k in converted_tensors if k.startswith(comp + ".")}
        assert have == set(sd), comp
        for k, v in sd.items():
            assert torch.equal(converted_tensors[f"{comp}.{k}"], v), f"{comp}.{k}"
    assert {k.split(".", 1)[0] for k in converted_tensors} == set(COMPONENTS)


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_cli_convert(tmp_path, capsys, dtype):
    out = tmp_path / "out" / "m.safetensors"
    argv = ["convert", "--moore", str(F), "--base", str(F), "-o", str(out),
            "--inference-config", str(INFER)]
    if dtype:
        argv += ["--dtype", dtype]
    assert cli.main(argv) == 0
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m.safetensors"]
    assert str(out) in capsys.readouterr().out
    want = torch.float16 if dtype == "fp16" else torch.float32
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "fp16" else "F32"}
        for name in MOORE_FILES:
            for k, v in moore_sd(name).items():
                got = f.get_tensor(f"{PREFIX[name]}.{k}")
                assert got.dtype == want and torch.equal(got, v.to(want)), f"{name}: {k}"
    assert json.loads(read_metadata(out)["provenance"])["dtype"] == (dtype or "as stored")


def test_unknown_dtype_is_refused(tmp_path):
    out = tmp_path / "out" / "m.safetensors"
    with pytest.raises(InputError, match="fp8"):
        convert_moore(F, F, out, dtype="fp8", inference_config=INFER)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- malicious pickles

def test_malicious_payload_is_live(tmp_path):
    """The test payload really runs code when unpickled unsafely (so the refusals below mean
    something)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    write_malicious("pose_guider.pth", marker)(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what a careless loader would do
    assert marker.exists()


@pytest.mark.parametrize("name,legacy", [(n, False) for n in MOORE_FILES] + [("pose_guider.pth", True)],
                         ids=[n for n in MOORE_FILES] + ["pose_guider.pth-legacy-format"])
def test_malicious_pickle_is_refused(tmp_path, name, legacy):
    marker = tmp_path / "PWNED"
    moore = moore_copy(tmp_path, {name: write_malicious(name, marker, legacy)})
    out = tmp_path / "out" / "m.safetensors"
    with pytest.raises(CheckpointError) as ei:
        convert_moore(moore, F, out, inference_config=INFER)
    msg = str(ei.value)
    assert str(moore / name) in msg
    assert "refused" in msg
    assert not marker.exists(), "the pickle's code ran"
    assert_nothing_written(out)


def test_malicious_pickle_message_names_the_blocked_global(tmp_path):
    path = tmp_path / "evil.pth"
    write_malicious("pose_guider.pth", tmp_path / "PWNED")(path)
    with pytest.raises(CheckpointError) as ei:
        load_pth(path)
    assert f"{os.system.__module__}.system" in str(ei.value)  # posix.system on Linux
    assert not (tmp_path / "PWNED").exists()


def test_cli_refuses_malicious_pickle(tmp_path, capsys):
    name = "motion_module.pth"
    marker = tmp_path / "PWNED"
    moore = moore_copy(tmp_path, {name: write_malicious(name, marker)})
    out = tmp_path / "out" / "m.safetensors"
    rc = cli.main(["convert", "--moore", str(moore), "--base", str(F), "-o", str(out),
                   "--inference-config", str(INFER)])
    assert rc == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aa-trt: error:")
    assert str(moore / name) in lines[0]
    assert "Traceback" not in err
    assert not marker.exists(), "the pickle's code ran"
    assert_nothing_written(out)


# ------------------------------------------------------------------------------- bad inputs

def _convert_raises(tmp_path, moore, base, exc=(CheckpointError, InputError)):
    out = tmp_path / "out" / "m.safetensors"
    with pytest.raises(exc) as ei:
        convert_moore(moore, base, out, inference_config=INFER)
    assert_nothing_written(out)
    return str(ei.value)


@pytest.mark.parametrize("name", MOORE_FILES)
def test_missing_pth(tmp_path, name):
    moore = moore_copy(tmp_path, drop=(name,))
    msg = _convert_raises(tmp_path, moore, F, InputError)
    assert name in msg and str(moore) in msg
    assert not any(other in msg for other in MOORE_FILES if other != name)


def test_moore_and_base_must_be_folders(tmp_path):
    msg = _convert_raises(tmp_path, tmp_path / "nope", F, InputError)
    assert str(tmp_path / "nope") in msg
    msg = _convert_raises(tmp_path, F, tmp_path / "nope", InputError)
    assert str(tmp_path / "nope") in msg


@pytest.mark.parametrize("piece,named", [("unet", "unet/config.json"), ("vae", "vae/config.json"),
                                         ("image_encoder", "image_encoder/config.json")])
def test_missing_base_piece(tmp_path, piece, named):
    base = base_copy(tmp_path, drop=(piece,))
    msg = _convert_raises(tmp_path, F, base, InputError)
    assert str(base / named) in msg


def test_truncated_base_weights(tmp_path):
    def truncated_vae(d: Path):
        shutil.copy(F / "vae" / "config.json", d)
        data = BASE_WEIGHTS["vae"].read_bytes()
        (d / BASE_WEIGHTS["vae"].name).write_bytes(data[: len(data) // 2])

    base = base_copy(tmp_path, replace={"vae": truncated_vae})
    msg = _convert_raises(tmp_path, F, base, InputError)
    assert str(base / "vae") in msg


def _base_missing_one_key(comp):
    def fill(d: Path):
        shutil.copy(F / comp / "config.json", d)
        sd = load_file(str(BASE_WEIGHTS[comp]))
        del sd[sorted(sd)[3]]
        save_file(sd, str(d / BASE_WEIGHTS[comp].name), metadata={"format": "pt"})
    return fill


def test_base_vae_missing_a_tensor_is_refused(tmp_path):
    base = base_copy(tmp_path, replace={"vae": _base_missing_one_key("vae")})
    sd = load_file(str(BASE_WEIGHTS["vae"]))
    msg = _convert_raises(tmp_path, F, base)
    assert sorted(sd)[3] in msg


def test_base_clip_missing_a_tensor_is_refused(tmp_path):
    base = base_copy(tmp_path, replace={"image_encoder": _base_missing_one_key("image_encoder")})
    sd = load_file(str(BASE_WEIGHTS["image_encoder"]))
    msg = _convert_raises(tmp_path, F, base)
    assert sorted(sd)[3] in msg


@pytest.mark.parametrize("name", MOORE_FILES)
def test_truncated_pth(tmp_path, name):
    def write(path: Path):
        data = (F / name).read_bytes()
        path.write_bytes(data[: len(data) // 2])

    moore = moore_copy(tmp_path, {name: write})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert str(moore / name) in msg
    assert len(msg.splitlines()) == 1


@pytest.mark.parametrize("obj", [[torch.randn(3)], {"a": torch.randn(3), "b": 3}], ids=["list", "int"])
def test_pth_that_is_not_a_dict_of_tensors(tmp_path, obj):
    name = "reference_unet.pth"
    moore = moore_copy(tmp_path, {name: lambda p: torch.save(obj, p)})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert str(moore / name) in msg and "dict of tensors" in msg


def test_load_pth_unwraps_state_dict(tmp_path):
    sd = moore_sd("pose_guider.pth")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    got = load_pth(tmp_path / "wrapped.pth")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def _weights(sd):
    """>=2-D weights in sorted order. For pose_guider.pth the middle ones are blocks.3-5.weight;
    the converter reads the PoseGuider's widths from dim 0 of conv_in/blocks.1,3,5/conv_out only."""
    return sorted(k for k, v in sd.items() if v.ndim >= 2)


@pytest.mark.parametrize("name", MOORE_FILES)
def test_pth_with_extra_and_missing_key(tmp_path, name):
    sd = moore_sd(name)
    gone = _weights(sd)[len(_weights(sd)) // 2]
    extra = gone.rsplit(".", 1)[0] + ".extra_weight"  # inside a motion module for motion_module.pth

    def mutate(sd):
        del sd[gone]
        sd[extra] = torch.randn(4)

    moore = moore_copy(tmp_path, {name: write_edited(name, mutate)})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert name in msg, msg
    assert f"1 missing keys: {gone}" in msg, msg
    assert f"1 unexpected keys: {extra}" in msg, msg
    assert len(msg.splitlines()) == 1


@pytest.mark.parametrize("name", MOORE_FILES)
def test_pth_with_wrong_shapes(tmp_path, name):
    sd = moore_sd(name)
    keys = _weights(sd)[len(_weights(sd)) // 2:][:2]  # two of them: the first (sorted) is named

    def mutate(sd):
        for k in keys:
            s = sd[k].shape
            sd[k] = torch.randn(s[0], s[1] + 1, *s[2:])

    moore = moore_copy(tmp_path, {name: write_edited(name, mutate)})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert name in msg, msg
    s = tuple(sd[keys[0]].shape)
    assert f"2 tensors of the wrong shape, first {keys[0]}: {(s[0], s[1] + 1, *s[2:])} in the file, {s} " \
        "expected" in msg, msg
    assert len(msg.splitlines()) == 1


def test_motion_module_pth_with_a_non_motion_key(tmp_path):
    name = "motion_module.pth"
    moore = moore_copy(tmp_path, {name: write_edited(name, lambda sd: sd.update(
        {"conv_in.weight": torch.randn(32, 4, 3, 3)}))})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert name in msg and "conv_in.weight" in msg


def test_key_in_both_denoising_unet_and_motion_module(tmp_path):
    mm = moore_sd("motion_module.pth")
    k = sorted(mm)[0]
    name = "denoising_unet.pth"
    moore = moore_copy(tmp_path, {name: write_edited(name, lambda sd: sd.update({k: mm[k] + 1}))})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert "denoising_unet.pth" in msg and "motion_module.pth" in msg and k in msg


def test_pose_guider_width_must_match_unet(tmp_path):
    name = "pose_guider.pth"

    def mutate(sd):
        sd["conv_out.weight"] = torch.randn(48, *sd["conv_out.weight"].shape[1:])
        sd["conv_out.bias"] = torch.randn(48)

    moore = moore_copy(tmp_path, {name: write_edited(name, mutate)})
    msg = _convert_raises(tmp_path, moore, F, CheckpointError)
    assert str(moore / name) in msg and "48" in msg


# ------------------------------------------------------------------------ full SD1.5 layouts

MOORE_COUNTS = {"denoising_unet": 686, "reference_unet": 682, "motion_module": 588, "pose_guider": 16}


@pytest.fixture(scope="module")
def moore_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: read_key_list(name) for name in MOORE_COUNTS}


@pytest.fixture(scope="module")
def sd15():
    return build_models(PRESETS["sd15"], "meta")


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _meta(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


def test_moore_key_list_counts(moore_keys):
    assert {n: len(v) for n, v in moore_keys.items()} == MOORE_COUNTS

    def params(n):
        return sum(torch.Size(s).numel() for s in moore_keys[n].values()) / 1e6

    assert round(params("denoising_unet"), 1) == 859.5
    assert round(params("reference_unet"), 1) == 859.5
    assert round(params("motion_module"), 1) == 454.4
    assert round(params("pose_guider"), 2) == 1.09
    mm = moore_keys["motion_module"]
    assert all("motion_modules" in k for k in mm)
    pe = {k: s for k, s in mm.items() if k.endswith("pos_encoder.pe")}
    assert len(pe) == 42 and all(s[:2] == (1, 32) for s in pe.values())
    den, ref = moore_keys["denoising_unet"], moore_keys["reference_unet"]
    assert not any("motion_modules" in k for k in den)
    assert set(den) - set(ref) == {"conv_norm_out.weight", "conv_norm_out.bias",
                                   "conv_out.weight", "conv_out.bias"}
    assert set(ref) <= set(den)


def test_sd15_denoising_unet_layout(sd15, moore_keys):
    den, mm = moore_keys["denoising_unet"], moore_keys["motion_module"]
    assert not den.keys() & mm.keys()
    ours = _shapes(sd15.denoising_unet)
    assert ours.keys() == den.keys() | mm.keys(), (sorted(ours.keys() - den.keys() - mm.keys())[:5],
                                                    sorted((den.keys() | mm.keys()) - ours.keys())[:5])
    bad = {k: (ours[k], s) for k, s in {**den, **mm}.items() if ours[k] != s}
    assert not bad, list(bad.items())[:5]


def test_sd15_reference_unet_layout(sd15, moore_keys):
    assert _shapes(sd15.reference_unet) == moore_keys["reference_unet"]


def test_sd15_pose_guider_layout(sd15, moore_keys):
    assert _shapes(sd15.pose_guider) == moore_keys["pose_guider"]


def test_sd15_split_and_check_like_the_converter(sd15, moore_keys):
    files = {f"{n}.pth": _meta(keys) for n, keys in moore_keys.items()}
    sds = split_moore(files)
    assert set(sds) == {"denoising_unet", "reference_unet", "pose_guider"}
    # Nothing dropped, nothing duplicated on the way.
    assert sum(len(v) for v in sds.values()) == sum(MOORE_COUNTS.values())
    for comp, sd in sds.items():
        check_state_dict(f"sd15/{comp}", comp, getattr(sd15, comp), sd)  # raises on any mismatch
    # And the check does bite on this layout: one missing motion-module tensor is named.
    den = dict(sds["denoising_unet"])
    gone = sorted(moore_keys["motion_module"])[0]
    del den[gone]
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        check_state_dict("sd15/denoising_unet", "denoising_unet", sd15.denoising_unet, den)


def test_sd15_pose_guider_config_from_shapes(moore_keys):
    cfg = pose_guider_config(_meta(moore_keys["pose_guider"]))
    assert cfg.block_out_channels == (16, 32, 96, 256)
    assert cfg.embedding_channels == 320
    assert cfg.conditioning_channels == 3
    assert cfg == PoseGuiderConfig() == PRESETS["sd15"].pose_guider
