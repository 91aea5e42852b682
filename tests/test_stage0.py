"""Stage 0: the small VAE and CLIP a shippable preset trains for itself."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from aa_trt.checkpoint import build_models, load_checkpoint, read_config, read_metadata, save_models
from aa_trt.cli import main
from aa_trt.config import preset
from aa_trt.training.autoencoder import (Stage0Options, clip_loss, decoder_loss, decoder_parameters, random_crops,
                                        reconstruction_loss, train_stage0, vae_loss)
from aa_trt.models.external import clip_pixels
from aa_trt.training.data import VideoSet, sample_batch, to_unit
from aa_trt.training.metrics import ssim, ssim_torch
from aa_trt.training.synthetic import synthesize

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s0data")
    synthesize(root, videos=6, size=64, frames=4, seed=3, formats=("npz",), progress=False)
    return root


def test_losses_fall_on_a_fixed_batch(data):
    torch.manual_seed(0)
    m = build_models(preset("tiny"), components=("vae", "image_encoder"))
    rng = np.random.default_rng(0)
    px = sample_batch(VideoSet(data), rng, 4)
    x = to_unit(random_crops(np.concatenate([px.ref, px.frames[:, 0]]), 32, rng)) * 2 - 1
    size = m.image_encoder.config.image_size
    a, b = clip_pixels(px.ref, size), clip_pixels(px.frames[:, 0], size)
    params = list(m.vae.parameters()) + list(m.image_encoder.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for step in range(8):
        lv, _ = vae_loss(m.vae, x, 1e-6, torch.Generator().manual_seed(0))
        lc, _ = clip_loss(m.image_encoder, a, b, 0.1)
        losses.append((lv.item(), lc.item()))
        opt.zero_grad()
        (lv + lc).backward()
        opt.step()
    assert losses[-1][0] < 0.9 * losses[0][0] and losses[-1][1] < 0.9 * losses[0][1]


def test_random_crops_stay_inside_and_refuse_oversize():
    frames = np.arange(2 * 10 * 12 * 3, dtype=np.uint8).reshape(2, 10, 12, 3)
    c = random_crops(frames, 8, np.random.default_rng(0))
    assert c.shape == (2, 8, 8, 3)
    with pytest.raises(Exception, match="larger than the frames"):
        random_crops(frames, 16, np.random.default_rng(0))


def test_stage0_command_writes_a_checkpoint_for_stage1(data, tmp_path, capsys):
    out = tmp_path / "s0"
    rc = main(["train", "--stage", "0", "--preset", "tiny", "--data", str(data), "--out", str(out),
               "--steps", "2", "--batch", "2", "--crop", "32", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    ckpt = out / "model.safetensors"
    cfg = read_config(ckpt)
    trained = load_checkpoint(ckpt)
    torch.manual_seed(0)
    fresh = build_models(preset("tiny"))
    # latent_scale is measured on the data, not the preset's SD constant.
    assert cfg.latent_scale != preset("tiny").latent_scale and cfg.latent_scale > 0
    # Only the VAE and CLIP train; the UNets keep their seeded initialisation, the zero-initialised
    # outputs (PoseGuider conv_out, motion proj_out) are zero.
    for comp in ("vae", "image_encoder"):
        a, b = trained.components()[comp].state_dict(), fresh.components()[comp].state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a)
    den, fresh_den = trained.denoising_unet.state_dict(), fresh.denoising_unet.state_dict()
    ref = trained.reference_unet.state_dict()
    assert all(torch.equal(den[k], fresh_den[k]) for k in ref)
    # ReferenceNet starts as a copy of the denoising UNet's spatial weights (the paper's init).
    assert all(torch.equal(ref[k], den[k]) for k in ref)
    assert any(not torch.equal(ref[k], fresh.reference_unet.state_dict()[k]) for k in ref)
    assert not trained.pose_guider.conv_out.weight.any()
    assert all(not m.temporal_transformer.proj_out.weight.any() for m in trained.denoising_unet.motion_modules())
    # Stage 1 starts from it.
    rc = main(["train", "--stage", "1", "--init", str(ckpt), "--data", str(data), "--out", str(tmp_path / "s1"),
               "--steps", "1", "--batch", "2", "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err


def test_stage0_init_must_exist(data, tmp_path, capsys):
    rc = main(["train", "--stage", "0", "--init", str(tmp_path / "x.safetensors"), "--data", str(data),
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and "x.safetensors" in err and "Traceback" not in err


def test_small_preset_latents_and_pose_features_line_up():
    cfg = preset("small")
    assert cfg.latent_factor == 8 and preset("sd15").latent_factor == 8
    m = build_models(cfg, components=("vae", "pose_guider"))
    with torch.no_grad():
        lat = m.vae.encode(torch.rand(1, 3, 64, 96) * 2 - 1).latent_dist.mean
        feat = m.pose_guider(torch.rand(1, 3, 64, 96))
    assert lat.shape[2:] == feat.shape[2:] == (8, 12)
    assert lat.shape[1] == cfg.latent_channels == cfg.unet.in_channels == cfg.unet.out_channels == 16
    assert feat.shape[1] == cfg.unet.block_out_channels[0]
    # A PoseGuider that downsamples by 4 next to an 8x VAE is refused when the config is made.
    from aa_trt.config import PoseGuiderConfig

    with pytest.raises(ValueError, match="would not line up"):
        cfg.replace(pose_guider=PoseGuiderConfig(block_out_channels=(16, 32, 64), embedding_channels=64))
    # So is a UNet that does not denoise the VAE's latent channels.
    with pytest.raises(ValueError, match="latents have 16"):
        cfg.replace(unet=preset("tiny").unet)


def test_decoder_loss_falls_on_a_fixed_batch_and_leaves_the_encoder_alone(data):
    torch.manual_seed(0)
    vae = build_models(preset("tiny"), components=("vae",)).vae
    rng = np.random.default_rng(1)
    px = sample_batch(VideoSet(data), rng, 4)
    x = to_unit(random_crops(px.frames[:, 0], 32, rng)) * 2 - 1
    params = decoder_parameters(vae)
    opt = torch.optim.Adam(params, lr=2e-3)
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    losses = []
    for _ in range(8):
        loss, _ = decoder_loss(vae, x, torch.Generator().manual_seed(0))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0]
    # No gradient reaches the encoder: the latent space the UNets were trained on cannot move.
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in vae.encoder.state_dict().items())


def test_ssim_term_is_evals_ssim_and_raises_it_on_a_fixed_batch(data):
    # The training SSIM is the one eval reports: same numbers on [0, 1] pixels as on uint8 frames.
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, (2, 3, 24, 24, 3)).astype(np.uint8)
    to_t = lambda u: torch.from_numpy(u).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    np.testing.assert_allclose(ssim_torch(to_t(a), to_t(b), 1.0).numpy(), ssim(a, b), atol=1e-5)
    # ... and reconstruction_loss's term is that SSIM of its [-1, 1] inputs.
    _, parts = reconstruction_loss(to_t(a) * 2 - 1, to_t(b) * 2 - 1, ssim_weight=1.0)
    assert parts["ssim"] == pytest.approx(float(ssim(a, b).mean()), abs=1e-5)

    torch.manual_seed(0)
    vae = build_models(preset("tiny"), components=("vae",)).vae
    px = sample_batch(VideoSet(data), rng, 4)
    x = to_unit(random_crops(px.frames[:, 0], 32, rng)) * 2 - 1
    params = decoder_parameters(vae)
    opt = torch.optim.Adam(params, lr=2e-3)
    seen = []
    for _ in range(8):
        loss, parts = decoder_loss(vae, x, torch.Generator().manual_seed(0), ssim_weight=1.0)
        seen.append((loss.item(), parts["ssim"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen[-1][0] < 0.9 * seen[0][0] and seen[-1][1] > seen[0][1] + 0.02
    # Without the weight the term is neither computed nor reported.
    assert "ssim" not in decoder_loss(vae, x, torch.Generator().manual_seed(0))[1]


def test_decoder_only_finetune_changes_the_decoder_and_nothing_else(data, tmp_path, capsys):
    first = tmp_path / "s0"
    assert main(["train", "--stage", "0", "--preset", "tiny", "--data", str(data), "--out", str(first),
                 "--steps", "1", "--batch", "2", "--crop", "32", "--quiet"]) == 0
    init = first / "model.safetensors"
    out = tmp_path / "dec"
    rc = main(["train", "--stage", "0", "--init", str(init), "--decoder-only", "--data", str(data),
               "--out", str(out), "--steps", "3", "--batch", "2", "--crop", "32", "--lr", "1e-3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    before, after = load_checkpoint(init), load_checkpoint(out / "model.safetensors")
    changed = {c for c, m in after.components().items()
               for k, v in m.state_dict().items() if not torch.equal(v, before.components()[c].state_dict()[k])}
    assert changed == {"vae"}
    vb, va = before.vae.state_dict(), after.vae.state_dict()
    moved = {k.split(".")[0] for k in va if not torch.equal(va[k], vb[k])}
    assert "decoder" in moved and moved <= {"decoder", "post_quant_conv"}  # nothing before the latent
    assert read_config(out / "model.safetensors").latent_scale == read_config(init).latent_scale
    prov = json.loads(read_metadata(out / "model.safetensors")["provenance"])
    assert prov["stage"] == 0 and prov["decoder_finetune"]["options"]["decoder_only"] is True
    assert "clip" not in (out / "log.jsonl").read_text()

    # A second fine-tune continues the first and keeps its record.
    again = tmp_path / "dec2"
    assert main(["train", "--stage", "0", "--init", str(out / "model.safetensors"), "--decoder-only",
                 "--data", str(data), "--out", str(again), "--steps", "1", "--batch", "2", "--crop", "32",
                 "--quiet"]) == 0
    rec = json.loads(read_metadata(again / "model.safetensors")["provenance"])["decoder_finetune"]
    assert rec["step"] == 1 and rec["continues"]["step"] == 3 and "continues" not in rec["continues"]

    # tools/graft_decoder.py moves the fine-tuned decoder onto a checkpoint with the same encoder,
    # and refuses one whose encoder differs.
    grafted = tmp_path / "grafted.safetensors"
    run_graft(init, out / "model.safetensors", grafted)
    g = load_checkpoint(grafted)
    for c, m in g.components().items():
        for k, v in m.state_dict().items():
            want = after if c == "vae" and k.startswith(("decoder.", "post_quant_conv.")) else before
            assert torch.equal(v, want.components()[c].state_dict()[k]), (c, k)
    assert json.loads(read_metadata(grafted)["provenance"])["decoder_finetune"]["step"] == 3
    other = load_checkpoint(init)
    with torch.no_grad():
        other.vae.encoder.conv_in.weight.add_(0.01)
    save_models(tmp_path / "other.safetensors", other)
    with pytest.raises(SystemExit, match="encoder differs"):
        run_graft(tmp_path / "other.safetensors", out / "model.safetensors", tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def run_graft(*args):
    script = Path(__file__).resolve().parents[1] / "tools" / "graft_decoder.py"
    runpy.run_path(str(script))["main"]([str(a) for a in args])


@pytest.mark.parametrize("argv, needle", [
    (["--stage", "0", "--preset", "tiny", "--decoder-only"], "give --init"),
    (["--stage", "1", "--preset", "tiny", "--decoder-only"], "belongs to stage 0"),
    (["--stage", "1", "--preset", "tiny", "--ssim-weight", "1"], "--ssim-weight belongs to stage 0"),
    (["--stage", "0", "--preset", "tiny", "--ssim-weight", "-1"], "--ssim-weight -1.0: must be >= 0"),
    (["--stage", "0", "--preset", "tiny", "--ssim-weight", "1", "--crop", "8"], "at least 16"),
])
def test_decoder_only_refuses_what_it_cannot_do(data, tmp_path, capsys, argv, needle):
    rc = main(["train", *argv, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and needle in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s0tiny")
    assert main(["train", "--stage", "0", "--preset", "tiny", "--data", str(data), "--out", str(out),
                 "--steps", "1", "--batch", "2", "--crop", "32", "--quiet"]) == 0
    return out / "model.safetensors"


def test_denoised_pairs_are_the_pipelines_latents_beside_the_true_frames(data, tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    from aa_trt.pipeline import Animator
    from aa_trt.training.denoised import load_pairs

    metas = [data / "test_characters.json", data / "test_motions.json"]
    out = tmp_path / "pairs.npz"
    assert main(["data", "denoised", *map(str, metas), "--ckpt", str(tiny_ckpt), "--out", str(out),
                 "--frames", "2", "--steps", "3", "--guidance", "1.5", "--seed", "7", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and not list(tmp_path.glob(".*tmp*"))
    cfg = read_config(tiny_ckpt)
    pairs = load_pairs(out, cfg.latent_channels, cfg.latent_factor)
    assert len(pairs) == 4 and pairs.frames.shape == (4, 64, 64, 3) and pairs.frames.dtype == np.uint8
    assert pairs.latents.shape == (4, cfg.latent_channels, 64 // cfg.latent_factor, 64 // cfg.latent_factor)
    # Oracle: the second video (seed 7 + 1) through the pipeline directly, and its true frames 1..2.
    entry = json.loads(metas[1].read_text())[0]
    with np.load(data / entry["npz_path"]) as z:
        frames, poses = z["frames"], z["poses"]
    animator = Animator.from_pretrained(tiny_ckpt)
    want = animator(Image.fromarray(frames[0]), poses[1:3], steps=3, guidance=1.5, seed=8, output="latent",
                    progress=False)[0].transpose(0, 1) / cfg.latent_scale
    torch.testing.assert_close(pairs.latents[2:], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(pairs.frames[2:], frames[1:3])
    assert pairs.latents.std() > 0.01  # a real sample, not zeros


def test_decoder_fits_denoised_pairs_and_nothing_else(data, tiny_ckpt, tmp_path, capsys):
    from aa_trt.training.denoised import load_pairs, random_pair_crops, sample_pairs

    pairs_file = sample_pairs(tiny_ckpt, [data / "test_characters.json"], tmp_path / "p.npz", frames=3, steps=2,
                              progress=False)
    cfg = read_config(tiny_ckpt)
    pairs = load_pairs(pairs_file, cfg.latent_channels, cfg.latent_factor)
    z, x = random_pair_crops(pairs, 4, 32, cfg.latent_factor, np.random.default_rng(0))
    assert z.shape == (4, cfg.latent_channels, 32 // cfg.latent_factor, 32 // cfg.latent_factor)
    assert x.shape == (4, 3, 32, 32) and -1 <= x.min() < x.max() <= 1
    # The loss on a fixed batch of pairs falls when the decoder alone trains on it.
    vae = load_checkpoint(tiny_ckpt).vae
    params = decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    seen = []
    for _ in range(15):
        loss, _ = reconstruction_loss(vae.decode(z).sample, x, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert seen[-1] < 0.8 * seen[0]

    # Through the command: both terms logged, only the decoder (and post_quant_conv) moves.
    out = tmp_path / "dec"
    rc = main(["train", "--stage", "0", "--init", str(tiny_ckpt), "--decoder-only", "--denoised", str(pairs_file),
               "--denoised-batch", "3", "--data", str(data), "--out", str(out), "--steps", "2", "--batch", "2",
               "--crop", "32", "--ssim-weight", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    line = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"l1", "ssim", "denoised_l1", "denoised_ssim"} <= set(line)
    before, after = load_checkpoint(tiny_ckpt), load_checkpoint(out / "model.safetensors")
    for c, m in after.components().items():
        for k, v in m.state_dict().items():
            same = torch.equal(v, before.components()[c].state_dict()[k])
            assert same == (not (c == "vae" and k.startswith(("decoder.", "post_quant_conv.")))), (c, k)
    rec = json.loads(read_metadata(out / "model.safetensors")["provenance"])["decoder_finetune"]
    assert rec["options"]["denoised"] == str(pairs_file) and rec["options"]["denoised_batch"] == 3


@pytest.mark.parametrize("argv, needle", [
    (["--stage", "0", "--init", "CKPT", "--denoised", "PAIRS"], "needs --decoder-only"),
    (["--stage", "0", "--init", "CKPT", "--decoder-only", "--denoised-batch", "2"], "--denoised-batch 2: needs --denoised"),
    (["--stage", "1", "--init", "CKPT", "--denoised", "PAIRS"], "--denoised belongs to stage 0"),
    (["--stage", "0", "--init", "CKPT", "--decoder-only", "--denoised", "MISSING"], "no such file"),
    (["--stage", "0", "--init", "CKPT", "--decoder-only", "--denoised", "WRONG"], "this VAE has"),
])
def test_denoised_refuses_what_it_cannot_use(data, tiny_ckpt, tmp_path, capsys, argv, needle):
    pairs = tmp_path / "p.npz"
    np.savez(pairs, latents=np.ones((2, 4, 8, 8), np.float32), frames=np.zeros((2, 64, 64, 3), np.uint8))
    wrong = tmp_path / "w.npz"
    np.savez(wrong, latents=np.ones((2, 3, 8, 8), np.float32), frames=np.zeros((2, 64, 64, 3), np.uint8))
    subs = {"CKPT": str(tiny_ckpt), "PAIRS": str(pairs), "MISSING": str(tmp_path / "none.npz"), "WRONG": str(wrong)}
    rc = main(["train", *[subs.get(a, a) for a in argv], "--data", str(data), "--out", str(tmp_path / "o"),
               "--steps", "1", "--batch", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and needle in err and "Traceback" not in err
