"""A Segmenter that serves known masks (the synthetic videos' ground truth), so identity
logic can be tested apart from SAM2."""

from __future__ import annotations

import numpy as np

from preprocess.segment.identity import box_iou, mask_boxes


class GroundTruthSegmenter:
    """Each object started with a box is bound to the ground-truth person whose mask box
    overlaps that box most (among persons not yet bound); its logits are +10 on that
    person's mask and -10 elsewhere, frame after frame."""

    def __init__(self, masks: np.ndarray):
        self.masks = np.asarray(masks, bool)  # [T, P, H, W]
        self.bound: dict[int, int] = {}  # object id -> ground-truth person
        self.calls = 0
        self._t = 0

    def step(self, frame: np.ndarray, new_boxes: dict[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
        from scipy.optimize import linear_sum_assignment  # imported where used: cached reruns skip scipy

        masks = self.masks[self._t]
        if new_boxes:
            free = [p for p in range(masks.shape[0]) if p not in self.bound.values()]
            iou = box_iou(np.stack(list(new_boxes.values())), mask_boxes(masks[free]))
            objects = list(new_boxes)
            for row, col in zip(*linear_sum_assignment(-iou)):
                self.bound[objects[row]] = free[col]
        ids = sorted(self.bound)
        logits = np.where(masks[[self.bound[i] for i in ids]], 10.0, -10.0).astype(np.float32)
        self.calls += 1
        self._t += 1
        return ids, logits.reshape(len(ids), *masks.shape[1:])
