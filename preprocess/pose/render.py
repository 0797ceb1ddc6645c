"""Draw OpenPose-style pose images (spec "Decisions", A.6, A.7, A.9).

Two styles, both on a black uint8 canvas, every person in the frame drawn (A.9):

* ``"unianimate"`` (project default, spec "Decisions" + A.7): 18 body points + the two
  UniAnimate foot points (19 limbs, 20 keypoint circles), both hands, NO face. UniAnimate
  drew the listed colours into an OpenCV (BGR) canvas and saved it with OpenCV; the
  released weights saw those files read as RGB. We reproduce that by drawing the listed
  colours and then swapping channels 0 and 2, so in the returned RGB array R and B are
  swapped relative to the lists: the nose dot is BLUE (0, 0, 255), hand dots are RED,
  face dots (not drawn here) would stay white.
* ``"dwpose"`` (standard DWPose, A.6): 18 body points (17 limbs), hands, face (white dots).
  Channel convention: the listed colours are returned AS RGB (nose dot RED (255, 0, 0)),
  which is what DWPose / controlnet_aux hand to their callers as an RGB image.

Drawing rules (A.6), identical for both styles apart from the lists above:

* Order: all body limbs (limb-major, every person), canvas *= 0.6 (float multiply then
  uint8 cast, i.e. truncation: 255 -> 153), body keypoint circles (radius 4, full colour),
  then hands (all left hands, then all right hands; per hand its edges then its dots),
  then faces.
* Limb: filled convex polygon of ``cv2.ellipse2Poly(centre=int(midpoint),
  axes=(int(length/2), 4), angle=int(degrees(atan2(ya-yb, xa-xb))), 0, 360, 1)`` where a,
  b are the limb's first and second end point in pixels (normalised * W or H). Drawn only
  when both end points are present: score > frame.threshold (DWPose's "subset" rule, A.5)
  and not the -1 placeholder.
* Keypoint centres: ``(int(x * W), int(y * H))``.
* Hand edge k: line, thickness 2, colour HSV(k/20, 1, 1) * 255 passed as floats (OpenCV
  rounds them to the nearest integer, ties to even: 127.5 -> 128); drawn only if both end
  points have int pixel x > 0.01 and y > 0.01 (A.6's eps test on the int-truncated pixel
  coordinates, which also rejects the -1 placeholder). Hand dots: radius 4, (0, 0, 255)
  listed, same eps test.
* Face dot: radius 3, (255, 255, 255), same eps test.

Size (A.7): the release drew every pose image on a canvas of the SOURCE frame's size (the
frame DWPose saw) and its loaders resized it, after the training crop, to the model size with
torchvision's bilinear resize (on PIL images, i.e. antialiased when shrinking). Stick width 4,
radii 4 and line thickness 2 are therefore source pixels: ``draw_pose_resized`` /
``draw_pose_rows`` reproduce that image; ``draw_pose`` draws at the size it is given.

How: every shape is drawn as a palette index into one uint8 channel (``draw_pose_indices``)
and looked up in ``pose_palette(style)``, whose entries hold the dimmed limb colours and the
channel order of the style. Drawing is opaque and its pixel coverage does not depend on the
number of channels, so this gives the pixels of the rules above (tests/preprocess/test_pose_render.py
compares the two on random poses) with a third of the memory traffic; the training loader
looks indices up straight into its channel planes.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from preprocess.pose.convert import (
    BODY_COLORS,
    BODY_LIMBS,
    BODY_LIMBS_DRAWN,
    FACE_POINT_COLOR,
    FOOT_COLORS,
    FOOT_LIMBS,
    HAND_EDGES,
    HAND_POINT_COLOR,
    OpenPoseFrame,
)

__all__ = [
    "POSE_STYLES",
    "PoseStyle",
    "draw_pose",
    "draw_pose_indices",
    "draw_pose_resized",
    "draw_pose_rows",
    "draw_pose_sequence",
    "hand_edge_color",
    "pose_palette",
    "resize_bilinear",
]

PoseStyle = Literal["unianimate", "dwpose"]
POSE_STYLES: tuple[str, ...] = ("unianimate", "dwpose")

STICK_WIDTH = 4
LIMB_DIM = 0.6
BODY_POINT_RADIUS = 4
HAND_LINE_THICKNESS = 2
HAND_POINT_RADIUS = 4
FACE_POINT_RADIUS = 3
EPS = 0.01

_COLORS_20 = BODY_COLORS + FOOT_COLORS  # colour i for limb i and keypoint i

# Palette indices (module docstring, "How"); 0 = nothing drawn.
_LIMB = 1  # + limb i (dimmed colour i)
_BODY_POINT = _LIMB + len(_COLORS_20)  # + keypoint i (full colour i)
_HAND_EDGE = _BODY_POINT + len(_COLORS_20)  # + hand edge k
_HAND_POINT = _HAND_EDGE + len(HAND_EDGES)
_FACE_POINT = _HAND_POINT + 1


def hand_edge_color(k: int, n_edges: int = len(HAND_EDGES)) -> tuple[float, float, float]:
    """Listed colour of hand edge k: HSV(k/n, 1, 1) * 255 as floats (OpenCV rounds them)."""
    r, g, b = colorsys.hsv_to_rgb(k / float(n_edges), 1.0, 1.0)
    return (r * 255.0, g * 255.0, b * 255.0)


def _stored_color(color: Sequence[float]) -> tuple[int, ...]:
    # What OpenCV writes for a (float) colour: asked from OpenCV itself, so its rounding is used.
    pixel = np.zeros((1, 1, 3), np.uint8)
    cv2.rectangle(pixel, (0, 0), (0, 0), tuple(color), thickness=-1)
    return tuple(int(v) for v in pixel[0, 0])


# The limbs are dimmed by the float multiply then uint8 cast (truncation) of the reference:
# a table built from that very expression.
_DIM_LUT = (np.arange(256) * LIMB_DIM).astype(np.uint8)


def _listed_palette() -> np.ndarray:
    """uint8 [256, 3]: index -> the colour a canvas in the listed channel order gets."""
    palette = np.zeros((256, 3), np.uint8)
    for i, color in enumerate(_COLORS_20):
        palette[_LIMB + i] = _DIM_LUT[list(color)]
        palette[_BODY_POINT + i] = color
    for k in range(len(HAND_EDGES)):
        palette[_HAND_EDGE + k] = _stored_color(hand_edge_color(k))
    palette[_HAND_POINT] = HAND_POINT_COLOR
    palette[_FACE_POINT] = FACE_POINT_COLOR
    return palette


# UniAnimate drew the listed colours as if channel 0 were Blue (its OpenCV canvas, A.7):
# read back as RGB that is a swap of channels 0 and 2.
_LISTED_PALETTE = _listed_palette()
_PALETTES: dict[str, np.ndarray] = {
    "dwpose": _LISTED_PALETTE,
    "unianimate": np.ascontiguousarray(_LISTED_PALETTE[:, ::-1]),
}
for _table in _PALETTES.values():
    _table.flags.writeable = False  # shared by every caller
# The same tables one channel at a time (contiguous, for cv2.LUT on one-channel images).
_PLANE_PALETTES: dict[str, tuple[np.ndarray, ...]] = {
    style: tuple(np.ascontiguousarray(table[:, c]) for c in range(3)) for style, table in _PALETTES.items()
}


def pose_palette(style: PoseStyle = "unianimate") -> np.ndarray:
    """uint8 [256, 3] (read-only): RGB colour of each index ``draw_pose_indices`` draws."""
    if style not in POSE_STYLES:
        raise ValueError(f"unknown pose style {style!r}; expected one of {POSE_STYLES}")
    return _PALETTES[style]


def _present(points: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[P, K] bool: the body/feet drawing rule (score > threshold, not the -1 placeholder)."""
    placeholder = (points[..., 0] == -1.0) & (points[..., 1] == -1.0)
    return (scores > threshold) & ~placeholder


def _draw_limb(canvas: np.ndarray, a: tuple[float, float], b: tuple[float, float], index: int) -> None:
    (xa, ya), (xb, yb) = a, b
    mx, my = (xa + xb) / 2.0, (ya + yb) / 2.0
    length = ((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5
    # Direction measured from the second end point to the first, truncated like the source.
    angle = math.degrees(math.atan2(ya - yb, xa - xb))
    polygon = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, index)


def _draw_body(canvas: np.ndarray, frame: OpenPoseFrame, with_feet: bool) -> None:
    h, w = canvas.shape[:2]
    if with_feet:
        pts, scores = frame.body_and_feet, frame.body_and_feet_scores
        limbs = BODY_LIMBS[:BODY_LIMBS_DRAWN] + FOOT_LIMBS
    else:
        pts, scores = frame.body, frame.body_scores
        limbs = BODY_LIMBS[:BODY_LIMBS_DRAWN]
    present = _present(pts, scores, frame.threshold).tolist()
    px = (pts * np.array([float(w), float(h)])).tolist()  # pixels, still float (truncated at use)

    for i, (ja, jb) in enumerate(limbs):  # limb-major over persons, as the source loops
        a, b = ja - 1, jb - 1  # the limb lists are 1-based
        for n in range(frame.num_persons):
            if present[n][a] and present[n][b]:
                _draw_limb(canvas, px[n][a], px[n][b], _LIMB + i)

    # No dimming pass after the limbs: the palette entries of limb indices are the dimmed colours.
    for i in range(pts.shape[1]):
        for n in range(frame.num_persons):
            if present[n][i]:
                centre = (int(pts[n, i, 0] * w), int(pts[n, i, 1] * h))
                cv2.circle(canvas, centre, BODY_POINT_RADIUS, _BODY_POINT + i, thickness=-1)


def _draw_hands(canvas: np.ndarray, frame: OpenPoseFrame) -> None:
    h, w = canvas.shape[:2]
    # DWPose stacks all left hands, then all right hands (A.5); overlap order follows.
    for hand in list(frame.left_hands) + list(frame.right_hands):
        xs = [int(x * w) for x in hand[:, 0]]
        ys = [int(y * h) for y in hand[:, 1]]
        ok = [x > EPS and y > EPS for x, y in zip(xs, ys)]
        for k, (a, b) in enumerate(HAND_EDGES):
            if ok[a] and ok[b]:
                cv2.line(canvas, (xs[a], ys[a]), (xs[b], ys[b]), _HAND_EDGE + k, thickness=HAND_LINE_THICKNESS)
        for x, y, good in zip(xs, ys, ok):
            if good:
                cv2.circle(canvas, (x, y), HAND_POINT_RADIUS, _HAND_POINT, thickness=-1)


def _draw_faces(canvas: np.ndarray, frame: OpenPoseFrame) -> None:
    h, w = canvas.shape[:2]
    for face in frame.faces:
        for xf, yf in face:
            x, y = int(xf * w), int(yf * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), FACE_POINT_RADIUS, _FACE_POINT, thickness=-1)


def draw_pose_indices(frame: OpenPoseFrame, canvas: np.ndarray, style: PoseStyle = "unianimate") -> np.ndarray:
    """Draw one frame's poses into ``canvas`` (uint8 [H, W], all zeros) as palette indices;
    ``pose_palette(style)[canvas]`` is the ``draw_pose`` image. Returns ``canvas``."""
    if style not in POSE_STYLES:
        raise ValueError(f"unknown pose style {style!r}; expected one of {POSE_STYLES}")
    if canvas.ndim != 2 or canvas.dtype != np.uint8:
        raise ValueError(f"canvas must be uint8 [H, W], got {canvas.dtype} {canvas.shape}")
    unianimate = style == "unianimate"
    _draw_body(canvas, frame, with_feet=unianimate)
    _draw_hands(canvas, frame)
    if not unianimate:
        _draw_faces(canvas, frame)
    return canvas


def draw_pose(frame: OpenPoseFrame, height: int, width: int, style: PoseStyle = "unianimate") -> np.ndarray:
    """Render one frame's poses; returns uint8 [H, W, 3] in RGB channel order (see module doc)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    canvas = draw_pose_indices(frame, np.zeros((int(height), int(width)), np.uint8), style)
    # One lookup through a 3-channel table: twice as fast as numpy's palette[canvas].
    return cv2.LUT(cv2.merge((canvas, canvas, canvas)), pose_palette(style).reshape(256, 1, 3))


def draw_pose_sequence(
    frames: Sequence[OpenPoseFrame], height: int, width: int, style: PoseStyle = "unianimate"
) -> np.ndarray:
    """Render T frames; returns uint8 [T, H, W, 3] (T may be 0)."""
    if style not in POSE_STYLES:
        raise ValueError(f"unknown pose style {style!r}; expected one of {POSE_STYLES}")
    out = np.zeros((len(frames), int(height), int(width), 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = draw_pose(frame, height, width, style)
    return out


def resize_bilinear(image_hwC: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, C] -> uint8 [height, width, C]: torch's antialiased bilinear uint8 kernel,
    within one rounding step of torchvision's tensor resize and of PIL's bilinear (the release's)."""
    import torch  # imported where used: drawing and cached reruns need no torch
    import torch.nn.functional as F

    # A channels-last view in, a channels-last result out: no copies around the kernel.
    resized_1CHW = F.interpolate(
        torch.from_numpy(image_hwC)[None].permute(0, 3, 1, 2),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return resized_1CHW[0].permute(1, 2, 0).numpy()


def draw_pose_rows(
    frame: OpenPoseFrame,
    source_hw: tuple[int, int],
    out_hw: tuple[int, int],
    style: PoseStyle = "unianimate",
    crop: tuple[int, int, int, int] | None = None,
    canvas: np.ndarray | None = None,
) -> tuple[int, np.ndarray]:
    """The non-black rows of ``draw_pose_resized``'s image: (first row, uint8 [n, W, 3]).

    Same pixels, less work: torch's resize is a horizontal pass (rows independent) then a
    vertical one (columns independent), each rounded to uint8 (tests/preprocess/test_pose_scale.py
    checks the split is exact), so the horizontal pass runs over the drawn rows only and the
    vertical pass over the columns that hold something. ``canvas``: an optional reusable
    uint8 [h, w] buffer of the source size (its content is overwritten).
    """
    src_h, src_w = (int(v) for v in source_hw)
    out_h, out_w = (int(v) for v in out_hw)
    if min(src_h, src_w, out_h, out_w) <= 0:
        raise ValueError(f"sizes must be positive, got source {src_h}x{src_w}, output {out_h}x{out_w}")
    x0, y0, x1, y1 = crop if crop is not None else (0, 0, src_w, src_h)
    if not (0 <= x0 < x1 <= src_w and 0 <= y0 < y1 <= src_h):
        raise ValueError(f"crop {crop} is not a non-empty box inside the {src_w}x{src_h} source")
    if canvas is None or canvas.shape != (src_h, src_w):
        canvas = np.empty((src_h, src_w), np.uint8)
    canvas.fill(0)
    # Drawn on the whole source canvas and then cropped, as the release did: shapes cut by the
    # crop edge are cut the same way.
    indices = draw_pose_indices(frame, canvas, style)[y0:y1, x0:x1]
    _, top, _, band = cv2.boundingRect(indices)
    if not band:
        return 0, np.zeros((0, out_w, 3), np.uint8)
    # Three one-channel lookups and a merge: twice as fast as one three-channel lookup here.
    rgb = cv2.merge([cv2.LUT(indices[top : top + band], table) for table in _PLANE_PALETTES[style]])
    rows = resize_bilinear(rgb, band, out_w)  # the horizontal pass, drawn rows only
    left, _, cols, _ = cv2.boundingRect(rows.reshape(band, out_w * 3))
    if not cols:  # everything faded to black (a tiny drawing shrunk a lot)
        return 0, np.zeros((0, out_w, 3), np.uint8)
    c0, c1 = left // 3, -(-(left + cols) // 3)
    column = np.zeros((y1 - y0, c1 - c0, 3), np.uint8)
    column[top : top + band] = rows[:, c0:c1]
    block = resize_bilinear(column, out_h, c1 - c0)  # the vertical pass, used columns only
    _, first, _, count = cv2.boundingRect(block.reshape(out_h, -1))
    out = np.zeros((count, out_w, 3), np.uint8)
    out[:, c0:c1] = block[first : first + count]
    return first, out


def draw_pose_resized(
    frame: OpenPoseFrame,
    source_hw: tuple[int, int],
    out_hw: tuple[int, int],
    style: PoseStyle = "unianimate",
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The pose image the released weights saw (module doc, "Size"): drawn on a
    ``source_hw`` canvas (the frame the keypoints are normalised to), cut to ``crop``
    (x0, y0, x1, y1; None = all), resized to ``out_hw``. uint8 [H, W, 3] RGB."""
    first, rows = draw_pose_rows(frame, source_hw, out_hw, style, crop)
    out = np.zeros((int(out_hw[0]), int(out_hw[1]), 3), np.uint8)
    out[first : first + len(rows)] = rows
    return out
