"""Identity logic with the ground-truth segmenter (apart from SAM2): figures that cross and
occlude keep their numbers, and every pose goes to its own figure."""

from __future__ import annotations

import numpy as np
import pytest

from data_schemas.config import SegmentConfig
from preprocess.segment.ground_truth import GroundTruthSegmenter
from preprocess.segment.stage import load_masks, segment_clip
from preprocess.synthetic import SyntheticSpec
from tests.helpers.workspaces import write_clip_and_poses


def identities(labels: np.ndarray, gt_masks: np.ndarray) -> dict[int, set[int]]:
    """For each label k, the set of ground-truth persons whose masks it equals over the clip."""
    found: dict[int, set[int]] = {}
    for t in range(len(labels)):
        for k in range(1, labels[t].max() + 1):
            region = labels[t] == k
            if not region.any():
                continue
            matches = {p for p in range(gt_masks.shape[1]) if np.array_equal(region, gt_masks[t, p])}
            assert matches, f"frame {t}: label {k} matches no figure"
            found.setdefault(k, set()).update(matches)
    return found


def test_crossing_figures_keep_their_identities_and_poses(tmp_path):
    spec = SyntheticSpec(width=256, height=192, num_frames=60, num_persons=3, seed=3, motions=("walk", "walk", "dance"))
    clip, video, poses, origin = write_clip_and_poses(spec, tmp_path)
    # The walkers really cross: their left-to-right order swaps during the clip.
    x = clip.keypoints[:, :2, 1, 0]
    assert np.sign(x[0, 0] - x[0, 1]) != np.sign(x[-1, 0] - x[-1, 1])
    segmenter = GroundTruthSegmenter(clip.masks)
    record = segment_clip(video, "clip", poses, lambda: segmenter, "ground-truth", SegmentConfig(), tmp_path)
    masks = load_masks(tmp_path / record.path)
    labels, pose_index = masks["label_map"], masks["pose_index"]
    assert record.num_persons == 3 and labels.shape == (60, 192, 256) and pose_index.shape == (60, 3)
    ids = identities(labels, clip.masks)
    assert all(len(v) == 1 for v in ids.values()), f"identity switch: {ids}"  # zero switches
    person_of = {k: next(iter(v)) for k, v in ids.items()}
    # Order: left to right at first appearance.
    first_x = [np.nonzero(clip.masks[0, person_of[k]])[1].mean() for k in (1, 2, 3)]
    assert first_x == sorted(first_x)
    # Every pose row is assigned to its own figure, in every frame.
    for t in range(60):
        for k in (1, 2, 3):
            row = pose_index[t, k - 1]
            if person_of[k] in origin[t]:
                assert row >= 0 and origin[t][row] == person_of[k], (t, k)
            else:
                assert row == -1


def test_late_arrival_early_departure_and_nobody(tmp_path):
    spec = SyntheticSpec(width=256, height=192, num_frames=30, num_persons=3, seed=5)
    # Person 2 is detected only from frame 10; person 0 only until frame 20.
    keep = lambda t, p: not (p == 2 and t < 10) and not (p == 0 and t >= 20)
    clip, video, poses, _origin = write_clip_and_poses(spec, tmp_path, keep=keep)
    masks_seen = clip.masks.copy()
    masks_seen[:10, 2] = False
    masks_seen[20:, 0] = False
    record = segment_clip(
        video, "c", poses, lambda: GroundTruthSegmenter(masks_seen), "ground-truth", SegmentConfig(), tmp_path
    )
    masks = load_masks(tmp_path / record.path)
    assert record.num_persons == 3
    assert sorted(masks["first_frame"].tolist()) == [0, 0, 10] and masks["first_frame"][2] == 10  # latecomer last
    ids = identities(masks["label_map"], masks_seen)
    assert all(len(v) == 1 for v in ids.values())
    late = next(k for k, v in ids.items() if v == {2})
    assert late == 3 and not (masks["label_map"][:10] == 3).any()
    assert (masks["pose_index"][20:, next(k for k, v in ids.items() if v == {0}) - 1] == -1).all()

    nobody = SyntheticSpec(width=128, height=96, num_frames=8, num_persons=0)
    (tmp_path / "n").mkdir()
    _, video, poses, _ = write_clip_and_poses(nobody, tmp_path / "n")
    calls = []
    record = segment_clip(video, "n", poses, lambda: calls.append(1), "ground-truth", SegmentConfig(), tmp_path)
    assert calls == [] and record.num_persons == 0 and record.frames_with_persons == 0
    assert load_masks(tmp_path / record.path)["label_map"].shape == (8, 96, 128)


@pytest.mark.parametrize("max_persons", [2])
def test_persons_beyond_the_pool_are_ignored_and_counted(tmp_path, max_persons):
    spec = SyntheticSpec(width=256, height=192, num_frames=5, num_persons=3, seed=1)
    clip, video, poses, _ = write_clip_and_poses(spec, tmp_path)
    record = segment_clip(
        video,
        "c",
        poses,
        lambda: GroundTruthSegmenter(clip.masks),
        "ground-truth",
        SegmentConfig(max_persons=max_persons),
        tmp_path,
    )
    assert record.num_persons == 2 and record.ignored_arrivals >= 1
