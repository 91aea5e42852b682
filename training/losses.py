"""The diffusion objective: the checkpoint's noise schedule, offset noise, min-SNR weighting.

Moore trains with v-prediction on a zero-terminal-SNR schedule (`aa_trt.sampling.alphas_cumprod`
with the checkpoint's SchedulerConfig), so training and sampling read one schedule.
"""
from __future__ import annotations

import torch

from aa_trt.config import SchedulerConfig
from aa_trt.sampling import alphas_cumprod


class NoiseSchedule:
    def __init__(self, cfg: SchedulerConfig, device="cpu"):
        self.prediction_type = cfg.prediction_type
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"training supports v_prediction and epsilon, not {self.prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod(cfg).to(device)  # (T,) float32
        self.num_timesteps = cfg.num_train_timesteps

    def _ab(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        # t (B,) -> alpha_bar (B, 1, ..., 1) broadcasting against a (B, ...) tensor of `ndim` dims.
        return self.alphas_cumprod[t].view(-1, *([1] * (ndim - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar), (B,); exactly 0 at the last step of a zero-SNR schedule."""
        ab = self.alphas_cumprod[t]
        return ab / (1 - ab)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab) x0 + sqrt(1 - ab) noise.  x0, noise (B, ...), t (B,) -> (B, ...)."""
        ab = self._ab(t, x0.ndim)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts: v = sqrt(ab) noise - sqrt(1 - ab) x0, or the noise."""
        if self.prediction_type == "epsilon":
            return noise
        ab = self._ab(t, x0.ndim)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def offset_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise plus `offset` x a per-sample, per-channel constant (Guttenberg's offset noise:
    lets the model change an image's mean brightness). shape (B, C, ...) -> (B, C, ...)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator)
    return noise


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str = "v_prediction") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) as a weight on the MSE of the given prediction type.

    For v-prediction Moore's training (after diffusers' example scripts) weights by
    min(SNR + 1, gamma) / (SNR + 1), and so do we: the paper's literal min(SNR, gamma) / (SNR + 1)
    gives the zero-SNR schedule's last step (t = 999, where sampling starts) weight 0, leaving the
    step that sets the whole composition untrained. Epsilon: min(SNR, gamma) / SNR (1 where
    SNR = 0, its limit). gamma <= 0: no weighting.
    """
    if gamma <= 0:
        return torch.ones_like(snr)
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    clipped = torch.clamp(snr, max=gamma)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """pred, target (B, ...), weight (B,) -> scalar: mean over samples of weight x per-sample MSE."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()
