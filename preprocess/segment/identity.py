"""Stable person identities: prompt a video segmenter with person boxes, resolve overlaps
into a label map, and assign each frame's poses to the masklets.

Tensor legend: T frames, H x W pixels, K tracked persons (masklets), P poses in a frame.

Rules (documented once, here):
* A detected box starts a new person when no known person covers it (box IoU with every
  person's last non-empty mask box below ``new_person_iou``: someone hidden for a while is
  not started twice when they reappear); at most
  ``max_persons`` persons are tracked, later arrivals beyond that are ignored (counted).
* Overlaps: a pixel belongs to the person whose mask logit is highest there, if positive.
* Order: persons are numbered by (frame of first appearance, left-to-right mask centre at
  that frame): everyone present at the start left to right, latecomers after them. The
  order is fixed once and recorded; the label map uses it (0 = background, k = person k).
* Pose assignment, per frame: cost(pose p, person k) = -(share of p's confident keypoints
  inside k's mask + IoU of p's box with k's mask box), solved with scipy's
  linear_sum_assignment; ``pose_index[t, k-1]`` is the pose row of person k, or -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Segmenter(Protocol):
    """A streaming video segmenter: one call per frame, in order."""

    def step(self, frame: np.ndarray, new_boxes: dict[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
        """Start tracking ``new_boxes`` ({object id: x1,y1,x2,y2}) at this frame; return the
        ids of every tracked object and their mask logits float32 [K, H, W]."""
        ...


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Bounding boxes [K, 4] (x1, y1, x2, y2) of boolean masks [K, H, W]; empty masks give zeros."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    import torch  # imported where used: a rerun whose masks are cached loads neither torch nor scipy
    import torchvision

    return torchvision.ops.box_iou(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()


def resolve_overlaps(logits: np.ndarray) -> np.ndarray:
    """Per-pixel owner [H, W] int: index of the highest positive logit, -1 for background."""
    if not len(logits):
        return np.full(logits.shape[1:], -1, np.int64)
    owner = logits.argmax(axis=0)
    owner[logits.max(axis=0) <= 0] = -1
    return owner


def assign_poses(
    owner: np.ndarray, num_objects: int, keypoints: np.ndarray, scores: np.ndarray, boxes: np.ndarray, threshold: float
) -> np.ndarray:
    """pose row of each object [K] (-1 where none) for one frame (rule in the module docstring)."""
    from scipy.optimize import linear_sum_assignment  # imported where used, as torch in box_iou

    result = np.full(num_objects, -1, np.int64)
    if not num_objects or not len(keypoints):
        return result
    height, width = owner.shape
    masks = owner[None] == np.arange(num_objects)[:, None, None]
    cost = -box_iou(boxes, mask_boxes(masks))  # [P, K]
    for p in range(len(keypoints)):
        good = scores[p] > threshold
        xy = np.round(keypoints[p][good]).astype(int)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        if inside.any():
            hits = owner[xy[inside, 1], xy[inside, 0]]
            cost[p] -= np.bincount(hits[hits >= 0], minlength=num_objects)[:num_objects] / max(1, good.sum())
    rows, cols = linear_sum_assignment(cost)
    for p, k in zip(rows, cols):
        if cost[p, k] < 0:  # no evidence at all is no assignment
            result[k] = p
    return result


@dataclass
class IdentityTracker:
    """Drives a Segmenter over a clip and builds the label map and the pose assignment."""

    segmenter: Segmenter
    num_frames: int
    height: int
    width: int
    max_persons: int = 7
    new_person_iou: float = 0.3
    keypoint_threshold: float = 0.3
    labels: np.ndarray = field(init=False)  # uint8 [T, H, W], provisional object index + 1
    pose_index: list[np.ndarray] = field(init=False, default_factory=list)
    first_seen: dict[int, tuple[int, float]] = field(init=False, default_factory=dict)  # obj idx -> (frame, x)
    ignored_arrivals: int = field(init=False, default=0)
    _last_boxes: np.ndarray = field(init=False)  # [K, 4] last non-empty mask box of each person
    _t: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.labels = np.zeros((self.num_frames, self.height, self.width), np.uint8)
        self._last_boxes = np.zeros((0, 4), np.float32)

    @property
    def num_objects(self) -> int:
        return len(self.first_seen)

    def step(self, frame: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, boxes: np.ndarray) -> None:
        """One frame: its poses' keypoints [P,133,2], scores [P,133] and boxes [P,4]."""
        new_boxes: dict[int, np.ndarray] = {}
        if len(boxes):
            overlap = box_iou(boxes, self._last_boxes).max(axis=1, initial=0.0)
            for box in boxes[overlap < self.new_person_iou]:
                if self.num_objects + len(new_boxes) >= self.max_persons:
                    self.ignored_arrivals += 1
                    continue
                new_boxes[self.num_objects + len(new_boxes)] = box
        if self.num_objects == 0 and not new_boxes:
            owner = np.full((self.height, self.width), -1, np.int64)  # nobody yet: no segmenter call
            ids: list[int] = []
        else:
            ids, logits = self.segmenter.step(frame, new_boxes)
            assert ids == list(range(len(ids))), "object ids are handed out densely, in order"
            owner = resolve_overlaps(logits)
        for obj in new_boxes:
            present = owner == obj
            x = float(np.nonzero(present)[1].mean()) if present.any() else float(new_boxes[obj][[0, 2]].mean())
            self.first_seen[obj] = (self._t, x)
        self.labels[self._t] = owner + 1
        self.pose_index.append(assign_poses(owner, len(ids), keypoints, scores, boxes, self.keypoint_threshold))
        current = mask_boxes(owner[None] == np.arange(len(ids))[:, None, None])
        known = np.concatenate([self._last_boxes, np.zeros((len(ids) - len(self._last_boxes), 4), np.float32)])
        visible = current[:, 2] > current[:, 0]
        known[visible] = current[visible]
        self._last_boxes = known
        self._t += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label map uint8 [T,H,W] in the final person order, pose_index int16 [T,K],
        first frame of each person [K]), with persons renumbered by the order rule."""
        order = sorted(self.first_seen, key=lambda obj: self.first_seen[obj])  # final position -> obj idx
        lut = np.zeros(256, np.uint8)
        for position, obj in enumerate(order):
            lut[obj + 1] = position + 1
        pose_index = np.full((self.num_frames, self.num_objects), -1, np.int16)
        for t, row in enumerate(self.pose_index):
            for position, obj in enumerate(order):
                if obj < len(row):
                    pose_index[t, position] = row[obj]
        first = np.array([self.first_seen[obj][0] for obj in order], np.int32)
        return lut[self.labels], pose_index, first
