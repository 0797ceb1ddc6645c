"""Deterministic synthetic multi-person videos with exact ground truth.

The generator draws 0..9 articulated, human-like figures (an OpenPose-18
skeleton fleshed out with filled limbs) over a low-saturation textured
background. Everything is a pure function of :class:`SyntheticSpec` (seed
included), so tests and demos can check later pipeline stages (pose
estimation, segmentation, tracking, scene splitting) against the truth.

Ground-truth conventions
------------------------
* ``keypoints[t, p, k]`` is the pixel ``(x, y)`` of joint ``OPENPOSE_18[k]``
  of person ``p``. Figures face the camera, so a person's *right* side is on
  the *image left* (as in OpenPose).
* Figures are drawn farthest first without anti-aliasing (``cv2.LINE_8``)
  into both the frame and an integer label buffer, so ``masks[t, p]`` is
  exactly the set of pixels of person ``p`` that remain visible.
* Keypoint visibility rule: a keypoint is visible iff its rounded position is
  inside the frame AND at least one pixel of the person's own visible mask
  lies within 2 px (Chebyshev distance, i.e. the 5x5 window around it).
* Each person has three colours ``(shirt, trousers, skin)``; the "skin" slot
  is just a third distinct, saturated colour (not a realistic skin tone) so
  that every person is colour-separable from all others and the background.
* A scene cut (``scene_cut_frames``) swaps in a new background texture and
  re-lays-out the figures (position, depth, size, walking direction, phase);
  person identities and their colours stay the same so ``colours`` holds for
  the whole clip.
* Masks are stored in ``*.gt.npz`` bit-packed along the width axis
  (``np.packbits(masks, axis=-1)``, key ``masks_packed``); use
  :func:`load_ground_truth` to get boolean masks back.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from data_schemas.atomic import atomic_path
from preprocess.media import write_video
from preprocess.pose.convert import OPENPOSE_BODY_NAMES as OPENPOSE_18  # one list of joint names

KP = {name: i for i, name in enumerate(OPENPOSE_18)}
MOTIONS: tuple[str, ...] = ("walk", "wave", "dance")
MAX_PERSONS = 9
VISIBILITY_RADIUS_PX = 2

# Body proportions as fractions of the figure height S (ankle to top of head).
_THIGH, _SHIN = 0.24, 0.23
_TORSO, _NECK_TO_NOSE, _HEAD_R = 0.30, 0.10, 0.075
_SHOULDER_HALF, _HIP_HALF = 0.11, 0.065
_UPPER_ARM, _FOREARM = 0.16, 0.15
# Limb thicknesses (full width) as fractions of S.
_W_THIGH, _W_SHIN, _W_PELVIS = 0.085, 0.07, 0.09
_W_UPPER_ARM, _W_FOREARM, _W_NECK, _HAND_R = 0.065, 0.05, 0.05, 0.035

_SHIFT = 4  # cv2 sub-pixel bits: smooth motion while staying aliased (exact masks)
_SCALE = 1 << _SHIFT
_PART_SHIRT, _PART_TROUSERS, _PART_SKIN = 1, 2, 3
_BG_PAD = 12  # texture margin used by the slow background drift


class SyntheticSpec(BaseModel, frozen=True):
    """Parameters of one synthetic clip; the clip is a pure function of it."""

    width: int = Field(256, ge=32, le=4096, description="Frame width in pixels (even, >= 32).")
    height: int = Field(192, ge=32, le=4096, description="Frame height in pixels (even, >= 32).")
    fps: float = Field(25.0, gt=0.0, le=240.0, description="Frame rate of the clip.")
    num_frames: int = Field(50, ge=1, le=100_000, description="Number of frames.")
    num_persons: int = Field(2, ge=0, le=MAX_PERSONS, description="Number of figures (0 = background only).")
    seed: int = Field(0, ge=0, description="Random seed; the clip is deterministic given the spec.")
    motions: tuple[str, ...] | None = Field(
        None,
        description="Motion per person from ('walk', 'wave', 'dance'); None cycles through them.",
    )
    background: Literal["texture", "flat"] = Field(
        "texture",
        description="'texture': drifting low-saturation texture; 'flat': one uniform grey per scene, "
        "static (the persons are then the only content, as in the learning check)",
    )
    walk_speed: float | None = Field(
        None,
        gt=0.0,
        description="Walkers' speed in frame widths per second (they turn at the edges, so position "
        "does not tell direction); None: they cross ~2/3 of the width once per scene.",
    )
    scene_cut_frames: tuple[int, ...] = Field(
        (),
        description="Strictly increasing frame indices (1..num_frames-1) that start a new scene "
        "(new background, figures re-laid-out).",
    )

    @field_validator("width", "height")
    @classmethod
    def _even(cls, v: int, info: ValidationInfo) -> int:
        # yuv420p (what write_video encodes) needs even frame sizes.
        if v % 2:
            raise ValueError(f"{info.field_name} must be even, got {v}")
        return v

    @field_validator("fps")
    @classmethod
    def _finite_fps(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"fps must be finite, got {v}")
        return v

    @field_validator("motions")
    @classmethod
    def _known_motions(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None:
            bad = [m for m in v if m not in MOTIONS]
            if bad:
                raise ValueError(f"motions: unknown motion(s) {bad}; choose from {MOTIONS}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticSpec:
        if self.motions is not None and len(self.motions) != self.num_persons:
            raise ValueError(f"motions has {len(self.motions)} entries but num_persons is {self.num_persons}")
        cuts = self.scene_cut_frames
        if any(not 1 <= c < self.num_frames for c in cuts):
            raise ValueError(f"scene_cut_frames must lie in 1..num_frames-1, got {cuts}")
        if any(b <= a for a, b in itertools.pairwise(cuts)):
            raise ValueError(f"scene_cut_frames must be strictly increasing, got {cuts}")
        return self

    def person_motions(self) -> tuple[str, ...]:
        """Motion of each person (explicit, or cycling through MOTIONS)."""
        if self.motions is not None:
            return self.motions
        return tuple(MOTIONS[i % len(MOTIONS)] for i in range(self.num_persons))


@dataclass
class SyntheticClip:
    """Rendered frames plus exact per-frame ground truth (see module docstring)."""

    frames: np.ndarray | None  # uint8 [T,H,W,3] RGB; None when loaded from ground truth
    keypoints: np.ndarray  # float32 [T,P,18,2] pixel (x, y), OPENPOSE_18 order
    keypoint_visible: np.ndarray  # bool [T,P,18]
    masks: np.ndarray  # bool [T,P,H,W] visible pixels of each person
    colours: np.ndarray  # uint8 [P,3,3] RGB (shirt, trousers, skin)
    depth_order: np.ndarray  # int32 [T,P] draw rank, 0 = drawn first = farthest
    spec: SyntheticSpec

    def label_map(self) -> np.ndarray:
        """uint8 [T,H,W]: 0 = background, k = person k (1-based)."""
        t, p, h, w = self.masks.shape
        labels = np.zeros((t, h, w), np.uint8)
        for i in range(p):
            labels[self.masks[:, i]] = i + 1
        return labels


# --------------------------------------------------------------------------- colours


def _palette_candidates() -> np.ndarray:
    """Saturated RGB candidates (float [N,3]); all far from any grey."""
    cands = []
    for hue in range(0, 360, 15):
        for sat, val in ((1.0, 1.0), (0.85, 0.78), (1.0, 0.62)):
            hsv = np.array([[[hue / 2, sat * 255, val * 255]]], np.uint8)  # OpenCV hue is 0..179
            cands.append(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    return np.unique(np.array(cands, np.float32), axis=0)


def _person_colours(num_persons: int, rng: np.random.Generator) -> np.ndarray:
    """Pick 3 colours per person by farthest-point sampling so all are well separated."""
    if num_persons == 0:
        return np.zeros((0, 3, 3), np.uint8)
    cands = _palette_candidates()
    chosen = [int(rng.integers(len(cands)))]
    min_d = np.linalg.norm(cands - cands[chosen[0]], axis=1)
    for _ in range(3 * num_persons - 1):
        nxt = int(np.argmax(min_d))
        chosen.append(nxt)
        min_d = np.minimum(min_d, np.linalg.norm(cands - cands[nxt], axis=1))
    picked = cands[rng.permutation(chosen)]
    return picked.reshape(num_persons, 3, 3).astype(np.uint8)


# ------------------------------------------------------------------------ background


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Unit-ish noise with features of roughly ``cell`` pixels (bicubic upsampling)."""
    coarse = rng.normal(size=(h // cell + 3, w // cell + 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _background_texture(rng: np.random.Generator, h: int, w: int, base_level: float) -> np.ndarray:
    """Low-saturation texture (uint8 [h+2pad, w+2pad, 3]): smooth noise plus gentle stripes."""
    hh, ww = h + 2 * _BG_PAD, w + 2 * _BG_PAD
    lum = float(base_level)
    lum = lum + 16.0 * _smooth_noise(rng, hh, ww, 24) + 5.0 * _smooth_noise(rng, hh, ww, 4)
    theta, period = rng.uniform(0, np.pi), rng.uniform(18, 48)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    lum += 8.0 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 6.3))
    # A faint tint keeps it from being pure grey while staying far from the saturated figure colours.
    tint = rng.uniform(-10, 10, size=3).astype(np.float32)
    chroma = np.stack([3.0 * _smooth_noise(rng, hh, ww, 32) for _ in range(3)], axis=-1)
    rgb = lum[..., None] + tint + chroma
    return np.clip(rgb, 30, 225).astype(np.uint8)


@dataclass(frozen=True)
class _Scene:
    start: int
    length: int
    texture: np.ndarray
    drift_amp: tuple[float, float]
    drift_freq: float
    drift_phase: tuple[float, float]
    layouts: tuple[_PersonLayout, ...]

    def background(self, local_frame: int, h: int, w: int) -> np.ndarray:
        # Bounded sinusoidal drift (< 0.5 px/frame) so the video is not static.
        ang = self.drift_freq * local_frame
        ox = _BG_PAD + int(round(self.drift_amp[0] * math.sin(ang + self.drift_phase[0])))
        oy = _BG_PAD + int(round(self.drift_amp[1] * math.sin(ang + self.drift_phase[1])))
        return self.texture[oy : oy + h, ox : ox + w]


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class _PersonLayout:
    motion: str
    home_x: float  # crossing point for walkers, standing position otherwise (px)
    direction: float  # +1 walks right, -1 walks left
    speed: float  # px / s
    size: float  # figure height (px) at depth 0
    depth_base: float  # 0 = nearest .. 1 = farthest
    depth_amp: float
    depth_freq: float  # rad / s
    phase: float
    tempo: float  # rad / s of the motion cycle
    track_offset: float = 0.0  # px along the walker's back-and-forth track (walk_speed clips)


def _scene_layouts(spec: SyntheticSpec, rng: np.random.Generator, length: int) -> tuple[_PersonLayout, ...]:
    """Random but structured placement: walkers cross mid-scene, others are spread out."""
    n, w, h = spec.num_persons, spec.width, spec.height
    motions = spec.person_motions()
    duration = max(length - 1, 1) / spec.fps
    # Walkers travel ~2/3 of the width during the scene (clamped for very short/long scenes).
    speed = float(np.clip(0.65 * w / duration, 0.1 * w, 0.45 * w)) if spec.walk_speed is None else spec.walk_speed * w
    ranks = rng.permutation(n)
    size0 = 0.62 * h * min(1.0, math.sqrt(2.5 / max(n, 1)))
    walkers = [i for i in range(n) if motions[i] == "walk"]
    first_dir = float(rng.choice([-1.0, 1.0]))
    static = [i for i in range(n) if motions[i] != "walk"]
    slots = rng.permutation(len(static))
    layouts: list[_PersonLayout] = []
    for i in range(n):
        if motions[i] == "walk":
            k = walkers.index(i)
            home_x = w * (0.5 + rng.uniform(-0.05, 0.05))
            direction = first_dir if k % 2 == 0 else -first_dir  # opposite directions -> crossing
        else:
            slot = slots[static.index(i)]
            home_x = w * (0.12 + 0.76 * (slot + 0.5) / len(static) + rng.uniform(-0.03, 0.03))
            direction = 1.0
        layouts.append(
            _PersonLayout(
                motion=motions[i],
                home_x=home_x,
                direction=direction,
                speed=speed * rng.uniform(0.9, 1.1),
                size=size0 * rng.uniform(0.9, 1.1),
                depth_base=(ranks[i] + 0.5) / n,
                depth_amp=0.6 / n,
                depth_freq=rng.uniform(0.8, 2.0),
                phase=rng.uniform(0, 2 * np.pi),
                tempo=2 * np.pi * rng.uniform(1.0, 1.5),
            )
        )
    if spec.walk_speed is not None:
        # walkers of a given speed start anywhere along their back-and-forth track, so neither position
        # nor the scene's timing tells where they go (an own stream: other clips keep their draws)
        track = np.random.default_rng(int(rng.integers(2**32))).uniform(0, 4 * 0.42 * w, size=n)
        layouts = [dataclasses.replace(lay, track_offset=float(o)) for lay, o in zip(layouts, track)]
    return tuple(layouts)


def _fold(x: float, half: float) -> float:
    """Reflect x into [-half, half] (walkers turn around instead of leaving forever)."""
    period = 4 * half
    y = (x + half) % period
    return (y if y <= 2 * half else period - y) - half


def _rot(v: tuple[float, float], ang: float) -> np.ndarray:
    c, s = math.cos(ang), math.sin(ang)
    return np.array([v[0] * c - v[1] * s, v[0] * s + v[1] * c])


def _limb(start: np.ndarray, angle: float, length: float, side: float, lean: float = 0.0) -> np.ndarray:
    """Joint at ``length`` from ``start``; angle is outward from straight down (rad)."""
    return start + length * _rot((side * math.sin(angle), math.cos(angle)), lean)


@dataclass(frozen=True)
class _Angles:
    dx: float = 0.0  # hip-centre offset (fractions of S)
    dy: float = 0.0
    lean: float = 0.0  # torso tilt (rad)
    head: float = 0.0  # extra head tilt (rad)
    upper_r: float = 0.2  # outward angles from straight down (rad)
    fore_r: float = 0.3
    upper_l: float = 0.2
    fore_l: float = 0.3
    thigh_r: float = 0.08
    shin_r: float = 0.05
    thigh_l: float = 0.08
    shin_l: float = 0.05


def _motion_angles(motion: str, t: float, lay: _PersonLayout) -> _Angles:
    ph = lay.tempo * t + lay.phase
    s = math.sin(ph)
    if motion == "walk":
        return _Angles(
            dy=-0.02 * abs(s),
            lean=0.04 * math.sin(2 * ph),
            upper_r=0.22 - 0.25 * s,
            fore_r=0.45 - 0.25 * s,
            upper_l=0.22 + 0.25 * s,
            fore_l=0.45 + 0.25 * s,
            thigh_r=0.12 + 0.28 * s,
            shin_r=0.12 + 0.28 * s - 0.15 * max(0.0, s),
            thigh_l=0.12 - 0.28 * s,
            shin_l=0.12 - 0.28 * s - 0.15 * max(0.0, -s),
        )
    if motion == "wave":
        wave = math.sin(1.6 * ph)
        return _Angles(
            dx=0.03 * math.sin(0.3 * ph),
            head=0.1 * math.sin(0.5 * ph),
            upper_r=2.25 + 0.1 * wave,
            fore_r=2.65 + 0.45 * wave,
            upper_l=0.15,
            fore_l=0.2,
        )
    if motion == "dance":
        c = math.cos(ph)
        return _Angles(
            dx=0.08 * math.sin(0.5 * ph),
            dy=-0.06 * abs(s),
            lean=0.18 * math.sin(0.5 * ph),
            head=-0.1 * math.sin(0.5 * ph),
            upper_r=1.3 + 0.9 * s,
            fore_r=1.6 + 1.1 * s,
            upper_l=1.3 + 0.9 * c,
            fore_l=1.6 + 1.1 * c,
            thigh_r=0.25 + 0.12 * s,
            shin_r=0.15 + 0.12 * s,
            thigh_l=0.25 - 0.12 * s,
            shin_l=0.15 - 0.12 * s,
        )
    raise ValueError(f"unknown motion {motion!r}")


def _depth(lay: _PersonLayout, t: float) -> float:
    return lay.depth_base + lay.depth_amp * math.sin(lay.depth_freq * t + lay.phase)


def _pose(lay: _PersonLayout, t: float, t_mid: float, spec: SyntheticSpec) -> tuple[np.ndarray, float, float]:
    """Forward kinematics: returns (keypoints [18,2], depth, figure height S in px)."""
    w, h = spec.width, spec.height
    depth = _depth(lay, t)
    size = lay.size * (1.0 - 0.25 * depth)  # farther figures are smaller and stand higher
    # Crowds spread further in depth so that they use more of the frame height.
    feet_y = h * (0.94 - (0.16 if spec.num_persons <= 3 else 0.3) * depth)
    x = lay.home_x
    if lay.motion == "walk":
        x += _fold(lay.direction * lay.speed * (t - t_mid) + lay.track_offset, 0.42 * w)
    a = _motion_angles(lay.motion, t, lay)
    hip = np.array([x + a.dx * size, feet_y - (_THIGH + _SHIN) * size + a.dy * size])
    up, right = _rot((0.0, -1.0), a.lean), _rot((1.0, 0.0), a.lean)
    kp = np.zeros((18, 2))
    neck = hip + _TORSO * size * up
    kp[KP["neck"]] = neck
    # Facing the camera: the person's right side (side=-1) is on the image left.
    for side, pre, upper, fore, thigh, shin in (
        (-1.0, "r_", a.upper_r, a.fore_r, a.thigh_r, a.shin_r),
        (1.0, "l_", a.upper_l, a.fore_l, a.thigh_l, a.shin_l),
    ):
        sh = neck + side * _SHOULDER_HALF * size * right
        el = _limb(sh, upper, _UPPER_ARM * size, side, a.lean)
        kp[KP[pre + "shoulder"]], kp[KP[pre + "elbow"]] = sh, el
        kp[KP[pre + "wrist"]] = _limb(el, fore, _FOREARM * size, side, a.lean)
        hp = hip + side * _HIP_HALF * size * right
        kn = _limb(hp, thigh, _THIGH * size, side)  # legs in world frame: feet stay down
        kp[KP[pre + "hip"]], kp[KP[pre + "knee"]] = hp, kn
        kp[KP[pre + "ankle"]] = _limb(kn, shin, _SHIN * size, side)
    head_tilt = a.lean + a.head
    nose = neck + _NECK_TO_NOSE * size * _rot((0.0, -1.0), head_tilt)
    kp[KP["nose"]] = nose
    for side, pre in ((-1.0, "r_"), (1.0, "l_")):
        kp[KP[pre + "eye"]] = nose + size * _rot((side * 0.03, -0.03), head_tilt)
        kp[KP[pre + "ear"]] = nose + size * _rot((side * 0.06, -0.01), head_tilt)
    return kp, depth, size


def _fx(p: np.ndarray) -> tuple[int, int]:
    """Point in cv2 fixed-point (``_SHIFT`` fractional bits)."""
    return int(round(p[0] * _SCALE)), int(round(p[1] * _SCALE))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(1e-6, float(np.linalg.norm(v)))


def _thick(size: float, frac: float) -> int:
    return max(2, int(round(frac * size)))


def _draw_figure(parts: np.ndarray, kp: np.ndarray, size: float) -> None:
    """Draw one figure into ``parts`` (uint8 [H,W]) as part ids 1=shirt, 2=trousers, 3=skin.

    LINE_8 (no anti-aliasing) keeps every pixel fully owned by one part, so
    masks derived from the same raster are exact.
    """
    k = KP

    def line(a: str, b: str, part: int, frac: float) -> None:
        cv2.line(parts, _fx(kp[k[a]]), _fx(kp[k[b]]), part, _thick(size, frac), cv2.LINE_8, _SHIFT)

    def disc(centre: np.ndarray, radius: float, part: int) -> None:
        r = max(1.0, radius)
        cv2.circle(parts, _fx(centre), int(round(r * _SCALE)), part, -1, cv2.LINE_8, _SHIFT)

    line("r_hip", "l_hip", _PART_TROUSERS, _W_PELVIS)
    for pre in ("r_", "l_"):
        line(pre + "hip", pre + "knee", _PART_TROUSERS, _W_THIGH)
        line(pre + "knee", pre + "ankle", _PART_TROUSERS, _W_SHIN)
    widen = 0.02 * size * _unit(kp[k["l_hip"]] - kp[k["r_hip"]])  # torso slightly wider than the hip joints
    torso = np.array(
        [_fx(kp[k["r_shoulder"]]), _fx(kp[k["l_shoulder"]]), _fx(kp[k["l_hip"]] + widen), _fx(kp[k["r_hip"]] - widen)],
        np.int32,
    )
    cv2.fillConvexPoly(parts, torso, _PART_SHIRT, cv2.LINE_8, _SHIFT)
    for pre in ("r_", "l_"):
        line(pre + "shoulder", pre + "elbow", _PART_SHIRT, _W_UPPER_ARM)
        line(pre + "elbow", pre + "wrist", _PART_SKIN, _W_FOREARM)
        disc(kp[k[pre + "wrist"]], _HAND_R * size, _PART_SKIN)
    head_centre = kp[k["nose"]] + 0.015 * size * _unit(kp[k["nose"]] - kp[k["neck"]])
    cv2.line(parts, _fx(kp[k["neck"]]), _fx(head_centre), _PART_SKIN, _thick(size, _W_NECK), cv2.LINE_8, _SHIFT)
    disc(head_centre, _HEAD_R * size, _PART_SKIN)


def _keypoint_visibility(kp: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    """Documented rule: rounded point inside the frame and own pixels within 2 px."""
    h, w = labels.shape
    r = VISIBILITY_RADIUS_PX
    vis = np.zeros(len(kp), bool)
    for j, (x, y) in enumerate(np.rint(kp).astype(int)):
        if 0 <= x < w and 0 <= y < h:
            win = labels[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            vis[j] = bool((win == label).any())
    return vis


# ------------------------------------------------------------------------- rendering


def _scenes(spec: SyntheticSpec) -> list[_Scene]:
    bounds = [0, *spec.scene_cut_frames, spec.num_frames]
    # Consecutive scenes alternate dark and bright backgrounds (90 levels apart), so every
    # cut scores well above ffmpeg's usual scene thresholds, as real hard cuts do.
    first_bright = int(np.random.default_rng([spec.seed, 2]).integers(0, 2))
    scenes = []
    for s, (start, stop) in enumerate(itertools.pairwise(bounds)):
        rng = np.random.default_rng([spec.seed, 100 + s])  # independent stream per scene
        level = 75.0 + 90.0 * ((first_bright + s) % 2)
        texture = _background_texture(rng, spec.height, spec.width, level)
        amp = (float(rng.uniform(3, _BG_PAD - 1)), float(rng.uniform(2, _BG_PAD - 1)))
        if spec.background == "flat":  # the same draws as a texture, so the figures do not change
            texture, amp = np.full_like(texture, int(level)), (0.0, 0.0)
        scenes.append(
            _Scene(
                start=start,
                length=stop - start,
                texture=texture,
                drift_amp=amp,
                drift_freq=float(rng.uniform(0.02, 0.04)),
                drift_phase=(float(rng.uniform(0, 6.3)), float(rng.uniform(0, 6.3))),
                layouts=_scene_layouts(spec, rng, stop - start),
            )
        )
    return scenes


def render_clip(spec: SyntheticSpec) -> SyntheticClip:
    """Render the clip described by ``spec`` together with its exact ground truth."""
    t_n, p_n, h, w = spec.num_frames, spec.num_persons, spec.height, spec.width
    colours = _person_colours(p_n, np.random.default_rng([spec.seed, 1]))
    frames = np.empty((t_n, h, w, 3), np.uint8)
    keypoints = np.zeros((t_n, p_n, 18, 2), np.float32)
    visible = np.zeros((t_n, p_n, 18), bool)
    masks = np.zeros((t_n, p_n, h, w), bool)
    depth_order = np.zeros((t_n, p_n), np.int32)
    # Part ids 1..3 index into each person's colours; row 0 is unused.
    luts = [np.concatenate([np.zeros((1, 3), np.uint8), colours[p]]) for p in range(p_n)]
    for scene in _scenes(spec):
        t_mid = (scene.length - 1) / 2 / spec.fps
        for lf in range(scene.length):
            t = scene.start + lf
            secs = lf / spec.fps
            frame = scene.background(lf, h, w).copy()
            labels = np.zeros((h, w), np.uint8)
            poses = [_pose(lay, secs, t_mid, spec) for lay in scene.layouts]
            order = np.argsort([-d for _, d, _ in poses], kind="stable")  # farthest first
            for rank, p in enumerate(order):
                kp, _, size = poses[p]
                keypoints[t, p] = kp
                depth_order[t, p] = rank
                parts = np.zeros((h, w), np.uint8)
                _draw_figure(parts, kp, size)
                on = parts > 0
                frame[on] = luts[p][parts[on]]
                labels[on] = p + 1
            for p in range(p_n):
                masks[t, p] = labels == p + 1
                visible[t, p] = _keypoint_visibility(keypoints[t, p], labels, p + 1)
            frames[t] = frame
    return SyntheticClip(frames, keypoints, visible, masks, colours, depth_order, spec)


# ------------------------------------------------------------------------------- I/O


def save_ground_truth(clip: SyntheticClip, path: Path) -> Path:
    """Write the clip's ground truth (no frames) to a compressed npz, atomically.

    Masks are stored bit-packed along the width axis as ``masks_packed``; read
    them back with :func:`load_ground_truth`.
    """
    path = Path(path)
    spec = clip.spec
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object stops numpy from appending ".npz"
        np.savez_compressed(
            fh,
            keypoints=clip.keypoints.astype(np.float32),
            keypoint_visible=clip.keypoint_visible.astype(bool),
            masks_packed=np.packbits(clip.masks, axis=-1),
            colours=clip.colours.astype(np.uint8),
            depth_order=clip.depth_order.astype(np.int32),
            fps=np.float64(spec.fps),
            width=np.int64(spec.width),
            height=np.int64(spec.height),
            keypoint_names=np.array(OPENPOSE_18),
            spec_json=np.array(spec.model_dump_json()),
        )
    return path


def load_ground_truth(path: Path) -> SyntheticClip:
    """Read a ``save_ground_truth`` file back; the returned clip has ``frames=None``."""
    with np.load(Path(path), allow_pickle=False) as z:
        width = int(z["width"])
        masks = np.unpackbits(z["masks_packed"], axis=-1, count=width).astype(bool)
        return SyntheticClip(
            frames=None,
            keypoints=z["keypoints"],
            keypoint_visible=z["keypoint_visible"],
            masks=masks,
            colours=z["colours"],
            depth_order=z["depth_order"],
            spec=SyntheticSpec.model_validate_json(str(z["spec_json"])),
        )


def make_synthetic_video(spec: SyntheticSpec, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Render ``spec`` and write ``<out_dir>/<name>.mp4`` and ``<out_dir>/<name>.gt.npz``."""
    out_dir = Path(out_dir)
    clip = render_clip(spec)
    video = write_video(clip.frames, out_dir / f"{name}.mp4", spec.fps)  # type: ignore[arg-type]
    gt = save_ground_truth(clip, out_dir / f"{name}.gt.npz")
    return video, gt


_SAMPLE_SIZES = ((256, 192), (320, 240), (192, 256), (288, 224))


def make_sample_folder(folder: Path, num_videos: int = 4, seed: int = 0, **spec_overrides: Any) -> list[Path]:
    """Write a small deterministic demo folder ``sample_XX.mp4`` (+ ``.gt.npz`` each).

    Videos vary in person count (1..3), motions and frame size; every third one
    has a scene cut. ``spec_overrides`` (e.g. ``num_frames=10``) apply to all.
    Returns the video paths.
    """
    rng = np.random.default_rng([seed, 7])
    videos = []
    for i in range(num_videos):
        w, h = _SAMPLE_SIZES[i % len(_SAMPLE_SIZES)]
        drawn_frames = int(rng.integers(40, 61))
        drawn_motions = tuple(str(m) for m in rng.choice(MOTIONS, size=MAX_PERSONS))  # fixed draw count
        fields: dict[str, Any] = dict(
            width=w, height=h, num_frames=drawn_frames, num_persons=1 + i % 3, seed=seed * 1000 + i
        )
        fields.update(spec_overrides)
        # Derived fields follow any overridden person/frame counts so the spec stays valid.
        nf, n = fields["num_frames"], fields["num_persons"]
        fields.setdefault("motions", drawn_motions[:n])
        fields.setdefault("scene_cut_frames", (nf // 2,) if i % 3 == 2 and nf >= 2 else ())
        video, _ = make_synthetic_video(SyntheticSpec(**fields), Path(folder), f"sample_{i:02d}")
        videos.append(video)
    return videos


# OpenPose-18 index -> COCO-WholeBody index (the neck has no WholeBody slot of its own).
OPENPOSE_TO_WHOLEBODY = {
    0: 0,
    2: 6,
    3: 8,
    4: 10,
    5: 5,
    6: 7,
    7: 9,
    8: 12,
    9: 14,
    10: 16,
    11: 11,
    12: 13,
    13: 15,
    14: 2,
    15: 1,
    16: 4,
    17: 3,
}


def ground_truth_poses(clip: SyntheticClip, seed: int = 0, keep=None) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Pose-stage arrays (layout of data_schemas.pose) made from the ground truth, as a perfect
    detector would give them: only figures with visible pixels (and ``keep(t, p)``), in a
    shuffled order every frame (detectors promise no order). Returns the arrays and
    origin[t][row] = the figure of each pose row."""
    rng = np.random.default_rng(seed)
    num_frames, persons = clip.keypoints.shape[:2]
    keypoints = np.full((num_frames, persons, 133, 2), -1, np.float32)
    scores = np.zeros((num_frames, persons, 133), np.float32)
    boxes = np.zeros((num_frames, persons, 4), np.float32)
    counts = np.zeros(num_frames, np.int32)
    origin: list[list[int]] = []
    for t in range(num_frames):
        present = [p for p in range(persons) if clip.masks[t, p].any() and (keep is None or keep(t, p))]
        rng.shuffle(present)
        origin.append(present)
        counts[t] = len(present)
        for row, p in enumerate(present):
            for op, wb in OPENPOSE_TO_WHOLEBODY.items():
                keypoints[t, row, wb] = clip.keypoints[t, p, op]
                scores[t, row, wb] = 0.9 if clip.keypoint_visible[t, p, op] else 0.0
            ys, xs = np.nonzero(clip.masks[t, p])
            boxes[t, row] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    arrays = {
        "keypoints": keypoints,
        "scores": scores,
        "boxes": boxes,
        "box_scores": (counts[:, None] > np.arange(persons)) * np.float32(0.9),
        "num_persons": counts,
        "width": np.int32(clip.spec.width),
        "height": np.int32(clip.spec.height),
    }
    return arrays, origin


def write_ground_truth_stage_files(clip: SyntheticClip, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``poses.npz`` and ``masks.npz`` in the pose and segment stages' layouts, made from the
    clip's ground truth (a perfect detector and tracker): generation jobs can be driven by a
    synthetic clip without real models."""
    from data_schemas.arrays import write_npz

    folder = Path(folder)
    poses, origin = ground_truth_poses(clip, seed=seed)
    num_frames, num_persons = clip.keypoints.shape[:2]
    pose_index = np.full((num_frames, num_persons), -1, np.int16)
    for t, rows in enumerate(origin):
        for row, person in enumerate(rows):
            pose_index[t, person] = row
    write_npz(folder / "poses.npz", **poses)
    write_npz(
        folder / "masks.npz",
        label_map=clip.label_map(),
        pose_index=pose_index,
        first_frame=np.zeros(num_persons, np.int32),
        source=np.array("ground-truth"),
    )
    return folder / "poses.npz", folder / "masks.npz"


def write_demo_job_inputs(folder: Path, seed: int, size: int, num_frames: int) -> tuple[Path, Path, Path, Path]:
    """A new two-person synthetic video with its ground-truth poses and masks (``folder/driving/``),
    and a reference image of two other persons with its ground-truth poses (``folder/reference/``):
    returns (reference image, its poses, driving poses, driving masks)."""
    folder = Path(folder)
    drive = render_clip(
        SyntheticSpec(width=size, height=size, num_frames=num_frames, num_persons=2, seed=seed * 1000 + 901)
    )
    write_video(drive.frames, folder / "driving" / "driving.mp4", fps=25.0)
    poses, masks = write_ground_truth_stage_files(drive, folder / "driving")
    ref = render_clip(SyntheticSpec(width=size, height=size, num_frames=1, num_persons=2, seed=seed * 1000 + 902))
    (folder / "reference").mkdir(parents=True, exist_ok=True)
    reference = folder / "reference" / "reference.png"
    cv2.imwrite(str(reference), ref.frames[0][..., ::-1])
    ref_poses, _ = write_ground_truth_stage_files(ref, folder / "reference")
    return reference, ref_poses, poses, masks
