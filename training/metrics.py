"""Frame metrics of the paper's evaluation: SSIM, PSNR and L1 between generated and true frames.

SSIM is Wang et al. 2004 as scikit-image computes it with `gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255` (the settings of the paper's reference code path):
an 11x11 Gaussian window, K1 = 0.01, K2 = 0.03, averaged over channels and over the valid interior
(the window's 5-pixel margin is cropped). Written here in torch so `aa-trt eval` needs no
scikit-image; tests/test_eval.py compares it with scikit-image on random images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """x, y (N, C, H, W) float in [0, data_range] -> (N,) SSIM per image, differentiable. The range
    must start at 0: the luminance term compares means, so shifted pixels give another number.
    Stage 0's --ssim-weight trains on exactly the measure `aa-trt eval` reports."""
    if x.shape != y.shape:
        raise ValueError(f"ssim of images shaped {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    g = _gaussian_window().to(x)
    r = len(g) // 2
    if min(x.shape[2:]) <= 2 * r:
        raise ValueError(f"images of {x.shape[3]}x{x.shape[2]} are too small for an 11x11 SSIM window")
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian, "valid" region only (skimage crops the same margin)
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """a, b: (N, H, W, 3) uint8 or float in [0, data_range] -> (N,) float64 SSIM per frame."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"ssim of frames shaped {tuple(np.shape(a))} and {tuple(np.shape(b))}")
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).permute(0, 3, 1, 2)
    return ssim_torch(x, y, data_range).numpy()


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """(N, H, W, 3) pairs -> (N,) PSNR in dB per frame (capped at 100 dB for identical frames)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = (d * d).reshape(len(d), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(data_range**2 / mse)
    return np.minimum(out, 100.0)


def l1(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """(N, H, W, 3) pairs -> (N,) mean absolute error with pixels scaled to [0, 1]."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / data_range
    return d.reshape(len(d), -1).mean(axis=1)


def frame_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Mean SSIM, PSNR (dB) and L1 over the frames of one video (uint8 (N, H, W, 3) each)."""
    return {"ssim": float(ssim(pred, true).mean()), "psnr": float(psnr(pred, true).mean()),
            "l1": float(l1(pred, true).mean())}
