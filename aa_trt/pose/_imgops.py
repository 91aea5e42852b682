"""Small image operations shared by the pose backends (numpy and torch; no OpenCV).

Coordinates follow OpenCV's convention: pixel (i, j) has its centre at x = j, y = i.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def as_rgb_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an (H, W, 3) / (H, W, 4) / (H, W) uint8 array; anything else is an error."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


def warp_affine(image: np.ndarray, m: np.ndarray, out_w: int, out_h: int, border: str = "constant",
                fill: float = 0.0, antialias: bool = True) -> np.ndarray:
    """Bilinear warp. `m` (2x3) maps an output pixel (x, y) to the input point it samples.

    border="constant" blends with `fill` outside the image (like cv2.BORDER_CONSTANT),
    "replicate" clamps to the edge (cv2.BORDER_REPLICATE). With `antialias`, an input much larger than
    the output is first box-reduced by an integer factor so bilinear sampling does not alias.
    Returns float32 (out_h, out_w, C).
    """
    m = np.asarray(m, np.float64)
    img = image
    if antialias:
        step = max(np.hypot(m[0, 0], m[1, 0]), np.hypot(m[0, 1], m[1, 1]))  # input px per output px
        k = int(step // 2)
        if k >= 2:
            img = np.asarray(Image.fromarray(image).reduce(k))
            # reduced pixel j covers input pixels [j k, (j + 1) k): centre j k + (k - 1) / 2
            m = m.copy() / k
            m[:, 2] -= (k - 1) / 2 / k
    import torch
    import torch.nn.functional as F

    if border not in ("constant", "replicate"):
        raise ValueError(f"unknown border mode {border!r}")
    if border == "constant" and fill != 0:
        raise ValueError("only fill=0 is supported")
    h, w = img.shape[:2]
    # only the part of the image the output can sample (+1 px for bilinear) is converted
    corners = np.array([[0, 0], [out_w - 1, 0], [0, out_h - 1], [out_w - 1, out_h - 1]], np.float64)
    src = corners @ m[:, :2].T + m[:, 2]
    x0 = int(np.clip(np.floor(src[:, 0].min()) - 1, 0, w - 1))
    x1 = int(np.clip(np.ceil(src[:, 0].max()) + 2, x0 + 1, w))
    y0 = int(np.clip(np.floor(src[:, 1].min()) - 1, 0, h - 1))
    y1 = int(np.clip(np.ceil(src[:, 1].max()) + 2, y0 + 1, h))
    part = img[y0:y1, x0:x1]
    ph, pw = part.shape[:2]
    # (layout changes in numpy: torch's small-tensor copies are slow on a busy 2-core machine)
    t = torch.from_numpy(np.ascontiguousarray(part.transpose(2, 0, 1), dtype=np.float32))[None]
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    sx = m[0, 0] * xs + m[0, 1] * ys + (m[0, 2] - x0)
    sy = m[1, 0] * xs + m[1, 1] * ys + (m[1, 2] - y0)
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    gx = sx * (2.0 / max(pw - 1, 1)) - 1.0 if pw > 1 else np.where(np.abs(sx) < 1, 0.0, 2.0 * np.sign(sx))
    gy = sy * (2.0 / max(ph - 1, 1)) - 1.0 if ph > 1 else np.where(np.abs(sy) < 1, 0.0, 2.0 * np.sign(sy))
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    with torch.no_grad():
        out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros" if border == "constant" else "border",
                            align_corners=True)
    return np.ascontiguousarray(out[0].numpy().transpose(1, 2, 0))


def invert_affine(m: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine map."""
    a = np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine map to (..., 2) points."""
    pts = np.asarray(pts, np.float64)
    return pts @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]
