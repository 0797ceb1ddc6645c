"""Pose retargeting: every driving person's motion on a reference person's body (spec A.7,
extended from one person to many).

UniAnimate's inference-time alignment (spec A.7, ``run_align_pose.py``) handles ONE person:
a global x/y scale from shoulder width and torso height (reference vs the first driving
frame), then per body segment a length ratio (reference / first driving frame) applied to
every frame by moving the segment's child joint, and everything below it, along the
segment; finally a translation that puts the driving neck on the reference neck.

Ours does the same for each driving person, onto the reference person it is matched with,
in WholeBody-133 pixel coordinates (so the pose stage's arrays and converter are used as
they are):

* **Root and anchor.** The root is the neck, the mean of the two shoulders (as the
  converter makes it). The person as a whole moves by one similarity transform
  ``T(p) = ref_anchor + s * (p - drv_anchor)``: ``drv_anchor`` is the driving root in the
  person's first frame that has one, ``ref_anchor`` the reference root, so the first frame
  stands where the reference person stands and later motion (walking, jumping) is kept,
  scaled by ``s``. Without a root on either side, the mean of the present body points is
  used on both sides.
* **Global scale** ``s`` = reference torso / driving torso (neck to mid-hip), else shoulder
  width, else the vertical extent of the body points; one isotropic factor (separate x and
  y factors, as UniAnimate has, squash a person who turns sideways).
* **Body segments** (neck-nose, nose-eyes, eyes-ears, neck-shoulders, arms, neck-hips,
  legs) are rebuilt from the root outwards: ``new[child] = new[parent] + r * (drv[child] -
  drv[parent])`` with ``r`` = reference length / driving length, so the retargeted limb has
  the reference person's length and the driving limb's direction, and everything below it
  follows. Both shoulders share one ratio (reference / driving shoulder width), which
  keeps the neck on the root. Unlike UniAnimate, the driving length is the MEDIAN over the
  frames where the segment is seen, not the first frame's: a limb foreshortened or hidden
  in frame 0 would otherwise distort the whole video. A segment missing on either side
  takes ``s``.
* **Hands, face and feet** keep their driving shape scaled by ``s``, hanging off the
  wrist, the nose and the ankle.
* A point whose parent is not seen in a frame is placed by ``T`` alone; a point that is
  not seen stays missing (-1). Scores are the driving scores.

Persons are matched left to right (mean x of their present body points: the reference
image's persons, and each driving person in its first frame with a pose) unless the job's
``person_map`` says otherwise. The masks of a driving person move with ``T`` (their
shape is the driving person's), so the identity label stays on the body that wears it.

Legend: T frames, K driving persons, R reference persons, 133 WholeBody keypoints, pixel
(x, y) coordinates; ``ok`` arrays mark present points (score >= threshold, as the
converter keeps them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data_schemas.arrays import read_npz
from data_schemas.config import PoseConfig
from preprocess.pose.convert import wholebody_to_openpose
from preprocess.pose.render import PoseStyle, draw_pose_resized
from preprocess.shards import poses_by_person

ROOT = -1  # the neck: mean of the shoulders, not a WholeBody point of its own
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 5, 6, 11, 12
BODY_POINTS = np.arange(23)  # body + feet: what locates and orders a person

# (parent, child), parents before children: each takes the reference person's length.
BODY_SEGMENTS: tuple[tuple[int, int], ...] = (
    (ROOT, 0),  # neck -> nose
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),  # nose -> eyes -> ears
    (ROOT, L_SHOULDER),
    (ROOT, R_SHOULDER),  # one shared ratio: the shoulder width
    (L_SHOULDER, 7),
    (7, 9),
    (R_SHOULDER, 8),
    (8, 10),  # arms
    (ROOT, L_HIP),
    (ROOT, R_HIP),  # torso sides
    (L_HIP, 13),
    (13, 15),
    (R_HIP, 14),
    (14, 16),  # legs
)
# parent -> points that keep their driving shape, scaled by the global scale.
ATTACHED: tuple[tuple[int, tuple[int, ...]], ...] = (
    (15, (17, 18, 19)),  # left ankle -> big toe, small toe, heel
    (16, (20, 21, 22)),  # right ankle
    (0, tuple(range(23, 91))),  # nose -> face
    (9, tuple(range(91, 112))),  # left wrist -> left hand
    (10, tuple(range(112, 133))),  # right wrist -> right hand
)
_EPS = 1e-6


# ---- measurements ----------------------------------------------------------------------


def present(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Points the converter keeps (score >= threshold; a zero score is padding)."""
    scores = np.asarray(scores, np.float64)  # compared as doubles, as the converter does
    return (scores >= threshold) & (scores > 0)


def root_points(keypoints: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neck [..., 2] and where it exists [...]: both shoulders present."""
    root = (keypoints[..., L_SHOULDER, :] + keypoints[..., R_SHOULDER, :]) / 2.0
    return root, ok[..., L_SHOULDER] & ok[..., R_SHOULDER]


def _point(keypoints: np.ndarray, ok: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    return root_points(keypoints, ok) if index == ROOT else (keypoints[..., index, :], ok[..., index])


def _lengths(keypoints: np.ndarray, ok: np.ndarray, a: int, b: int) -> np.ndarray:
    """|b - a| per frame, NaN where either end is missing."""
    pa, oa = _point(keypoints, ok, a)
    pb, ob = _point(keypoints, ok, b)
    return np.where(oa & ob, np.linalg.norm(pb - pa, axis=-1), np.nan)


def _torso(keypoints: np.ndarray, ok: np.ndarray) -> np.ndarray:
    root, root_ok = root_points(keypoints, ok)
    hips = (keypoints[..., L_HIP, :] + keypoints[..., R_HIP, :]) / 2.0
    return np.where(root_ok & ok[..., L_HIP] & ok[..., R_HIP], np.linalg.norm(hips - root, axis=-1), np.nan)


def _shoulder_width(keypoints: np.ndarray, ok: np.ndarray) -> np.ndarray:
    return _lengths(keypoints, ok, L_SHOULDER, R_SHOULDER)


def _extent(keypoints: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Vertical extent of the present body points (NaN with fewer than two)."""
    mask, y = ok[..., BODY_POINTS], keypoints[..., BODY_POINTS, 1]
    top, bottom = np.where(mask, y, np.inf).min(axis=-1), np.where(mask, y, -np.inf).max(axis=-1)
    return np.where(mask.sum(axis=-1) >= 2, bottom - top, np.nan)


def _ratio(reference: np.ndarray, driving: np.ndarray) -> float | None:
    """reference length / median driving length, or None when either is not measurable."""
    ref = float(np.asarray(reference).reshape(-1)[0])
    drv = driving[np.isfinite(driving)]
    if not np.isfinite(ref) or ref < _EPS or not len(drv) or np.median(drv) < _EPS:
        return None
    return ref / float(np.median(drv))


def global_scale(drv_kp: np.ndarray, drv_ok: np.ndarray, ref_kp: np.ndarray, ref_ok: np.ndarray) -> float:
    """Reference size / driving size: torso, else shoulder width, else body height; 1 when
    nothing is measurable on both sides."""
    for measure in (_torso, _shoulder_width, _extent):
        ratio = _ratio(measure(ref_kp[None], ref_ok[None]), measure(drv_kp, drv_ok))
        if ratio is not None:
            return ratio
    return 1.0


def _centroid(keypoints: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the present body points [..., 2] and where there is one [...]."""
    mask = ok[..., BODY_POINTS]
    count = mask.sum(axis=-1)
    total = (keypoints[..., BODY_POINTS, :] * mask[..., None]).sum(axis=-2)
    return total / np.maximum(count, 1)[..., None], count > 0


def mean_x(keypoints: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Mean x of each person's present body points [P] (NaN: none), for left-to-right order."""
    centre, has = _centroid(keypoints, ok)
    return np.where(has, centre[..., 0], np.nan)


# ---- one person ------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonTransform:
    """The person as a whole, driving pixels -> reference pixels: ``ref + scale * (p - drv)``."""

    scale: float
    anchor_driving: tuple[float, float]
    anchor_reference: tuple[float, float]

    def apply(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(self.anchor_reference) + self.scale * (
            np.asarray(points, np.float64) - np.asarray(self.anchor_driving)
        )

    def matrix(self, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
        """2x3 affine for cv2.warpAffine: driving pixels -> reference pixels, then scaled by (sx, sy)."""
        (dx, dy), (rx, ry), s = self.anchor_driving, self.anchor_reference, self.scale
        return np.array([[s * sx, 0.0, (rx - s * dx) * sx], [0.0, s * sy, (ry - s * dy) * sy]], np.float64)


def person_transform(drv_kp: np.ndarray, drv_ok: np.ndarray, ref_kp: np.ndarray, ref_ok: np.ndarray) -> PersonTransform:
    """Scale and anchors of one driving person [T, 133, 2] onto one reference person [133, 2]."""
    scale = global_scale(drv_kp, drv_ok, ref_kp, ref_ok)
    ref_root, ref_root_ok = root_points(ref_kp, ref_ok)
    drv_root, drv_root_ok = root_points(drv_kp, drv_ok)
    if not (ref_root_ok and drv_root_ok.any()):
        (ref_root, ref_root_ok), (drv_root, drv_root_ok) = _centroid(ref_kp, ref_ok), _centroid(drv_kp, drv_ok)
    if not ref_root_ok:
        raise ValueError("the reference person has no body keypoint above the threshold")
    if not drv_root_ok.any():
        raise ValueError("the driving person has no body keypoint above the threshold in any frame")
    first = int(np.argmax(drv_root_ok))
    return PersonTransform(scale, tuple(map(float, drv_root[first])), tuple(map(float, ref_root)))


def segment_ratio(
    parent: int, child: int, drv_kp: np.ndarray, drv_ok: np.ndarray, ref_kp: np.ndarray, ref_ok: np.ndarray
) -> float | None:
    """Reference length / median driving length of one segment (None: not measurable)."""
    if parent == ROOT and child in (L_SHOULDER, R_SHOULDER):
        return _ratio(_shoulder_width(ref_kp[None], ref_ok[None]), _shoulder_width(drv_kp, drv_ok))
    return _ratio(_lengths(ref_kp[None], ref_ok[None], parent, child), _lengths(drv_kp, drv_ok, parent, child))


def retarget_person(
    drv_kp: np.ndarray, drv_scores: np.ndarray, ref_kp: np.ndarray, ref_scores: np.ndarray, threshold: float
) -> tuple[np.ndarray, PersonTransform]:
    """One driving person [T, 133, 2] (driving pixels) on one reference person [133, 2]
    (reference pixels) -> keypoints [T, 133, 2] in reference pixels (-1 where missing) and the
    person's transform. Scores stay the driving ones (see the module doc for the method)."""
    drv_kp, ref_kp = np.asarray(drv_kp, np.float64), np.asarray(ref_kp, np.float64)
    drv_ok, ref_ok = present(drv_scores, threshold), present(ref_scores, threshold)
    transform = person_transform(drv_kp, drv_ok, ref_kp, ref_ok)
    out = np.full(drv_kp.shape, -1.0)
    drv_root, root_ok = root_points(drv_kp, drv_ok)
    new_root = transform.apply(drv_root)

    def hang(parent: int, children: Sequence[int], ratio: float) -> None:
        parent_drv, parent_ok = (drv_root, root_ok) if parent == ROOT else (drv_kp[:, parent], drv_ok[:, parent])
        parent_new = new_root if parent == ROOT else out[:, parent]
        child_drv, child_ok = drv_kp[:, children], drv_ok[:, children]  # [T, C, 2], [T, C]
        attached = parent_new[:, None] + ratio * (child_drv - parent_drv[:, None])
        alone = transform.apply(child_drv)
        placed = np.where(parent_ok[:, None, None], attached, alone)
        out[:, children] = np.where(child_ok[..., None], placed, -1.0)

    for parent, child in BODY_SEGMENTS:
        ratio = segment_ratio(parent, child, drv_kp, drv_ok, ref_kp, ref_ok)
        hang(parent, [child], transform.scale if ratio is None else ratio)
    for parent, children in ATTACHED:
        hang(parent, list(children), transform.scale)
    return out, transform


# ---- persons ---------------------------------------------------------------------------


def left_to_right(xs: Sequence[float] | np.ndarray) -> list[int]:
    """Indices of the persons with a position, leftmost first (ties keep index order)."""
    xs = np.asarray(xs, np.float64)
    return sorted((i for i in range(len(xs)) if np.isfinite(xs[i])), key=lambda i: (xs[i], i))


def driving_mean_x(keypoints: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """[K]: each driving person's mean body x in its first frame with a pose (NaN: never posed).
    ``keypoints`` [T, K, 133, 2], ``ok`` [T, K, 133]."""
    xs = mean_x(keypoints, ok)  # [T, K]
    out = np.full(xs.shape[1], np.nan)
    for k in range(xs.shape[1]):
        seen = np.flatnonzero(np.isfinite(xs[:, k]))
        if len(seen):
            out[k] = xs[seen[0], k]
    return out


def match_persons(
    driving_x: Sequence[float], reference_x: Sequence[float], person_map: Mapping[int, int] | None
) -> dict[int, int]:
    """Driving person k (1-based label) -> reference ROW (index into the reference arrays).

    Reference persons are numbered 1.. left to right among those with a position; persons
    without one (no pose) exist on neither side. Default: left to right on both sides,
    which needs equal counts."""
    drv_order, ref_order = left_to_right(driving_x), left_to_right(reference_x)
    posed = [k + 1 for k in drv_order]
    if person_map is None:
        if not drv_order:
            raise ValueError("no person with a pose in the driving frames: nothing to animate")
        if len(drv_order) != len(ref_order):
            raise ValueError(
                f"{len(drv_order)} person(s) with a pose in the driving frames (labels {posed}), "
                f"{len(ref_order)} in the reference image: give person_map to say who animates whom"
            )
        return {k + 1: r for k, r in zip(drv_order, ref_order)}
    for k, j in sorted(person_map.items()):
        if k not in posed:
            raise ValueError(
                f"person_map: driving person {k} has no pose in the used frames (persons with one: {posed})"
            )
        if not 1 <= j <= len(ref_order):
            raise ValueError(
                f"person_map: reference person {j}, but the reference image has {len(ref_order)} person(s) with a pose"
            )
    return {k: ref_order[j - 1] for k, j in sorted(person_map.items())}


# ---- a job's inputs --------------------------------------------------------------------


@dataclass
class Driving:
    """The first T frames of a driving clip, one row per tracked person (label k -> row k-1)."""

    keypoints: np.ndarray  # float32 [T, K, 133, 2] driving pixels, -1 where none
    scores: np.ndarray  # float32 [T, K, 133]
    label_map: np.ndarray  # uint8 [T, H, W]
    width: int
    height: int


def load_driving(poses_path: Path, masks_path: Path, num_frames: int) -> Driving:
    """A pose-stage npz and the segment-stage npz of the same clip, cut to ``num_frames``;
    a ValueError names the file and what is wrong."""
    arrays = {}
    for name, path in (("poses", poses_path), ("masks", masks_path)):
        try:
            arrays[name] = read_npz(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the {name} npz ({exc})") from exc
    poses, masks = arrays["poses"], arrays["masks"]
    for name, path, data, keys in (
        ("poses", poses_path, poses, ("keypoints", "scores", "width", "height")),
        ("masks", masks_path, masks, ("label_map", "pose_index")),
    ):
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"{path}: not a {name} npz of this project (no {', '.join(missing)})")
    label_map, pose_index = masks["label_map"], masks["pose_index"].astype(np.int64)
    width, height = int(poses["width"]), int(poses["height"])
    if (
        label_map.shape[1:] != (height, width)
        or len(label_map) != len(poses["keypoints"])
        or len(pose_index) != len(label_map)
    ):
        raise ValueError(
            f"{masks_path}: label map {label_map.shape} does not fit the poses of {poses_path} "
            f"({len(poses['keypoints'])} frames of {width}x{height}): not the same clip"
        )
    if len(label_map) < num_frames:
        raise ValueError(f"{poses_path}: {len(label_map)} frames, the job needs {num_frames}")
    keypoints, scores = poses_by_person(poses, pose_index[:num_frames])  # as the shards reorder them
    return Driving(keypoints, scores, label_map[:num_frames], width, height)


def read_reference_image(path: Path) -> np.ndarray:
    """The reference image as uint8 RGB [H, W, 3] (OpenCV applies its EXIF orientation)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: reference image not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image (OpenCV cannot decode it)")
    return np.ascontiguousarray(image[..., ::-1])


def detect_reference_poses(
    image_rgb: np.ndarray, cfg: PoseConfig, files: tuple[Path, Path]
) -> tuple[np.ndarray, np.ndarray]:
    """The pose stage's DWPose (same runner, config and channel order) on one image:
    keypoints [R, 133, 2] in image pixels and scores [R, 133]."""
    from preprocess.pose.stage import runner_for  # onnxruntime: only when poses are extracted

    frame = image_rgb[..., ::-1] if cfg.channel_order == "bgr" else image_rgb
    poses, _ = runner_for(cfg, files).estimate(np.ascontiguousarray(frame)[None], cfg.max_persons)
    return poses[0].keypoints, poses[0].scores


def load_reference_poses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The persons of a poses npz's first frame (pose-stage layout): keypoints [R, 133, 2], scores [R, 133]."""
    from preprocess.pose.stage import load_poses

    try:
        arrays = load_poses(path)
        count = int(arrays["num_persons"][0])
        return arrays["keypoints"][0, :count].astype(np.float64), arrays["scores"][0, :count]
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable poses npz ({exc})") from exc


@dataclass
class JobInputs:
    """Everything a generation needs from the poses and masks, at the output size."""

    pose: np.ndarray  # uint8 [T, H, W, 3] rendered retargeted poses (drawn at the reference size, resized)
    ref_pose: np.ndarray  # uint8 [H, W, 3] the reference image's poses (likewise)
    masks: np.ndarray  # bool [K, T, H, W]: person i = the i-th mapped driving person
    keypoints: np.ndarray  # float64 [T, K, 133, 2] retargeted, reference pixels (-1: missing)
    scores: np.ndarray  # float32 [T, K, 133]
    person_map: dict[int, int]  # driving label -> reference person (1 = leftmost), as applied
    transforms: list[PersonTransform]


def warp_person_masks(
    label_map: np.ndarray, label: int, transform: PersonTransform, ref_size: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    """Pixels of ``label`` moved by the person's transform into the output frame: bool [T, H, W].
    ``ref_size``/``out_size``: (width, height). Nearest neighbour: labels are not blended."""
    (ref_w, ref_h), (out_w, out_h) = ref_size, out_size
    matrix = transform.matrix(out_w / ref_w, out_h / ref_h)
    out = np.zeros((len(label_map), out_h, out_w), bool)
    for t, labels in enumerate(label_map):
        mask = (labels == label).astype(np.uint8)
        out[t] = cv2.warpAffine(mask, matrix, (out_w, out_h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    return out


def prepare_inputs(
    driving: Driving,
    ref_kp: np.ndarray,
    ref_scores: np.ndarray,
    ref_size: tuple[int, int],
    out_size: tuple[int, int],
    person_map: Mapping[int, int] | None,
    style: PoseStyle,
    threshold: float,
) -> JobInputs:
    """Match persons, retarget each, render the poses and move the masks, at ``out_size``
    (width, height). ``ref_size``: the reference image's (width, height)."""
    drv_ok = present(driving.scores, threshold)
    reference_x = mean_x(np.asarray(ref_kp, np.float64), present(ref_scores, threshold))
    rows = match_persons(driving_mean_x(driving.keypoints, drv_ok), reference_x, person_map)
    number = {row: j + 1 for j, row in enumerate(left_to_right(reference_x))}
    num_frames = len(driving.keypoints)
    keypoints = np.full((num_frames, len(rows), 133, 2), -1.0)
    scores = np.zeros((num_frames, len(rows), 133), np.float32)
    masks = np.zeros((len(rows), num_frames, out_size[1], out_size[0]), bool)
    transforms = []
    for i, (label, row) in enumerate(rows.items()):
        keypoints[:, i], transform = retarget_person(
            driving.keypoints[:, label - 1], driving.scores[:, label - 1], ref_kp[row], ref_scores[row], threshold
        )
        scores[:, i] = driving.scores[:, label - 1]
        masks[i] = warp_person_masks(driving.label_map, label, transform, ref_size, out_size)
        transforms.append(transform)
    # Poses are drawn on a canvas of the reference image's size and then resized, as the
    # release's pose images were (spec A.7): stick widths are reference-image pixels.
    ref_w, ref_h = ref_size
    ref_hw, out_hw = (ref_h, ref_w), (out_size[1], out_size[0])
    pose = np.zeros((num_frames, *out_hw, 3), np.uint8)
    for t in range(num_frames):
        frame = wholebody_to_openpose(keypoints[t], scores[t], ref_w, ref_h, threshold)
        pose[t] = draw_pose_resized(frame, ref_hw, out_hw, style)
    reference = wholebody_to_openpose(ref_kp, ref_scores, ref_w, ref_h, threshold)
    return JobInputs(
        pose=pose,
        ref_pose=draw_pose_resized(reference, ref_hw, out_hw, style),
        masks=masks,
        keypoints=keypoints,
        scores=scores,
        person_map={label: number[row] for label, row in rows.items()},
        transforms=transforms,
    )
