"""Pose images at the release's scale (spec A.7): drawn on a canvas of the SOURCE frame's size
(stick width 4, radii 4, hand lines 2, all in source pixels), cut by the training crop, then
resized to the model size with torchvision's bilinear resize.

The reference is written literally: the drawing rules applied with cv2 on a 3-channel canvas
of the source size (``reference_draw_pose`` of tests/helpers/poses.py), a numpy crop, and
``torchvision.transforms.functional.resize(..., BILINEAR, antialias=True)`` on the uint8
tensor (antialias=True is torchvision's default for tensors since 0.17, and what its PIL path,
the one the release's loaders took, always does when shrinking).

Tolerance: every channel value within 1 and a mean difference below 0.02 (the observed
rate is under 0.005). Ours resizes with torch's uint8 kernel; torchvision's tensor resize
computes in float32 and rounds at the end, and PIL's bilinear (the release's actual path) uses
its own fixed-point kernel: each pair differs by one rounding step on a fraction of a percent
of the values, never more, so one step is the admissible difference. Drawing at the target
size instead, the bug this file guards against, is off by over 100 levels along whole limb
edges (mean 2.1, checked below).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocess import retarget
from preprocess.pose.convert import OpenPoseFrame, wholebody_to_openpose
from preprocess.pose.render import draw_pose, draw_pose_resized, draw_pose_rows, resize_bilinear
from tests.helpers.poses import MAX_DIFF, assert_close, crafted_person, reference_draw_pose, torchvision_resize

# (source w, h) -> (output w, h): landscape, portrait, an upscale, 4K.
SIZE_PAIRS = [
    ((1920, 1080), (832, 480)),
    ((1280, 720), (832, 480)),
    ((720, 1280), (480, 832)),
    ((640, 480), (832, 480)),
    ((3840, 2160), (832, 480)),
]


def release_image(frame: OpenPoseFrame, source_wh, out_wh, style: str, crop=None) -> np.ndarray:
    """Draw at the source size, crop, resize: the release's pose image (module docstring)."""
    (src_w, src_h), (out_w, out_h) = source_wh, out_wh
    x0, y0, x1, y1 = crop if crop is not None else (0, 0, src_w, src_h)
    return torchvision_resize(reference_draw_pose(frame, src_h, src_w, style)[y0:y1, x0:x1], out_h, out_w)


def random_persons(rng: np.random.Generator, width: int, height: int, persons: int = 2) -> tuple[np.ndarray, ...]:
    """Persons of a plausible size (points off the canvas, -1 placeholders, scores at the threshold)."""
    centres = rng.uniform(0.1, 0.9, (persons, 1, 2)) * [width, height]
    kp = centres + rng.normal(0.0, 0.12, (persons, 133, 2)) * min(width, height)
    kp[rng.random((persons, 133)) < 0.1] = -1.0
    sc = rng.uniform(0.0, 1.0, (persons, 133)).astype(np.float32)
    sc[rng.random((persons, 133)) < 0.1] = 0.3
    return kp, sc


def seed_crop(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The seed's crop (D.5): 0..W//14 px off the left and right, 0..H//14 off top and bottom."""
    left, right = rng.integers(0, width // 14 + 1, 2)
    top, bottom = rng.integers(0, height // 14 + 1, 2)
    return int(left), int(top), int(width - right), int(height - bottom)


@pytest.mark.parametrize(("source", "out"), SIZE_PAIRS, ids=[f"{s[0]}x{s[1]}-{o[0]}x{o[1]}" for s, o in SIZE_PAIRS])
def test_drawn_at_source_size_then_resized(source, out) -> None:
    rng = np.random.default_rng(source[0] + out[0])
    (src_w, src_h), (out_w, out_h) = source, out
    kp, sc = crafted_person()
    crafted = (kp * [src_w / 512, src_h / 512])[None], sc[None]  # the spread-out person of test_pose_render
    for keypoints, scores in (crafted, random_persons(rng, src_w, src_h), random_persons(rng, src_w, src_h, 3)):
        frame = wholebody_to_openpose(keypoints, scores, src_w, src_h)
        for style in ("unianimate", "dwpose"):
            for crop in (None, seed_crop(src_w, src_h, rng)):
                reference = release_image(frame, source, out, style, crop)
                assert reference.any()
                ours = draw_pose_resized(frame, (src_h, src_w), (out_h, out_w), style, crop)  # type: ignore[arg-type]
                assert_close(ours, reference)


def test_the_split_resize_is_the_one_pass_resize_exactly() -> None:
    # draw_pose_rows runs the horizontal pass over the drawn rows and the vertical pass over
    # the used columns: bit for bit torch's one-call resize of the whole cropped image.
    rng = np.random.default_rng(11)
    for (src_w, src_h), (out_w, out_h) in SIZE_PAIRS:
        frame = wholebody_to_openpose(*random_persons(rng, src_w, src_h), src_w, src_h)
        x0, y0, x1, y1 = crop = seed_crop(src_w, src_h, rng)
        whole = np.ascontiguousarray(draw_pose(frame, src_h, src_w)[y0:y1, x0:x1])
        ours = draw_pose_resized(frame, (src_h, src_w), (out_h, out_w), crop=crop)
        np.testing.assert_array_equal(ours, resize_bilinear(whole, out_h, out_w))
    # A tiny drawing shrunk 240 times (it may fade to black entirely).
    dot = wholebody_to_openpose(np.full((1, 133, 2), 1000.0), np.full((1, 133), 0.9), 3840, 2160)
    ours = draw_pose_resized(dot, (2160, 3840), (9, 16))
    np.testing.assert_array_equal(ours, resize_bilinear(draw_pose(dot, 2160, 3840), 9, 16))


def test_the_tolerance_catches_drawing_at_the_target_size() -> None:
    kp, sc = crafted_person()
    frame = wholebody_to_openpose((kp * [1920 / 512, 1080 / 512])[None], sc[None], 1920, 1080)
    reference = release_image(frame, (1920, 1080), (832, 480), "unianimate")
    at_target = draw_pose(frame, 480, 832, "unianimate")  # limbs 4 px wide at 832x480: too thick
    diff = np.abs(at_target.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() > 100 and (diff > MAX_DIFF).sum() > 1000


def test_pil_bilinear_is_the_same_resize_up_to_one_rounding_step() -> None:
    # The release resized PIL images; the tensor resize of the reference matches it within the tolerance.
    rng = np.random.default_rng(3)
    for (src_w, src_h), (out_w, out_h) in SIZE_PAIRS:
        frame = wholebody_to_openpose(*random_persons(rng, src_w, src_h), src_w, src_h)
        drawn = reference_draw_pose(frame, src_h, src_w, "unianimate")
        pil = np.asarray(Image.fromarray(drawn).resize((out_w, out_h), Image.BILINEAR))
        assert_close(pil, torchvision_resize(drawn, out_h, out_w))


def test_rows_cover_every_non_black_row_and_reuse_the_canvas() -> None:
    rng = np.random.default_rng(7)
    canvas = np.full((720, 1280), 77, np.uint8)  # stale content must not leak into the next image
    for _ in range(3):
        frame = wholebody_to_openpose(*random_persons(rng, 1280, 720, persons=1), 1280, 720)
        full = draw_pose_resized(frame, (720, 1280), (480, 832))
        first, rows = draw_pose_rows(frame, (720, 1280), (480, 832), canvas=canvas)
        nonblack = np.flatnonzero(full.any(axis=(1, 2)))
        assert first == nonblack[0] and len(rows) == nonblack[-1] + 1 - first
        np.testing.assert_array_equal(rows, full[first : first + len(rows)])
    first, rows = draw_pose_rows(OpenPoseFrame.empty(), (720, 1280), (480, 832), canvas=canvas)
    assert rows.shape == (0, 832, 3)
    with pytest.raises(ValueError):
        draw_pose_rows(frame, (720, 1280), (480, 832), crop=(0, 0, 1281, 720))


def test_retargeted_poses_are_drawn_at_the_reference_size() -> None:
    # One driving person standing still on a 1280x720 reference person: the job's pose images
    # are the reference image's poses drawn at 1280x720 and resized to the output size.
    kp, sc = crafted_person()
    ref_kp = (kp * [1280 / 512, 720 / 512])[None]
    ref_scores = sc[None].astype(np.float32)
    driving = retarget.Driving(
        keypoints=np.repeat(ref_kp[None] / 2, 3, axis=0).astype(np.float32),  # a 640x360 clip
        scores=np.repeat(ref_scores[None], 3, axis=0),
        label_map=np.ones((3, 360, 640), np.uint8),
        width=640,
        height=360,
    )
    inputs = retarget.prepare_inputs(driving, ref_kp, ref_scores, (1280, 720), (832, 480), None, "unianimate", 0.3)
    for t in range(3):
        frame = wholebody_to_openpose(inputs.keypoints[t], inputs.scores[t], 1280, 720)
        assert_close(inputs.pose[t], release_image(frame, (1280, 720), (832, 480), "unianimate"))
    reference = wholebody_to_openpose(ref_kp, ref_scores, 1280, 720)
    assert_close(inputs.ref_pose, release_image(reference, (1280, 720), (832, 480), "unianimate"))
