"""Tests for the synthetic multi-person video generator (preprocess/synthetic.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from preprocess import media
from preprocess.media import write_video
from preprocess.synthetic import (
    KP,
    OPENPOSE_18,
    SyntheticSpec,
    load_ground_truth,
    make_sample_folder,
    make_synthetic_video,
    render_clip,
    save_ground_truth,
)

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def _decode(path: Path, width: int, height: int) -> np.ndarray:
    """Decode an mp4 to uint8 [T,H,W,3] RGB through an ffmpeg pipe."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def _kernel(radius: int) -> np.ndarray:
    return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)


def _near(mask: np.ndarray, x: float, y: float, radius: int = 2) -> bool:
    xi, yi = int(round(x)), int(round(y))
    return bool(mask[max(0, yi - radius) : yi + radius + 1, max(0, xi - radius) : xi + radius + 1].any())


def _min_dist(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Per-pixel L2 distance (RGB) to the nearest of ``colours``."""
    d = np.linalg.norm(pixels[:, None, :].astype(np.float32) - colours[None].astype(np.float32), axis=-1)
    return d.min(axis=1)


@pytest.fixture(scope="module")
def clip3():
    return render_clip(SyntheticSpec(width=320, height=240, num_frames=30, num_persons=3, seed=3))


@pytest.fixture(scope="module")
def crossing():
    return render_clip(SyntheticSpec(num_frames=50, num_persons=2, motions=("walk", "walk"), seed=5))


# ------------------------------------------------------------------------ spec / API


def test_openpose_order():
    assert len(OPENPOSE_18) == 18 and OPENPOSE_18[:2] == ("nose", "neck") and OPENPOSE_18[-1] == "l_ear"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 255}, "width"),
        ({"height": 16}, "height"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_persons": 10}, "num_persons"),
        ({"fps": 0}, "fps"),
        ({"num_persons": 2, "motions": ("walk",)}, "motions"),
        ({"num_persons": 1, "motions": ("jump",)}, "motions"),
        ({"num_frames": 10, "scene_cut_frames": (10,)}, "scene_cut_frames"),
        ({"num_frames": 10, "scene_cut_frames": (5, 3)}, "scene_cut_frames"),
    ],
)
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**kwargs)


def test_spec_is_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        SyntheticSpec().width = 64  # type: ignore[misc]


@pytest.mark.parametrize("n", [0, 1, 2, 9])
def test_shapes_and_dtypes(n):
    spec = SyntheticSpec(num_persons=n, num_frames=4, seed=n)
    c = render_clip(spec)
    t, h, w = 4, spec.height, spec.width
    assert c.frames.shape == (t, h, w, 3) and c.frames.dtype == np.uint8
    assert c.keypoints.shape == (t, n, 18, 2) and c.keypoints.dtype == np.float32
    assert c.keypoint_visible.shape == (t, n, 18) and c.keypoint_visible.dtype == bool
    assert c.masks.shape == (t, n, h, w) and c.masks.dtype == bool
    assert c.colours.shape == (n, 3, 3) and c.colours.dtype == np.uint8
    assert c.depth_order.shape == (t, n) and np.issubdtype(c.depth_order.dtype, np.integer)
    for row in c.depth_order:
        assert sorted(row.tolist()) == list(range(n))
    # Visible masks never overlap, and the label map is consistent with them.
    assert (c.masks.sum(axis=1) <= 1).all()
    labels = c.label_map()
    assert labels.shape == (t, h, w) and labels.dtype == np.uint8
    assert ((labels > 0) == c.masks.any(axis=1)).all()
    if n:
        assert all((labels[c.masks[:, p]] == p + 1).all() for p in range(n))
        assert c.masks.any(axis=(0, 2, 3)).all(), "every person is visible somewhere"


def test_determinism():
    spec = SyntheticSpec(num_frames=8, num_persons=3, seed=11, scene_cut_frames=(4,))
    a, b = render_clip(spec), render_clip(spec)
    for name in ("frames", "keypoints", "keypoint_visible", "masks", "colours", "depth_order"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    other = render_clip(spec.model_copy(update={"seed": 12}))
    assert np.abs(a.frames.astype(int) - other.frames.astype(int)).mean() > 5


def test_figures_move_and_video_not_static(clip3):
    hips = clip3.keypoints[:, :, [KP["r_hip"], KP["l_hip"]]].mean(axis=2)  # [T,P,2]
    travel = np.linalg.norm(hips[-1] - hips[0], axis=-1)
    wrist_spread = clip3.keypoints[:, :, KP["r_wrist"]].std(axis=0).max(axis=-1)
    assert (np.maximum(travel, wrist_spread) > 3).all(), "every figure moves"
    bg = ~clip3.masks.any(axis=1)
    assert (clip3.frames[0][bg[0] & bg[-1]] != clip3.frames[-1][bg[0] & bg[-1]]).any(), "background drifts"


def test_colours_distinct_and_saturated():
    c = render_clip(SyntheticSpec(num_persons=9, num_frames=1))
    cols = c.colours.reshape(-1, 3).astype(np.float32)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() > 60
    assert (cols.max(axis=1) - cols.min(axis=1) > 100).all(), "saturated colours"


# -------------------------------------------------------------------------- keypoints


def test_unoccluded_keypoints_lie_on_figure():
    c = render_clip(SyntheticSpec(num_persons=1, num_frames=30, motions=("dance",), seed=2))
    k = c.keypoints[:, 0]
    inside = (k[..., 0] >= 0) & (k[..., 0] <= c.spec.width - 1) & (k[..., 1] >= 0) & (k[..., 1] <= c.spec.height - 1)
    assert inside.all()
    assert c.keypoint_visible.all(), "a lone figure has every keypoint visible"
    for t in range(0, 30, 3):
        for j in range(18):
            assert c.masks[t, 0, int(round(k[t, j, 1])), int(round(k[t, j, 0]))], (t, OPENPOSE_18[j])


@pytest.mark.parametrize("n", [2, 9])
def test_visible_keypoints_on_own_mask(n):
    c = render_clip(SyntheticSpec(num_persons=n, num_frames=20, seed=4))
    t_idx, p_idx, k_idx = np.nonzero(c.keypoint_visible)
    for t, p, j in zip(t_idx, p_idx, k_idx):
        x, y = c.keypoints[t, p, j]
        assert _near(c.masks[t, p], x, y), (t, p, OPENPOSE_18[j])
    # ... and in-frame keypoints flagged invisible really have no own pixel within 2 px.
    for t, p, j in zip(*np.nonzero(~c.keypoint_visible)):
        x, y = np.rint(c.keypoints[t, p, j])
        if 0 <= x < c.spec.width and 0 <= y < c.spec.height:
            assert not _near(c.masks[t, p], x, y)


def test_crossing_and_occlusion(crossing):
    c = crossing
    hip_x = c.keypoints[:, :, [KP["r_hip"], KP["l_hip"]], 0].mean(axis=2)  # [T,2]
    order = np.sign(hip_x[:, 0] - hip_x[:, 1])
    assert order[0] != order[-1], "the two walkers swap horizontal order"
    area = c.masks.sum(axis=(2, 3)).astype(float)  # [T,2]
    far = c.depth_order == 0  # [T,2] farther person per frame
    far_area = area[far]
    far_typical = np.median(area, axis=0)[np.argmax(far, axis=1)]
    assert (far_area < 0.5 * far_typical).any(), "the nearer walker hides most of the farther one"
    # Some in-frame keypoints of the farther figure are hidden while crossing.
    k = c.keypoints
    inside = (k[..., 0] >= 0) & (k[..., 0] < c.spec.width) & (k[..., 1] >= 0) & (k[..., 1] < c.spec.height)
    hidden = inside & ~c.keypoint_visible
    assert hidden[far].any()
    assert not hidden[~far].any(), "the nearer figure is never hidden"


# --------------------------------------------------------------------------- scenes


def test_scene_cut_is_a_large_jump():
    c = render_clip(SyntheticSpec(num_frames=30, num_persons=2, seed=1, scene_cut_frames=(12, 20)))
    f = c.frames.astype(np.float32)
    diffs = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))  # diffs[i] = |frame i+1 - frame i|
    cut = np.array([11, 19])
    normal = np.delete(diffs, cut)
    assert diffs[cut].min() > 5 * np.median(normal)
    assert diffs[cut].min() > 2 * normal.max()


# ------------------------------------------------------------------------------ I/O


def test_ground_truth_round_trip(tmp_path, clip3):
    path = save_ground_truth(clip3, tmp_path / "clip.gt.npz")
    assert path == tmp_path / "clip.gt.npz" and [p.name for p in tmp_path.iterdir()] == ["clip.gt.npz"]
    g = load_ground_truth(path)
    assert g.frames is None and g.spec == clip3.spec
    for name in ("keypoints", "keypoint_visible", "masks", "colours", "depth_order"):
        a, b = getattr(g, name), getattr(clip3, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(g.label_map(), clip3.label_map())


@needs_ffmpeg
def test_video_matches_ground_truth(tmp_path, clip3):
    spec = clip3.spec
    video = write_video(clip3.frames, tmp_path / "v.mp4", spec.fps)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"], "no temp file left behind"
    dec = _decode(video, spec.width, spec.height)
    assert dec.shape == clip3.frames.shape
    n = spec.num_persons
    checked = 0
    for t in (0, spec.num_frames // 2, spec.num_frames - 1):
        union = clip3.masks[t].any(axis=0).astype(np.uint8)
        for p in range(n):
            core = cv2.erode(clip3.masks[t, p].astype(np.uint8), _kernel(2)).astype(bool)
            if core.sum() < 30:
                continue
            px = dec[t][core]
            own = np.median(_min_dist(px, clip3.colours[p]))
            others = np.delete(clip3.colours, p, axis=0).reshape(-1, 3)
            other = np.median(_min_dist(px, others))
            assert own < 30, (t, p, own)
            assert other > 2 * own + 30, (t, p, own, other)
            checked += 1
        background = ~cv2.dilate(union, _kernel(3)).astype(bool)
        d = _min_dist(dec[t][background], clip3.colours.reshape(-1, 3))
        assert np.percentile(d, 1) > 40, "background is far from every figure colour"
    assert checked >= 6


@needs_ffmpeg
def test_decord_reads_video(tmp_path):
    decord = pytest.importorskip("decord")
    spec = SyntheticSpec(num_frames=12, width=192, height=128, num_persons=1)
    video, gt = make_synthetic_video(spec, tmp_path / "out", "clip")
    assert video.name == "clip.mp4" and gt.name == "clip.gt.npz"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.gt.npz", "clip.mp4"]
    vr = decord.VideoReader(str(video))
    assert len(vr) == 12
    assert vr[0].asnumpy().shape == (128, 192, 3)
    assert abs(vr.get_avg_fps() - spec.fps) < 0.01


@needs_ffmpeg
def test_write_video_failure_leaves_no_temp(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="fps"):
        write_video(frames, tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match="even"):
        write_video(np.zeros((3, 33, 32, 3), np.uint8), tmp_path / "a.mp4", fps=25)
    with pytest.raises(ValueError, match="crf"):
        write_video(frames, tmp_path / "a.mp4", fps=25, crf=99)
    assert list(tmp_path.iterdir()) == []


def test_write_video_ffmpeg_failure_removes_temp(tmp_path, monkeypatch):
    # A stand-in ffmpeg that writes a partial output file, then fails.
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a; do last="$a"; done\necho partial > "$last"\necho boom >&2\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(media, "_ffmpeg_exe", lambda: str(fake))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        write_video(np.zeros((50, 64, 64, 3), np.uint8), out / "a.mp4", fps=25)
    assert list(out.iterdir()) == []


@needs_ffmpeg
def test_write_video_replaces_existing(tmp_path):
    target = tmp_path / "a.mp4"
    target.write_bytes(b"old")
    write_video(np.full((2, 32, 32, 3), 128, np.uint8), target, fps=10)
    assert target.stat().st_size > 100 and [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


@needs_ffmpeg
def test_make_sample_folder(tmp_path):
    videos = make_sample_folder(tmp_path / "a", num_videos=3, seed=1, num_frames=6)
    assert [v.name for v in videos] == ["sample_00.mp4", "sample_01.mp4", "sample_02.mp4"]
    gts = [load_ground_truth(v.with_name(v.stem + ".gt.npz")) for v in videos]
    assert [g.spec.num_persons for g in gts] == [1, 2, 3]
    assert len({(g.spec.width, g.spec.height) for g in gts}) > 1
    assert gts[2].spec.scene_cut_frames == (3,)
    again = make_sample_folder(tmp_path / "b", num_videos=3, seed=1, num_frames=6)
    for v, g in zip(again, gts):
        g2 = load_ground_truth(v.with_name(v.stem + ".gt.npz"))
        assert g2.spec == g.spec
        np.testing.assert_array_equal(g2.keypoints, g.keypoints)
        np.testing.assert_array_equal(g2.masks, g.masks)


def test_fast_walkers_start_anywhere_and_other_clips_keep_their_draws():
    """walk_speed: the track offset comes from its own stream, so clips without it are
    unchanged, and the walkers' first positions (and directions) vary from seed to seed."""
    plain = SyntheticSpec(width=64, height=48, num_frames=20, motions=("walk", "walk"), seed=3)
    assert plain.walk_speed is None
    fast = plain.model_copy(update={"walk_speed": 0.8})
    a, b = render_clip(plain), render_clip(fast)
    np.testing.assert_array_equal(a.colours, b.colours)
    neck = KP["neck"]
    speed = np.median(np.abs(np.diff(b.keypoints[:, :, neck, 0], axis=0)), axis=0)  # px per frame
    np.testing.assert_allclose(speed, 0.8 * 64 / 25, rtol=0.2)  # 0.8 widths per second at 25 fps (+-10 % per walker)
    starts = np.array([render_clip(fast.model_copy(update={"seed": s})).keypoints[0, :, neck, 0] for s in range(12)])
    assert starts.min() < 64 * 0.25 and starts.max() > 64 * 0.75  # anywhere on the track, not only mid-frame
    with pytest.raises(ValueError, match="walk_speed"):
        SyntheticSpec(walk_speed=0.0)
