"""Textured, clothed 2D puppets painted on the 18-point skeleton, and their backgrounds.

A `Character` is appearance only (skin, hair, clothes, proportions); `paint` draws it over a
background at given keypoints. Clothing patterns live in each body part's own coordinates (along and
across the limb, in body units), so stripes and checks move with the limb instead of sliding under
it: what the model has to learn is how appearance follows the skeleton. Frames are painted at twice
the size and averaged down (cv2.INTER_AREA) for anti-aliased edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from aa_trt.pose.keypoints import BODY

from aa_trt.training.dance import Body, head_geometry, random_body

SUPERSAMPLE = 2
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel positions for every shape
SKIN = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 94), (161, 102, 66), (120, 72, 46),
        (88, 54, 38))
HAIR = ((20, 16, 14), (60, 38, 24), (110, 70, 40), (170, 120, 60), (225, 200, 140), (180, 60, 30),
        (140, 140, 140), (60, 80, 200), (200, 60, 140))
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "gradient", "diagonal")


@dataclass(frozen=True)
class Material:
    color: tuple[int, int, int]
    color2: tuple[int, int, int]
    pattern: str = "solid"
    scale: float = 0.2  # pattern period in body units

    def shade(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Colour at part coordinates u (along), v (across), body units -> float32 (..., 3)."""
        s = self.scale
        if self.pattern == "hstripes":
            m = (np.floor(u / s) % 2).astype(np.float32)
        elif self.pattern == "vstripes":
            m = (np.floor(v / s) % 2).astype(np.float32)
        elif self.pattern == "checks":
            m = ((np.floor(u / s) + np.floor(v / s)) % 2).astype(np.float32)
        elif self.pattern == "dots":
            du, dv = (u / s) % 1 - 0.5, (v / s) % 1 - 0.5
            m = (du * du + dv * dv < 0.09).astype(np.float32)
        elif self.pattern == "gradient":
            m = np.clip(0.5 + u / 2.0, 0, 1).astype(np.float32)
        elif self.pattern == "diagonal":
            m = (np.floor((u + v) / s) % 2).astype(np.float32)
        else:
            m = np.zeros_like(u, dtype=np.float32)
        c1, c2 = np.float32(self.color), np.float32(self.color2)
        return c1 + m[..., None] * (c2 - c1)


@dataclass(frozen=True)
class Character:
    body: Body
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str          # "short", "long", "bald", "bun"
    shirt: Material
    sleeves: str             # "none", "short", "long"
    pants: Material
    legwear: str             # "trousers", "shorts", "skirt"
    shoes: tuple[int, int, int]
    eyes: tuple[int, int, int]


def _color(rng) -> tuple[int, int, int]:
    # Saturated or muted, light or dark: HSV so the palette covers clothing-like colours evenly.
    h, s, v = rng.uniform(0, 1), rng.uniform(0.2, 0.95), rng.uniform(0.25, 0.95)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(round(c * 255)) for c in rgb)


def _material(rng) -> Material:
    return Material(_color(rng), _color(rng), str(rng.choice(PATTERNS)), float(rng.uniform(0.08, 0.3)))


def random_character(rng: np.random.Generator) -> Character:
    skin = SKIN[int(rng.integers(len(SKIN)))]
    skin = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in skin)
    return Character(
        body=random_body(rng), skin=skin, hair=HAIR[int(rng.integers(len(HAIR)))],
        hair_style=str(rng.choice(["short", "long", "bald", "bun"], p=[0.4, 0.35, 0.1, 0.15])),
        shirt=_material(rng), sleeves=str(rng.choice(["none", "short", "long"])), pants=_material(rng),
        legwear=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.5, 0.25, 0.25])),
        shoes=_color(rng), eyes=(int(rng.integers(20, 90)),) * 3)


# ---------------------------------------------------------------------------------- backgrounds
def random_background(rng: np.random.Generator, width: int, height: int, floor: float) -> np.ndarray:
    """float32 (height, width, 3) in 0..255: a wall and a floor, each plain, tiled or blotchy."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    horizon = int(height * (floor - rng.uniform(0.15, 0.35)))
    for region, (y0, y1) in (("wall", (0, horizon)), ("floor", (horizon, height))):
        c1, c2 = np.float32(_color(rng)), np.float32(_color(rng))
        kind = rng.choice(["plain", "gradient", "tiles", "blobs", "stripes"])
        ys, xs = yy[y0:y1], xx[y0:y1]
        if kind == "gradient":
            m = (ys - y0) / max(1, y1 - y0)
        elif kind == "tiles":
            s = rng.uniform(0.06, 0.2) * width
            m = ((np.floor(xs / s) + np.floor(ys / s)) % 2) * 0.5
        elif kind == "stripes":
            s = rng.uniform(0.04, 0.15) * width
            m = (np.floor(xs / s) % 2) * 0.6
        elif kind == "blobs":
            grid = rng.uniform(0, 1, (int(rng.integers(3, 7)),) * 2).astype(np.float32)
            m = cv2.resize(grid, (width, max(1, y1 - y0)), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        else:
            m = np.zeros_like(ys)
        out[y0:y1] = c1 + m[..., None] * (c2 - c1)
    return out


# ---------------------------------------------------------------------------------- painting
class Painter:
    """Paints one frame: parts are masks (cv2 shapes) filled with a material in part coordinates."""

    def __init__(self, canvas: np.ndarray, unit: float):
        self.canvas = canvas  # float32 (H, W, 3), painted in place
        self.unit = unit      # pixels per body unit
        self.h, self.w = canvas.shape[:2]

    def _pts(self, p) -> tuple[int, int]:
        return int(round(p[0] * (1 << _SHIFT))), int(round(p[1] * (1 << _SHIFT)))

    def _fill(self, draw, origin, axis, material: Material | tuple, pad: float, shade_width: float = 0.0):
        """`draw(mask, offset)` draws the part's mask (uint8, 255 inside) into a bbox-sized buffer."""
        ox, oy = origin
        r = int(pad) + 2
        x0, x1 = max(0, int(min(draw.xs) - r)), min(self.w, int(max(draw.xs) + r) + 1)
        y0, y1 = max(0, int(min(draw.ys) - r)), min(self.h, int(max(draw.ys) + r) + 1)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        draw(mask, (x0, y0))
        inside = mask > 0
        if not inside.any():
            return
        yy, xx = np.nonzero(inside)
        dx, dy = xx + x0 - ox, yy + y0 - oy
        ax = np.asarray(axis, np.float64)
        ax = ax / (np.linalg.norm(ax) + 1e-9)
        u = (dx * ax[0] + dy * ax[1]) / self.unit
        v = (-dx * ax[1] + dy * ax[0]) / self.unit
        if isinstance(material, Material):
            col = material.shade(u, v)
        else:
            col = np.broadcast_to(np.float32(material), (len(u), 3))
        if shade_width > 0:  # a round limb: darker towards its edges
            col = col * (1 - 0.28 * np.clip(v / shade_width, -1, 1) ** 2)[:, None]
        self.canvas[yy + y0, xx + x0] = col

    def capsule(self, a, b, half: float, material):
        """A limb segment from a to b, `half` px thick on each side, rounded ends."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)

        def draw(mask, off):
            pa, pb = self._pts(a - off), self._pts(b - off)
            t = max(1, int(round(2 * half)))
            cv2.line(mask, pa, pb, 255, t, cv2.LINE_8, _SHIFT)
            for p in (pa, pb):
                cv2.circle(mask, p, int(round(half * (1 << _SHIFT))), 255, -1, cv2.LINE_8, _SHIFT)

        draw.xs, draw.ys = (a[0], b[0]), (a[1], b[1])
        self._fill(draw, a, b - a if np.linalg.norm(b - a) > 1e-6 else (0, 1), material, half,
                   shade_width=half / self.unit)

    def polygon(self, pts, origin, axis, material):
        pts = np.asarray(pts, np.float64)

        def draw(mask, off):
            cv2.fillPoly(mask, [np.array([self._pts(p - off) for p in pts], np.int32)], 255, cv2.LINE_8, _SHIFT)

        draw.xs, draw.ys = pts[:, 0], pts[:, 1]
        self._fill(draw, origin, axis, material, 0)

    def ellipse(self, centre, axes, angle_deg: float, material, origin=None, axis=(0, 1)):
        c = np.asarray(centre, np.float64)

        def draw(mask, off):
            cv2.ellipse(mask, self._pts(c - off), (int(axes[0] * (1 << _SHIFT)), int(axes[1] * (1 << _SHIFT))),
                        angle_deg, 0, 360, 255, -1, cv2.LINE_8, _SHIFT)

        m = max(axes)
        draw.xs, draw.ys = (c[0] - m, c[0] + m), (c[1] - m, c[1] + m)
        self._fill(draw, c if origin is None else origin, axis, material, 0)


def paint(ch: Character, kps: np.ndarray, unit: float, background: np.ndarray) -> np.ndarray:
    """The character at keypoints kps (18, 3) (pixels of the output) over `background`
    (float32 (H*S, W*S, 3), S = SUPERSAMPLE) -> uint8 (H, W, 3)."""
    S = SUPERSAMPLE
    canvas = background.copy()
    k = kps[:, :2].astype(np.float64) * S + (S - 1) / 2  # pixel centres of the big canvas
    p = Painter(canvas, unit * S)
    u = unit * S
    b = ch.body
    limb = b.limb * u
    J = lambda name: k[BODY[name]]  # noqa: E731
    centre, r, up = head_geometry(kps, b, unit)
    centre, r = centre * S + (S - 1) / 2, r * S
    head_angle = math.degrees(math.atan2(up[0], -up[1]))
    across = np.array([-up[1], up[0]])

    if ch.hair_style == "long":  # behind everything: hangs from the head to below the shoulders
        top = centre + up * r * 0.2
        p.polygon([top - across * r * 1.1, top + across * r * 1.1, centre - up * r * 2.2 + across * r * 1.2,
                   centre - up * r * 2.2 - across * r * 1.2], centre, -up, ch.hair)
        p.ellipse(top, (r * 1.1, r * 1.05), head_angle, ch.hair)
    # Shadow on the floor under the feet.
    feet = (J("r_ankle") + J("l_ankle")) / 2
    foot_y = max(J("r_ankle")[1], J("l_ankle")[1]) + limb
    shadow_c = (feet[0], foot_y)
    sh_axes = (abs(J("r_ankle")[0] - J("l_ankle")[0]) / 2 + limb * 3, limb * 1.2)
    yy, xx = np.ogrid[0:canvas.shape[0], 0:canvas.shape[1]]
    d = ((xx - shadow_c[0]) / sh_axes[0]) ** 2 + ((yy - shadow_c[1]) / sh_axes[1]) ** 2
    canvas *= (1 - 0.35 * np.clip(1 - d, 0, 1))[..., None]

    # Legs, then what covers them.
    for side in ("r", "l"):
        hip, knee, ankle = J(f"{side}_hip"), J(f"{side}_knee"), J(f"{side}_ankle")
        trousers = ch.legwear == "trousers"
        p.capsule(hip, knee, limb * 1.35, ch.pants if ch.legwear != "skirt" else ch.skin)
        p.capsule(knee, ankle, limb * 1.15, ch.pants if trousers else ch.skin)
        if ch.legwear == "shorts":
            p.capsule(hip, hip + (knee - hip) * 0.55, limb * 1.5, ch.pants)
        out = 1 if side == "l" else -1
        p.ellipse(ankle + np.array([out * limb * 0.6, limb * 0.5]), (limb * 1.9, limb * 1.0), 0, ch.shoes)
    hips = (J("r_hip") + J("l_hip")) / 2
    neck = J("neck")
    if ch.legwear == "skirt":
        knees = (J("r_knee") + J("l_knee")) / 2
        hem = hips + (knees - hips) * 0.8
        w_top = np.linalg.norm(J("l_hip") - J("r_hip")) / 2 + limb * 1.3
        w_hem = max(w_top * 1.5, abs(J("l_knee")[0] - J("r_knee")[0]) / 2 + limb * 1.6)
        p.polygon([hips + (-w_top, 0), hips + (w_top, 0), hem + (w_hem, 0), hem + (-w_hem, 0)],
                  hips, hips - neck, ch.pants)
    # Neck and torso.
    p.capsule(neck, neck + (centre - neck) * 0.6, limb * 1.2, ch.skin)
    torso_axis = hips - neck
    side_dir = np.array([-torso_axis[1], torso_axis[0]]) / (np.linalg.norm(torso_axis) + 1e-9)
    if side_dir[0] < 0:
        side_dir = -side_dir
    rs, ls = J("r_shoulder"), J("l_shoulder")
    rh, lh = J("r_hip"), J("l_hip")
    waist = limb * 1.5
    p.polygon([rs - side_dir * limb * 0.8 - torso_axis * 0.05, ls + side_dir * limb * 0.8 - torso_axis * 0.05,
               lh + side_dir * waist, rh - side_dir * waist], neck, torso_axis, ch.shirt)
    # Arms, in front of the torso.
    for side in ("r", "l"):
        sh, el, wr = J(f"{side}_shoulder"), J(f"{side}_elbow"), J(f"{side}_wrist")
        p.capsule(sh, el, limb * 1.1, ch.skin if ch.sleeves == "none" else ch.shirt)
        if ch.sleeves == "short":
            p.capsule(sh, sh + (el - sh) * 0.5, limb * 1.3, ch.shirt)
        p.capsule(el, wr, limb * 0.95, ch.shirt if ch.sleeves == "long" else ch.skin)
        d = wr - el
        d = d / (np.linalg.norm(d) + 1e-9)
        p.ellipse(wr + d * limb * 0.9, (limb * 1.25, limb * 1.0), math.degrees(math.atan2(d[1], d[0])), ch.skin)
    # Head: face, hair on top, eyes at the eye keypoints, a mouth under the nose.
    p.ellipse(centre, (r * 0.92, r * 1.05), head_angle, ch.skin)
    if ch.hair_style in ("short", "long", "bun"):
        # The top of the head down to a fringe line a third of the way above the eyes' centre.
        cap = [centre + (across * math.cos(t) + up * math.sin(t)) * r * 1.02
               for t in np.linspace(-0.25, math.pi + 0.25, 24)]
        fringe = [centre + up * r * 0.3 - across * r * 0.9, centre + up * r * 0.45,
                  centre + up * r * 0.3 + across * r * 0.9]
        p.polygon(cap + fringe, centre, -up, ch.hair)
    if ch.hair_style == "bun":
        p.ellipse(centre + up * r * 1.15, (r * 0.45, r * 0.4), head_angle, ch.hair)
    for side in ("r", "l"):
        p.ellipse(J(f"{side}_eye"), (max(1.0, r * 0.12),) * 2, 0, ch.eyes)
    nose = J("nose")
    p.ellipse(nose, (max(1.0, r * 0.09),) * 2, 0, tuple(int(c * 0.8) for c in ch.skin))
    p.capsule(nose - up * r * 0.32 - across * r * 0.18, nose - up * r * 0.32 + across * r * 0.18,
              max(0.8, r * 0.05), (150, 60, 60))

    small = cv2.resize(canvas, (canvas.shape[1] // S, canvas.shape[0] // S), interpolation=cv2.INTER_AREA)
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)
