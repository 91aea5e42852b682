"""The offline default pose extractor: MediaPipe BlazePose (full) run with a TFLite interpreter.

Needs no user files and no network: the two models (`pose_detection.tflite`, `pose_landmark_full.tflite`,
Apache-2.0, from the mediapipe 0.10.21 wheel; see assets/NOTICE) ship in `aa_trt/pose/assets/`, and
they run with `ai-edge-litert` (Google's TFLite runtime on PyPI, fine beside numpy 2 and protobuf >= 5).
mediapipe itself is not used. The pre/post-processing below is written from the models' tensor shapes
and BlazePose's published design:

1. Detector (224x224, inputs in [-1, 1]) on the whole image letterboxed to a square (zero padding).
   2254 SSD anchors (strides 8, 16, 32, 32, 32; two per cell; fixed size 1), 12 regressors per anchor:
   box (x, y, w, h) and 4 keypoints, all in 224-pixel units relative to the anchor centre; sigmoid
   scores >= 0.5; weighted non-maximum suppression (IoU 0.3). Keypoint 0 is the mid-hip centre, keypoint
   1 a point whose distance from it is the radius of a circle around the whole body, and whose
   direction gives the body's rotation.
2. Region of interest: a square centred on keypoint 0, side 2 x radius x 1.25, rotated so that the
   direction keypoint 0 -> keypoint 1 points up.
3. Landmark model (256x256, inputs in [0, 1]) on that crop: 39 landmarks x (x, y, z, visibility,
   presence) in crop pixels (0-32 the published BlazePose topology, 33/34 the hip centre and the
   body-circle point used to track the region to the next frame), a person-presence probability, and
   64x64 heatmaps used to refine the landmark positions. Landmarks map back through the crop's affine.

The 33 landmarks become OpenPose-18 body points (neck = mid-shoulders; the person's right side is
OpenPose's "r_"). Hands: BlazePose has only four points per hand, the wrist, a thumb point (its
"thumb #2 knuckle") and the index and pinky "#1 knuckles"; they go to the 21-point hand slots 0
(wrist), 4 (thumb tip: our choice; the thumb point is the farthest-out thumb point BlazePose has),
5 (index base) and 17 (pinky base); the other 17 slots have confidence 0. Face: none (all 68 at
confidence 0). Point confidence = sigmoid(visibility) x sigmoid(presence), unthresholded (the
renderer skips points under 0.3; points outside the image usually come out near 0).

Checked against mediapipe 0.10.21's own graph (legacy `solutions.pose`, model_complexity=1, run in a
separate environment): same detections (keypoints within ~1 px), same regions, and landmarks within
~0.5-1.5 px median given the same region. Two deliberate differences: with `antialias` (default) an
input much larger than the crop is box-reduced by an integer factor before bilinear sampling
(MediaPipe samples bilinearly without it; on a 2048 px upscaled photo this halved the landmark jitter
under 2-px shifts), and `video()` moves the tracked region with hysteresis (see there).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from aa_trt.errors import AATrtError
from aa_trt.pose._imgops import apply_affine, as_rgb_uint8, warp_affine
from aa_trt.pose.keypoints import BODY, Pose

ASSETS = Path(__file__).resolve().parent / "assets"
DETECTOR_FILE = "pose_detection.tflite"
LANDMARK_FILE = "pose_landmark_full.tflite"

DET_SIZE = 224
LMK_SIZE = 256
NUM_LANDMARKS = 39
_STRIDES = (8, 16, 32, 32, 32)
_ANCHORS_PER_LAYER = 2
_SCORE_CLIP = 100.0
_NMS_IOU = 0.3
_ROI_SCALE = 1.25
_HEATMAP_KERNEL = 7
_HEATMAP_MIN_CONF = 0.5

# BlazePose landmark indices
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 2, 5, 7, 8
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 11, 12, 13, 14, 15, 16
L_PINKY, R_PINKY, L_INDEX, R_INDEX, L_THUMB, R_THUMB = 17, 18, 19, 20, 21, 22
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 23, 24, 25, 26, 27, 28
AUX_CENTRE, AUX_SCALE = 33, 34

# OpenPose-18 slot <- BlazePose landmark (neck is computed from both shoulders)
BODY_FROM_BLAZE = {
    "nose": NOSE, "r_shoulder": R_SHOULDER, "r_elbow": R_ELBOW, "r_wrist": R_WRIST,
    "l_shoulder": L_SHOULDER, "l_elbow": L_ELBOW, "l_wrist": L_WRIST, "r_hip": R_HIP, "r_knee": R_KNEE,
    "r_ankle": R_ANKLE, "l_hip": L_HIP, "l_knee": L_KNEE, "l_ankle": L_ANKLE, "r_eye": R_EYE,
    "l_eye": L_EYE, "r_ear": R_EAR, "l_ear": L_EAR,
}
# 21-point hand slot <- BlazePose landmark, for (left hand, right hand)
HAND_SLOTS = (0, 4, 5, 17)
HAND_FROM_BLAZE = ((L_WRIST, L_THUMB, L_INDEX, L_PINKY), (R_WRIST, R_THUMB, R_INDEX, R_PINKY))

_INSTALL_HINT = ("the offline pose extractor needs a TFLite interpreter: pip install ai-edge-litert "
                 "(or tflite-runtime)")


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # the older standalone runtime
        return Interpreter
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the runtime's C-level "INFO: Created TensorFlow Lite XNNPACK delegate" line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -_SCORE_CLIP, _SCORE_CLIP)))


def ssd_anchors(size: int = DET_SIZE, strides=_STRIDES, per_layer: int = _ANCHORS_PER_LAYER) -> np.ndarray:
    """(N, 2) anchor centres, normalised, in the detector's output order (fixed anchor size 1).

    Consecutive layers with the same stride share one feature map, each contributing `per_layer`
    anchors per cell; cells are row-major (y, then x)."""
    out = []
    i = 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        n = per_layer * (j - i)
        fm = math.ceil(size / strides[i])
        ys, xs = np.mgrid[0:fm, 0:fm]
        c = np.stack([(xs + 0.5) / fm, (ys + 0.5) / fm], -1).reshape(-1, 1, 2)
        out.append(np.repeat(c, n, axis=1).reshape(-1, 2))
        i = j
    return np.concatenate(out).astype(np.float64)


@dataclass
class Detection:
    """One detected person, in pixels of the input image."""

    score: float
    box: np.ndarray        # (4,) x1, y1, x2, y2
    keypoints: np.ndarray  # (4, 2): hip centre, body-circle point, shoulder centre, upper-body point


@dataclass
class Roi:
    """A rotated square in pixels of the input image."""

    cx: float
    cy: float
    size: float
    angle: float  # radians; the crop's "up" is the image direction (sin a, -cos a)

    def crop_to_image(self, n: int) -> np.ndarray:
        """2x3 map from crop coordinates (0..n) to image coordinates."""
        s = self.size / n
        c, si = math.cos(self.angle) * s, math.sin(self.angle) * s
        return np.array([[c, -si, self.cx - c * n / 2 + si * n / 2],
                         [si, c, self.cy - si * n / 2 - c * n / 2]])


def roi_from_points(centre, scale_point, scale: float = _ROI_SCALE) -> Roi:
    """BlazePose's alignment: square centred on `centre`, side 2|scale_point - centre| x scale, rotated
    so that centre -> scale_point is up."""
    (x0, y0), (x1, y1) = centre, scale_point
    angle = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
    angle = (angle + math.pi) % (2 * math.pi) - math.pi
    return Roi(float(x0), float(y0), 2.0 * math.hypot(x1 - x0, y1 - y0) * scale, angle)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (N, 4), xyxy."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou: float = _NMS_IOU):
    """Weighted non-maximum suppression: each cluster (IoU > `iou` with its best member) becomes the
    score-weighted mean of its boxes and keypoints, with the best member's score. Best first."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        top = order[0]
        overlap = _iou(boxes[top], boxes[order]) > iou
        overlap[0] = True
        members = order[overlap]
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kps = (keypoints[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((float(scores[top]), box, kps))
        order = order[~overlap]
    return out


def decode_detections(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray,
                      min_score: float = 0.5, size: int = DET_SIZE):
    """Detector outputs (N, 12), (N,) -> [(score, box xyxy, keypoints (4, 2))] normalised to the
    detector's input square, best first."""
    scores = _sigmoid(raw_scores.reshape(-1).astype(np.float64))
    keep = scores >= min_score
    if not keep.any():
        return []
    r = raw_boxes.reshape(-1, 12)[keep].astype(np.float64) / size
    a = anchors[keep]
    centre = r[:, 0:2] + a
    half = r[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], 1)
    kps = r[:, 4:12].reshape(-1, 4, 2) + a[:, None, :]
    return weighted_nms(scores[keep], boxes, kps)


def refine_from_heatmap(xy: np.ndarray, heatmap: np.ndarray, crop: int = LMK_SIZE,
                        kernel: int = _HEATMAP_KERNEL, min_conf: float = _HEATMAP_MIN_CONF) -> np.ndarray:
    """Move each landmark (crop pixels) to the confidence-weighted centre of its heatmap (logits,
    (h, w, K)) in a kernel x kernel window around it, when the window's peak is confident enough."""
    h, w, k = heatmap.shape
    n = min(k, len(xy))
    out = np.array(xy, np.float64, copy=True)
    r = kernel // 2
    offs = np.arange(-r, r + 1)
    cols = np.trunc(out[:n, 0] / crop * w).astype(np.int64)[:, None] + offs  # (n, K)
    rows = np.trunc(out[:n, 1] / crop * h).astype(np.int64)[:, None] + offs
    vc = (cols >= 0) & (cols < w)
    vr = (rows >= 0) & (rows < h)
    ch = np.arange(n)[:, None, None]
    vals = heatmap[np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :], ch]
    conf = _sigmoid(vals.astype(np.float64)) * (vr[:, :, None] & vc[:, None, :])
    total = conf.sum((1, 2))
    ok = (conf.max((1, 2)) >= min_conf) & (total > 0)
    safe = np.where(ok, total, 1.0)
    out[:n, 0] = np.where(ok, (conf * cols[:, None, :]).sum((1, 2)) / safe / w * crop, out[:n, 0])
    out[:n, 1] = np.where(ok, (conf * rows[:, :, None]).sum((1, 2)) / safe / h * crop, out[:n, 1])
    return out


def pose_from_landmarks(lm: np.ndarray, width: int, height: int, score: float) -> Pose:
    """(>= 33, 3) landmarks (x, y, confidence) in image pixels -> Pose (OpenPose-18 body, sparse hands)."""
    pose = Pose(width, height, score=float(score))
    for name, j in BODY_FROM_BLAZE.items():
        pose.body[BODY[name]] = lm[j]
    ls, rs = lm[L_SHOULDER], lm[R_SHOULDER]
    pose.body[BODY["neck"]] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
    for h, src in enumerate(HAND_FROM_BLAZE):
        for slot, j in zip(HAND_SLOTS, src):
            pose.hands[h, slot] = lm[j]
    return pose


class BlazePoseExtractor:
    """One person per image: `extractor(image) -> Pose | None`, `extractor.video(frames)`.

    image: (H, W, 3) uint8 RGB ((H, W) grey and RGBA are accepted too). None means no person was
    found (no detection above `min_detection`, or the landmark model's person presence below
    `min_presence`). Pose.score is the landmark model's person-presence probability. `refine` moves
    landmarks to their heatmap centres (as MediaPipe does); `antialias` see the module docstring.
    """

    def __init__(self, min_detection: float = 0.5, min_presence: float = 0.5, num_threads: int | None = None,
                 assets: str | os.PathLike | None = None, refine: bool = True, antialias: bool = True):
        Interpreter = _interpreter_class()
        d = Path(assets) if assets is not None else ASSETS
        paths = [d / DETECTOR_FILE, d / LANDMARK_FILE]
        for p in paths:
            if not p.is_file():
                raise AATrtError(f"{p}: BlazePose model file missing (it ships with aa_trt; reinstall aa-trt)")
        if num_threads is None:
            num_threads = max(1, min(4, os.cpu_count() or 1))
        self._det = Interpreter(model_path=str(paths[0]), num_threads=num_threads)
        self._lmk = Interpreter(model_path=str(paths[1]), num_threads=num_threads)
        with _quiet_stderr():
            self._det.allocate_tensors()
            self._lmk.allocate_tensors()
        self._det_in = self._det.get_input_details()[0]["index"]
        self._lmk_in = self._lmk.get_input_details()[0]["index"]
        det_out = {tuple(o["shape"][1:]): o["index"] for o in self._det.get_output_details()}
        self._det_boxes, self._det_scores = det_out[(2254, 12)], det_out[(2254, 1)]
        lmk_out = {tuple(o["shape"][1:]): o["index"] for o in self._lmk.get_output_details()}
        self._lmk_pts = lmk_out[(NUM_LANDMARKS * 5,)]
        self._lmk_flag = lmk_out[(1,)]
        self._lmk_heat = lmk_out[(64, 64, NUM_LANDMARKS)]
        self.anchors = ssd_anchors()
        assert len(self.anchors) == 2254
        self.min_detection = min_detection
        self.min_presence = min_presence
        self.refine = refine
        self.antialias = antialias
        self.track_shift, self.track_scale, self.track_angle = 0.05, 0.07, 0.1

    # -- stages ---------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[Detection]:
        """All persons the detector finds (after NMS), best first, in image pixels."""
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        lb = Roi(w / 2, h / 2, float(max(w, h)), 0.0)  # the whole image letterboxed into a square
        m = lb.crop_to_image(DET_SIZE)
        x = warp_affine(img, m, DET_SIZE, DET_SIZE, border="constant",
                        antialias=self.antialias) / 127.5 - 1.0
        self._det.set_tensor(self._det_in, x[None].astype(np.float32))
        self._det.invoke()
        boxes = self._det.get_tensor(self._det_boxes)[0]
        scores = self._det.get_tensor(self._det_scores)[0, :, 0]
        out = []
        for score, box, kps in decode_detections(boxes, scores, self.anchors, self.min_detection):
            corners = apply_affine(m, box.reshape(2, 2) * DET_SIZE).reshape(4)
            out.append(Detection(score, corners, apply_affine(m, kps * DET_SIZE)))
        return out

    def landmarks(self, image: np.ndarray, roi: Roi):
        """Landmark model on `roi`: ((39, 5) x, y [image px], z, visibility, presence [probabilities],
        person presence)."""
        img = as_rgb_uint8(image)
        m = roi.crop_to_image(LMK_SIZE)
        x = warp_affine(img, m, LMK_SIZE, LMK_SIZE, border="replicate",
                        antialias=self.antialias) / 255.0
        self._lmk.set_tensor(self._lmk_in, x[None].astype(np.float32))
        self._lmk.invoke()
        raw = self._lmk.get_tensor(self._lmk_pts).reshape(NUM_LANDMARKS, 5).astype(np.float64)
        flag = float(self._lmk.get_tensor(self._lmk_flag).reshape(-1)[0])
        xy = raw[:, :2]
        if self.refine:
            xy = refine_from_heatmap(xy, self._lmk.get_tensor(self._lmk_heat)[0])
        out = np.empty_like(raw)
        out[:, :2] = apply_affine(m, xy)
        out[:, 2] = raw[:, 2] * roi.size / LMK_SIZE
        out[:, 3] = _sigmoid(raw[:, 3])
        out[:, 4] = _sigmoid(raw[:, 4])
        return out, flag

    # -- public API -----------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> Pose | None:
        pose, _ = self._frame(image, None)
        return pose

    def video(self, frames: Iterable[np.ndarray]) -> list[Pose | None]:
        """Poses for consecutive frames, tracking the person from frame to frame.

        After a found pose, the next frame's region comes from that pose's landmarks instead of the
        detector, as MediaPipe does; but the region is only moved when the landmarks say the person
        moved by more than `track_shift` (of the region's side), `track_scale` or `track_angle`
        (radians). That hysteresis keeps a still subject's region, and so its pose, fixed (the
        landmark -> region -> landmark loop otherwise wanders by a few percent per frame), and a
        repeated still image gives the same pose every frame. When tracking loses the person, the
        detector runs again on the same frame."""
        out, roi = [], None
        for f in frames:
            pose, roi = self._frame(f, roi)
            out.append(pose)
        return out

    def _close(self, a: Roi, b: Roi) -> bool:
        dangle = (a.angle - b.angle + math.pi) % (2 * math.pi) - math.pi
        return (math.hypot(a.cx - b.cx, a.cy - b.cy) <= self.track_shift * b.size
                and abs(a.size / b.size - 1) <= self.track_scale and abs(dangle) <= self.track_angle)

    def _frame(self, image, roi: Roi | None):
        """(pose or None, region for the next frame or None)."""
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        lm = None
        if roi is not None:  # tracking
            lm, flag = self.landmarks(img, roi)
            if flag < self.min_presence:
                lm = None
        if lm is None:
            roi = self._roi_from_detector(img)
            if roi is None:
                return None, None
            lm, flag = self.landmarks(img, roi)
            if flag < self.min_presence:
                return None, None
            # The detector's region is rough: when the landmarks place the body elsewhere, run the
            # landmark model once more on the region they give (what tracking would use next frame).
            again = roi_from_points(lm[AUX_CENTRE, :2], lm[AUX_SCALE, :2])
            if not self._close(again, roi):
                lm2, flag2 = self.landmarks(img, again)
                if flag2 >= self.min_presence:
                    roi, lm, flag = again, lm2, flag2
        nxt = roi_from_points(lm[AUX_CENTRE, :2], lm[AUX_SCALE, :2])
        if self._close(nxt, roi):
            nxt = roi
        conf = lm[:, 3] * lm[:, 4]
        pts = np.concatenate([lm[:, :2], conf[:, None]], 1).astype(np.float32)
        return pose_from_landmarks(pts, w, h, flag), nxt

    def _roi_from_detector(self, img) -> Roi | None:
        dets = self.detect(img)
        if not dets:
            return None
        best = dets[0]
        return roi_from_points(best.keypoints[0], best.keypoints[1])
