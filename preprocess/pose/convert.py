"""COCO-WholeBody 133 keypoints -> OpenPose-style frame (spec A.5, A.7, A.8).

Shape legend (P = persons in the frame, may be 0; coordinates are NORMALISED,
x / W and y / H as DWPose does, and ``-1`` in both coordinates marks a point
that is not there)::

    OpenPoseFrame.body               [P, 18, 2]  OpenPose-18 order, see OPENPOSE_BODY_NAMES
    OpenPoseFrame.body_scores        [P, 18]     neck score is 1.0 or 0.0 (A.5)
    OpenPoseFrame.feet               [P, 2, 2]   UniAnimate foot points 18 (left), 19 (right) (A.7)
    OpenPoseFrame.feet_scores        [P, 2]      min of the two toe scores, 0.0 when absent
    OpenPoseFrame.left_hands         [P, 21, 2]  WholeBody 91..111
    OpenPoseFrame.left_hand_scores   [P, 21]
    OpenPoseFrame.right_hands        [P, 21, 2]  WholeBody 112..132
    OpenPoseFrame.right_hand_scores  [P, 21]
    OpenPoseFrame.faces              [P, 68, 2]  WholeBody 23..90
    OpenPoseFrame.face_scores        [P, 68]

Rules and where they come from:

* Neck (A.5): mean of WholeBody 5 and 6 (L/R shoulder); its score is 1 when
  BOTH shoulder scores are > threshold, else 0.
* Re-index to OpenPose-18 (A.5): the simultaneous copy of the spec, applied to
  the 134-point array with the neck at index 17.
* Normalise by W and H, then every point whose score is < threshold gets
  coordinates -1 (A.5, A.8). Note the asymmetry kept from DWPose: a body point
  is *drawn* only when its score is > threshold (the "subset" rule), so a
  score exactly equal to the threshold keeps its coordinates but is not drawn
  as a body point (the renderer applies the > rule; see ``render.py``).
* Feet (A.7, UniAnimate): point 18 = mean of WholeBody 17, 18 (left big and
  small toe), point 19 = mean of 20, 21 (right); present only when both toes
  have score > threshold, otherwise -1. Heels (19, 22) are unused.

All functions here are numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BODY_COLORS",
    "BODY_LIMBS",
    "BODY_LIMBS_DRAWN",
    "FACE_POINT_COLOR",
    "FOOT_COLORS",
    "FOOT_LIMBS",
    "HAND_EDGES",
    "HAND_POINT_COLOR",
    "OPENPOSE_BODY_NAMES",
    "OpenPoseFrame",
    "wholebody_to_openpose",
]

# --- COCO-WholeBody 133 layout (A.5, 0-based) -------------------------------------------
WB_NUM_POINTS = 133
WB_L_SHOULDER, WB_R_SHOULDER = 5, 6
WB_LEFT_TOES = (17, 18)  # L big toe, L small toe
WB_RIGHT_TOES = (20, 21)  # R big toe, R small toe
WB_FACE = slice(23, 91)  # 68 points
WB_LEFT_HAND = slice(91, 112)  # 21 points
WB_RIGHT_HAND = slice(112, 133)  # 21 points

# --- OpenPose-18 body ---------------------------------------------------------------------
OPENPOSE_BODY_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)

# A.5's simultaneous copy on the 134-point array (neck inserted at 17):
# positions _REINDEX_DST take the values found at _REINDEX_SRC; 0, 5, 11 stay.
_NECK_134 = 17
_REINDEX_DST = (1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17)
_REINDEX_SRC = (17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3)


def _openpose_source_indices() -> tuple[int, ...]:
    """For each OpenPose-18 slot, its index in the 134-point array (neck = 17)."""
    src = list(range(18))
    for dst, s in zip(_REINDEX_DST, _REINDEX_SRC):
        src[dst] = s
    return tuple(src)


# (0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3); indices < 17 are
# WholeBody indices unchanged (nothing below the neck insertion point shifts).
OPENPOSE_FROM_134: tuple[int, ...] = _openpose_source_indices()

# Limbs, 1-BASED pairs into the 20-point body+feet array (OpenPose 1..18, feet 19, 20),
# exactly as the sources write them; the renderer subtracts 1. Only the first
# BODY_LIMBS_DRAWN of BODY_LIMBS are ever drawn (the last two, ear->shoulder, never are).
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
    (3, 17),
    (6, 18),
)
BODY_LIMBS_DRAWN = 17
# UniAnimate's extra limbs (A.7), same 1-based indexing: L-ankle (14) -> left foot point
# (19, i.e. 0-based 18), R-ankle (11) -> right foot point (20, i.e. 0-based 19). They are
# limbs 17 and 18 of the UniAnimate list and take colours 17 and 18.
FOOT_LIMBS: tuple[tuple[int, int], ...] = ((14, 19), (11, 20))

# 0-based pairs into one 21-point hand (A.6); edge k has colour HSV(k/20, 1, 1).
HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
)

# Colours as the source code lists them (A.6). They are "RGB-looking": the "unianimate"
# style draws them into a BGR canvas (A.7), so R and B end up swapped in an RGB image.
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
FOOT_COLORS: tuple[tuple[int, int, int], ...] = ((170, 255, 255), (255, 255, 0))  # indices 18, 19
HAND_POINT_COLOR: tuple[int, int, int] = (0, 0, 255)
FACE_POINT_COLOR: tuple[int, int, int] = (255, 255, 255)

DEFAULT_THRESHOLD = 0.3  # A.8


@dataclass(frozen=True)
class OpenPoseFrame:
    """One frame's OpenPose-style keypoints for all persons (shapes: module legend).

    ``threshold`` is the visibility threshold the frame was built with; the renderer
    uses it for the body/feet "score > threshold" drawing rule.
    """

    body: np.ndarray
    body_scores: np.ndarray
    feet: np.ndarray
    feet_scores: np.ndarray
    left_hands: np.ndarray
    left_hand_scores: np.ndarray
    right_hands: np.ndarray
    right_hand_scores: np.ndarray
    faces: np.ndarray
    face_scores: np.ndarray
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        p = self.body.shape[0]
        expected = {
            "body": (p, 18, 2),
            "body_scores": (p, 18),
            "feet": (p, 2, 2),
            "feet_scores": (p, 2),
            "left_hands": (p, 21, 2),
            "left_hand_scores": (p, 21),
            "right_hands": (p, 21, 2),
            "right_hand_scores": (p, 21),
            "faces": (p, 68, 2),
            "face_scores": (p, 68),
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"OpenPoseFrame.{name} has shape {got}, expected {shape}")

    @property
    def num_persons(self) -> int:
        return int(self.body.shape[0])

    @property
    def body_and_feet(self) -> np.ndarray:
        """[P, 20, 2]: OpenPose-18 then the two foot points (UniAnimate's 20-point body, A.7)."""
        return np.concatenate([self.body, self.feet], axis=1)

    @property
    def body_and_feet_scores(self) -> np.ndarray:
        """[P, 20]."""
        return np.concatenate([self.body_scores, self.feet_scores], axis=1)

    @classmethod
    def empty(cls, threshold: float = DEFAULT_THRESHOLD) -> OpenPoseFrame:
        """A frame with no persons (all arrays have P = 0)."""
        return wholebody_to_openpose(np.zeros((0, WB_NUM_POINTS, 2)), np.zeros((0, WB_NUM_POINTS)), 1, 1, threshold)


def wholebody_to_openpose(
    keypoints: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    threshold: float = DEFAULT_THRESHOLD,
) -> OpenPoseFrame:
    """Convert DWPose output (pixels) to a normalised OpenPose-style frame (A.5, A.7).

    keypoints: [P, 133, 2] float, pixel (x, y); scores: [P, 133]. P may be 0.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    # Thresholds meet the scores as doubles, as in the reference, which concatenates DWPose's
    # float32 scores with its float64 keypoints first: float32(0.3) counts as > 0.3.
    sc = np.asarray(scores, dtype=np.float64)
    if kp.ndim != 3 or kp.shape[1:] != (WB_NUM_POINTS, 2):
        raise ValueError(f"keypoints must be [P,133,2], got {kp.shape}")
    if sc.shape != kp.shape[:2]:
        raise ValueError(f"scores must be [P,133] matching keypoints, got {sc.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    p = kp.shape[0]

    # Neck (A.5): averaged coordinates; score forced to 1/0 by the both-shoulders rule.
    neck = kp[:, [WB_L_SHOULDER, WB_R_SHOULDER]].mean(axis=1)  # [P, 2]
    neck_score = ((sc[:, WB_L_SHOULDER] > threshold) & (sc[:, WB_R_SHOULDER] > threshold)).astype(np.float64)
    kp134 = np.concatenate([kp[:, :_NECK_134], neck[:, None], kp[:, _NECK_134:]], axis=1)
    sc134 = np.concatenate([sc[:, :_NECK_134], neck_score[:, None], sc[:, _NECK_134:]], axis=1)

    # Normalise by W, H (DWPose divides x by W and y by H), then mask low scores with -1.
    norm = kp134 / np.array([float(width), float(height)])
    norm[sc134 < threshold] = -1.0

    def wb(idx: int | slice) -> tuple[np.ndarray, np.ndarray]:
        # WholeBody index -> position in the 134 array (everything from 17 on shifts by 1).
        if isinstance(idx, slice):
            shifted = slice(idx.start + 1, idx.stop + 1)
            return norm[:, shifted], sc134[:, shifted]
        return norm[:, idx + 1], sc134[:, idx + 1]

    src = list(OPENPOSE_FROM_134)
    body, body_scores = norm[:, src], sc134[:, src]

    # Feet (A.7): toe-pair means, present only when BOTH toes are > threshold. The stored
    # score is the smaller toe score so the renderer's uniform "score > threshold" rule
    # reproduces the both-toes rule; 0 when absent.
    feet = np.full((p, 2, 2), -1.0)
    feet_scores = np.zeros((p, 2))
    for j, (a, b) in enumerate((WB_LEFT_TOES, WB_RIGHT_TOES)):
        (pa, sa), (pb, sb) = wb(a), wb(b)
        present = (sa > threshold) & (sb > threshold)
        feet[present, j] = (pa[present] + pb[present]) / 2.0
        feet_scores[present, j] = np.minimum(sa[present], sb[present])

    faces, face_scores = wb(WB_FACE)
    left, left_scores = wb(WB_LEFT_HAND)
    right, right_scores = wb(WB_RIGHT_HAND)
    return OpenPoseFrame(
        body=np.ascontiguousarray(body),
        body_scores=np.ascontiguousarray(body_scores),
        feet=feet,
        feet_scores=feet_scores,
        left_hands=np.ascontiguousarray(left),
        left_hand_scores=np.ascontiguousarray(left_scores),
        right_hands=np.ascontiguousarray(right),
        right_hand_scores=np.ascontiguousarray(right_scores),
        faces=np.ascontiguousarray(faces),
        face_scores=np.ascontiguousarray(face_scores),
        threshold=float(threshold),
    )
