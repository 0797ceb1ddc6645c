"""WholeBody -> OpenPose conversion and pose-image rendering (spec A.5-A.9).

Expectations are written out by hand from the spec (coordinates, colours, index tables),
not recomputed with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.pose.convert import (
    BODY_COLORS,
    BODY_LIMBS,
    BODY_LIMBS_DRAWN,
    FOOT_COLORS,
    FOOT_LIMBS,
    HAND_EDGES,
    OPENPOSE_BODY_NAMES,
    OpenPoseFrame,
    wholebody_to_openpose,
)
from preprocess.pose.render import draw_pose, draw_pose_indices, draw_pose_sequence, pose_palette
from tests.helpers.poses import (
    CRAFTED_CANVAS,
    LEFT_HAND_BASE,
    RIGHT_HAND_BASE,
    crafted_person,
    hand_points,
    reference_draw_pose,
)

# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------

W, H = 400, 200

# OpenPose slot -> WholeBody index, written from the joint names (A.5); None = neck.
OPENPOSE_SLOT_TO_WB = {
    0: 0,  # nose
    1: None,  # neck
    2: 6,  # r_shoulder
    3: 8,  # r_elbow
    4: 10,  # r_wrist
    5: 5,  # l_shoulder
    6: 7,  # l_elbow
    7: 9,  # l_wrist
    8: 12,  # r_hip
    9: 14,  # r_knee
    10: 16,  # r_ankle
    11: 11,  # l_hip
    12: 13,  # l_knee
    13: 15,  # l_ankle
    14: 2,  # r_eye
    15: 1,  # l_eye
    16: 4,  # r_ear
    17: 3,  # l_ear
}


def ramp_person() -> tuple[np.ndarray, np.ndarray]:
    """WholeBody point i at pixel (2i+1, i+3), score 0.9."""
    i = np.arange(133, dtype=np.float64)
    kp = np.stack([2 * i + 1, i + 3], axis=-1)
    return kp, np.full(133, 0.9)


def convert_one(kp: np.ndarray, sc: np.ndarray, threshold: float = 0.3) -> OpenPoseFrame:
    return wholebody_to_openpose(kp[None], sc[None], W, H, threshold)


def test_constants() -> None:
    assert len(OPENPOSE_BODY_NAMES) == 18
    assert OPENPOSE_BODY_NAMES[1] == "neck" and OPENPOSE_BODY_NAMES[2] == "r_shoulder"
    assert len(BODY_LIMBS) == 19 and BODY_LIMBS_DRAWN == 17
    assert BODY_LIMBS[0] == (2, 3) and BODY_LIMBS[16] == (16, 18) and BODY_LIMBS[18] == (6, 18)
    # 1-based, like BODY_LIMBS: ankles (L 14, R 11) to the foot points (19, 20).
    assert FOOT_LIMBS == ((14, 19), (11, 20))
    assert len(HAND_EDGES) == 20 and HAND_EDGES[4] == (0, 5) and HAND_EDGES[19] == (19, 20)
    assert len(BODY_COLORS) == 18 and BODY_COLORS[0] == (255, 0, 0) and BODY_COLORS[17] == (255, 0, 85)
    assert FOOT_COLORS == ((170, 255, 255), (255, 255, 0))


def test_reindex_and_normalisation() -> None:
    kp, sc = ramp_person()
    f = convert_one(kp, sc)
    assert f.num_persons == 1
    for slot, wb in OPENPOSE_SLOT_TO_WB.items():
        if wb is None:
            continue
        np.testing.assert_allclose(f.body[0, slot], [(2 * wb + 1) / W, (wb + 3) / H])
        assert f.body_scores[0, slot] == pytest.approx(0.9)
    # Spot checks with literal numbers: R-shoulder = WB 6 = (13, 9) px; L-ear = WB 3 = (7, 6) px.
    np.testing.assert_allclose(f.body[0, 2], [13 / 400, 9 / 200])
    np.testing.assert_allclose(f.body[0, 17], [7 / 400, 6 / 200])
    # Neck = mean of WB 5 (11, 8) and WB 6 (13, 9) = (12, 8.5) px; both shoulders > 0.3 -> 1.
    np.testing.assert_allclose(f.body[0, 1], [0.03, 0.0425])
    assert f.body_scores[0, 1] == 1.0


@pytest.mark.parametrize(
    ("s5", "s6", "neck_score"),
    [(0.9, 0.9, 1.0), (0.31, 0.9, 1.0), (0.3, 0.9, 0.0), (0.9, 0.1, 0.0), (0.1, 0.1, 0.0)],
)
def test_neck_score_rule(s5: float, s6: float, neck_score: float) -> None:
    kp, sc = ramp_person()
    sc[5], sc[6] = s5, s6
    f = convert_one(kp, sc)
    assert f.body_scores[0, 1] == neck_score
    if neck_score == 1.0:
        np.testing.assert_allclose(f.body[0, 1], [0.03, 0.0425])
    else:
        np.testing.assert_array_equal(f.body[0, 1], [-1.0, -1.0])


def test_low_scores_become_minus_one() -> None:
    kp, sc = ramp_person()
    sc[9] = 0.1  # L-wrist -> slot 7
    sc[14] = 0.3  # R-knee -> slot 9: exactly the threshold is NOT < 0.3, coordinates kept
    sc[91 + 4] = 0.29  # left-hand point 4
    sc[23 + 10] = 0.0  # face point 10
    f = convert_one(kp, sc)
    np.testing.assert_array_equal(f.body[0, 7], [-1.0, -1.0])
    assert f.body_scores[0, 7] == pytest.approx(0.1)
    np.testing.assert_allclose(f.body[0, 9], [29 / 400, 17 / 200])
    np.testing.assert_array_equal(f.left_hands[0, 4], [-1.0, -1.0])
    np.testing.assert_array_equal(f.faces[0, 10], [-1.0, -1.0])
    # A custom threshold is applied and stored for the renderer.
    f5 = convert_one(kp, np.full(133, 0.4), threshold=0.5)
    assert f5.threshold == 0.5
    assert np.all(f5.body == -1.0) and np.all(f5.left_hands == -1.0)


def test_float32_scores_meet_the_threshold_as_doubles() -> None:
    # DWPose's keypoint scores are float32, but the reference compares them after concatenating
    # them with its float64 keypoints: float32(0.3) = 0.30000001 is then > 0.3 (visible, a
    # neck), while float32 arithmetic would call it equal (not visible). Scores reach us as
    # float32 from the poses npz, so the test feeds them as such.
    kp, sc = ramp_person()
    sc32 = sc.astype(np.float32)
    sc32[[0, 5, 6, 17, 18]] = np.float32(0.3)  # nose, both shoulders, both left toes
    sc32[1] = np.nextafter(np.float32(0.3), np.float32(0))  # L-eye: just below, in both precisions
    info = np.concatenate([kp[None].astype(np.float64), sc32[None, :, None]], axis=-1)  # the reference's array
    visible = info[0, :, 2] > 0.3
    assert visible[[0, 5, 6, 17, 18]].all() and not visible[1] and not (sc32[[0, 5, 6]] > np.float32(0.3)).any()
    f = convert_one(kp, sc32)
    present = f.body_scores[0] > f.threshold  # the renderer's body rule
    assert present[0] and f.body_scores[0, 1] == 1.0  # the nose is drawn; both shoulders make a neck
    assert not present[15] and np.array_equal(f.body[0, 15], [-1.0, -1.0])  # the L-eye is not
    assert f.feet_scores[0, 0] > f.threshold  # both left toes count: a left foot point
    img = draw_pose(f, H, W, "unianimate")
    assert px(img, 1, 3) == (0, 0, 255)  # the nose dot (WB 0 at (1, 3) px), blue in this style


def test_hand_and_face_slices() -> None:
    kp, sc = ramp_person()
    f = convert_one(kp, sc)
    assert f.left_hands.shape == (1, 21, 2) and f.right_hands.shape == (1, 21, 2)
    assert f.faces.shape == (1, 68, 2)
    # Left hand point 0 = WB 91 = (183, 94) px; right hand point 20 = WB 132 = (265, 135) px;
    # face point 0 = WB 23 = (47, 26) px; face point 67 = WB 90 = (181, 93) px.
    np.testing.assert_allclose(f.left_hands[0, 0], [183 / 400, 94 / 200])
    np.testing.assert_allclose(f.left_hands[0, 20], [(2 * 111 + 1) / 400, 114 / 200])
    np.testing.assert_allclose(f.right_hands[0, 0], [(2 * 112 + 1) / 400, 115 / 200])
    np.testing.assert_allclose(f.right_hands[0, 20], [265 / 400, 135 / 200])
    np.testing.assert_allclose(f.faces[0, 0], [47 / 400, 26 / 200])
    np.testing.assert_allclose(f.faces[0, 67], [181 / 400, 93 / 200])


def test_feet_rule() -> None:
    kp, sc = ramp_person()
    # Left toes WB 17 (35, 20) and 18 (37, 21) -> (36, 20.5) px, both > 0.3 -> present.
    sc[17], sc[18] = 0.8, 0.6
    # Right toes WB 20, 21: one exactly at 0.3 -> absent (both must be > 0.3).
    sc[20], sc[21] = 0.9, 0.3
    sc[19] = sc[22] = 0.0  # heels are unused
    f = convert_one(kp, sc)
    np.testing.assert_allclose(f.feet[0, 0], [36 / 400, 20.5 / 200])
    assert f.feet_scores[0, 0] > 0.3
    np.testing.assert_array_equal(f.feet[0, 1], [-1.0, -1.0])
    assert f.feet_scores[0, 1] <= 0.3
    assert f.body_and_feet.shape == (1, 20, 2)


def test_persons_keep_order_and_zero_persons() -> None:
    kp, sc = ramp_person()
    kp2 = kp + [100.0, 50.0]
    f = wholebody_to_openpose(np.stack([kp, kp2]), np.stack([sc, sc]), W, H)
    assert f.num_persons == 2
    np.testing.assert_allclose(f.body[1, 0], [101 / 400, 53 / 200])
    np.testing.assert_allclose(f.body[0, 0], [1 / 400, 3 / 200])

    f0 = wholebody_to_openpose(np.zeros((0, 133, 2)), np.zeros((0, 133)), W, H)
    assert f0.num_persons == 0
    assert f0.body.shape == (0, 18, 2) and f0.body_scores.shape == (0, 18)
    assert f0.feet.shape == (0, 2, 2) and f0.faces.shape == (0, 68, 2)
    assert f0.left_hands.shape == (0, 21, 2) and f0.right_hand_scores.shape == (0, 21)


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError):
        wholebody_to_openpose(np.zeros((1, 17, 2)), np.zeros((1, 17)), W, H)
    with pytest.raises(ValueError):
        wholebody_to_openpose(np.zeros((1, 133, 2)), np.zeros((2, 133)), W, H)


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

S = CRAFTED_CANVAS  # the crafted person's square canvas (tests/helpers/poses.py): x/512*512 is exact


def render(kp: np.ndarray, sc: np.ndarray, style: str, h: int = S, w: int = S) -> np.ndarray:
    frame = wholebody_to_openpose(kp.reshape(-1, 133, 2), sc.reshape(-1, 133), w, h)
    img = draw_pose(frame, h, w, style)  # type: ignore[arg-type]
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    return img


def px(img: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in img[y, x])


def dim(c: int) -> int:
    # canvas * 0.6 then uint8 cast truncates; the listed values are multiples of 85, so
    # c * 0.6 is an exact integer (255 -> 153, 170 -> 102, 85 -> 51) either way.
    return int(c * 0.6)


@pytest.fixture(scope="module")
def person() -> tuple[np.ndarray, np.ndarray]:
    return crafted_person()


def test_dim_values() -> None:
    assert (dim(255), dim(170), dim(85), dim(0)) == (153, 102, 51, 0)


def test_limb_midpoint_is_dimmed_colour(person: tuple[np.ndarray, np.ndarray]) -> None:
    # Limb 2 = R-shoulder (176,130) -> R-elbow (112,200), colour 2 = (255,170,0); midpoint (144,165).
    dw = render(*person, "dwpose")
    ua = render(*person, "unianimate")
    assert px(dw, 144, 165) == (153, 102, 0)
    assert px(ua, 144, 165) == (0, 102, 153)  # R and B swapped
    # Limb 0 = neck (256,130) -> R-shoulder (176,130), colour (255,0,0): midpoint (216,130);
    # stick half-width 4 -> 3 px off the axis is inside, 6 px is outside.
    assert px(dw, 216, 130) == (153, 0, 0) and px(dw, 216, 133) == (153, 0, 0)
    assert px(dw, 216, 136) == (0, 0, 0)
    assert px(ua, 216, 130) == (0, 0, 153)  # the neck->R-shoulder limb is BLUE in UniAnimate


def test_keypoint_centres_full_colour(person: tuple[np.ndarray, np.ndarray]) -> None:
    dw = render(*person, "dwpose")
    ua = render(*person, "unianimate")
    # Nose: listed (255, 0, 0).
    assert px(dw, 256, 60) == (255, 0, 0)
    assert px(ua, 256, 60) == (0, 0, 255)  # BLUE in the UniAnimate convention
    # R-elbow (slot 3), listed (255, 255, 0); L-wrist (slot 7), listed (0, 255, 85).
    assert px(dw, 112, 200) == (255, 255, 0) and px(ua, 112, 200) == (0, 255, 255)
    assert px(dw, 440, 280) == (0, 255, 85) and px(ua, 440, 280) == (85, 255, 0)
    # Circle radius 4: 4 px from the centre inside, 6 px outside (nothing else there).
    assert px(dw, 112 - 4, 200) == (255, 255, 0) and px(dw, 112 - 6, 196) == (0, 0, 0)


def test_foot_points_only_in_unianimate(person: tuple[np.ndarray, np.ndarray]) -> None:
    dw = render(*person, "dwpose")
    ua = render(*person, "unianimate")
    # Left foot limb (L-ankle (330,460) -> foot (365,495)), colour 17 = (255,0,85):
    # midpoint (347.5, 477.5) -> (347, 477).
    assert px(ua, 347, 477) == (51, 0, 153)
    assert px(dw, 347, 477) == (0, 0, 0)
    # Right foot limb (R-ankle (182,460) -> foot (147,495)), colour 18 = (170,255,255):
    # midpoint (164.5, 477.5) -> (164, 477).
    assert px(ua, 164, 477) == (153, 153, 102)
    assert px(dw, 164, 477) == (0, 0, 0)
    # Foot points: left colour 18 (170,255,255), right colour 19 (255,255,0), swapped.
    assert px(ua, 365, 495) == (255, 255, 170)
    assert px(ua, 147, 495) == (0, 255, 255)
    assert px(dw, 365, 495) == (0, 0, 0) and px(dw, 147, 495) == (0, 0, 0)
    # Heels are never drawn.
    assert px(ua, 320, 500) == (0, 0, 0) and px(ua, 192, 500) == (0, 0, 0)


def test_foot_absent_when_a_toe_is_weak(person: tuple[np.ndarray, np.ndarray]) -> None:
    kp, sc = person
    sc = sc.copy()
    sc[18] = 0.2  # left small toe
    ua = render(kp, sc, "unianimate")
    assert px(ua, 347, 477) == (0, 0, 0) and px(ua, 365, 495) == (0, 0, 0)
    assert px(ua, 147, 495) == (0, 255, 255)  # the right foot is unaffected


def test_hands(person: tuple[np.ndarray, np.ndarray]) -> None:
    dw = render(*person, "dwpose")
    ua = render(*person, "unianimate")
    # Edge 5 = (5, 6): finger 1 joints 1 -> 2, from (bx-12, by+12) to (bx-12, by+24).
    # HSV(5/20, 1, 1) * 255 = (127.5, 255, 0); OpenCV rounds 127.5 to 128 (ties to even).
    for bx, by in (LEFT_HAND_BASE, RIGHT_HAND_BASE):
        assert px(dw, bx - 12, by + 18) == (128, 255, 0)
        assert px(ua, bx - 12, by + 18) == (0, 255, 128)
    # Edge 10 = (10, 11): finger 2 joints 2 -> 3 along x = bx, HSV(0.5,1,1) = (0,255,255).
    bx, by = LEFT_HAND_BASE
    assert px(dw, bx, by + 30) == (0, 255, 255) and px(ua, bx, by + 30) == (255, 255, 0)
    # Hand dots: listed (0, 0, 255) -> BLUE in dwpose, RED in unianimate.
    assert px(dw, bx + 24, by + 48) == (0, 0, 255)
    assert px(ua, bx + 24, by + 48) == (255, 0, 0)


def test_hand_eps_rule_uses_int_pixels() -> None:
    # A.6 tests the int-truncated PIXEL coordinates against 0.01. A hand point at x = 0.6 px
    # truncates to 0 and fails: neither its dot nor its edge is drawn. Points at x = 3 px
    # (normalised 3/512 < 0.01, so a test on normalised values would drop them) are drawn.
    kp, sc = crafted_person()
    kp[91:112] = hand_points(30, 300)
    kp[92:95] = [(3, 312), (3, 324), (3, 336)]  # left-hand points 1..3 (finger 0)
    kp[95] = (0.6, 400)  # left-hand point 4 (edge 3 = (3, 4) ends there)
    img = render(kp, sc, "dwpose")
    assert img[395:406, 0:6].max() == 0
    assert img[341:395, 0:8].max() == 0  # edge 3 would cross this band
    # Edge 2 = (2, 3): (3, 324) -> (3, 336), colour HSV(0.1, 1, 1) * 255 = (255, 153, 0).
    assert px(img, 3, 330) == (255, 153, 0)
    assert px(img, 3, 336) == (0, 0, 255)  # the dot of point 3


def test_low_score_point_draws_nothing(person: tuple[np.ndarray, np.ndarray]) -> None:
    kp, sc = person
    sc = sc.copy()
    sc[7] = 0.2  # L-elbow (400, 200)
    sc[14] = 0.3  # R-knee (192, 390): exactly the threshold -> kept as coordinates, not drawn
    for style in ("dwpose", "unianimate"):
        img = render(kp, sc, style)
        assert px(img, 400, 200) == (0, 0, 0)
        # L-shoulder (336,130) -> L-elbow midpoint (368,165) and L-elbow -> L-wrist (420,240).
        assert px(img, 368, 165) == (0, 0, 0) and px(img, 420, 240) == (0, 0, 0)
        # The L-wrist dot (colour 7) is still there.
        assert px(img, 440, 280) in {(0, 255, 85), (85, 255, 0)}
        # R-knee and both of its limbs are gone.
        assert px(img, 192, 390) == (0, 0, 0)
        assert px(img, 202, 345) == (0, 0, 0) and px(img, 187, 425) == (0, 0, 0)


def test_face_dots_only_in_dwpose(person: tuple[np.ndarray, np.ndarray]) -> None:
    dw = render(*person, "dwpose")
    ua = render(*person, "unianimate")
    assert px(dw, 20, 10) == (255, 255, 255) and px(dw, 76, 58) == (255, 255, 255)
    assert px(dw, 23, 10) == (255, 255, 255) and px(dw, 24, 14) == (0, 0, 0)  # radius 3
    assert ua[0:70, 0:100].max() == 0


def test_unianimate_is_channel_swapped_dwpose_without_face_and_feet(person: tuple[np.ndarray, np.ndarray]) -> None:
    kp, sc = person
    sc = sc.copy()
    sc[23:91] = 0.0  # no face
    sc[17:23] = 0.0  # no feet
    np.testing.assert_array_equal(render(kp, sc, "unianimate"), render(kp, sc, "dwpose")[..., ::-1])


def test_two_persons_both_drawn() -> None:
    a = crafted_person()
    b = crafted_person(dx=512)
    kp = np.stack([a[0], b[0]])
    sc = np.stack([a[1], b[1]])
    img = render(kp, sc, "unianimate", h=512, w=1024)
    for dx in (0, 512):
        assert px(img, 256 + dx, 60) == (0, 0, 255)
        assert px(img, 144 + dx, 165) == (0, 102, 153)
        assert px(img, 365 + dx, 495) == (255, 255, 170)


def test_zero_persons_black() -> None:
    f0 = OpenPoseFrame.empty()
    for style in ("unianimate", "dwpose"):
        img = draw_pose(f0, 48, 80, style)  # type: ignore[arg-type]
        assert img.shape == (48, 80, 3) and img.dtype == np.uint8 and img.max() == 0


def test_non_square_and_tiny() -> None:
    # W=700, H=300: the nose at (600.5, 250.5) px must land at column 600, row 250.
    kp, sc = crafted_person()
    kp = kp * [700 / 512, 300 / 512]
    kp[0] = (600.5, 250.5)
    img = render(kp, sc, "unianimate", h=300, w=700)
    assert px(img, 600, 250) == (0, 0, 255)
    for h, w in ((1, 1), (3, 5), (7, 2)):
        for style in ("unianimate", "dwpose"):
            tiny = render(kp * [w / 700, h / 300], sc, style, h=h, w=w)
            assert tiny.shape == (h, w, 3)


def test_sequence_and_bad_style(person: tuple[np.ndarray, np.ndarray]) -> None:
    f = wholebody_to_openpose(person[0][None], person[1][None], S, S)
    seq = draw_pose_sequence([f, OpenPoseFrame.empty(), f], S, S)
    assert seq.shape == (3, S, S, 3) and seq.dtype == np.uint8
    assert px(seq[0], 256, 60) == (0, 0, 255) and seq[1].max() == 0
    assert draw_pose_sequence([], 4, 6).shape == (0, 4, 6, 3)
    with pytest.raises(ValueError):
        draw_pose(f, S, S, "openpose")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# The palette-index renderer against the drawing rules applied literally
# ---------------------------------------------------------------------------------------


def test_pixel_identical_to_the_literal_rules() -> None:
    # Random persons (some points off the canvas, -1 placeholders, scores at the threshold),
    # random sizes and thresholds, both styles: every pixel equal.
    rng = np.random.default_rng(0)
    drawn = 0
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 260, size=2))
        persons = int(rng.integers(0, 4))
        kp = rng.uniform(-0.2, 1.2, (persons, 133, 2)) * [w, h]
        kp[rng.random((persons, 133)) < 0.1] = -1.0
        sc = rng.uniform(0.0, 1.0, (persons, 133))
        sc[rng.random((persons, 133)) < 0.1] = 0.3
        frame = wholebody_to_openpose(kp, sc, w, h, float(rng.choice([0.1, 0.3, 0.5])))
        for style in ("unianimate", "dwpose"):
            img = draw_pose(frame, h, w, style)  # type: ignore[arg-type]
            np.testing.assert_array_equal(img, reference_draw_pose(frame, h, w, style))
            canvas = draw_pose_indices(frame, np.zeros((h, w), np.uint8), style)  # type: ignore[arg-type]
            np.testing.assert_array_equal(pose_palette(style)[canvas], img)  # type: ignore[arg-type]
            drawn += bool(img.any())
    assert drawn > 150


def test_palette_and_index_canvas_contract() -> None:
    for style in ("unianimate", "dwpose"):
        palette = pose_palette(style)  # type: ignore[arg-type]
        assert palette.shape == (256, 3) and palette.dtype == np.uint8 and not palette.flags.writeable
        assert not palette[0].any()  # nothing drawn = black
    with pytest.raises(ValueError):
        pose_palette("openpose")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        draw_pose_indices(OpenPoseFrame.empty(), np.zeros((4, 4, 3), np.uint8))
