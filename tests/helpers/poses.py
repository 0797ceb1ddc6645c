"""Poses for tests: a crafted person with hand-placed joints, crafted DWPose models that always
find two standing persons, the pose-drawing rules applied literally (spec A.6), the resize and
tolerance of the release's pose images (tests/preprocess/test_pose_scale.py), driving files made from a
synthetic clip's ground truth, and the ONNX provider the runner should pick on this host."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from data_schemas.config import PoseConfig
from preprocess.pose.convert import (
    BODY_COLORS,
    BODY_LIMBS,
    BODY_LIMBS_DRAWN,
    FOOT_COLORS,
    FOOT_LIMBS,
    HAND_EDGES,
    OpenPoseFrame,
)
from preprocess.pose.render import hand_edge_color
from preprocess.synthetic import SyntheticSpec, render_clip, write_ground_truth_stage_files

# ---- a crafted person ---------------------------------------------------------------------

CRAFTED_CANVAS = 512  # square test canvas: x/512*512 is exact, so pixel positions are the literals below

# A spread-out person (pixel coordinates) so limbs are far apart.
BODY_WB = {
    0: (256, 60),  # nose
    1: (276, 50),
    2: (236, 50),
    3: (296, 60),
    4: (216, 60),  # eyes, ears
    5: (336, 130),
    6: (176, 130),  # shoulders -> neck (256, 130)
    7: (400, 200),
    8: (112, 200),  # elbows
    9: (440, 280),
    10: (72, 280),  # wrists
    11: (300, 300),
    12: (212, 300),  # hips
    13: (320, 390),
    14: (192, 390),  # knees
    15: (330, 460),
    16: (182, 460),  # ankles
    17: (370, 490),
    18: (360, 500),
    19: (320, 500),  # L big toe, small toe, heel -> foot (365, 495)
    20: (142, 490),
    21: (152, 500),
    22: (192, 500),  # R big toe, small toe, heel -> foot (147, 495)
}
LEFT_HAND_BASE = (440, 300)
RIGHT_HAND_BASE = (72, 300)


def hand_points(bx: float, by: float) -> list[tuple[float, float]]:
    """Point 0 at the base; finger f joint j at (bx + 12(f-2), by + 12j)."""
    pts = [(bx, by)]
    for f in range(5):
        for j in range(1, 5):
            pts.append((bx + 12 * (f - 2), by + 12 * j))
    return pts


def crafted_person(dx: float = 0.0, dy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    kp = np.zeros((133, 2))
    for i, xy in BODY_WB.items():
        kp[i] = xy
    for k in range(68):  # face dots in the top-left corner, 8 px apart
        kp[23 + k] = (20 + 8 * (k % 10), 10 + 8 * (k // 10))
    kp[91:112] = hand_points(*LEFT_HAND_BASE)
    kp[112:133] = hand_points(*RIGHT_HAND_BASE)
    return kp + [dx, dy], np.full(133, 0.9)


# ---- crafted DWPose models -----------------------------------------------------------------

# A standing figure in crop pixels (288 x 384), no hands or face.
FIGURE = {
    0: (144, 80),
    1: (134, 70),
    2: (154, 70),
    3: (124, 75),
    4: (164, 75),
    5: (104, 130),
    6: (184, 130),
    7: (90, 190),
    8: (198, 190),
    9: (84, 240),
    10: (204, 240),
    11: (118, 230),
    12: (170, 230),
    13: (114, 300),
    14: (174, 300),
    15: (112, 360),
    16: (176, 360),
    17: (100, 372),
    18: (106, 374),
    20: (186, 372),
    21: (180, 374),
}


def crafted_pose_config(folder: Path, size: tuple[int, int]) -> PoseConfig:
    """DWPose models that find two persons, always the same, in any frame of ``size`` (w, h):
    the tiny random ones find nobody, and a job without persons fails."""
    from preprocess.pose.onnx_models import build_crafted_models, detector_output_for_boxes, simcc_for_points

    w, h = size
    boxes = np.array([[0.06 * w, 0.15 * h, 0.44 * w, 0.95 * h], [0.53 * w, 0.15 * h, 0.94 * w, 0.95 * h]], np.float32)
    points = np.full((133, 2), np.nan)
    for k, xy in FIGURE.items():
        points[k] = xy
    files = build_crafted_models(
        folder, detector_output_for_boxes(boxes, np.full(2, 0.9), (h, w)), simcc_for_points(points)
    )
    return PoseConfig(models="files", detector_path=files[0], pose_model_path=files[1])


def expected_provider() -> str:
    """The provider the runner should pick on this host: CUDA when onnxruntime offers it and a
    GPU exists, else the CPU (onnxruntime falls back to the CPU without a GPU)."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    return "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"


def driving_files(tmp_path: Path, spec: SyntheticSpec) -> tuple[Path, Path]:
    """Pose-stage and segment-stage npz files made from a synthetic clip's ground truth."""
    return write_ground_truth_stage_files(render_clip(spec), tmp_path, seed=3)


# ---- the drawing rules applied literally, the release's resize, and its tolerance -----------


def reference_draw_pose(frame: OpenPoseFrame, h: int, w: int, style: str) -> np.ndarray:
    """A.6 step by step: listed colours drawn into a 3-channel canvas, canvas * 0.6 cast to
    uint8 after the limbs, then points, hands, faces; UniAnimate reads the canvas as BGR."""
    uni = style == "unianimate"
    canvas = np.zeros((h, w, 3), np.uint8)
    pts, sc = (frame.body_and_feet, frame.body_and_feet_scores) if uni else (frame.body, frame.body_scores)
    limbs = BODY_LIMBS[:BODY_LIMBS_DRAWN] + (FOOT_LIMBS if uni else ())
    colors = BODY_COLORS + FOOT_COLORS
    present = (sc > frame.threshold) & ~((pts[..., 0] == -1) & (pts[..., 1] == -1))
    for i, (ja, jb) in enumerate(limbs):
        for n in range(frame.num_persons):
            if present[n, ja - 1] and present[n, jb - 1]:
                (xa, ya), (xb, yb) = pts[n, ja - 1] * [w, h], pts[n, jb - 1] * [w, h]
                length = ((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5
                angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
                poly = cv2.ellipse2Poly(
                    (int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), 4), angle, 0, 360, 1
                )
                cv2.fillConvexPoly(canvas, poly, colors[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(pts.shape[1]):
        for n in range(frame.num_persons):
            if present[n, i]:
                cv2.circle(canvas, (int(pts[n, i, 0] * w), int(pts[n, i, 1] * h)), 4, colors[i], thickness=-1)
    for hand in list(frame.left_hands) + list(frame.right_hands):
        xy = [(int(x * w), int(y * h)) for x, y in hand]
        ok = [x > 0.01 and y > 0.01 for x, y in xy]
        for k, (a, b) in enumerate(HAND_EDGES):
            if ok[a] and ok[b]:
                cv2.line(canvas, xy[a], xy[b], hand_edge_color(k), thickness=2)
        for point, good in zip(xy, ok):
            if good:
                cv2.circle(canvas, point, 4, (0, 0, 255), thickness=-1)
    if not uni:
        for face in frame.faces:
            for x, y in face:
                if int(x * w) > 0.01 and int(y * h) > 0.01:
                    cv2.circle(canvas, (int(x * w), int(y * h)), 3, (255, 255, 255), thickness=-1)
    return np.ascontiguousarray(canvas[..., ::-1]) if uni else canvas


# One rounding step between resize kernels, on a fraction of a percent of the values
# (the docstring of tests/preprocess/test_pose_scale.py gives the reasons).
MAX_DIFF, MEAN_DIFF = 1, 0.02


def torchvision_resize(image_hwC: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor_CHW = torch.from_numpy(np.ascontiguousarray(image_hwC)).permute(2, 0, 1).contiguous()
    out = TF.resize(tensor_CHW, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out.permute(1, 2, 0).numpy()


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Two uint8 pose images within MAX_DIFF everywhere and MEAN_DIFF on average."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= MAX_DIFF and diff.mean() < MEAN_DIFF, (int(diff.max()), float(diff.mean()))
