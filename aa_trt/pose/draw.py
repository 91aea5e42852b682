"""Rendering in the OpenPose/DWPose style that Moore's weights were trained on.

Moore renders with DWPose's `draw_pose` on a canvas whose short side is 512 pixels, then resizes the
picture to the frame size: limbs are filled ellipses 4 px wide in OpenPose's 17 colours, the canvas
is then dimmed x0.6, joints are discs of radius 4; hand edges are 2 px lines coloured around the HSV
wheel with blue joint discs; face points are white discs of radius 3. Points under confidence 0.3
are not drawn. The canvas is RGB.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

from aa_trt.pose.keypoints import HAND_EDGES, LIMBS, Pose

COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
          (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
          (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_COLORS = tuple(tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
                    for i in range(len(HAND_EDGES)))
THRESHOLD = 0.3
DRAW_SHORT_SIDE = 512


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("pose rendering needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def draw_canvas(pose: Pose | None, width: int, height: int) -> np.ndarray:
    """Draw at exactly width x height (no resampling). Returns uint8 (height, width, 3) RGB."""
    cv2 = _cv2()
    canvas = np.zeros((height, width, 3), np.uint8)
    if pose is None:
        return canvas
    sx, sy = width / pose.width, height / pose.height
    body = pose.body
    ok = body[:, 2] >= THRESHOLD
    for i, (a, b) in enumerate(LIMBS):
        if not (ok[a] and ok[b]):
            continue
        xa, ya, xb, yb = body[a, 0] * sx, body[a, 1] * sy, body[b, 0] * sx, body[b, 1] * sy
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), 4),
                                int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        if ok[i]:
            cv2.circle(canvas, (int(body[i, 0] * sx), int(body[i, 1] * sy)), 4, COLORS[i], thickness=-1)
    for hand in pose.hands:
        hok = hand[:, 2] >= THRESHOLD
        pts = [(int(x * sx), int(y * sy)) for x, y, _ in hand]
        for i, (a, b) in enumerate(HAND_EDGES):
            if hok[a] and hok[b]:
                cv2.line(canvas, pts[a], pts[b], HAND_COLORS[i], thickness=2)
        for p, good in zip(pts, hok):
            if good:
                cv2.circle(canvas, p, 4, (0, 0, 255), thickness=-1)
    for x, y, c in pose.face:
        if c >= THRESHOLD:
            cv2.circle(canvas, (int(x * sx), int(y * sy)), 3, (255, 255, 255), thickness=-1)
    return canvas


def render(pose: Pose | None, width: int, height: int) -> np.ndarray:
    """Moore's pose image: drawn with short side 512 (so strokes keep their trained thickness),
    then resized to width x height. uint8 (height, width, 3) RGB; an empty canvas for None."""
    cv2 = _cv2()
    k = DRAW_SHORT_SIDE / min(width, height)
    dw, dh = max(1, round(width * k)), max(1, round(height * k))
    canvas = draw_canvas(pose, dw, dh)
    if (dw, dh) == (width, height):
        return canvas
    interp = cv2.INTER_AREA if dw > width else cv2.INTER_LINEAR
    return cv2.resize(canvas, (width, height), interpolation=interp)
