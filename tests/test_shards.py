"""Shard writer: round trip through webdataset, byte determinism, split by source, index."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_schemas import ClipRecord, PoseRecord, read_records, write_records
from data_schemas.atomic import is_temp_name
from data_schemas.config import SegmentConfig, ShardConfig
from data_schemas.mask import MaskRecord
from data_schemas.shard import ShardSample
from preprocess.segment.ground_truth import GroundTruthSegmenter
from preprocess.segment.stage import load_masks, segment_clip
from preprocess.shards import split_of, write_shards
from preprocess.synthetic import SyntheticSpec
from tests.test_segment_identity import write_clip_and_poses


def make_workspace(root, num_clips: int = 4, clips_per_source: int = 2, num_frames: int = 12, width: int = 128, height: int = 96, first_seed: int = 0,
                   **spec_fields):
    """A workspace with clips, poses and masks of synthetic two-person clips (ground-truth masks);
    ``spec_fields``: further SyntheticSpec fields (background, motions, walk_speed)."""
    clips, poses, masks, origins = [], [], [], {}
    for i in range(num_clips):
        folder = root / f"src{i}"
        folder.mkdir(parents=True)
        spec = SyntheticSpec(width=width, height=height, num_frames=num_frames, num_persons=2, seed=first_seed + i, **spec_fields)
        clip, video, pose_path, origin = write_clip_and_poses(spec, folder, seed=i)
        clip_id = f"{i // clips_per_source:016x}-{i % clips_per_source:03d}"
        os.makedirs(root / "clips", exist_ok=True)
        os.makedirs(root / "poses", exist_ok=True)
        shutil.copy(video, root / "clips" / f"{clip_id}.mp4")
        shutil.copy(pose_path, root / "poses" / f"{clip_id}.npz")
        record = segment_clip(video, clip_id, pose_path, lambda c=clip: GroundTruthSegmenter(c.masks), "ground-truth", SegmentConfig(), root)
        sha = hashlib.sha256((root / "clips" / f"{clip_id}.mp4").read_bytes()).hexdigest()
        source = f"{i // clips_per_source:064x}"
        clips.append(ClipRecord(clip_id=clip_id, source_sha256=source, source_path=f"/in/{i}.mp4", clip_index=i % clips_per_source,
                                start_s=0.0, end_s=num_frames / 25, num_frames=num_frames, fps=25.0, width=width, height=height,
                                path=f"clips/{clip_id}.mp4", sha256=sha, size_bytes=1))  # fmt: skip
        poses.append(PoseRecord(clip_id=clip_id, path=f"poses/{clip_id}.npz", sha256="x", num_frames=num_frames, width=width, height=height,
                                max_persons=2, frames_with_persons=num_frames, frames_over_limit=0, models="gt", provider="none"))  # fmt: skip
        masks.append(record)
        origins[clip_id] = (clip, origin)
    write_records(clips, ClipRecord, root / "manifests" / "clips.parquet")
    write_records(poses, PoseRecord, root / "manifests" / "poses.parquet")
    write_records(masks, MaskRecord, root / "manifests" / "masks.parquet")
    return origins


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    return root, make_workspace(root)


def test_round_trip_through_webdataset(workspace):
    root, origins = workspace
    summary = write_shards(root, ShardConfig(val_fraction=0.0))
    assert summary.num_samples == 4 and summary.shards == ("shards/train-000000.tar",)
    samples = list(wds.WebDataset(str(root / summary.shards[0]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(origins)
    for sample in samples:
        key = sample["__key__"]
        assert sample["mp4"] == (root / "clips" / f"{key}.mp4").read_bytes()
        labels = np.load(io.BytesIO(sample["mask.npz"]))["label_map"]
        np.testing.assert_array_equal(labels, load_masks(root / "masks" / f"{key}.npz")["label_map"])
        meta = json.loads(sample["json"])
        assert meta["clip_id"] == key and meta["persons"] == 2 and sample["txt"] == b"two person are dancing"
        # Row k of the poses is the figure of label k+1 in every frame: its nose keypoint
        # (WholeBody 0) lies inside that label wherever it is visible.
        pose = np.load(io.BytesIO(sample["pose.npz"]))
        for t in range(12):
            for k in range(2):
                if pose["scores"][t, k, 0] > 0:
                    x, y = np.round(pose["keypoints"][t, k, 0]).astype(int)
                    window = labels[t, max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
                    assert (window == k + 1).any(), (key, t, k)


def test_shards_are_byte_identical_and_atomic(workspace, tmp_path):
    root, _ = workspace
    first = write_shards(root, ShardConfig(val_fraction=0.5, target_shard_bytes=1))
    digests = {s: hashlib.sha256((root / s).read_bytes()).hexdigest() for s in first.shards}
    second = write_shards(root, ShardConfig(val_fraction=0.5, target_shard_bytes=1))
    assert second == first and {s: hashlib.sha256((root / s).read_bytes()).hexdigest() for s in second.shards} == digests
    assert len(first.shards) == 4  # one sample per shard at this target size
    for shard in first.shards:
        with tarfile.open(root / shard) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == sorted(m.name for m in members)
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert not [n for _, _, files in os.walk(root) for n in files if is_temp_name(n)]
    # A later run with bigger shards replaces them all; stale shard files go.
    third = write_shards(root, ShardConfig(val_fraction=0.5))
    assert sorted(p.name for p in (root / "shards").glob("*.tar")) == sorted(s.split("/")[1] for s in third.shards)


def test_split_is_by_source_and_reproducible(workspace):
    root, _ = workspace
    write_shards(root, ShardConfig(val_fraction=0.5, seed=3))
    index = read_records(root / "shards" / "index.parquet", ShardSample)
    sides: dict[str, set[str]] = {}
    for row in index:
        sides.setdefault(row.source_sha256, set()).add(row.split)
    assert all(len(s) == 1 for s in sides.values())  # never the same source on both sides
    sources = [f"{i:064x}" for i in range(200)]
    split = [split_of(s, ShardConfig(val_fraction=0.25, seed=3)) for s in sources]
    assert split == [split_of(s, ShardConfig(val_fraction=0.25, seed=3)) for s in sources]
    assert 0.15 < split.count("val") / 200 < 0.35
    assert split != [split_of(s, ShardConfig(val_fraction=0.25, seed=4)) for s in sources]


def test_index_offsets_point_at_the_samples(workspace):
    root, _ = workspace
    write_shards(root, ShardConfig(val_fraction=0.0, target_shard_bytes=10**9))
    for row in read_records(root / "shards" / "index.parquet", ShardSample):
        with open(root / "shards" / row.shard, "rb") as f:
            f.seek(row.offset)
            header = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
        assert header.name == f"{row.key}.json" and row.size_bytes > 0
