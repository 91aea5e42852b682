"""The keypoint format every pose backend returns and the aligner and renderer consume.

Coordinates are pixels of the image the pose was found in (x right, y down); a point that was not
found has confidence 0. Body points follow OpenPose's 18-point order (what DWPose and Moore's
renderer use); hands follow the 21-point order (wrist, then thumb, index, middle, ring, pinky from
base to tip); the face has the 68 points of iBUG-300W.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BODY_NAMES = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
              "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
BODY = {name: i for i, name in enumerate(BODY_NAMES)}
# OpenPose limb pairs (1-based in OpenPose's own code; 0-based here), in its drawing order.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))


@dataclass
class Pose:
    """One person in one image."""

    width: int
    height: int
    body: np.ndarray = field(default_factory=lambda: np.zeros((18, 3), np.float32))   # (18, 3) x, y, conf
    hands: np.ndarray = field(default_factory=lambda: np.zeros((2, 21, 3), np.float32))  # left, right
    face: np.ndarray = field(default_factory=lambda: np.zeros((68, 3), np.float32))
    score: float = 0.0  # the detector's confidence in the person

    def copy(self) -> "Pose":
        return Pose(self.width, self.height, self.body.copy(), self.hands.copy(), self.face.copy(), self.score)

    def to_array(self) -> np.ndarray:
        """(18 + 42 + 68, 3) float32: body, left hand, right hand, face."""
        return np.concatenate([self.body, self.hands.reshape(42, 3), self.face]).astype(np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray, width: int, height: int, score: float = 1.0) -> "Pose":
        a = np.asarray(a, np.float32)
        return cls(width, height, a[:18].copy(), a[18:60].reshape(2, 21, 3).copy(), a[60:128].copy(), score)


# ---------------------------------------------------------------------------------- saved poses
# One saved-pose format for the extraction cache and `aa-trt data prepare`: an npz with
#   keypoints (N, 128, 3) float32 (Pose.to_array; zeros where nobody was found),
#   found (N,) bool, size (2,) int: the (width, height) of the frames they were found in.
def save_poses(path, poses: "list[Pose | None]", width: int, height: int) -> None:
    """Atomically (a killed write leaves nothing under `path`)."""
    from aa_trt.files import atomic_output

    arr = np.stack([p.to_array() if p is not None else np.zeros((128, 3), np.float32) for p in poses])
    with atomic_output(path, make_parent=True) as tmp:
        np.savez(tmp, keypoints=arr, found=np.array([p is not None for p in poses]),
                 size=np.array([width, height]))


def load_poses(path) -> "list[Pose | None]":
    """What `save_poses` wrote (KeyError/ValueError/OSError for anything else: a broken zip, a
    truncated array, arrays of other shapes are a ValueError naming the file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arr, found, size = z["keypoints"], z["found"], z["size"]
        arr, found, size = np.asarray(arr, np.float32), np.asarray(found, bool), np.asarray(size)
        if arr.ndim != 3 or arr.shape[1:] != (128, 3) or found.shape != arr.shape[:1] or size.shape != (2,):
            raise ValueError("arrays of other shapes than keypoints (N, 128, 3), found (N,), size (2,)")
        return [Pose.from_array(a, int(size[0]), int(size[1])) if ok else None for a, ok in zip(arr, found)]
    except (OSError, KeyError, ValueError):
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ...: a damaged file
        raise ValueError(f"{path}: not a saved-pose file ({type(e).__name__}: {e})") from None
