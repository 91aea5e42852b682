"""Pose extraction backends.

BlazePose (the offline default) runs its real bundled models on a real photo of a person
(`skimage.data.astronaut()`, 512x512: Eileen Collins in an orange suit, head and shoulders in view,
hips just below the bottom edge, a helmet at the lower right and a shuttle model at the upper right).

DWPose's real ONNX weights (`yolox_l.onnx`, `dw-ll_ucoco_384.onnx`) are NOT available here (no
network, no PyPI package ships them). Its pure pre/post-processing is tested on synthetic arrays, and
the whole backend on tiny stand-in ONNX graphs with the real models' input/output names and shapes
that emit known raw outputs (a fixed detection; SimCC maps peaking at known bins), so the plumbing
(letterbox, grid decoding, NMS, box -> crop, SimCC -> image pixels, COCO-WholeBody -> OpenPose) is
exercised end to end. That they produce correct poses on real images with the real weights is not
tested here.
"""
from __future__ import annotations

import numpy as np
import pytest

from aa_trt.errors import InputError
from aa_trt.pose import BODY, Pose

# --------------------------------------------------------------------------------------------------
# BlazePose on a real photo
# --------------------------------------------------------------------------------------------------
FOUND = 0.5  # confidence at which a point counts as found


@pytest.fixture(scope="module")
def astronaut():
    skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
    return skdata.astronaut()


@pytest.fixture(scope="module")
def blaze():
    pytest.importorskip("ai_edge_litert", reason="the offline extractor needs ai-edge-litert")
    from aa_trt.pose.blazepose import BlazePoseExtractor
    return BlazePoseExtractor()


@pytest.fixture(scope="module")
def astronaut_pose(blaze, astronaut):
    return blaze(astronaut)


def test_blazepose_finds_the_astronaut(blaze, astronaut, astronaut_pose):
    p = astronaut_pose
    assert isinstance(p, Pose) and (p.width, p.height) == (512, 512)
    assert p.body.shape == (18, 3) and p.hands.shape == (2, 21, 3) and p.face.shape == (68, 3)
    assert p.score > 0.9
    b = p.body
    found = b[:, 2] >= FOUND
    head = [BODY[n] for n in ("nose", "r_eye", "l_eye", "r_ear", "l_ear")]
    shoulders = [BODY[n] for n in ("r_shoulder", "l_shoulder", "neck")]
    assert found[head].all() and found[shoulders].all()
    # head above shoulders above hips (hips lie just below the frame: their positions are still
    # predicted, at low confidence)
    assert b[head, 1].max() < b[shoulders, 1].min()
    hips = [BODY["r_hip"], BODY["l_hip"]]
    assert b[shoulders, 1].max() < b[hips, 1].min()
    # the person's right is OpenPose's r_: she faces the camera, so her right is on the image's left
    assert b[BODY["r_shoulder"], 0] < b[BODY["neck"], 0] < b[BODY["l_shoulder"], 0]
    assert b[BODY["r_eye"], 0] < b[BODY["l_eye"], 0]
    # shoulders about a head-and-a-half wide apart (measured: 193 px; eyes 44 px apart)
    assert 120 < b[BODY["l_shoulder"], 0] - b[BODY["r_shoulder"], 0] < 260
    # every found point is on the person: inside the image, left of the helmet and shuttle model
    # (x < 380), and inside the detector's own whole-body circle (an independent model output)
    pts = b[found, :2]
    assert (pts >= 0).all() and (pts[:, 0] < 380).all() and (pts[:, 1] < 512).all()
    det = blaze.detect(astronaut)[0]
    centre, radius = det.keypoints[0], np.linalg.norm(det.keypoints[1] - det.keypoints[0])
    assert (np.linalg.norm(pts - centre, axis=1) < radius * 1.1).all()
    # sparse hands: only wrist, thumb, index base and pinky base slots can be set; no face points
    assert (p.hands[:, [i for i in range(21) if i not in (0, 4, 5, 17)], 2] == 0).all()
    assert (p.face[:, 2] == 0).all()


def test_blazepose_still_video_is_stable(blaze, astronaut, astronaut_pose):
    poses = blaze.video([astronaut] * 4)
    assert all(p is not None for p in poses)
    for p in poses:
        found = astronaut_pose.body[:, 2] >= FOUND
        assert np.abs(p.body[found, :2] - astronaut_pose.body[found, :2]).max() <= 1.0
        assert np.abs(p.body[:, 2] - astronaut_pose.body[:, 2]).max() <= 0.05


def test_blazepose_rotated_person(blaze, astronaut):
    """The region follows the body's rotation: the astronaut turned 90 degrees (lying, head to the
    left) is found with her head left of her shoulders."""
    img = np.ascontiguousarray(np.rot90(astronaut))  # counter-clockwise: her head ends up on the left
    p = blaze(img)
    assert p is not None
    b = p.body
    assert b[BODY["nose"], 2] >= FOUND and b[BODY["neck"], 2] >= FOUND
    assert b[BODY["nose"], 0] < b[BODY["neck"], 0] - 50


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blazepose_blank_image_is_none(blaze, value):
    assert blaze(np.full((240, 320, 3), value, np.uint8)) is None
    assert blaze.video([np.full((64, 64, 3), value, np.uint8)] * 2) == [None, None]


def test_blazepose_rejects_bad_arrays(blaze):
    with pytest.raises(ValueError, match="uint8"):
        blaze(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        blaze(np.zeros((32, 32, 2), np.uint8))


def test_ssd_anchors_match_detector_layout():
    from aa_trt.pose.blazepose import ssd_anchors
    a = ssd_anchors()
    assert a.shape == (2254, 2)  # 28*28*2 + 14*14*2 + 7*7*6
    np.testing.assert_allclose(a[0], [0.5 / 28, 0.5 / 28])
    np.testing.assert_allclose(a[2], [1.5 / 28, 0.5 / 28])  # two anchors per cell, x fastest
    np.testing.assert_allclose(a[1568], [0.5 / 14, 0.5 / 14])
    np.testing.assert_allclose(a[-1], [6.5 / 7, 6.5 / 7])


def test_roi_rotation_convention():
    """A body lying with its head to the right (scale point right of the hip centre) gets a region
    rotated by +90 degrees, whose crop 'up' points to the image's right."""
    from aa_trt.pose.blazepose import roi_from_points
    r = roi_from_points((100.0, 100.0), (180.0, 100.0))
    assert r.size == pytest.approx(2 * 80 * 1.25) and r.angle == pytest.approx(np.pi / 2)
    m = r.crop_to_image(256)
    top_centre = m[:, :2] @ [128, 0] + m[:, 2]
    np.testing.assert_allclose(top_centre, [100 + r.size / 2, 100], atol=1e-9)
    upright = roi_from_points((50.0, 200.0), (50.0, 100.0))
    assert upright.angle == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# DWPose: pure functions on synthetic arrays
# --------------------------------------------------------------------------------------------------
def test_letterbox():
    from aa_trt.pose.dwpose import letterbox
    img = np.full((300, 400, 3), 7, np.uint8)
    out, r = letterbox(img)
    assert out.shape == (640, 640, 3) and out.dtype == np.float32 and r == pytest.approx(1.6)
    assert (out[:480, :640] == 7).all() and (out[480:] == 114).all()  # top-left, 114 below
    tall = np.full((800, 200, 3), 9, np.uint8)
    out, r = letterbox(tall)
    assert r == pytest.approx(0.8) and (out[:, :160] == 9).all() and (out[:, 160:] == 114).all()


def test_yolox_grid_decode():
    from aa_trt.pose.dwpose import yolox_decode
    raw = np.zeros((8400, 85))
    # stride 8: row = y * 80 + x; stride 16 starts at 6400; stride 32 at 8000
    raw[3 * 80 + 5] = [0.5, 0.25, np.log(2.0), 0.0, 0.9, 0.8] + [0.0] * 79
    raw[6400 + 15 * 40 + 20, :6] = [0.5, 0.5, np.log(10.0), np.log(20.0), 1.0, 0.5]
    raw[8000 + 19 * 20 + 19, :6] = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    boxes, scores = yolox_decode(raw)
    assert boxes.shape == (8400, 4) and scores.shape == (8400, 80)
    np.testing.assert_allclose(boxes[245], [44 - 8, 26 - 4, 44 + 8, 26 + 4])  # centre (5.5*8, 3.25*8)
    np.testing.assert_allclose(scores[245, 0], 0.72)
    np.testing.assert_allclose(boxes[7020], [328 - 80, 248 - 160, 328 + 80, 248 + 160])
    np.testing.assert_allclose(boxes[8399], [608 - 16, 608 - 16, 608 + 16, 608 + 16])


def test_nms_keeps_best_of_overlaps():
    from aa_trt.pose.dwpose import nms
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], float)
    scores = np.array([0.6, 0.9, 0.5, 0.3])
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]


def test_simcc_decode():
    from aa_trt.pose.dwpose import simcc_decode
    x = np.zeros((3, 576), np.float32)
    y = np.zeros((3, 768), np.float32)
    x[0, 101], y[0, 33] = 0.9, 0.7
    x[1, 575], y[1, 0] = 0.4, 0.8
    locs, vals = simcc_decode(x, y)  # point 2: all zero -> not found
    np.testing.assert_allclose(locs[:2], [[50.5, 16.5], [287.5, 0.0]])
    np.testing.assert_allclose(vals, [0.7, 0.4, 0.0], atol=1e-6)
    np.testing.assert_array_equal(locs[2], [-1, -1])


def test_box_to_crop_and_back():
    """The crop puts the padded box's centre at the crop's centre with the 3:4 aspect, and a bright
    dot in the image lands where the inverse map says."""
    from aa_trt.pose._imgops import apply_affine, invert_affine, warp_affine
    from aa_trt.pose.dwpose import box_to_centre_scale, crop_matrix
    centre, scale = box_to_centre_scale([155, 55, 255, 255])
    np.testing.assert_allclose(centre, [205, 155])
    np.testing.assert_allclose(scale, [187.5, 250])  # 1.25 x (100, 200), widened to 3:4
    wide_c, wide_s = box_to_centre_scale([0, 0, 400, 100])
    np.testing.assert_allclose(wide_s, [500, 500 / 0.75])
    m = crop_matrix(centre, scale)
    np.testing.assert_allclose(apply_affine(m, [[144, 192], [0, 0]]), [[205, 155], [205 - 93.75, 30]])
    img = np.zeros((300, 400, 3), np.uint8)
    img[120, 230] = 255
    crop = warp_affine(img, m, 288, 384, border="constant", antialias=False)
    expected = apply_affine(invert_affine(m), [230, 120])
    peak = np.unravel_index(np.argmax(crop[:, :, 0]), crop.shape[:2])
    assert abs(peak[1] - expected[0]) <= 1 and abs(peak[0] - expected[1]) <= 1


def test_wholebody_to_openpose_mapping():
    from aa_trt.pose.dwpose import wholebody_to_pose
    kps = np.stack([np.arange(133) * 2.0, np.arange(133) * 3.0], 1)
    scores = np.full(133, 0.8)
    scores[3] = 0.0   # COCO l_ear not found
    scores[5] = 0.6   # l_shoulder
    scores[100] = 1.7  # out-of-range confidence is clipped
    p = wholebody_to_pose(kps, scores, 640, 480, 0.95)
    coco_of = {"nose": 0, "l_eye": 1, "r_eye": 2, "r_ear": 4, "l_shoulder": 5, "r_shoulder": 6,
               "l_elbow": 7, "r_elbow": 8, "l_wrist": 9, "r_wrist": 10, "l_hip": 11, "r_hip": 12,
               "l_knee": 13, "r_knee": 14, "l_ankle": 15, "r_ankle": 16}
    for name, j in coco_of.items():
        np.testing.assert_allclose(p.body[BODY[name], :2], kps[j], err_msg=name)
    assert p.body[BODY["l_ear"], 2] == 0
    np.testing.assert_allclose(p.body[BODY["neck"]], [11.0, 16.5, 0.6])  # mid-shoulders, lower conf
    np.testing.assert_allclose(p.face[:, :2], kps[23:91])
    np.testing.assert_allclose(p.hands[0, :, :2], kps[91:112])
    np.testing.assert_allclose(p.hands[1, :, :2], kps[112:133])
    assert p.hands[0, 100 - 91, 2] == 1.0 and p.score == pytest.approx(0.95)
    assert (p.width, p.height) == (640, 480)


# --------------------------------------------------------------------------------------------------
# DWPose end to end on stand-in ONNX graphs (the real weights are not available here)
# --------------------------------------------------------------------------------------------------
def _const_plus_zero_input(name_in, in_shape, outputs, path):
    """An ONNX graph whose outputs are constants plus 0 x mean(input), so it runs on the real input."""
    from onnx import TensorProto, helper, numpy_helper, save
    nodes = [helper.make_node("ReduceMean", [name_in], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for oname, arr in outputs.items():
        arr = np.asarray(arr)
        inits.append(numpy_helper.from_array(arr, f"{oname}_c"))
        if arr.dtype == np.float32:
            nodes.append(helper.make_node("Add", [f"{oname}_c", "z"], [oname]))
            elem = TensorProto.FLOAT
        else:
            nodes.append(helper.make_node("Identity", [f"{oname}_c"], [oname]))
            elem = TensorProto.INT64
        outs.append(helper.make_tensor_value_info(oname, elem, list(arr.shape)))
    graph = helper.make_graph(nodes, "standin", [helper.make_tensor_value_info(name_in, TensorProto.FLOAT, in_shape)],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


# The stand-in detection: stride-16 cell (x 20, y 15), box 160 x 320 detector pixels centred at
# (328, 248) = image box (155, 55, 255, 255) after the 1.6 letterbox of a 400x300 image.
_SIMCC_BINS = [(100 + 3 * k, 50 + 5 * k) for k in range(133)]


def _write_standins(d, mmdeploy=False):
    d.mkdir(exist_ok=True)
    if mmdeploy:
        dets = np.array([[[248, 88, 408, 408, 0.9], [0, 0, 600, 600, 0.99], [250, 90, 400, 400, 0.2]]], np.float32)
        labels = np.array([[0, 5, 0]], np.int64)  # the best box is not a person
        _const_plus_zero_input("input", [1, 3, 640, 640], {"dets": dets, "labels": labels}, d / "yolox_l.onnx")
    else:
        raw = np.zeros((1, 8400, 85), np.float32)
        raw[0, 6400 + 15 * 40 + 20, :6] = [0.5, 0.5, np.log(10.0), np.log(20.0), 0.95, 0.9]  # person 0.855
        raw[0, 6400 + 15 * 40 + 21, :6] = [0.0, 0.5, np.log(10.0), np.log(20.0), 0.9, 0.8]   # overlapping, 0.72
        raw[0, 100, :4] = [0.5, 0.5, np.log(4.0), np.log(4.0)]
        raw[0, 100, 4], raw[0, 100, 5 + 2] = 0.99, 0.99  # a confident car: not a person
        _const_plus_zero_input("images", [1, 3, 640, 640], {"output": raw}, d / "yolox_l.onnx")
    sx = np.zeros((1, 133, 576), np.float32)
    sy = np.zeros((1, 133, 768), np.float32)
    for k, (bx, by) in enumerate(_SIMCC_BINS):
        sx[0, k, bx], sy[0, k, by] = 0.9, 0.8
    sx[0, 3] = 0.0  # COCO l_ear: no peak -> not found
    _const_plus_zero_input("input", [1, 3, 384, 288], {"simcc_x": sx, "simcc_y": sy}, d / "dw-ll_ucoco_384.onnx")
    return d


def _expected_keypoints():
    # crop: centre (205, 155), 187.5 x 250 image pixels -> 288 x 384, so 0.651 image px per crop px
    s = 187.5 / 288
    return np.array([[205 + s * (bx / 2 - 144), 155 + s * (by / 2 - 192)] for bx, by in _SIMCC_BINS])


@pytest.mark.parametrize("mmdeploy", [False, True], ids=["yolox-raw-head", "mmdeploy-dets"])
def test_dwpose_backend_on_standin_graphs(tmp_path, mmdeploy):
    """Stand-in graphs (real input/output names and shapes, known raw outputs; NOT the real weights,
    which are not available here) run through onnxruntime; the poses come out where the decoding
    math puts them."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from aa_trt.pose.dwpose import DWPoseExtractor
    ex = DWPoseExtractor(_write_standins(tmp_path / "dw", mmdeploy))
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    dets = ex.detect(img)
    assert len(dets) == 1  # the overlap is suppressed, the non-person dropped
    np.testing.assert_allclose(dets[0][1], [155, 55, 255, 255], atol=1e-4)
    p = ex(img)
    assert p is not None and (p.width, p.height) == (400, 300)
    assert p.score == pytest.approx(0.9 if mmdeploy else 0.855, abs=1e-5)
    exp = _expected_keypoints()
    np.testing.assert_allclose(p.body[BODY["nose"], :2], exp[0], atol=1e-3)
    np.testing.assert_allclose(p.body[BODY["r_wrist"], :2], exp[10], atol=1e-3)
    np.testing.assert_allclose(p.body[BODY["l_hip"], :2], exp[11], atol=1e-3)
    np.testing.assert_allclose(p.body[BODY["neck"], :2], (exp[5] + exp[6]) / 2, atol=1e-3)
    assert p.body[BODY["l_ear"], 2] == 0 and p.body[BODY["nose"], 2] == pytest.approx(0.8)
    np.testing.assert_allclose(p.face[:, :2], exp[23:91], atol=1e-3)
    np.testing.assert_allclose(p.hands[0, :, :2], exp[91:112], atol=1e-3)
    np.testing.assert_allclose(p.hands[1, :, :2], exp[112:133], atol=1e-3)
    video = ex.video([img, img])
    assert all(np.array_equal(v.to_array(), p.to_array()) for v in video)


def test_dwpose_no_person_is_none(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from aa_trt.pose.dwpose import DWPoseExtractor
    d = tmp_path / "dw"
    _write_standins(d)
    _const_plus_zero_input("images", [1, 3, 640, 640], {"output": np.zeros((1, 8400, 85), np.float32)},
                           d / "yolox_l.onnx")
    assert DWPoseExtractor(d)(np.zeros((64, 64, 3), np.uint8)) is None


def test_dwpose_missing_or_bad_files(tmp_path):
    from aa_trt.pose.dwpose import DWPoseExtractor
    with pytest.raises(InputError, match="yolox_l.onnx"):
        DWPoseExtractor(tmp_path)
    (tmp_path / "yolox_l.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="dw-ll_ucoco_384.onnx"):
        DWPoseExtractor(tmp_path)
    pytest.importorskip("onnxruntime")
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes(b"not onnx either")
    with pytest.raises(InputError, match="yolox_l.onnx.*not a loadable ONNX model"):
        DWPoseExtractor(tmp_path)
