"""The DWPose runner decodes exactly: crafted ONNX models whose outputs encode known boxes
and SimCC peaks must come back as those boxes and keypoints in image pixels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from preprocess.pose import dwpose
from preprocess.pose.onnx_models import (
    POSE_INPUT,
    build_crafted_models,
    build_tiny_models,
    detector_output_for_boxes,
    simcc_for_points,
)
from tests.helpers.poses import expected_provider

H, W = 480, 832  # landscape: the letterbox leaves padding at the bottom
BOXES = np.array([[100, 50, 300, 420], [500, 100, 700, 450], [505, 110, 705, 455], [20, 20, 60, 90]], np.float32)
SCORES = np.array([0.9, 0.8, 0.7, 0.2], np.float32)  # box 2 overlaps box 1 (NMS), box 3 is below 0.3


def reference_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS as the DWPose reference writes it (spec A.3): areas and overlaps count pixels
    inclusively (+1), float32 arithmetic, a box goes when its overlap is above ``iou``."""
    x1, y1, x2, y2 = boxes.astype(np.float32).T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i, rest = order[0], np.asarray(order[1:], np.int64)
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = [int(j) for j in rest[overlap <= np.float32(iou)]]
    return keep


def iou_without_plus_one(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
    return float(w * h / (area(a) + area(b) - w * h))


def crop_points() -> np.ndarray:
    """Known crop-pixel positions for the 133 keypoints; every 10th is 'not found'."""
    k = np.arange(133, dtype=np.float64)
    points = np.stack([10 + (k * 7) % 268, 12 + (k * 11) % 360], axis=1)
    points[::10] = np.nan
    return points


def expected_in_image(box: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Crop pixels -> image pixels, written from the spec's words (A.4), not from the runner."""
    in_h, in_w = POSE_INPUT
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = (box[2] - box[0]) * 1.25, (box[3] - box[1]) * 1.25
    if w > h * in_w / in_h:
        h = w * in_h / in_w
    else:
        w = h * in_w / in_h
    return np.stack([cx - w / 2 + points[:, 0] / in_w * w, cy - h / 2 + points[:, 1] / in_h * h], axis=1)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    return build_crafted_models(
        folder, detector_output_for_boxes(BOXES, SCORES, (H, W)), simcc_for_points(crop_points())
    )


def test_crafted_models_have_the_real_signatures(crafted):
    detector, pose = (ort.InferenceSession(str(p)) for p in crafted)
    assert [(i.name, i.shape, i.type) for i in detector.get_inputs()] == [("images", [1, 3, 640, 640], "tensor(float)")]
    assert [(o.name, o.shape) for o in detector.get_outputs()] == [("output", [1, 8400, 85])]
    (pose_in,) = pose.get_inputs()
    assert pose_in.name == "input" and pose_in.shape[1:] == [3, 384, 288] and pose_in.type == "tensor(float)"
    assert [(o.name, o.shape[1:]) for o in pose.get_outputs()] == [("simcc_x", [133, 576]), ("simcc_y", [133, 768])]


def test_boxes_and_keypoints_come_back_in_image_pixels(crafted):
    runner = dwpose.DWPose(*crafted)
    frames = np.random.default_rng(0).integers(0, 255, (3, H, W, 3), dtype=np.uint8)
    poses, truncated = runner.estimate(frames)
    assert truncated == 0 and len(poses) == 3
    for frame in poses:
        # NMS removes the overlapping box, the threshold the weak one; order is by score.
        np.testing.assert_allclose(frame.boxes, BOXES[:2], atol=1.0)
        np.testing.assert_allclose(frame.box_scores, SCORES[:2], atol=1e-5)
        found = ~np.isnan(crop_points()[:, 0])
        for p in range(2):
            expected = expected_in_image(BOXES[p], crop_points())
            np.testing.assert_allclose(frame.keypoints[p][found], expected[found], atol=1.0)
            assert (frame.keypoints[p][~found] == -1).all() and (frame.scores[p][~found] == 0).all()
            np.testing.assert_allclose(frame.scores[p][found], 0.9, atol=1e-6)
    assert runner.times.calls == {"detector": 3, "pose": 1}  # static-batch detector, one pose batch


def test_max_persons_keeps_the_largest(crafted):
    runner = dwpose.DWPose(*crafted)
    poses, truncated = runner.estimate(np.zeros((2, H, W, 3), np.uint8), max_persons=1)
    assert truncated == 2
    areas = (BOXES[:2, 2] - BOXES[:2, 0]) * (BOXES[:2, 3] - BOXES[:2, 1])
    np.testing.assert_allclose(poses[0].boxes, BOXES[[int(np.argmax(areas))]], atol=1.0)


def test_crop_transform_maps_the_box_onto_the_model_input():
    box = np.array([120.0, 40.0, 260.0, 400.0])
    centre, scale = dwpose.box_to_centre_scale(box, POSE_INPUT[1] / POSE_INPUT[0])
    matrix = dwpose.crop_transform(centre, scale, (POSE_INPUT[1], POSE_INPUT[0]))
    corners = np.array(
        [[centre[0] - scale[0] / 2, centre[1] - scale[1] / 2], [centre[0] + scale[0] / 2, centre[1] + scale[1] / 2]]
    )
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, [[0, 0], [POSE_INPUT[1], POSE_INPUT[0]]], atol=1e-3)
    # A marker painted in the image lands where the inverse mapping says, in the real crop.
    image = np.zeros((H, W, 3), np.uint8)
    image[200:204, 180:184] = 255
    crop = dwpose.cv2.warpAffine(image, matrix, (POSE_INPUT[1], POSE_INPUT[0]))
    ys, xs = np.nonzero(crop[..., 0] > 128)
    expected = (np.array([182.0, 202.0]) - (centre - scale / 2)) / scale * [POSE_INPUT[1], POSE_INPUT[0]]
    np.testing.assert_allclose([xs.mean(), ys.mean()], expected, atol=1.0)


def test_no_detection_gives_empty_arrays(tmp_path):
    detector, pose = build_crafted_models(
        tmp_path, detector_output_for_boxes(np.zeros((0, 4)), np.zeros(0), (H, W)), simcc_for_points(crop_points())
    )
    poses, _ = dwpose.DWPose(detector, pose).estimate(np.zeros((2, H, W, 3), np.uint8))
    assert [p.keypoints.shape for p in poses] == [(0, 133, 2)] * 2 and [p.boxes.shape for p in poses] == [(0, 4)] * 2


def test_tiny_models_run_batched(tmp_path):
    runner = dwpose.DWPose(*build_tiny_models(tmp_path), batch_size=4)
    assert runner.pose_batched and not runner.det_batched and runner.provider == expected_provider()
    poses, _ = runner.estimate(np.random.default_rng(1).integers(0, 255, (2, 192, 256, 3), dtype=np.uint8))
    assert len(poses) == 2 and all(p.keypoints.dtype == np.float32 for p in poses)


def test_nms_counts_pixels_inclusively():
    # Boxes 100 px wide, 38.1 px apart: IoU 0.448 with exclusive areas (plain NMS keeps both),
    # 0.452 with the reference's +1 areas (the weaker box goes at 0.45).
    boxes = np.array([[100, 100, 200, 200], [138.1, 100, 238.1, 200]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert iou_without_plus_one(*boxes) < 0.45 and reference_nms(boxes, scores, 0.45) == [0]
    raw = detector_output_for_boxes(boxes, scores, (H, W))[0]
    ratio = min(640 / H, 640 / W)
    kept, kept_scores = dwpose.decode_detections(raw, ratio, 0.1, 0.45, 0.3)
    np.testing.assert_allclose(kept, boxes[:1], atol=1e-3)
    np.testing.assert_allclose(kept_scores, scores[:1], atol=1e-6)


def test_nms_matches_the_reference_on_crowds():
    rng = np.random.default_rng(0)
    compared = suppressed = 0
    for _ in range(40):
        # Clusters of jittered boxes, one box per stride-8 cell (the crafted encoding's limit).
        cells = rng.choice(80 * 60, size=12, replace=False)
        centres = np.stack([cells % 80, cells // 80], axis=1) * 8.0 + 4.0
        centres = centres[:1] + (centres - centres[:1]) * 0.15 if rng.random() < 0.5 else centres
        cells = np.unique((centres // 8).astype(int) @ [1, 80], return_index=True)[1]
        centres = centres[cells]
        sizes = rng.uniform(40, 120, (len(centres), 2))
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
        scores = rng.uniform(0.35, 0.99, len(boxes)).astype(np.float32)
        raw = detector_output_for_boxes(boxes, scores, (640, 640))[0]
        decoded, decoded_scores = dwpose.decode_detections(raw, 1.0, 0.1, 1.0, 0.3)  # IoU 1: nothing suppressed
        kept, _ = dwpose.decode_detections(raw, 1.0, 0.1, 0.45, 0.3)
        expected = decoded[reference_nms(decoded, decoded_scores, 0.45)]
        np.testing.assert_array_equal(kept, expected)
        compared += len(decoded)
        suppressed += len(decoded) - len(kept)
    assert compared > 300 and suppressed > 30, (compared, suppressed)


def test_score_thresholds_in_the_references_precision():
    # The reference keeps person scores > 0.1 in float32 (its class scores), NMS, then > 0.3
    # in float64 (after concatenating them with its float64 class column): a score of exactly
    # float32(0.3), 0.30000001 as a double, is kept; the next float32 below it is not.
    at = np.float32(0.3)
    below = np.nextafter(at, np.float32(0))
    boxes = np.array([[100, 100, 200, 300], [500, 100, 600, 300]], np.float32)
    scores = np.array([at, below], np.float32)
    dets = np.concatenate([boxes, scores[:, None], np.zeros((2, 1))], axis=1)  # the reference's layout
    expected = dets[:, 4] > 0.3
    assert expected.tolist() == [True, False] and not (scores > np.float32(0.3)).any()
    raw = detector_output_for_boxes(boxes, scores, (H, W))[0]
    kept, kept_scores = dwpose.decode_detections(raw, min(640 / H, 640 / W), 0.1, 0.45, 0.3)
    np.testing.assert_allclose(kept, boxes[expected], atol=1e-3)
    assert kept_scores.tolist() == scores[expected].tolist()
