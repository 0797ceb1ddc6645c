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

H, W = 480, 832  # landscape: the letterbox leaves padding at the bottom
BOXES = np.array([[100, 50, 300, 420], [500, 100, 700, 450], [505, 110, 705, 455], [20, 20, 60, 90]], np.float32)
SCORES = np.array([0.9, 0.8, 0.7, 0.2], np.float32)  # box 2 overlaps box 1 (NMS), box 3 is below 0.3


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
    return build_crafted_models(folder, detector_output_for_boxes(BOXES, SCORES, (H, W)), simcc_for_points(crop_points()))


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
    corners = np.array([[centre[0] - scale[0] / 2, centre[1] - scale[1] / 2], [centre[0] + scale[0] / 2, centre[1] + scale[1] / 2]])
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
    detector, pose = build_crafted_models(tmp_path, detector_output_for_boxes(np.zeros((0, 4)), np.zeros(0), (H, W)), simcc_for_points(crop_points()))
    poses, _ = dwpose.DWPose(detector, pose).estimate(np.zeros((2, H, W, 3), np.uint8))
    assert [p.keypoints.shape for p in poses] == [(0, 133, 2)] * 2 and [p.boxes.shape for p in poses] == [(0, 4)] * 2


def test_tiny_models_run_batched(tmp_path):
    runner = dwpose.DWPose(*build_tiny_models(tmp_path), batch_size=4)
    assert runner.pose_batched and not runner.det_batched and runner.provider == "CPUExecutionProvider"
    poses, _ = runner.estimate(np.random.default_rng(1).integers(0, 255, (2, 192, 256, 3), dtype=np.uint8))
    assert len(poses) == 2 and all(p.keypoints.dtype == np.float32 for p in poses)
