"""Aligning the driving skeleton to the reference character (the paper's "rescale the skeleton").

Every body bone of the driving pose keeps its direction and takes the reference's length; the
skeleton is rebuilt from the neck outwards along OpenPose's limb tree. The neck is anchored at the
reference's neck in the first frame and then follows the driving neck's motion, scaled by the ratio
of the two bodies' sizes. Hands are scaled about their wrists by the forearm ratio, the face about
the nose by the head ratio. A bone missing in the reference keeps the driving length times the body
ratio; a bone missing in a driving frame stays missing.
"""
from __future__ import annotations

import numpy as np

from aa_trt.pose.keypoints import BODY, LIMBS, Pose

THRESHOLD = 0.3
TORSO = ((1, 8), (1, 11), (1, 2), (1, 5))  # neck to hips and shoulders: the body-size yardstick
HEAD = ((1, 0), (0, 14), (0, 15))


def _length(body: np.ndarray, a: int, b: int) -> float | None:
    if body[a, 2] < THRESHOLD or body[b, 2] < THRESHOLD:
        return None
    return float(np.hypot(*(body[b, :2] - body[a, :2])))


def _size(body: np.ndarray, bones) -> float | None:
    lengths = [l for a, b in bones if (l := _length(body, a, b))]
    return float(np.mean(lengths)) if lengths else None


class PoseAligner:
    """Fit once on the reference pose and the first driving pose, then map every driving frame.
    Coordinates come out in the reference image's pixel space (width/height of the reference)."""

    def __init__(self, reference: Pose, first_driving: Pose):
        if reference.body[BODY["neck"], 2] < THRESHOLD:
            raise ValueError("the reference pose has no neck (shoulders not found)")
        self.ref = reference
        ref_size = _size(reference.body, TORSO)
        drv_size = _size(first_driving.body, TORSO)
        if ref_size is None or drv_size is None:
            raise ValueError("cannot measure the body size (no torso bones found)")
        self.ratio = ref_size / drv_size
        self.origin = first_driving.body[BODY["neck"], :2].copy()
        self.ref_lengths = {(a, b): _length(reference.body, a, b) for a, b in LIMBS}
        ref_head, drv_head = _size(reference.body, HEAD), _size(first_driving.body, HEAD)
        self.head_ratio = ref_head / drv_head if ref_head and drv_head else self.ratio

    def __call__(self, pose: Pose | None) -> Pose | None:
        if pose is None:
            return None
        src = pose.body
        out = Pose(self.ref.width, self.ref.height, score=pose.score)
        neck = BODY["neck"]
        if src[neck, 2] < THRESHOLD:
            return out  # nothing to anchor: an empty pose
        out.body[neck, :2] = self.ref.body[neck, :2] + (src[neck, :2] - self.origin) * self.ratio
        out.body[neck, 2] = src[neck, 2]
        for a, b in LIMBS:  # parents come before children in OpenPose's limb order
            if out.body[a, 2] < THRESHOLD or src[b, 2] < THRESHOLD:
                continue
            vec = src[b, :2] - src[a, :2]
            norm = float(np.hypot(*vec))
            length = self.ref_lengths[(a, b)] or norm * self.ratio
            direction = vec / norm if norm > 1e-6 else np.zeros(2, np.float32)
            out.body[b, :2] = out.body[a, :2] + direction * length
            out.body[b, 2] = src[b, 2]
        for h, (elbow, wrist) in enumerate(((BODY["l_elbow"], BODY["l_wrist"]),
                                            (BODY["r_elbow"], BODY["r_wrist"]))):
            hand = pose.hands[h]
            if out.body[wrist, 2] < THRESHOLD or hand[0, 2] < THRESHOLD:
                continue
            src_fore, ref_fore = _length(src, elbow, wrist), self.ref_lengths[(elbow, wrist)]
            k = ref_fore / src_fore if src_fore and ref_fore else self.ratio
            out.hands[h, :, :2] = out.body[wrist, :2] + (hand[:, :2] - src[wrist, :2]) * k
            out.hands[h, :, 2] = hand[:, 2]
        nose = BODY["nose"]
        if out.body[nose, 2] >= THRESHOLD and src[nose, 2] >= THRESHOLD:
            out.face[:, :2] = out.body[nose, :2] + (pose.face[:, :2] - src[nose, :2]) * self.head_ratio
            out.face[:, 2] = pose.face[:, 2]
        return out


def align_sequence(reference: Pose, driving: list[Pose | None]) -> list[Pose | None]:
    first = next((p for p in driving if p is not None and p.body[BODY["neck"], 2] >= THRESHOLD), None)
    if first is None:
        raise ValueError("no driving frame has a body to align")
    aligner = PoseAligner(reference, first)
    return [aligner(p) for p in driving]
