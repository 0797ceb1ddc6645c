"""Quality measures of one clip, per clip and per person, from its poses, masks and frames
(record and field meanings: data_schemas/quality.py).

Inputs are the stages' arrays: poses (data_schemas/pose.py: keypoints [T,P,133,2], scores
[T,P,133], boxes [T,P,4]) and masks (data_schemas/mask.py: label_map [T,H,W], pose_index
[T,K]). Person k is label k; its pose in frame t is row pose_index[t, k-1] of the poses.
Keypoint groups are COCO-WholeBody's: body 0-16, feet 17-22, hands 91-132. A keypoint is
*found* when its score is above ``keypoint_threshold``.

Definitions that need more than a field description:

* Identity switch at frame t between persons a and b (t not a camera cut), by either rule:
  - mask: a's mask at t overlaps b's mask at t-1 with IoU >= ``switch_min_iou`` and by at
    least ``switch_margin`` more than it overlaps a's own mask at t-1, and the same holds
    with a and b exchanged (the two labels traded regions; one-sided takeovers happen
    without any switch when overlapping persons change depth order);
  - pose: a's assigned body keypoints moved by a median of >= ``jump_min`` frame heights
    since t-1, and lie within ``jump_ratio`` of that distance of b's keypoints at t-1 (the
    pose row given to a is the one that was following b).
  One switch per (t, pair), whatever rules and directions fired; persons are reported as
  labels (1-based) and t as the first frame after the switch.
* Pose-mask disagreement: the assigned pose has >= ``min_judged_keypoints`` found body
  keypoints inside the frame and fewer than ``disagreement_share`` of them have a pixel of
  the person within ``mask_tolerance`` frame heights.
* Camera cut at frame t: the mean absolute difference of grey ``thumbnail_side``^2
  thumbnails of frames t-1 and t is >= ``cut_threshold`` (0..1) and >= ``cut_ratio`` times
  the clip's median difference (handheld shake raises every difference, a cut only one).

Frames are needed only for blur, brightness and cuts: every frame is read once, in chunks
of ``frames_per_chunk`` (a cut is a difference of consecutive frames), from the clip with
``preprocess.media.read_frames``, or taken from any iterable of RGB frames.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data_schemas.arrays import read_npz
from data_schemas.quality import ClipQuality, QualityConfig

BODY = slice(0, 17)
FEET = slice(17, 23)
HANDS = slice(91, 133)


@dataclass(frozen=True)
class ImageMeasures:
    """What the frames alone tell."""

    num_frames: int
    blur: float | None
    brightness: float | None
    cuts: tuple[int, ...]


def clip_frames(clip: Path, num_frames: int, frames_per_chunk: int = 32) -> Iterator[np.ndarray]:
    """The frames of one of our clips, decoded ``frames_per_chunk`` at a time (never the whole clip)."""
    from preprocess.media import read_frames

    for start in range(0, num_frames, frames_per_chunk):
        yield from read_frames(clip, list(range(start, min(start + frames_per_chunk, num_frames))))


def image_measures(frames: Iterable[np.ndarray], cfg: QualityConfig = QualityConfig()) -> ImageMeasures:
    """Blur (variance of the grey Laplacian), brightness and camera cuts of RGB frames uint8 [H,W,3]."""
    blurs, levels, diffs = [], [], []
    previous = None
    side = cfg.thumbnail_side
    for frame in frames:
        grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        levels.append(cv2.mean(grey)[0] / 255.0)
        blurs.append(cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_64F))[1][0, 0] ** 2)
        thumb = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
        if previous is not None:
            diffs.append(float(cv2.norm(thumb, previous, cv2.NORM_L1)) / (side * side * 255.0))
        previous = thumb
    return ImageMeasures(
        num_frames=len(levels),
        blur=float(np.mean(blurs)) if blurs else None,
        brightness=float(np.mean(levels)) if levels else None,
        cuts=cut_frames(np.asarray(diffs, np.float64), cfg),
    )


def cut_frames(diffs: np.ndarray, cfg: QualityConfig = QualityConfig()) -> tuple[int, ...]:
    """Frames starting a new shot, from diffs[i] = thumbnail difference of frames i and i+1 (rule above)."""
    if not len(diffs):
        return ()
    limit = max(cfg.cut_threshold, cfg.cut_ratio * float(np.median(diffs)))
    return tuple(int(i) + 1 for i in np.flatnonzero(diffs >= limit))


def _gather(poses: Mapping[str, np.ndarray], pose_index: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each person's assigned pose per frame: keypoints [T,K,133,2], scores [T,K,133], boxes
    [T,K,4] (zeros where no pose is assigned) and has_pose [T,K]."""
    has_pose = pose_index >= 0
    rows = np.where(has_pose, pose_index, 0).astype(np.int64)
    frame_of = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)

    def take(array: np.ndarray) -> np.ndarray:
        if array.shape[1] == 0:  # nobody detected in the whole clip
            return np.zeros(rows.shape + array.shape[2:], np.float32)
        keep = has_pose.reshape(rows.shape + (1,) * (array.ndim - 2))
        return np.where(keep, array[frame_of, rows], 0).astype(np.float32)

    return take(poses["keypoints"]), take(poses["scores"]), take(poses["boxes"]), has_pose


def _pair_distances(keypoints: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For t >= 1: median and mean distance [T-1, K, K] between person a's body keypoints at t
    and person b's at t-1 over the keypoints found in both (NaN where none), and how many those are."""
    diff = keypoints[1:, :, None] - keypoints[:-1, None, :]  # [T-1, K, K, 17, 2]
    both = found[1:, :, None] & found[:-1, None, :]
    dist = np.where(both, np.hypot(diff[..., 0], diff[..., 1]), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pairs with no common keypoint stay NaN
        return np.nanmedian(dist, axis=-1), np.nanmean(dist, axis=-1), both.sum(-1)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def measure_clip(
    clip_id: str,
    frames: Path | str | Iterable[np.ndarray] | None,
    poses: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    cfg: QualityConfig = QualityConfig(),
) -> ClipQuality:
    """Every measure of one clip. ``frames``: the clip's video file (read in chunks), RGB
    frames uint8 [H,W,3] in order, or None (then blur, brightness and cuts are unknown)."""
    label_map, pose_index = np.asarray(masks["label_map"]), np.asarray(masks["pose_index"])
    num_frames, height, width = label_map.shape
    num_persons = pose_index.shape[1]
    if pose_index.shape[0] != num_frames or poses["keypoints"].shape[0] != num_frames:
        raise ValueError(
            f"{clip_id}: masks have {num_frames} frames, pose_index {pose_index.shape[0]}, "
            f"poses {poses['keypoints'].shape[0]}"
        )
    if num_frames and int(label_map.max()) > num_persons:
        raise ValueError(f"{clip_id}: label map holds label {int(label_map.max())} but only {num_persons} persons")

    if frames is None:
        image = ImageMeasures(0, None, None, ())
    elif isinstance(frames, (str, Path)):
        image = image_measures(clip_frames(Path(frames), num_frames, cfg.frames_per_chunk), cfg)
    else:
        image = image_measures(frames, cfg)
    if frames is not None and image.num_frames != num_frames:
        raise ValueError(f"{clip_id}: {image.num_frames} frames given for masks of {num_frames} frames")
    cut = np.zeros(num_frames, bool)
    cut[list(image.cuts)] = True

    keypoints, scores, pose_boxes, has_pose = _gather(poses, pose_index)
    found = scores > cfg.keypoint_threshold  # [T,K,133]
    body_found = found[:, :, BODY]
    median_d, mean_d, common = _pair_distances(keypoints[:, :, BODY], body_found)
    median_d[common < cfg.min_judged_keypoints] = np.nan  # too few keypoints to tell whose pose it is
    step_d = np.diagonal(mean_d, 0, 1, 2)  # [T-1, K]: each person's own displacement

    labels = num_persons + 1
    row_code = np.repeat(np.arange(height, dtype=np.int64) * labels, width)
    col_code = np.tile(np.arange(width, dtype=np.int64) * labels, height)
    radius = max(1, round(cfg.mask_tolerance * height))
    offsets = np.stack(np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1)), -1).reshape(-1, 2)

    area = np.zeros((num_frames, num_persons), np.int64)
    box_height = np.zeros((num_frames, num_persons))
    occlusion = np.zeros((num_frames, num_persons))
    disagree = np.zeros((num_frames, num_persons), bool)
    self_iou = np.full((num_frames, num_persons), np.nan)  # [t]: IoU of frames t-1 and t
    events: dict[tuple[int, int, int], set[str]] = {}
    previous = None
    for t in range(num_frames):
        flat = label_map[t].ravel().astype(np.int64)
        counts = np.bincount(flat, minlength=labels)
        area[t] = counts[1:]
        rows_hit = np.bincount(row_code + flat, minlength=height * labels).reshape(height, labels) > 0
        cols_hit = np.bincount(col_code + flat, minlength=width * labels).reshape(width, labels) > 0
        covered = cv2.integral((label_map[t] > 0).astype(np.uint8))  # [H+1, W+1] pixels of anyone
        for k in np.flatnonzero(area[t]):
            ys, xs = np.flatnonzero(rows_hit[:, k + 1]), np.flatnonzero(cols_hit[:, k + 1])
            x1, y1, x2, y2 = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
            if has_pose[t, k]:
                # the detector's box also covers parts hidden behind others
                bx1, by1, bx2, by2 = pose_boxes[t, k]
                if bx2 > bx1 and by2 > by1:
                    x1, y1 = max(0, min(x1, math.floor(bx1))), max(0, min(y1, math.floor(by1)))
                    x2, y2 = min(width, max(x2, math.ceil(bx2))), min(height, max(y2, math.ceil(by2)))
                disagree[t, k] = _disagrees(label_map[t], k + 1, keypoints[t, k, BODY], body_found[t, k], offsets, cfg)
            box_height[t, k] = (y2 - y1) / height
            anyone = covered[y2, x2] - covered[y1, x2] - covered[y2, x1] + covered[y1, x1]
            occlusion[t, k] = (anyone - area[t, k]) / ((y2 - y1) * (x2 - x1))  # every own pixel lies in the box
        if previous is not None:
            overlap = np.bincount(flat * labels + previous, minlength=labels * labels).reshape(labels, labels)[1:, 1:]
            now, before = area[t][:, None], area[t - 1][None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = overlap / (now + before - overlap)  # [a at t, b at t-1]
            both = (area[t] > 0) & (area[t - 1] > 0)
            self_iou[t, both] = np.diag(iou)[both]
            if not cut[t]:
                _mask_switches(t, np.nan_to_num(iou), area[t], area[t - 1], cfg, events)
                _pose_switches(t, median_d[t - 1], has_pose[t], has_pose[t - 1], height, cfg, events)
        previous = flat

    present = area > 0
    frames_present = present.sum(0)
    counted = (frames_present > 0) & (frames_present >= cfg.min_visible_share * num_frames)
    switched = np.zeros((num_frames, num_persons), bool)  # frames right after a person's switch
    for t, a, b in events:
        switched[t, [a - 1, b - 1]] = True
    min_body = math.ceil(cfg.min_body_share * (BODY.stop - BODY.start))

    def per_frame_mean(values: np.ndarray, k: int) -> float | None:
        return _mean_or_none(values[present[:, k], k])

    body_conf, hands_conf, feet_conf = (scores[:, :, part].mean(-1) for part in (BODY, HANDS, FEET))
    speed_pairs = has_pose[1:] & has_pose[:-1] & ~cut[1:, None] & ~switched[1:] & ~np.isnan(step_d)
    person = {
        "counted": [bool(c) for c in counted],
        "frames_present": [int(n) for n in frames_present],
        "visible_share": [float(n / num_frames) if num_frames else 0.0 for n in frames_present],
        "box_height": [per_frame_mean(box_height, k) for k in range(num_persons)],
        "body_confidence": [per_frame_mean(body_conf, k) for k in range(num_persons)],
        "hands_confidence": [per_frame_mean(hands_conf, k) for k in range(num_persons)],
        "feet_confidence": [per_frame_mean(feet_conf, k) for k in range(num_persons)],
        "body_present_share": [per_frame_mean(body_found.sum(-1) >= min_body, k) for k in range(num_persons)],
        "mask_stability": [_mean_or_none(self_iou[~cut & ~np.isnan(self_iou[:, k]), k]) for k in range(num_persons)],
        "area_share": [per_frame_mean(area / (height * width), k) for k in range(num_persons)],
        "occlusion_share": [per_frame_mean(occlusion, k) for k in range(num_persons)],
        "pose_mask_disagreements": [int(n) for n in disagree.sum(0)],
        "speed": [_mean_or_none(step_d[speed_pairs[:, k], k] / height) for k in range(num_persons)],
    }

    def over_counted(name: str, pick) -> float | None:
        values = [v for v, c in zip(person[name], counted) if c and v is not None]
        return float(pick(values)) if values else None

    switches = sorted(events)
    return ClipQuality(
        clip_id=clip_id,
        num_frames=num_frames,
        width=width,
        height=height,
        num_persons=num_persons,
        num_visible_persons=int(counted.sum()),
        **{f"person_{name}": tuple(values) for name, values in person.items()},
        num_identity_switches=len(switches),
        switch_frames=tuple(t for t, _, _ in switches),
        switch_persons_a=tuple(a for _, a, _ in switches),
        switch_persons_b=tuple(b for _, _, b in switches),
        switch_evidence=tuple("+".join(sorted(events[s])) for s in switches),
        num_disagreement_frames=int(disagree.any(1).sum()),
        min_person_height=over_counted("box_height", min),
        min_body_confidence=over_counted("body_confidence", min),
        min_mask_stability=over_counted("mask_stability", min),
        max_occlusion_share=over_counted("occlusion_share", max),
        motion=over_counted("speed", max),
        camera_cuts=image.cuts,
        frames_measured=image.num_frames,
        blur=image.blur,
        brightness=image.brightness,
    )


def _disagrees(
    labels: np.ndarray, person: int, keypoints: np.ndarray, found: np.ndarray, offsets: np.ndarray, cfg: QualityConfig
) -> bool:
    """Rule in the module docstring, for one person in one frame."""
    height, width = labels.shape
    xy = np.rint(keypoints[found]).astype(np.int64)
    xy = xy[(xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)]
    if len(xy) < cfg.min_judged_keypoints:
        return False
    window = xy[:, None, :] + offsets[None]  # [N, window, 2]
    xs, ys = np.clip(window[..., 0], 0, width - 1), np.clip(window[..., 1], 0, height - 1)
    inside = (labels[ys, xs] == person).any(1)
    return bool(inside.mean() < cfg.disagreement_share)


def _mask_switches(
    t: int,
    iou: np.ndarray,
    now: np.ndarray,
    before: np.ndarray,
    cfg: QualityConfig,
    events: dict[tuple[int, int, int], set[str]],
) -> None:
    """Mask rule at frame t: iou[a, b] = IoU of a's mask at t with b's at t-1."""
    own = np.diag(iou)
    took = (iou >= cfg.switch_min_iou) & (iou >= own[:, None] + cfg.switch_margin)
    took &= (now[:, None] > 0) & (before[None, :] > 0)
    # both ways: when overlapping persons change depth order, the one coming to the front takes
    # over the other's visible pixels, but the other does not take over its old ones
    for a, b in zip(*np.nonzero(took & took.T)):
        if a < b:
            events.setdefault((t, int(a) + 1, int(b) + 1), set()).add("mask")


def _pose_switches(
    t: int,
    median: np.ndarray,
    has_now: np.ndarray,
    had: np.ndarray,
    height: int,
    cfg: QualityConfig,
    events: dict[tuple[int, int, int], set[str]],
) -> None:
    """Pose rule at frame t: median[a, b] = median distance of a's keypoints at t to b's at t-1."""
    own = np.diag(median)
    with np.errstate(invalid="ignore"):
        moved = has_now & had & (own >= cfg.jump_min * height)
        lands = median <= cfg.jump_ratio * own[:, None]
    for a, b in zip(*np.nonzero(moved[:, None] & had[None, :] & lands)):
        if a != b:
            events.setdefault((t, int(min(a, b)) + 1, int(max(a, b)) + 1), set()).add("pose")


def measure_clip_files(
    clip_id: str, clip: Path | None, poses_path: Path, masks_path: Path, cfg: QualityConfig = QualityConfig()
) -> ClipQuality:
    """measure_clip on a workspace's files: clips/<id>.mp4 (None: no image measures),
    poses/<id>.npz and masks/<id>.npz."""
    return measure_clip(clip_id, clip, read_npz(poses_path), read_npz(masks_path), cfg)
