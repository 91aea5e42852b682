"""The aa-trt checkpoint file: save/load round trip, meta-device loading, dtypes, errors, atomic save."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aa_trt.checkpoint import (COMPONENTS, FORMAT_VERSION, build_models, load_checkpoint, read_config,
                               read_metadata, save_checkpoint, save_models)
from aa_trt.config import PRESETS, SchedulerConfig
from aa_trt.errors import CheckpointError
from helpers import randomize_

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_models():
    models = build_models(TINY)
    for i, module in enumerate(models.components().values()):
        randomize_(module, seed=i + 1).eval()
    return models


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    path = save_models(folder / "tiny.safetensors", tiny_models, provenance={"test": "round trip"})
    assert [p.name for p in folder.iterdir()] == ["tiny.safetensors"]  # no temporary left
    return path


def rewrite(src: Path, dst: Path, edit_tensors=None, edit_meta=None) -> Path:
    """A copy of the checkpoint `src` with its tensors and/or metadata edited in place."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _load_error(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, **kw)
    msg = str(ei.value)
    assert str(path) in msg, msg
    return msg


# -------------------------------------------------------------------------------- round trip

def test_round_trip_state_dicts(tiny_models, saved):
    loaded = load_checkpoint(saved)
    for comp in COMPONENTS:
        want, got = getattr(tiny_models, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert got.keys() == want.keys(), comp
        for k, v in want.items():
            assert got[k].dtype == v.dtype, f"{comp}.{k}"
            assert torch.equal(got[k], v), f"{comp}.{k}"
    # The weights really are random: a comparison can fail on any of them.
    assert not any(torch.all(p == 0) for p in tiny_models.denoising_unet.parameters())


def test_round_trip_config_and_metadata(saved):
    assert read_config(saved) == TINY
    meta = read_metadata(saved)
    assert meta["format"] == "aa-trt" and int(meta["format_version"]) == FORMAT_VERSION
    assert json.loads(meta["provenance"]) == {"test": "round trip"}
    assert load_checkpoint(saved, components=("pose_guider",)).config == TINY


def test_round_trip_non_default_config(tiny_models, tmp_path):
    cfg = TINY.replace(name="custom", default_size=(96, 80), bank_dtype="float32", latent_scale=0.2, guidance=1.5,
                       scheduler=SchedulerConfig(beta_schedule="scaled_linear", steps_offset=0))
    path = save_checkpoint(tmp_path / "c.safetensors", cfg,
                           {c: m.state_dict() for c, m in tiny_models.components().items()})
    assert read_config(path) == cfg


def test_save_in_fp16(tiny_models, tmp_path):
    path = save_models(tmp_path / "h.safetensors", tiny_models, dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded = load_checkpoint(path, dtype=torch.float16)
    want = tiny_models.pose_guider.state_dict()
    for k, v in loaded.pose_guider.state_dict().items():
        assert torch.equal(v, want[k].half()), k


# --------------------------------------------------------------------- meta-device loading

def _all_tensors(module):
    return list(module.named_parameters()) + list(module.named_buffers())


def test_load_leaves_nothing_on_meta(tiny_models, saved):
    loaded = load_checkpoint(saved)
    for comp in COMPONENTS:
        module = getattr(loaded, comp)
        on_meta = [n for n, t in _all_tensors(module) if t.is_meta]
        assert not on_meta, f"{comp}: {on_meta[:5]}"
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters()), comp
    # CLIP's non-persistent position_ids is not in the file: it must be rebuilt, not left on meta.
    ours = dict(loaded.image_encoder.named_buffers())["vision_model.embeddings.position_ids"]
    ref = dict(tiny_models.image_encoder.named_buffers())["vision_model.embeddings.position_ids"]
    assert not ours.is_meta and ours.dtype == ref.dtype and torch.equal(ours, ref)
    # And the loaded CLIP computes what the original does (up to float rounding: the loaded
    # weights live at other alignments in the memory-mapped file, so SIMD sums may round apart).
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = loaded.image_encoder(pixel_values=x).image_embeds
        b = tiny_models.image_encoder(pixel_values=x).image_embeds
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_dtype_and_component_dtypes(tiny_models, saved):
    loaded = load_checkpoint(saved, dtype=torch.float16, component_dtypes={"vae": torch.float32})
    for comp in COMPONENTS:
        module = getattr(loaded, comp)
        want = torch.float32 if comp == "vae" else torch.float16
        for name, t in _all_tensors(module):
            assert not t.is_meta, f"{comp}.{name}"
            if t.is_floating_point():
                assert t.dtype == want, f"{comp}.{name}: {t.dtype}"
            else:
                assert t.dtype == torch.int64, f"{comp}.{name}: {t.dtype}"  # position_ids
    v0 = tiny_models.vae.state_dict()
    assert all(torch.equal(v, v0[k]) for k, v in loaded.vae.state_dict().items())  # fp32, exact
    d0 = tiny_models.denoising_unet.state_dict()
    assert all(torch.equal(v, d0[k].half()) for k, v in loaded.denoising_unet.state_dict().items())


def test_load_some_components(saved):
    loaded = load_checkpoint(saved, components=("pose_guider", "vae"))
    assert loaded.pose_guider is not None and loaded.vae is not None
    assert loaded.denoising_unet is None and loaded.reference_unet is None and loaded.image_encoder is None


# ------------------------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    _load_error(path)
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_config(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a checkpoint\n" * 10)
    _load_error(path)


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    _load_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _load_error(path)


@pytest.mark.parametrize("meta", [None, {"format": "pt"}], ids=["no-metadata", "format-pt"])
def test_safetensors_without_aa_trt_metadata(tmp_path, meta):
    path = tmp_path / "plain.safetensors"
    save_file({"pose_guider.conv_in.weight": torch.randn(16, 3, 3, 3)}, str(path), metadata=meta)
    msg = _load_error(path)
    assert "not an aa-trt checkpoint" in msg


def test_missing_key(saved, tmp_path):
    key = "denoising_unet.up_blocks.1.motion_modules.0.temporal_transformer.proj_out.weight"
    path = rewrite(saved, tmp_path / "m.safetensors", lambda t: t.pop(key))
    msg = _load_error(path)
    assert "1 missing keys" in msg and key.split(".", 1)[1] in msg and "denoising_unet" in msg


def test_unexpected_key(saved, tmp_path):
    key = "reference_unet.down_blocks.0.extra.weight"
    path = rewrite(saved, tmp_path / "u.safetensors", lambda t: t.update({key: torch.randn(3)}))
    msg = _load_error(path)
    assert "unexpected" in msg and key.split(".", 1)[1] in msg and "reference_unet" in msg


def test_wrong_shape(saved, tmp_path):
    key = "vae.decoder.conv_in.weight"

    def edit(t):
        s = t[key].shape
        t[key] = torch.randn(s[0] + 1, *s[1:])

    path = rewrite(saved, tmp_path / "s.safetensors", edit)
    msg = _load_error(path)
    assert "wrong shape" in msg and key.split(".", 1)[1] in msg and "vae" in msg


def test_key_outside_components(saved, tmp_path):
    key = "controlnet.conv_in.weight"
    path = rewrite(saved, tmp_path / "o.safetensors", lambda t: t.update({key: torch.randn(3)}))
    msg = _load_error(path)
    assert key in msg


def test_newer_format_version(saved, tmp_path):
    path = rewrite(saved, tmp_path / "v.safetensors",
                   edit_meta=lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    msg = _load_error(path)
    assert f"format version {FORMAT_VERSION + 1}" in msg
    with pytest.raises(CheckpointError, match="newer"):
        read_config(path)


@pytest.mark.parametrize("config", ["{", "{}", "[1]"], ids=["bad-json", "no-name", "not-a-dict"])
def test_unreadable_config_metadata(saved, tmp_path, config):
    path = rewrite(saved, tmp_path / "c.safetensors", edit_meta=lambda m: m.update(config=config))
    assert "config" in _load_error(path)


def test_non_integer_format_version(saved, tmp_path):
    path = rewrite(saved, tmp_path / "v.safetensors", edit_meta=lambda m: m.update(format_version="two"))
    _load_error(path)


def test_integer_tensor_for_float_parameter(saved, tmp_path):
    key = "pose_guider.conv_in.weight"
    path = rewrite(saved, tmp_path / "i.safetensors",
                   lambda t: t.update({key: torch.randint(0, 3, t[key].shape)}))
    assert key.split(".", 1)[1] in _load_error(path)


# ----------------------------------------------------------------------------- atomic save

def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial safetensors data")
    raise OSError("No space left on device")


def test_failed_save_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    target = tmp_path / "out" / "x.safetensors"
    with pytest.raises(OSError, match="No space left"):
        save_models(target, tiny_models)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failed_save_keeps_the_old_file(saved, tiny_models, tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    target.write_bytes(saved.read_bytes())
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save_models(target, tiny_models, dtype=torch.float16)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_save_replaces_an_existing_file(saved, tiny_models, tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old contents")
    save_models(target, tiny_models, dtype=torch.float16)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with safe_open(str(target), framework="pt") as f:
        assert f.get_slice("pose_guider.conv_in.weight").get_dtype() == "F16"


def test_saved_checkpoint_has_the_usual_file_mode(tiny_models, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = save_models(tmp_path / "m.safetensors", tiny_models)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
