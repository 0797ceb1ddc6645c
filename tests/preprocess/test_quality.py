"""Quality measures (preprocess/quality.py) and shard filters (data_schemas/quality.py) on
synthetic clips with known defects, made from the generator's exact ground truth: poses
and masks in the stages' layouts come from write_ground_truth_stage_files, and each defect
is applied to those arrays (or to the truth) in a way whose right answer is known."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from data_schemas.arrays import read_npz
from data_schemas.io import read_records, write_records
from data_schemas.quality import ClipQuality, QualityConfig, QualityFilters
from preprocess.media import write_video
from preprocess.quality import measure_clip, measure_clip_files
from preprocess.synthetic import (
    OPENPOSE_TO_WHOLEBODY,
    SyntheticClip,
    SyntheticSpec,
    render_clip,
    write_ground_truth_stage_files,
)

BODY_OP = sorted(OPENPOSE_TO_WHOLEBODY)  # the 17 OpenPose points with a COCO-WholeBody body slot (all but the neck)
APART = dict(num_persons=2, motions=("wave", "dance"))  # two figures that keep to their own places
FILTERS = QualityFilters(
    min_persons=2,
    max_persons=3,
    max_identity_switches=0,
    min_keypoint_confidence=0.5,
    min_person_height=0.2,
    min_motion=0.002,
)


def truth_steps(clip: SyntheticClip, p: int) -> np.ndarray:
    """[T-1] mean displacement of figure p's body keypoints visible in both frames (NaN: none), from the truth."""
    visible = clip.keypoint_visible[:, p][:, BODY_OP]
    both = visible[1:] & visible[:-1]
    step = np.linalg.norm(clip.keypoints[1:, p][:, BODY_OP] - clip.keypoints[:-1, p][:, BODY_OP], axis=-1)
    return np.array([step[t][both[t]].mean() if both[t].any() else np.nan for t in range(len(step))])


def stage_arrays(clip: SyntheticClip, folder) -> tuple[dict, dict]:
    """The pose and segment stages' arrays for the clip, as a perfect detector and tracker give them."""
    folder.mkdir(parents=True, exist_ok=True)
    poses, masks = write_ground_truth_stage_files(clip, folder)
    return read_npz(poses), read_npz(masks)


def exchange(masks: dict, a: int, b: int, start: int, labels: bool = True) -> dict:
    """Persons a and b (labels) trade label map pixels (when ``labels``) and pose rows from ``start`` on."""
    label_map, pose_index = masks["label_map"].copy(), masks["pose_index"].copy()
    if labels:
        tail = label_map[start:]
        was_a = tail == a
        tail[tail == b] = a
        tail[was_a] = b
    pose_index[start:, [a - 1, b - 1]] = pose_index[start:, [b - 1, a - 1]]
    return {**masks, "label_map": label_map, "pose_index": pose_index}


def fade(poses: dict, masks: dict, person: int, start: int, factor: float) -> dict:
    """The person's keypoint scores times ``factor`` from ``start`` on (a detector guessing)."""
    scores = poses["scores"].copy()
    for t in range(start, len(scores)):
        row = masks["pose_index"][t, person - 1]
        if row >= 0:
            scores[t, row] *= factor
    return {**poses, "scores": scores}


def still(clip: SyntheticClip) -> SyntheticClip:
    """The clip's first frame held for its whole length (truth included): nobody moves."""
    hold = lambda a: np.repeat(a[:1], len(a), axis=0)
    return dataclasses.replace(
        clip,
        frames=hold(clip.frames),
        keypoints=hold(clip.keypoints),
        keypoint_visible=hold(clip.keypoint_visible),
        masks=hold(clip.masks),
        depth_order=hold(clip.depth_order),
    )


def with_far_person(clip: SyntheticClip, small: SyntheticClip, x0: int, y0: int) -> SyntheticClip:
    """``clip`` plus the one figure of ``small`` (rendered on a small canvas) pasted at (x0, y0):
    a distant person whose pixels, keypoints and visibility are the small render's, exactly."""
    num_frames, _, h, w = small.masks.shape
    mask = np.zeros((num_frames, 1, *clip.masks.shape[2:]), bool)
    mask[:, 0, y0 : y0 + h, x0 : x0 + w] = small.masks[:, 0]
    assert not (clip.masks & mask).any(), "the pasted figure must not cover anyone"
    frames = clip.frames.copy()
    frames[mask[:, 0]] = small.frames[small.masks[:, 0]]
    return dataclasses.replace(
        clip,
        frames=frames,
        masks=np.concatenate([clip.masks, mask], 1),
        keypoints=np.concatenate([clip.keypoints, small.keypoints + np.float32([x0, y0])], 1),
        keypoint_visible=np.concatenate([clip.keypoint_visible, small.keypoint_visible], 1),
        colours=np.concatenate([clip.colours, small.colours]),
        depth_order=np.concatenate([clip.depth_order, small.depth_order], 1),
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, tuple[SyntheticClip, dict, dict]]:
    """Named clips: (truth, poses, masks) each."""
    root = tmp_path_factory.mktemp("quality")
    out: dict[str, tuple[SyntheticClip, dict, dict]] = {}

    def add(name: str, clip: SyntheticClip, poses=None, masks=None) -> None:
        p, m = stage_arrays(clip, root / name)
        out[name] = (clip, poses if poses is not None else p, masks if masks is not None else m)

    add("clean_apart", render_clip(SyntheticSpec(seed=1, **APART)))
    add("clean_crossing", render_clip(SyntheticSpec(seed=3, num_persons=3, motions=("walk", "walk", "dance"))))
    add("clean_cycle", render_clip(SyntheticSpec(seed=0)))
    add("clean_shot_cut", render_clip(SyntheticSpec(seed=2, scene_cut_frames=(25,), **APART)))
    # the walker passes in front of the dancer at frame 31: it takes over her visible pixels
    add("clean_depth_change", render_clip(SyntheticSpec(seed=52, num_persons=2, motions=("walk", "dance"))))
    # two walkers so close at frame 23 that one's pose lies nearer the other's last one than its own
    add("clean_close", render_clip(SyntheticSpec(seed=79, num_persons=3, motions=("walk", "walk", "dance"))))
    swap = render_clip(SyntheticSpec(seed=1, **APART))
    poses, masks = stage_arrays(swap, root / "swap-src")
    add("swap", swap, poses, exchange(masks, 1, 2, 20))
    add("pose_swap", swap, poses, exchange(masks, 1, 2, 20, labels=False))
    add("guessing", swap, fade(poses, masks, 2, 10, 0.25), masks)
    add("static", still(render_clip(SyntheticSpec(seed=4, **APART))))
    base = render_clip(SyntheticSpec(seed=5, num_persons=1, motions=("dance",)))
    small = render_clip(SyntheticSpec(width=32, height=32, seed=6, num_persons=1, motions=("wave",)))
    add("far_person", with_far_person(base, small, 6, 4))
    add("alone", base)
    add("crowd", render_clip(SyntheticSpec(seed=7, num_persons=4)))
    crossing, poses, masks = out["clean_crossing"]
    label_map, pose_index = masks["label_map"].copy(), masks["pose_index"].copy()
    label_map[10:][label_map[10:] == 3] = 0  # figure 3 leaves after 10 frames: a passer-by
    pose_index[10:, 2] = -1
    out["passer_by"] = (crossing, poses, {**masks, "label_map": label_map, "pose_index": pose_index})
    return out


@pytest.fixture(scope="module")
def rows(clips) -> dict[str, ClipQuality]:
    return {name: measure_clip(name, clip.frames, poses, masks) for name, (clip, poses, masks) in clips.items()}


def test_measures_equal_independent_computations(clips, rows):
    """Every per-person measure of a clean clip, recomputed straight from the generator's truth."""
    clip, _, _ = clips["clean_crossing"]
    row = rows["clean_crossing"]
    num_frames, num_persons, height, _width = clip.masks.shape
    labels = clip.label_map()
    assert row.num_persons == row.num_visible_persons == num_persons and row.num_frames == num_frames
    for p in range(num_persons):
        m = clip.masks[:, p]
        boxes = []
        for t in range(num_frames):
            ys, xs = np.nonzero(m[t])
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        heights = [(y2 - y1) / height for _, y1, _, y2 in boxes]
        occlusion = [
            np.mean((labels[t, y1:y2, x1:x2] > 0) & (labels[t, y1:y2, x1:x2] != p + 1))
            for t, (x1, y1, x2, y2) in enumerate(boxes)
        ]
        inter = (m[1:] & m[:-1]).sum((1, 2))
        union = (m[1:] | m[:-1]).sum((1, 2))
        visible = clip.keypoint_visible[:, p][:, BODY_OP]
        speed = np.nanmean(truth_steps(clip, p)) / height
        assert row.person_frames_present[p] == num_frames and row.person_visible_share[p] == 1.0
        assert row.person_box_height[p] == pytest.approx(np.mean(heights), abs=1e-9)
        assert row.person_area_share[p] == pytest.approx(m.mean(), abs=1e-9)
        assert row.person_occlusion_share[p] == pytest.approx(np.mean(occlusion), abs=1e-9)
        assert row.person_mask_stability[p] == pytest.approx(np.mean(inter / union), abs=1e-9)
        # the truth's scores: 0.9 for a visible keypoint, 0 for a hidden one; no hands or feet
        assert row.person_body_confidence[p] == pytest.approx(0.9 * visible.mean(), abs=1e-6)
        assert row.person_hands_confidence[p] == row.person_feet_confidence[p] == 0.0
        assert row.person_body_present_share[p] == pytest.approx(np.mean(visible.sum(1) >= 9), abs=1e-9)
        assert row.person_speed[p] == pytest.approx(speed, rel=1e-5)
    assert max(row.person_occlusion_share) > 0.1  # the walkers do cover each other
    assert row.motion == max(row.person_speed) and row.min_person_height == min(row.person_box_height)
    # image measures: grey levels and a 4-neighbour Laplacian with mirrored borders, in numpy
    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip.frames]).astype(np.float64)
    pad = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    laplacian = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:] - 4 * grey
    assert row.brightness == pytest.approx(grey.mean() / 255, rel=1e-9)
    assert row.blur == pytest.approx(laplacian.var(axis=(1, 2)).mean(), rel=1e-6)
    assert row.frames_measured == num_frames


CLEAN = ("clean_apart", "clean_crossing", "clean_cycle", "clean_shot_cut", "clean_depth_change", "clean_close")


def test_clean_clips_show_no_defect_and_pass_every_filter(rows):
    for name in CLEAN:
        row = rows[name]
        assert row.num_identity_switches == 0, (name, row.switch_frames, row.switch_persons_a, row.switch_persons_b)
        assert row.num_disagreement_frames == 0 and sum(row.person_pose_mask_disagreements) == 0, name
        assert FILTERS.reasons(row) == [], (name, FILTERS.explain(row))
        assert row.camera_cuts == ((25,) if name == "clean_shot_cut" else ()), name


def test_what_is_no_switch(clips, rows):
    """The traps the switch rules avoid really occur in these clean clips."""
    clip, _, masks = clips["clean_depth_change"]
    labels = masks["label_map"]
    iou = lambda a, b: (a & b).sum() / (a | b).sum()
    cfg = QualityConfig()
    # one-sided: the walker's mask at 31 is the dancer's at 30, but not the other way round
    own = iou(labels[31] == 1, labels[30] == 1)
    assert iou(labels[31] == 1, labels[30] == 2) > max(cfg.switch_min_iou, own + cfg.switch_margin)
    assert iou(labels[31] == 2, labels[30] == 1) < cfg.switch_min_iou
    clip, poses, masks = clips["clean_close"]

    # the walkers' poses at 23: one lies nearer the other's at 22 than its own, but moved little
    def median_distance(a: int, b: int) -> float:
        ra, rb = masks["pose_index"][23, a], masks["pose_index"][22, b]
        found = np.minimum(poses["scores"][23, ra, :17], poses["scores"][22, rb, :17]) > cfg.keypoint_threshold
        distance = np.linalg.norm(poses["keypoints"][23, ra, :17] - poses["keypoints"][22, rb, :17], axis=-1)
        return float(np.median(distance[found]))

    near = [(a, b) for a, b in ((0, 1), (1, 0)) if median_distance(a, b) < cfg.jump_ratio * median_distance(a, a)]
    assert near and all(median_distance(a, a) < cfg.jump_min * clip.spec.height for a, _ in near)
    # across the cut the figures jump: left out of the motion
    clip, row = clips["clean_shot_cut"][0], rows["clean_shot_cut"]
    for p in range(2):
        steps = truth_steps(clip, p)
        assert row.person_speed[p] == pytest.approx(np.nanmean(np.delete(steps, 24)) / clip.spec.height, rel=1e-5)


def test_a_passer_by_is_no_visible_person(rows):
    row, full = rows["passer_by"], rows["clean_crossing"]
    assert row.num_persons == 3 and row.num_visible_persons == 2 and row.person_counted == (True, True, False)
    assert row.person_frames_present[2] == 10 and row.person_visible_share[2] == 0.2
    assert row.person_box_height[:2] == full.person_box_height[:2] and row.person_speed[:2] == full.person_speed[:2]
    assert row.min_person_height == min(row.person_box_height[:2]) and row.motion == max(row.person_speed[:2])


def test_exchanged_label_maps_are_one_switch_at_that_frame(clips, rows):
    clip, _, _ = clips["swap"]
    row = rows["swap"]
    assert (row.switch_frames, row.switch_persons_a, row.switch_persons_b) == ((20,), (1,), (2,))
    assert row.switch_evidence == ("mask+pose",)  # both the masks and the poses moved
    assert row.num_disagreement_frames == 0  # poses still lie in their (exchanged) masks
    # motion leaves the jump out: person 1 moves as figure 0 up to frame 19 and as figure 1 from frame 20 on
    steps = [truth_steps(clip, p) for p in (0, 1)]
    for k, (before, after) in enumerate(((0, 1), (1, 0))):
        expected = np.nanmean(np.concatenate([steps[before][:19], steps[after][20:]])) / clip.spec.height
        assert row.person_speed[k] == pytest.approx(expected, rel=1e-5)
    assert FILTERS.reasons(row) == ["max_identity_switches"]


def test_exchanged_pose_rows_alone_are_a_switch_and_disagree_with_the_masks(rows):
    row = rows["pose_swap"]
    assert (row.switch_frames, row.switch_persons_a, row.switch_persons_b) == ((20,), (1,), (2,))
    assert row.switch_evidence == ("pose",)  # the masks kept their persons
    assert row.person_pose_mask_disagreements == (30, 30) and row.num_disagreement_frames == 30  # frames 20..49
    assert row.person_mask_stability == rows["clean_apart"].person_mask_stability


def test_a_person_whose_keypoints_lose_confidence(rows):
    row, clean = rows["guessing"], rows["clean_apart"]
    assert row.person_body_confidence[0] == clean.person_body_confidence[0]
    # 10 frames as before, 40 at a quarter of the score
    expected = (10 + 40 * 0.25) / 50 * clean.person_body_confidence[1]
    assert row.person_body_confidence[1] == pytest.approx(expected, rel=0.05)
    assert row.person_body_present_share[1] == pytest.approx(10 / 50)  # 0.9 x 0.25 is below the threshold
    assert row.num_identity_switches == 0 and row.num_disagreement_frames == 0
    assert FILTERS.reasons(row) == ["min_keypoint_confidence"]


def test_hands_and_feet_are_their_own_keypoints(clips):
    _, poses, masks = clips["clean_apart"]
    scores = poses["scores"].copy()
    scores[:, :, 91:133], scores[:, :, 17:23] = 0.6, 0.3  # the truth has neither: give them known scores
    row = measure_clip("c", None, {**poses, "scores": scores}, masks)
    assert row.person_hands_confidence == pytest.approx((0.6, 0.6))
    assert row.person_feet_confidence == pytest.approx((0.3, 0.3))


def test_a_pose_box_extends_the_person_box(clips, rows):
    """A detector's box also covers what is hidden: it widens the box the height is read from."""
    _, poses, masks = clips["clean_apart"]
    boxes = poses["boxes"].copy()
    boxes[:, :, 1] -= 8  # 8 px above the pixels' top, which is far below the frame's top
    row = measure_clip("c", None, {**poses, "boxes": boxes}, masks)
    clean = rows["clean_apart"]
    assert row.person_box_height == pytest.approx([h + 8 / 192 for h in clean.person_box_height], abs=1e-9)


def test_a_static_clip_has_no_motion(rows):
    row = rows["static"]
    assert row.motion == 0.0 and row.person_speed == (0.0, 0.0)
    assert row.person_mask_stability == (1.0, 1.0) and row.camera_cuts == ()
    assert FILTERS.reasons(row) == ["min_motion"]


def test_a_tiny_distant_person(clips, rows):
    clip, _, _ = clips["far_person"]
    row = rows["far_person"]
    ys = [np.nonzero(clip.masks[t, 1])[0] for t in range(len(clip.masks))]
    tiny = np.mean([(y.max() + 1 - y.min()) / clip.spec.height for y in ys])
    assert row.num_visible_persons == 2 and row.min_person_height == pytest.approx(tiny, abs=1e-9) and tiny < 0.15
    assert row.person_box_height[0] > 0.4
    assert row.num_identity_switches == 0 and row.num_disagreement_frames == 0
    assert FILTERS.reasons(row) == ["min_person_height"]


def test_filters_drop_exactly_the_defective_clips_and_say_why(rows):
    reasons = {name: FILTERS.reasons(row) for name, row in rows.items()}
    dropped = {name: r for name, r in reasons.items() if r}
    assert dropped == {
        "swap": ["max_identity_switches"],
        "pose_swap": ["max_identity_switches"],
        "guessing": ["min_keypoint_confidence"],
        "static": ["min_motion"],
        "far_person": ["min_person_height"],
        "alone": ["min_persons"],
        "crowd": ["max_persons"],
    }
    assert set(rows) - set(dropped) == {*CLEAN, "passer_by"}
    assert "visible persons 1 < 2" in FILTERS.explain(rows["alone"])["min_persons"]
    # the defaults keep what the release trained on: two or more visible persons, nothing else asked
    assert {name for name, row in rows.items() if QualityFilters().reasons(row)} == {"alone"}
    off = QualityFilters(min_persons=None)
    assert not any(off.reasons(row) for row in rows.values())
    with pytest.raises(ValueError, match="min_persons"):
        QualityFilters(min_persons=3, max_persons=2)


def test_rows_round_trip_through_parquet(rows, tmp_path):
    path = write_records(list(rows.values()), ClipQuality, tmp_path / "quality.parquet")
    back = read_records(path, ClipQuality)
    assert back == list(rows.values())
    persons = back[0].persons()
    assert [p.person for p in persons] == [1, 2] and persons[1].speed == back[0].person_speed[1]


def test_clip_file_in_chunks_and_no_frames(clips, rows, tmp_path):
    """From the encoded video (decoded in chunks) the cut is found and the image measures stay
    close to the rendered frames'; without frames only the image measures are missing, and a
    cut, not known then, looks like what it does to the masks."""
    clip, poses, masks = clips["clean_shot_cut"]
    video = write_video(clip.frames, tmp_path / "clip.mp4", fps=clip.spec.fps)
    write_ground_truth_stage_files(clip, tmp_path)
    cfg = QualityConfig(frames_per_chunk=7)  # chunks that do not divide the clip
    from_file = measure_clip_files("c", video, tmp_path / "poses.npz", tmp_path / "masks.npz", cfg)
    exact = rows["clean_shot_cut"]
    assert from_file.camera_cuts == (25,) and from_file.frames_measured == 50
    assert from_file.brightness == pytest.approx(exact.brightness, abs=0.01)
    assert from_file.blur == pytest.approx(exact.blur, rel=0.25)  # the codec softens edges
    blind = measure_clip("c", None, poses, masks)
    assert (blind.blur, blind.brightness, blind.camera_cuts, blind.frames_measured) == (None, None, (), 0)
    assert blind.switch_frames == (25,)  # the new shot put each figure where the other stood
    _, poses, masks = clips["clean_apart"]
    blind, exact = measure_clip("c", None, poses, masks), rows["clean_apart"]
    image = {"blur", "brightness", "camera_cuts", "frames_measured", "clip_id"}
    assert blind.model_dump(exclude=image) == exact.model_dump(exclude=image)


def test_a_clip_without_persons(tmp_path):
    clip = render_clip(SyntheticSpec(num_persons=0, num_frames=5))
    poses, masks = stage_arrays(clip, tmp_path)
    row = measure_clip("empty", clip.frames, poses, masks)
    assert (row.num_persons, row.num_visible_persons, row.motion, row.min_person_height) == (0, 0, None, None)
    assert FILTERS.reasons(row) == ["min_persons", "min_keypoint_confidence", "min_person_height", "min_motion"]
