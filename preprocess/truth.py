"""Truth models: stand-ins for DWPose and SAM2 that answer with the synthetic generator's
exact ground truth, so that the demo and the end-to-end tests of the later stages run on
poses and masks that mean something.

A synthetic video ``NAME.mp4`` has its truth beside it in ``NAME.gt.npz``
(``preprocess.synthetic.save_ground_truth``). A clip finds it through its source path, and
its frames through its time range: ingest resamples to the clip rate with ffmpeg's ``fps``
filter, which shows at output frame n the last input frame i whose timestamp, rounded to
the nearest output slot, is <= n (``source_frames``); the clip's scaling applies to the
keypoints (x sx, y sy) and to the masks (nearest neighbour).

The pose model (``TruthPoses``) answers like ``DWPose.estimate``: the persons with visible
pixels in a shuffled order (a detector promises no order), the 17 body points of COCO
WholeBody where the generator defines them (score 0.9 when visible, 0 when hidden; hands,
face and feet absent), boxes around the visible pixels. The segmenter is
``GroundTruthSegmenter`` on the clip's masks. Everything after the model call (packing,
identity numbering, pose-to-mask assignment, rendering) is the stages' own code; their
records name ``truth`` as the model, so such data is never taken for extracted data.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data_schemas.video import ClipRecord
from preprocess.pose.dwpose import FramePoses
from preprocess.synthetic import SyntheticClip, ground_truth_poses, load_ground_truth

TRUTH = "truth"
TRUTH_SUFFIX = ".gt.npz"


class MissingTruthError(ValueError):
    """A clip whose source has no ground truth beside it."""


def truth_file(source: Path) -> Path:
    """Where the ground truth of a synthetic video lives: ``NAME.gt.npz`` beside ``NAME.mp4``."""
    source = Path(source)
    return source.with_name(source.stem + TRUTH_SUFFIX)


def source_frames(first_output: int, count: int, fps_out: float, fps_in: float, num_inputs: int) -> np.ndarray:
    """Input frame shown at output frames first_output .. first_output+count-1 of ffmpeg's
    ``fps`` filter (round=near: halves away from zero), for inputs at constant ``fps_in``
    starting at time 0."""
    slots = np.floor(np.arange(num_inputs) * (fps_out / fps_in) + 0.5)  # each input's output slot
    wanted = np.arange(first_output, first_output + count)
    return np.clip(np.searchsorted(slots, wanted, side="right") - 1, 0, num_inputs - 1)


def clip_truth(
    clip_id: str, source: Path, start_s: float, fps: float, num_frames: int, width: int, height: int
) -> SyntheticClip:
    """The ground truth of one clip: its frames of the source's truth, at the clip's size."""
    path = truth_file(source)
    if not path.is_file():
        raise MissingTruthError(
            f"clip {clip_id}: its source {source} has no ground truth ({path.name} missing beside it); "
            "the truth models serve synthetic videos only (use pose/segment models 'tiny' or 'files')"
        )
    truth = load_ground_truth(path)
    picks = source_frames(round(start_s * fps), num_frames, fps, truth.spec.fps, len(truth.keypoints))
    keypoints = truth.keypoints[picks].copy()
    masks = truth.masks[picks]
    if (width, height) != (truth.spec.width, truth.spec.height):
        keypoints *= np.array([width / truth.spec.width, height / truth.spec.height], np.float32)
        flat = masks.reshape(-1, *masks.shape[2:]).astype(np.uint8)
        masks = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in flat]).astype(bool)
        masks = masks.reshape(num_frames, -1, height, width)
    return SyntheticClip(
        frames=None,
        keypoints=keypoints,
        keypoint_visible=truth.keypoint_visible[picks],
        masks=masks,
        colours=truth.colours,
        depth_order=truth.depth_order[picks],
        spec=truth.spec,
    )


def truth_of(clip: ClipRecord) -> SyntheticClip:
    """``clip_truth`` of a clip of the manifest."""
    return clip_truth(
        clip.clip_id, Path(clip.source_path), clip.start_s, clip.fps, clip.num_frames, clip.width, clip.height
    )


class TruthPoses:
    """``DWPose.estimate`` answered from a clip's ground truth, frame after frame."""

    provider = TRUTH

    def __init__(self, truth: SyntheticClip, seed: int = 0):
        # the generator's own perfect-detector arrays (preprocess.synthetic.ground_truth_poses)
        self.arrays, _ = ground_truth_poses(truth, seed=seed)
        self._t = 0

    def estimate(self, frames: np.ndarray, max_persons: int | None = None) -> tuple[list[FramePoses], int]:
        out, truncated = [], 0
        a = self.arrays
        for _ in range(len(frames)):
            t, n = self._t, int(a["num_persons"][self._t])
            poses = FramePoses(a["boxes"][t, :n], a["box_scores"][t, :n], a["keypoints"][t, :n], a["scores"][t, :n])
            self._t += 1
            if max_persons is not None and len(poses.boxes) > max_persons:
                # as DWPose does: the largest boxes are kept
                area = (poses.boxes[:, 2] - poses.boxes[:, 0]) * (poses.boxes[:, 3] - poses.boxes[:, 1])
                keep = np.sort(np.argsort(-area, kind="stable")[:max_persons])
                poses = FramePoses(poses.boxes[keep], poses.box_scores[keep], poses.keypoints[keep], poses.scores[keep])
                truncated += 1
            out.append(poses)
        return out, truncated
