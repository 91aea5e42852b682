"""The two reference-only baselines `aa-trt eval` reports beside the model: what a method that only
moves the reference scores, which a generative model has to beat.

- copy: every output frame is the reference frame.
- skeleton warp: the reference warped part by part onto each target skeleton. Starting from the
  reference frame, the torso (an affine map of neck and hips), then legs, arms and head (a
  similarity map of each bone: rotation, scale and shift taking the reference bone onto the target
  bone) are cut from the reference around their bone and pasted where the target skeleton puts
  them, back to front. No inpainting: where a limb moved away, the reference still shows it.
"""
from __future__ import annotations

import numpy as np

from aa_trt.pose.keypoints import BODY

_TORSO = (BODY["neck"], BODY["r_hip"], BODY["l_hip"])
_TORSO_OUTLINE = (BODY["r_shoulder"], BODY["l_shoulder"], BODY["l_hip"], BODY["r_hip"])
# Back to front: legs, then arms (upper before lower), then the head.
_BONES = ((BODY["r_hip"], BODY["r_knee"]), (BODY["r_knee"], BODY["r_ankle"]),
          (BODY["l_hip"], BODY["l_knee"]), (BODY["l_knee"], BODY["l_ankle"]),
          (BODY["r_shoulder"], BODY["r_elbow"]), (BODY["r_elbow"], BODY["r_wrist"]),
          (BODY["l_shoulder"], BODY["l_elbow"]), (BODY["l_elbow"], BODY["l_wrist"]))
_HEAD = (BODY["neck"], BODY["nose"])


def copy_reference(ref: np.ndarray, frames: int) -> np.ndarray:
    """ref (H, W, 3) -> (frames, H, W, 3)."""
    return np.repeat(ref[None], frames, axis=0)


def similarity(p1, p2, q1, q2) -> np.ndarray:
    """The 2x3 rotation+scale+shift taking segment p1-p2 onto q1-q2."""
    p, q = complex(*(np.subtract(p2, p1))), complex(*(np.subtract(q2, q1)))
    z = q / p if abs(p) > 1e-6 else 1.0
    m = np.array([[z.real, -z.imag, 0.0], [z.imag, z.real, 0.0]])
    m[:, 2] = np.asarray(q1, float) - m[:, :2] @ np.asarray(p1, float)
    return m


def _paste(out: np.ndarray, ref: np.ndarray, mask: np.ndarray, m: np.ndarray) -> None:
    import cv2

    h, w = out.shape[:2]
    warped = cv2.warpAffine(ref, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    wm = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR)[..., None] / 255.0
    out[:] = out * (1 - wm) + warped * wm


def skeleton_warp(ref: np.ndarray, ref_body: np.ndarray, bodies: np.ndarray) -> np.ndarray:
    """ref (H, W, 3) uint8, ref_body (18, 3) and bodies (N, 18, 3) keypoints (x, y, confidence) in
    pixels of that frame size -> (N, H, W, 3) uint8."""
    import cv2

    h, w = ref.shape[:2]
    ok = lambda body, idx: all(body[i, 2] > 0 for i in idx)  # noqa: E731
    mid_hip = (ref_body[BODY["r_hip"], :2] + ref_body[BODY["l_hip"], :2]) / 2
    torso_len = float(np.linalg.norm(ref_body[BODY["neck"], :2] - mid_hip)) if ok(ref_body, _TORSO) else h / 4
    radius = max(2, int(round(0.16 * torso_len)))  # half a limb's width
    refs = ref.astype(np.float32)
    masks = {}
    if ok(ref_body, _TORSO_OUTLINE):
        m = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(m, np.round(ref_body[list(_TORSO_OUTLINE), :2]).astype(np.int32), 255)
        masks["torso"] = cv2.dilate(m, np.ones((2 * radius + 1,) * 2, np.uint8))
    for a, b in _BONES:
        if ok(ref_body, (a, b)):
            m = np.zeros((h, w), np.uint8)
            cv2.line(m, tuple(np.round(ref_body[a, :2]).astype(int)), tuple(np.round(ref_body[b, :2]).astype(int)),
                     255, thickness=2 * radius + 1)
            masks[(a, b)] = m
    if ok(ref_body, _HEAD):
        m = np.zeros((h, w), np.uint8)
        r = int(round(1.1 * np.linalg.norm(ref_body[_HEAD[1], :2] - ref_body[_HEAD[0], :2])))
        cv2.circle(m, tuple(np.round(ref_body[_HEAD[1], :2]).astype(int)), max(r, radius), 255, -1)
        masks["head"] = m
    out = np.empty((len(bodies), h, w, 3), np.uint8)
    for i, body in enumerate(bodies):
        f = refs.copy()
        if "torso" in masks and ok(body, _TORSO):
            src = ref_body[list(_TORSO), :2].astype(np.float32)
            dst = body[list(_TORSO), :2].astype(np.float32)
            _paste(f, refs, masks["torso"], cv2.getAffineTransform(src, dst))
        for a, b in _BONES:
            if (a, b) in masks and ok(body, (a, b)):
                _paste(f, refs, masks[(a, b)], similarity(ref_body[a, :2], ref_body[b, :2], body[a, :2], body[b, :2]))
        if "head" in masks and ok(body, _HEAD):
            _paste(f, refs, masks["head"], similarity(*ref_body[list(_HEAD), :2], *body[list(_HEAD), :2]))
        out[i] = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return out
