"""DWPose backend: the user's two ONNX files run with onnxruntime.

`DWPoseExtractor(dir)` expects `dir/yolox_l.onnx` (YOLOX-L person detector, 640x640) and
`dir/dw-ll_ucoco_384.onnx` (DWPose-L whole-body model: RTMPose-style SimCC head, input 288x384
(w x h), 133 COCO-WholeBody points). Neither ships with aa_trt (no PyPI package carries the weights).

Pipeline (top-down, one person, the most confident):
1. YOLOX: the image (BGR, as YOLOX was trained with OpenCV; ControlNet's DWPose annotator feeds it RGB)
   resized to fit 640x640 keeping its aspect ratio (PIL bilinear, which antialiases when shrinking;
   DWPose uses cv2.resize), placed top-left on a 114-grey canvas, raw 0-255 values. The raw head output (1, 8400, 85) is
   decoded on the 80/40/20 grids of strides 8/16/32: centre = (offset + cell) x stride, size =
   exp(log-size) x stride; score = objectness x person-class probability (both already sigmoids in the
   exported graph); NMS (IoU 0.45) and the best box with score >= 0.3. An mmdeploy-style detector
   (outputs `dets` (1, N, 5) in input pixels and `labels` (1, N)) is accepted too.
2. Crop: the box's centre, its size x 1.25, widened or heightened to the model's 3:4 aspect, affinely
   warped (bilinear, zero border) to 288x384; RGB normalised with ImageNet mean/std
   (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375).
3. SimCC: per point, argmax over the x bins (576) and y bins (768) / split ratio 2.0 -> crop pixels;
   score = min of the two maxima (a point whose score is <= 0 is not found); back to image pixels
   through the crop's affine.
4. COCO-WholeBody 133 -> Pose: body 0-16 to OpenPose-18 (neck = mid-shoulders, confidence = the lower
   shoulder's), face 23-90 (68 points, iBUG order), left hand 91-111, right hand 112-132 (21 points,
   OpenPose hand order). Feet (17-22) are dropped. Confidences are clipped to [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from aa_trt.errors import InputError
from aa_trt.pose._imgops import apply_affine, as_rgb_uint8, warp_affine
from aa_trt.pose.keypoints import Pose

DET_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"

YOLOX_SIZE = (640, 640)  # (h, w)
YOLOX_STRIDES = (8, 16, 32)
PAD_VALUE = 114
POSE_INPUT = (288, 384)  # (w, h)
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)

# OpenPose-18 body slot <- COCO body index (slot 1, the neck, is the mid-shoulder point)
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
FACE = slice(23, 91)
LEFT_HAND = slice(91, 112)
RIGHT_HAND = slice(112, 133)

_INSTALL_HINT = "the DWPose backend needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)"


# -- detector --------------------------------------------------------------------------------------
def letterbox(image: np.ndarray, size=YOLOX_SIZE, pad: int = PAD_VALUE) -> tuple[np.ndarray, float]:
    """YOLOX input: resize to fit `size` (h, w) keeping the aspect ratio, top-left on a `pad` canvas.
    Returns ((h, w, C) float32, ratio), where detector pixels = image pixels x ratio."""
    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    nw, nh = max(1, int(w * r)), max(1, int(h * r))
    out = np.full((size[0], size[1], image.shape[2]), pad, np.float32)
    resized = image if (nw, nh) == (w, h) else np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out[:nh, :nw] = resized
    return out, r


def yolox_grids(size=YOLOX_SIZE, strides=YOLOX_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) cell offsets (x, y) and (N, 1) strides in the head's output order (stride by stride,
    row-major)."""
    grids, st = [], []
    for s in strides:
        hs, ws = size[0] // s, size[1] // s
        ys, xs = np.mgrid[0:hs, 0:ws]
        grids.append(np.stack([xs, ys], -1).reshape(-1, 2))
        st.append(np.full((hs * ws, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(st).astype(np.float64)


def yolox_decode(raw: np.ndarray, size=YOLOX_SIZE, strides=YOLOX_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Raw head output (N, 5 + classes) -> (boxes (N, 4) x1 y1 x2 y2 in detector pixels,
    class scores (N, classes) = objectness x class probability)."""
    raw = np.asarray(raw, np.float64).reshape(-1, raw.shape[-1])
    grid, stride = yolox_grids(size, strides)
    if len(grid) != len(raw):
        raise ValueError(f"YOLOX output has {len(raw)} rows, the {size} grid has {len(grid)}")
    centre = (raw[:, 0:2] + grid) * stride
    wh = np.exp(np.clip(raw[:, 2:4], -50, 50)) * stride
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1)
    return boxes, raw[:, 4:5] * raw[:, 5:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        ix = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        iy = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = ix * iy
        order = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-12) <= iou]
    return np.array(keep, np.int64)


# -- pose model ------------------------------------------------------------------------------------
def box_to_centre_scale(box, padding: float = BOX_PADDING, aspect: float = POSE_INPUT[0] / POSE_INPUT[1]):
    """xyxy box -> (centre (2,), scale (2,) = region w, h) padded and fixed to w / h = `aspect`."""
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * padding, (y2 - y1) * padding
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return centre, np.array([w, h])


def crop_matrix(centre, scale, out_size=POSE_INPUT) -> np.ndarray:
    """2x3 map from crop pixels (out_size = (w, h)) to image pixels: the crop's centre is `centre`,
    its width `scale[0]` image pixels (OpenCV pixel-centre convention, as RTMPose's warpAffine)."""
    s = float(scale[0]) / out_size[0]
    return np.array([[s, 0.0, centre[0] - s * out_size[0] / 2],
                     [0.0, s, centre[1] - s * out_size[1] / 2]])


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT):
    """(K, Wx), (K, Wy) -> (locations (K, 2) in crop pixels, scores (K,)). Score = the lower of the
    two maxima; points scoring <= 0 get location -1."""
    x = np.asarray(simcc_x, np.float64)
    y = np.asarray(simcc_y, np.float64)
    locs = np.stack([np.argmax(x, 1), np.argmax(y, 1)], -1).astype(np.float64) / split
    vals = np.minimum(x.max(1), y.max(1))
    locs[vals <= 0] = -1
    return locs, vals


def wholebody_to_pose(kps: np.ndarray, scores: np.ndarray, width: int, height: int, score: float = 1.0) -> Pose:
    """133 COCO-WholeBody points (pixels) and scores -> Pose (body 18, hands 2x21, face 68)."""
    kps = np.asarray(kps, np.float32).reshape(133, 2)
    conf = np.clip(np.asarray(scores, np.float32).reshape(133), 0.0, 1.0)
    pts = np.concatenate([kps, conf[:, None]], 1)
    pose = Pose(width, height, score=float(score))
    for slot, j in enumerate(COCO_TO_OPENPOSE):
        if j is not None:
            pose.body[slot] = pts[j]
    ls, rs = pts[5], pts[6]
    pose.body[1] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
    pose.face[:] = pts[FACE]
    pose.hands[0] = pts[LEFT_HAND]
    pose.hands[1] = pts[RIGHT_HAND]
    pose.body[pose.body[:, 2] <= 0] = 0.0
    pose.hands[pose.hands[..., 2] <= 0] = 0.0
    pose.face[pose.face[:, 2] <= 0] = 0.0
    return pose


# -- the backend -----------------------------------------------------------------------------------
def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return onnxruntime


class DWPoseExtractor:
    """`DWPoseExtractor(dir)(image) -> Pose | None` with `dir/yolox_l.onnx` and
    `dir/dw-ll_ucoco_384.onnx`; image (H, W, 3) uint8 RGB; None = no person."""

    def __init__(self, dir: str | os.PathLike, providers: list[str] | None = None, min_score: float = 0.3,
                 nms_iou: float = 0.45, num_threads: int | None = None):
        d = Path(dir)
        self.det_path, self.pose_path = d / DET_FILE, d / POSE_FILE
        for p in (self.det_path, self.pose_path):
            if not p.is_file():
                raise InputError(f"{p}: DWPose model file not found (the DWPose folder must hold "
                                 f"{DET_FILE} and {POSE_FILE})")
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        providers = providers or ["CPUExecutionProvider"]
        self._det = self._session(ort, self.det_path, opts, providers)
        self._pose = self._session(ort, self.pose_path, opts, providers)
        self.min_score, self.nms_iou = min_score, nms_iou

        di = self._det.get_inputs()[0]
        self._det_in = di.name
        self.det_size = tuple(int(v) if isinstance(v, int) and v > 0 else dflt
                              for v, dflt in zip(di.shape[2:4], YOLOX_SIZE))
        self._det_outs = [o.name for o in self._det.get_outputs()]
        pi = self._pose.get_inputs()[0]
        self._pose_in = pi.name
        h, w = pi.shape[2:4]
        self.pose_size = (int(w) if isinstance(w, int) else POSE_INPUT[0], int(h) if isinstance(h, int) else POSE_INPUT[1])
        names = [o.name for o in self._pose.get_outputs()]
        self._simcc = (["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(names) else names[:2])

    @staticmethod
    def _session(ort, path: Path, opts, providers):
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # corrupt or not an ONNX file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: not a loadable ONNX model ({first})") from None

    # -- stages ---------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Persons as (score, xyxy box in image pixels), best first."""
        img = as_rgb_uint8(image)
        x, ratio = letterbox(img[:, :, ::-1].copy(), self.det_size)  # YOLOX expects BGR
        outs = self._det.run(self._det_outs, {self._det_in: x.transpose(2, 0, 1)[None]})
        if len(outs) >= 2 and outs[0].ndim == 3 and outs[0].shape[-1] == 5:  # mmdeploy: dets, labels
            dets, labels = outs[0][0].astype(np.float64), outs[1][0]
            keep = labels == 0
            boxes, scores = dets[keep, :4], dets[keep, 4]
        else:
            boxes, cls = yolox_decode(outs[0][0], self.det_size)
            scores = cls[:, 0]
            cand = scores >= 0.1
            boxes, scores = boxes[cand], scores[cand]
            k = nms(boxes, scores, self.nms_iou)
            boxes, scores = boxes[k], scores[k]
        good = scores >= self.min_score
        order = np.argsort(-scores[good], kind="stable")
        h, w = img.shape[:2]
        out = []
        for b, s in zip(boxes[good][order] / ratio, scores[good][order]):
            b = np.array([np.clip(b[0], 0, w), np.clip(b[1], 0, h), np.clip(b[2], 0, w), np.clip(b[3], 0, h)])
            if b[2] > b[0] and b[3] > b[1]:
                out.append((float(s), b))
        return out

    def keypoints(self, image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        """Whole-body model on one person box -> ((133, 2) image pixels, (133,) scores)."""
        img = as_rgb_uint8(image)
        centre, scale = box_to_centre_scale(box, BOX_PADDING, self.pose_size[0] / self.pose_size[1])
        m = crop_matrix(centre, scale, self.pose_size)
        crop = warp_affine(img, m, self.pose_size[0], self.pose_size[1], border="constant", antialias=False)
        x = ((crop - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
        sx, sy = self._pose.run(self._simcc, {self._pose_in: x})
        locs, vals = simcc_decode(sx[0], sy[0])
        pts = apply_affine(m, locs)
        pts[vals <= 0] = 0.0
        return pts, vals

    # -- public API -----------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> Pose | None:
        img = as_rgb_uint8(image)
        dets = self.detect(img)
        if not dets:
            return None
        score, box = dets[0]
        kps, vals = self.keypoints(img, box)
        return wholebody_to_pose(kps, vals, img.shape[1], img.shape[0], score)

    def video(self, frames: Iterable[np.ndarray]) -> list[Pose | None]:
        """Each frame on its own (detector every frame), so a repeated image gives the same pose."""
        return [self(f) for f in frames]
