"""The workspace layout on the preprocessing side: one per-person reorder for shards and
driving videos, shards written from the records a flow passes, and pose + segment of clips
held in another workspace (a driving video's) through the same cached tasks."""

from __future__ import annotations

import io

import numpy as np
import pytest

from data_schemas import IngestConfig, ProjectConfig
from data_schemas.arrays import read_npz
from data_schemas.config import ShardConfig
from data_schemas.workspace import ClipRef, Workspace
from preprocess.retarget import load_driving
from preprocess.shards import build_sample, manifest_records, poses_by_person, write_shards
from preprocess.synthetic import SyntheticSpec, make_synthetic_video
from tests.helpers.workspaces import make_workspace


def test_shards_and_driving_videos_order_poses_by_person_alike(tmp_path):
    make_workspace(tmp_path, num_clips=1, num_frames=10)
    ws = Workspace(tmp_path)
    ((clip, pose, mask),) = manifest_records(ws)
    members, meta = build_sample(ws, clip, pose, mask, ShardConfig())
    shard_poses = np.load(io.BytesIO(members["pose.npz"]))
    driving = load_driving(ws.resolve(pose.path), ws.resolve(mask.path), num_frames=7)
    np.testing.assert_array_equal(driving.keypoints, shard_poses["keypoints"][:7])
    np.testing.assert_array_equal(driving.scores, shard_poses["scores"][:7])
    keypoints, scores = poses_by_person(read_npz(ws.resolve(pose.path)), read_npz(ws.resolve(mask.path))["pose_index"])
    assert keypoints.shape == (10, meta["persons"], 133, 2) and keypoints.dtype == scores.dtype == np.float32
    np.testing.assert_array_equal(keypoints, shard_poses["keypoints"])


def test_shards_from_passed_records_are_the_shards_from_the_manifests(tmp_path):
    make_workspace(tmp_path, num_clips=3, num_frames=8)
    records = manifest_records(tmp_path)
    from_manifests = write_shards(tmp_path, ShardConfig(val_fraction=0.0))
    passed = write_shards(tmp_path, ShardConfig(val_fraction=0.0), list(reversed(records)))
    assert passed == from_manifests and passed.num_samples == 3
    fewer = write_shards(tmp_path, ShardConfig(val_fraction=0.0), records[:2])  # only what the caller passes
    assert fewer.num_samples == 2 and fewer.set_dir != from_manifests.set_dir


@pytest.mark.slow
def test_pose_and_segment_of_clips_held_in_another_workspace(tmp_path, prefect_api):
    from prefect import flow

    from flows.stages import StageModels, pose_and_segment
    from preprocess.video import ingest_video, sha256_file

    video, _ = make_synthetic_video(
        SyntheticSpec(width=64, height=64, num_frames=10, num_persons=2, seed=3), tmp_path / "in", "d"
    )
    ws = Workspace(tmp_path / "ws")
    held = Workspace(ws.driving_at(25.0))
    result = ingest_video(video, sha256_file(video), IngestConfig(fps=25.0, min_clip_s=0.04), held)
    assert result.status == "ok", result.error
    refs = {"d": ClipRef(result.clips[0], held)}
    config = ProjectConfig.model_validate({"pose": {"models": "truth"}, "segment": {"models": "truth"}})

    @flow
    def run():
        return pose_and_segment(refs, config, StageModels.of(config, ()), ws, "driving")

    poses, masks, failures = run()
    assert failures == {} and poses["d"].path == held.relative(refs["d"].pose_file) == f"poses/{refs['d'].clip_id}.npz"
    assert refs["d"].pose_file.is_file() and refs["d"].mask_file.is_file() and masks["d"].num_persons == 2
    assert not ws.poses.exists() and not ws.masks.exists()  # the training clips' folders stay untouched
    before = refs["d"].mask_file.stat().st_mtime_ns
    again = run()  # cached by content: nothing is written again
    assert again[:2] == (poses, masks) and refs["d"].mask_file.stat().st_mtime_ns == before
