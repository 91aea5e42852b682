"""Skeleton alignment and rendering."""
import numpy as np
import pytest

from aa_trt.pose import BODY, LIMBS, Pose
from aa_trt.pose.align import PoseAligner, align_sequence
from aa_trt.pose.draw import COLORS, render


def skeleton(scale=1.0, origin=(100.0, 60.0), size=(400, 600), jitter=0.0, seed=0) -> Pose:
    """A standing figure: neck at origin, bones of scale x their base length."""
    rng = np.random.default_rng(seed)
    offsets = {  # child relative to parent, unit scale
        (1, 2): (-20, 0), (2, 3): (-5, 30), (3, 4): (-3, 28), (1, 5): (20, 0), (5, 6): (5, 30),
        (6, 7): (3, 28), (1, 8): (-12, 60), (8, 9): (0, 45), (9, 10): (0, 45), (1, 11): (12, 60),
        (11, 12): (0, 45), (12, 13): (0, 45), (1, 0): (0, -25), (0, 14): (-5, -5), (14, 16): (-6, 2),
        (0, 15): (5, -5), (15, 17): (6, 2)}
    p = Pose(*size, score=1.0)
    p.body[1] = (*origin, 1.0)
    for a, b in LIMBS:
        d = np.array(offsets[(a, b)], float) * scale + rng.normal(0, jitter, 2)
        p.body[b] = (*(p.body[a, :2] + d), 1.0)
    p.hands[:, :, :2] = p.body[[7, 4], None, :2] + rng.normal(0, 5 * scale, (2, 21, 2))
    p.hands[:, :, 2] = 1.0
    return p


def bone_lengths(p: Pose):
    return np.array([np.hypot(*(p.body[b, :2] - p.body[a, :2])) for a, b in LIMBS])


def test_twice_as_large_driving_takes_reference_bones_and_position():
    ref = skeleton(1.0, origin=(150, 80), jitter=2.0, seed=1)
    drv = [skeleton(2.0, origin=(300 + 10 * i, 200), jitter=0.0, seed=2) for i in range(3)]
    out = align_sequence(ref, drv)
    for p in out:
        np.testing.assert_allclose(bone_lengths(p), bone_lengths(ref), rtol=1e-4)
    np.testing.assert_allclose(out[0].body[BODY["neck"], :2], ref.body[BODY["neck"], :2], atol=1e-4)
    # the driving neck moved 10 px per frame at twice the size: 5 px per frame at the reference's
    ratio = PoseAligner(ref, drv[0]).ratio
    assert ratio == pytest.approx(0.5, rel=0.05)
    np.testing.assert_allclose(out[2].body[1, :2] - out[0].body[1, :2], [20 * ratio, 0], atol=1e-3)
    assert (out[0].width, out[0].height) == (ref.width, ref.height)
    # directions are the driving ones
    for a, b in LIMBS:
        u = drv[0].body[b, :2] - drv[0].body[a, :2]
        v = out[0].body[b, :2] - out[0].body[a, :2]
        assert np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_missing_points_stay_missing_and_frames_without_person():
    ref, drv = skeleton(1.0), skeleton(1.5)
    drv.body[BODY["l_knee"], 2] = 0.0  # not found: its child (ankle) cannot be placed either
    out = align_sequence(ref, [drv, None])
    assert out[0].body[BODY["l_knee"], 2] == 0 and out[0].body[BODY["l_ankle"], 2] == 0
    assert out[0].body[BODY["r_ankle"], 2] > 0
    assert out[1] is None
    with pytest.raises(ValueError, match="no driving frame"):
        align_sequence(ref, [None, None])


def test_hands_follow_the_wrist_scaled_by_the_forearm():
    ref, drv = skeleton(1.0), skeleton(2.0)
    out = align_sequence(ref, [drv])[0]
    spread_ref = np.ptp(drv.hands[0, :, :2], axis=0) * 0.5
    np.testing.assert_allclose(np.ptp(out.hands[0, :, :2], axis=0), spread_ref, rtol=1e-3)
    np.testing.assert_allclose(out.hands[0, 0, :2] - out.body[7, :2],
                               (drv.hands[0, 0, :2] - drv.body[7, :2]) * 0.5, atol=1e-3)


def test_render_draws_limbs_in_openpose_colours():
    p = skeleton(1.0, origin=(100, 60), size=(200, 300))
    img = render(p, 200, 300)
    assert img.shape == (300, 200, 3) and img.dtype == np.uint8
    # joint discs keep their full colour (drawn after the x0.6 dimming); e.g. the neck's
    x, y = p.body[1, :2].astype(int)
    assert tuple(img[y, x]) == pytest.approx(COLORS[1], abs=40)
    assert img.sum() > 0 and render(None, 64, 32).sum() == 0
    # drawn at short side 512 then resized: the same pose at half the size is the same picture, smaller
    small = render(p, 100, 150)
    assert small.shape == (150, 100, 3) and small.sum() > 0
