"""Stage 0: the small VAE and CLIP image encoder a shippable model needs, trained on the data.

SD's VAE (84 M parameters) and CLIP ViT-L/14 (303 M) are too large to embed, and a preset built
from scratch has random ones, which make every later stage meaningless. Stage 0 trains the preset's
own AutoencoderKL and CLIPVisionModelWithProjection (aa_trt/models/vae.py and clip.py, the
architectures of diffusers and transformers, at small widths):

- VAE: L1 + MSE reconstruction of random crops plus a small KL term (SD's autoencoder without its
  perceptual and adversarial losses, which need pretrained networks this environment cannot fetch);
  `--ssim-weight W` adds W * (1 - SSIM), with eval's SSIM, against the blur L1 and MSE settle for.
  Crops keep the step cheap; the network is convolutional, so it is used at full size afterwards.
- CLIP: contrastive (InfoNCE) between two frames of the same video, other videos of the batch as
  negatives: the embedding learns what stays fixed while the character dances (its appearance),
  which is what Animate Anyone's cross-attention reads from it.

After training, `latent_scale` is set to 1 / std of the VAE's latents over the data (SD's 0.18215
was measured the same way for its VAE), and the checkpoint is written with every component: the
UNets and PoseGuider still at their initialisation (zero-initialised PoseGuider output and
motion-module projections, ReferenceNet a copy of the denoising UNet's spatial weights, as stage 1
starts from), ready for `aa-trt train --stage 1 --init`.

`--decoder-only` fine-tunes the VAE's decoder alone, on the frozen encoder's latents (SD's ft-MSE
decoder was made the same way). The latent space does not move, so `latent_scale` and every
network trained on the latents (UNets, PoseGuider) stay valid: it sharpens a finished model's
pixels without another stage 1. The checkpoint keeps the init's provenance and records the
fine-tune under `decoder_finetune` (a fine-tune of an already fine-tuned decoder nests the earlier
record under `continues`).

`--denoised PAIRS` (with `--decoder-only`) adds a second term: the decoder on crops of a finished
model's own final latents (denoised.py, `aa-trt data denoised`) against the frames they should have
been. The encoder's latents are not what the decoder meets at inference; the denoiser's miss them in
ways of their own (washed-out backgrounds, soft limbs). On the default model it did not help
(docs/training.md: validation SSIM 0.8399 with it against 0.8424 without); it is kept
for models whose denoiser misses more.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aa_trt.checkpoint import build_models, load_checkpoint, read_metadata, save_models
from aa_trt.config import preset as get_preset
from aa_trt.errors import InputError, OptionError

from aa_trt.models.external import clip_pixels
from aa_trt.training.data import VideoSet, sample_batch, to_unit
from aa_trt.training.denoised import load_pairs, random_pair_crops
from aa_trt.training.metrics import ssim_torch

MODEL_FILE = "model.safetensors"


@dataclass
class Stage0Options:
    data: str
    out: str
    preset: str | None = None
    init: str | None = None       # continue from this aa-trt checkpoint's VAE and CLIP instead
    steps: int = 1000
    batch: int = 16
    crop: int = 32                # VAE training crop (pixels; a multiple of the latent factor)
    lr: float = 1e-3
    kl_weight: float = 1e-6
    # Weight of (1 - SSIM) in the reconstruction loss: L1 and MSE alone are minimised by a blur,
    # which SSIM (what `aa-trt eval` reports) punishes. 0 = L1 + MSE only, as stage 0 was at first.
    ssim_weight: float = 0.0
    temperature: float = 0.1      # InfoNCE temperature for the CLIP embedding
    seed: int = 0
    size: int | None = None
    log_every: int = 10
    scale_samples: int = 256      # frames used to measure latent_scale
    decoder_only: bool = False    # train the VAE decoder alone on the frozen encoder's latents
    # With decoder_only: also fit the decoder to a finished model's own final latents (a file made by
    # `aa-trt data denoised`, denoised.py), `denoised_batch` crops of them a step beside the usual ones.
    denoised: str | None = None
    denoised_batch: int | None = None  # default: --batch

    def __post_init__(self):
        if (self.preset is None) == (self.init is None):
            raise OptionError("init", self.init, "stage 0 takes exactly one of `init` (a checkpoint to continue) "
                              "and `preset` (a name, from scratch)")
        if self.decoder_only and not self.init:
            raise OptionError("decoder_only", True, "fine-tunes a trained VAE's decoder: give `init` (a checkpoint)")
        if self.ssim_weight < 0:
            raise OptionError("ssim_weight", self.ssim_weight, "must be >= 0")
        if self.ssim_weight and self.crop < 16:
            raise OptionError("crop", self.crop, "must be at least 16 with an SSIM weight (SSIM's window is 11x11)")
        if self.denoised and not self.decoder_only:
            raise OptionError("denoised", self.denoised, "fits the decoder to a model's latents: it needs `decoder_only`")
        if self.denoised_batch is not None and (not self.denoised or self.denoised_batch < 1):
            raise OptionError("denoised_batch", self.denoised_batch, "needs `denoised` and must be at least 1")
        if self.batch < 2:
            raise OptionError("batch", self.batch, "must be at least 2 (the CLIP loss contrasts the batch's videos)")


def random_crops(frames: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, crop, crop, 3), each at a random place, randomly mirrored."""
    b, h, w, _ = frames.shape
    if crop > min(h, w):
        raise OptionError("crop", crop, f"is larger than the frames ({w}x{h})")
    out = np.empty((b, crop, crop, 3), np.uint8)
    for i in range(b):
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        c = frames[i, y:y + crop, x:x + crop]
        out[i] = c[:, ::-1] if rng.random() < 0.5 else c
    return out


def posterior_sample(d, gen: torch.Generator) -> torch.Tensor:
    """One draw z = mean + std * eps from a diffusers DiagonalGaussianDistribution, with `gen`."""
    return d.mean + d.std * torch.randn(d.mean.shape, generator=gen).to(d.mean)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, ssim_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """A reconstruction against x, both (B, 3, h, w) in [-1, 1] -> L1 + MSE + ssim_weight * (1 - SSIM)
    and its parts. SSIM is eval's (metrics.ssim_torch), on the pixels mapped to [0, 1] as eval sees them."""
    l1, mse = (rec - x).abs().mean(), F.mse_loss(rec, x)
    loss, parts = l1 + mse, {"l1": l1.item(), "mse": mse.item()}
    if ssim_weight:
        s = ssim_torch((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0).mean()
        loss = loss + ssim_weight * (1 - s)
        parts["ssim"] = s.item()
    return loss, parts


def vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator,
             ssim_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """x (B, 3, h, w) in [-1, 1] -> scalar loss and its parts."""
    d = vae.encode(x).latent_dist
    loss, parts = reconstruction_loss(vae.decode(posterior_sample(d, gen)).sample, x, ssim_weight)
    kl = 0.5 * (d.mean.pow(2) + d.var - 1.0 - d.logvar).sum(dim=(1, 2, 3)).mean()
    return loss + kl_weight * kl, {**parts, "kl": kl.item()}


def decoder_loss(vae, x: torch.Tensor, gen: torch.Generator, ssim_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """x (B, 3, h, w) in [-1, 1] -> the reconstruction loss of the decoder on the frozen encoder's
    posterior sample. No KL term: the encoder, and with it the latent distribution, does not change."""
    with torch.no_grad():
        z = posterior_sample(vae.encode(x).latent_dist, gen)
    return reconstruction_loss(vae.decode(z).sample, x, ssim_weight)


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What --decoder-only trains: everything after the latent (post_quant_conv and the decoder)."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def clip_loss(image_encoder, a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """a, b (B, 3, s, s): two frames of each of B videos -> symmetric InfoNCE and top-1 accuracy."""
    za = F.normalize(image_encoder(pixel_values=a).image_embeds, dim=-1)
    zb = F.normalize(image_encoder(pixel_values=b).image_embeds, dim=-1)
    logits = za @ zb.T / temperature
    labels = torch.arange(len(a))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def measure_latent_scale(vae, videos: VideoSet, samples: int, seed: int) -> float:
    """1 / std of posterior samples over `samples` random frames at full size."""
    rng = np.random.default_rng([seed, 99])
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for s in range(0, samples, 16):
        px = sample_batch(videos, rng, min(16, samples - s))
        x = to_unit(px.frames[:, 0]) * 2 - 1
        zs.append(posterior_sample(vae.encode(x).latent_dist, gen))
    return float(1.0 / torch.cat(zs).std())


def tie_reference_init(models) -> None:
    """Start ReferenceNet from the denoising UNet's own (spatial) weights, as the paper starts both
    from the same SD UNet: at step 0 the reference and the frame then produce features in the same
    space, and the self-attention over [frame; reference] tokens can match them from the start."""
    den = models.denoising_unet.state_dict()
    ref = models.reference_unet.state_dict()
    models.reference_unet.load_state_dict({k: den[k].clone() for k in ref})


def train_stage0(opts: Stage0Options, progress: bool = True) -> Path:
    torch.manual_seed(opts.seed)
    if opts.init:
        models = load_checkpoint(opts.init, "cpu", torch.float32)
        cfg = models.config
    else:
        cfg = get_preset(opts.preset)
        models = build_models(cfg, "cpu")
        models.pose_guider.zero_init()
        for m in models.denoising_unet.motion_modules():
            m.zero_init()
        tie_reference_init(models)
    for m in models.components().values():
        m.requires_grad_(False).eval()
    vae, enc = models.vae, models.image_encoder
    factor = cfg.latent_factor
    if opts.crop % factor:
        raise OptionError("crop", opts.crop, f"must be a multiple of the VAE's factor {factor}")
    if not opts.init:
        # Start the posterior narrow (std e^-2): with diffusers' default init its noise (std ~1)
        # drowns the encoder's mean (std ~0.2) and the decoder first learns to ignore the latent.
        with torch.no_grad():
            vae.quant_conv.bias[cfg.vae.get("latent_channels", 4):] = -4.0
    if opts.decoder_only:
        params = decoder_parameters(vae)
        for p in params:
            p.requires_grad_(True)
        vae.decoder.train()
    else:
        vae.requires_grad_(True).train()
        enc.requires_grad_(True).train()
        params = list(vae.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    warm = max(1, opts.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, opts.steps) / opts.steps))))
    size = (opts.size, opts.size) if opts.size else None
    videos = VideoSet(opts.data, size)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(opts.denoised, cfg.latent_channels, factor) if opts.denoised else None
    log = open(out / "log.jsonl", "a")
    clip_size = enc.config.image_size
    t_last, acc = time.perf_counter(), []
    try:
        for step in range(1, opts.steps + 1):
            rng = np.random.default_rng([opts.seed, step])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            px = sample_batch(videos, rng, opts.batch)  # ref and frames[:, 0]: two frames of one video
            crops = random_crops(np.concatenate([px.ref, px.frames[:, 0]]), opts.crop, rng)
            x = to_unit(crops) * 2 - 1
            opt.zero_grad(set_to_none=True)
            if opts.decoder_only:
                lv, parts = decoder_loss(vae, x, gen, opts.ssim_weight)
                if pairs is not None:
                    z, xd = random_pair_crops(pairs, opts.denoised_batch or opts.batch, opts.crop, factor, rng)
                    ld, pd = reconstruction_loss(vae.decode(z).sample, xd, opts.ssim_weight)
                    lv = lv + ld
                    parts.update({f"denoised_{k}": v for k, v in pd.items()})
                lv.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                extra = {}
            else:
                lv, parts = vae_loss(vae, x, opts.kl_weight, gen, opts.ssim_weight)
                lc, top1 = clip_loss(enc, clip_pixels(px.ref, clip_size), clip_pixels(px.frames[:, 0], clip_size),
                                     opts.temperature)
                (lv + lc).backward()
                # Clipped apart: the contrastive loss's gradients would otherwise set the VAE's scale.
                torch.nn.utils.clip_grad_norm_(list(vae.parameters()), 1.0)
                torch.nn.utils.clip_grad_norm_(list(enc.parameters()), 1.0)
                extra = {"clip": lc.item(), "clip_top1": top1}
            opt.step()
            sched.step()
            acc.append({**parts, "vae": lv.item(), **extra})
            if step % opts.log_every == 0 or step == opts.steps:
                rec = {k: round(float(np.mean([a[k] for a in acc])), 6) for k in acc[0]}
                rec.update(step=step, lr=sched.get_last_lr()[0],
                           s_per_step=round((time.perf_counter() - t_last) / len(acc), 4))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if progress:
                    clip = f"clip {rec['clip']:.3f} top1 {rec['clip_top1']:.2f} " if "clip" in rec else ""
                    print(f"stage 0 step {step}/{opts.steps} vae {rec['vae']:.4f} (l1 {rec['l1']:.4f}) "
                          f"{clip}{rec['s_per_step']:.2f} s/step", flush=True)
                t_last, acc = time.perf_counter(), []
    finally:
        log.close()
    vae.eval().requires_grad_(False)
    enc.eval().requires_grad_(False)
    options = {k: getattr(opts, k) for k in opts.__dataclass_fields__}
    if opts.decoder_only:
        # Same encoder, same latents: latent_scale and the rest of the model stay as they were.
        prov = json.loads(read_metadata(opts.init).get("provenance") or "{}")
        record = {"trained_by": "aa-trt train", "stage": 0, "step": opts.steps, "options": options}
        if "decoder_finetune" in prov:  # a continued fine-tune keeps the record of the one it continued
            record["continues"] = prov["decoder_finetune"]
        prov["decoder_finetune"] = record
        return save_models(out / MODEL_FILE, models, provenance=prov)
    scale = measure_latent_scale(vae, videos, opts.scale_samples, opts.seed)
    models.config = cfg.replace(latent_scale=round(scale, 6))
    prov = {"trained_by": "aa-trt train", "stage": 0, "step": opts.steps, "options": options}
    return save_models(out / MODEL_FILE, models, provenance=prov)
