"""DWPose whole-body estimation over two onnxruntime sessions (spec A.3, A.4).

    frames (uint8 [T,H,W,3]) -> YOLOX person boxes per frame -> affine crop of every box
    -> one batched pose-model call for all crops of all frames -> SimCC decoding
    -> keypoints [P,133,2] (image pixels) and scores [P,133] per frame

Tensor legend: T frames, P persons in a frame, N crops in a batch, K = 133 keypoints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # imported where used: a rerun whose poses are cached loads neither onnxruntime nor torch
    import onnxruntime as ort

logger = logging.getLogger(__name__)

# The real models' input and output signature (A.3, A.4); the tiny test models share it.
DET_INPUT = (640, 640)  # (h, w)
SIMCC_RATIO = 2.0
STRIDES = (8, 16, 32)

PAD_VALUE = 114  # YOLOX letterbox fill
POSE_PADDING = 1.25  # box -> crop scale
POSE_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], np.float32)


@dataclass
class FramePoses:
    """Persons of one frame, in image pixels; P may be 0."""

    boxes: np.ndarray  # float32 [P, 4] x1, y1, x2, y2
    box_scores: np.ndarray  # float32 [P]
    keypoints: np.ndarray  # float32 [P, 133, 2]; -1 where the model found nothing
    scores: np.ndarray  # float32 [P, 133]


@dataclass
class RunTimes:
    """Seconds spent inside ``session.run`` and in total, for the benchmark."""

    model_s: float = 0.0
    total_s: float = 0.0
    calls: dict[str, int] = field(default_factory=lambda: {"detector": 0, "pose": 0})


def make_session(path: Path, provider: str = "auto") -> ort.InferenceSession:
    """An onnxruntime session on CUDA when available (and not refused), else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"provider 'cuda' asked for, but onnxruntime offers only {available} (install the 'gpu' extra)"
        )
    use_cuda = provider in ("auto", "cuda") and "CUDAExecutionProvider" in available
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    logger.info("%s runs on %s", Path(path).name, session.get_providers()[0])
    return session


def letterbox_into(image: np.ndarray, out_chw: np.ndarray) -> float:
    """YOLOX input (A.3): the image scaled to fit 640x640 and pasted top-left on a 114 canvas,
    written straight into a float32 [3, 640, 640] slot (no HWC copy, no transposed copy)."""
    height, width = image.shape[:2]
    ratio = min(DET_INPUT[0] / height, DET_INPUT[1] / width)
    resized = cv2.resize(image, (int(width * ratio), int(height * ratio)), interpolation=cv2.INTER_LINEAR)
    out_chw.fill(PAD_VALUE)
    for c in range(3):
        out_chw[c, : resized.shape[0], : resized.shape[1]] = resized[..., c]
    return ratio


def _grids() -> tuple[np.ndarray, np.ndarray]:
    cells, strides = [], []
    for stride in STRIDES:
        h, w = DET_INPUT[0] // stride, DET_INPUT[1] // stride
        ys, xs = np.mgrid[0:h, 0:w]
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((h * w, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


_GRID, _STRIDE = _grids()


def decode_detections(raw: np.ndarray, ratio: float, pre_threshold: float, nms_iou: float, threshold: float):
    """Person boxes (image pixels) and scores from one raw YOLOX output [8400, 85] (A.3).

    NMS is class-aware in the reference, so for the person class alone it is plain NMS over
    the boxes whose person score passes ``pre_threshold``. Result ordered by score.

    Two details of the reference's numpy code are kept: box areas and overlaps count pixels
    inclusively, ``(x2 - x1 + 1) * (y2 - y1 + 1)``, which ``torchvision.ops.nms`` reproduces on
    boxes shifted by [0, 0, 1, 1]; and the float32 scores meet ``pre_threshold`` in float32
    but ``threshold`` in float64 (the reference compares after concatenating them with its
    float64 class column), so a score of exactly float32(0.3) passes 0.3.
    """
    import torch  # imported where used: a rerun whose poses are cached needs no torch
    import torchvision

    scores = raw[:, 4] * raw[:, 5]  # objectness x person probability, float32
    # Greedy NMS never lets a box suppress a higher-scoring one, so boxes that the final
    # threshold will drop cannot change which others survive: dropping them before NMS
    # gives the same result, and NMS runs over a handful of boxes instead of thousands.
    keep = (scores > np.float32(pre_threshold)) & (scores.astype(np.float64) > threshold)
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    centres = (raw[keep, :2] + _GRID[keep]) * _STRIDE[keep]
    sizes = np.exp(raw[keep, 2:4]) * _STRIDE[keep]
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1) / ratio
    inclusive = torch.from_numpy(boxes) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    order = torchvision.ops.nms(inclusive, torch.from_numpy(scores[keep]), nms_iou).numpy()
    return boxes[order].astype(np.float32), scores[keep][order].astype(np.float32)


def box_to_centre_scale(box: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop centre and size from a box: padded by 1.25, then widened to the model's aspect (A.4)."""
    x1, y1, x2, y2 = box
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2], np.float32)
    w, h = (x2 - x1) * POSE_PADDING, (y2 - y1) * POSE_PADDING
    if w > aspect * h:
        h = w / aspect
    else:
        w = aspect * h
    return centre, np.array([w, h], np.float32)


def crop_transform(centre: np.ndarray, scale: np.ndarray, out_wh: tuple[int, int]) -> np.ndarray:
    """2x3 affine map of the crop box onto the model input (no rotation), from three points (A.4)."""
    out_w, out_h = out_wh
    src_dir = np.array([0.0, scale[0] * -0.5])
    dst_dir = np.array([0.0, out_w * -0.5])
    src = np.stack([centre, centre + src_dir, centre + src_dir + [src_dir[1], -src_dir[0]]]).astype(np.float32)
    dst_c = np.array([out_w * 0.5, out_h * 0.5])
    dst = np.stack([dst_c, dst_c + dst_dir, dst_c + dst_dir + [dst_dir[1], -dst_dir[0]]]).astype(np.float32)
    return cv2.getAffineTransform(src, dst)


def normalise_crops(crops: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] of (pixel - mean) / std (A.4), one channel at a
    time into the output: four times faster than the broadcast-then-transpose idiom."""
    out = np.empty((crops.shape[0], 3, *crops.shape[1:3]), np.float32)
    for c in range(3):
        np.multiply(crops[..., c], np.float32(1.0 / POSE_STD[c]), out=out[:, c], casting="unsafe")
        out[:, c] -= np.float32(POSE_MEAN[c] / POSE_STD[c])
    return out


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, centres: np.ndarray, scales: np.ndarray, in_wh):
    """Keypoints in image pixels [N,K,2] and scores [N,K] from SimCC vectors (A.4)."""
    x_bin, y_bin = simcc_x.argmax(axis=2), simcc_y.argmax(axis=2)
    scores = np.minimum(simcc_x.max(axis=2), simcc_y.max(axis=2))
    points = np.stack([x_bin, y_bin], axis=2).astype(np.float32) / SIMCC_RATIO
    points = points / np.asarray(in_wh, np.float32) * scales[:, None, :] + centres[:, None, :] - scales[:, None, :] / 2
    points[scores <= 0] = -1
    return points.astype(np.float32), scores.astype(np.float32)


class DWPose:
    """The two-stage whole-body estimator. ``estimate`` takes frames in the channel order the
    models expect (BGR for the released DWPose weights, see spec A.3/A.4)."""

    def __init__(
        self,
        detector: Path,
        pose_model: Path,
        *,
        provider: str = "auto",
        pre_threshold: float = 0.1,
        nms_iou: float = 0.45,
        threshold: float = 0.3,
        batch_size: int = 64,
    ):
        self.detector = make_session(detector, provider)
        self.pose = make_session(pose_model, provider)
        self.provider = self.pose.get_providers()[0]
        self.det_input = self.detector.get_inputs()[0].name
        self.det_batched = not isinstance(self.detector.get_inputs()[0].shape[0], int)
        pose_input = self.pose.get_inputs()[0]
        self.pose_input = pose_input.name
        self.pose_hw = tuple(pose_input.shape[2:4])  # (384, 288) for the real model
        self.pose_batched = not isinstance(pose_input.shape[0], int)
        self.pre_threshold, self.nms_iou, self.threshold, self.batch_size = (
            pre_threshold,
            nms_iou,
            threshold,
            batch_size,
        )
        self.times = RunTimes()

    def _run(self, session: ort.InferenceSession, name: str, feeds: dict) -> list[np.ndarray]:
        start = time.perf_counter()
        out = session.run(None, feeds)
        self.times.model_s += time.perf_counter() - start
        self.times.calls[name] += 1
        return out

    def detect(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Person boxes and scores for every frame of uint8 [T,H,W,3]."""
        step = max(1, len(frames)) if self.det_batched else 1
        # One input buffer reused per call: a static-batch detector (the real one) then
        # touches 5 MB per frame instead of 5 MB x frames.
        buffer = np.empty((step, 3, *DET_INPUT), np.float32)
        results = []
        for first in range(0, len(frames), step):
            chunk = frames[first : first + step]
            ratios = [letterbox_into(frame, slot) for frame, slot in zip(chunk, buffer)]
            (raw,) = self._run(self.detector, "detector", {self.det_input: buffer[: len(chunk)]})
            results += [
                decode_detections(raw[i], ratios[i], self.pre_threshold, self.nms_iou, self.threshold)
                for i in range(len(chunk))
            ]
        return results

    def estimate_boxes(
        self, frames: np.ndarray, boxes_per_frame: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Keypoints and scores of every box in every frame, all crops through the pose model in batches."""
        in_h, in_w = self.pose_hw
        owners = np.asarray([t for t, boxes in enumerate(boxes_per_frame) for _ in boxes], np.int64)
        results = [(np.zeros((0, 133, 2), np.float32), np.zeros((0, 133), np.float32)) for _ in boxes_per_frame]
        if not len(owners):
            return results
        crops = np.empty((len(owners), in_h, in_w, 3), np.uint8)
        centres = np.empty((len(owners), 2), np.float32)
        scales = np.empty((len(owners), 2), np.float32)
        for i, (t, box) in enumerate(zip(owners, (b for boxes in boxes_per_frame for b in boxes))):
            centres[i], scales[i] = box_to_centre_scale(box, in_w / in_h)
            cv2.warpAffine(
                frames[t],
                crop_transform(centres[i], scales[i], (in_w, in_h)),
                (in_w, in_h),
                dst=crops[i],
                flags=cv2.INTER_LINEAR,
            )
        batch = normalise_crops(crops)
        step = self.batch_size if self.pose_batched else 1
        outs = [
            self._run(self.pose, "pose", {self.pose_input: batch[i : i + step]}) for i in range(0, len(batch), step)
        ]
        simcc_x = np.concatenate([o[0] for o in outs])
        simcc_y = np.concatenate([o[1] for o in outs])
        points, scores = decode_simcc(simcc_x, simcc_y, centres, scales, (in_w, in_h))
        return [(points[owners == t], scores[owners == t]) for t in range(len(boxes_per_frame))]

    def estimate(self, frames: np.ndarray, max_persons: int | None = None) -> tuple[list[FramePoses], int]:
        """Whole-body poses of every frame; with ``max_persons``, only the largest boxes are kept.
        Returns the poses and the number of frames that had more persons than allowed."""
        start = time.perf_counter()
        detections = self.detect(frames)
        truncated = 0
        kept = []
        for boxes, scores in detections:
            if max_persons is not None and len(boxes) > max_persons:
                truncated += 1
                areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                keep = np.sort(np.argsort(-areas, kind="stable")[:max_persons])
                boxes, scores = boxes[keep], scores[keep]
            kept.append((boxes, scores))
        poses = self.estimate_boxes(frames, [b for b, _ in kept])
        result = [FramePoses(b, s, kp, ks) for (b, s), (kp, ks) in zip(kept, poses)]
        self.times.total_s += time.perf_counter() - start
        return result, truncated
