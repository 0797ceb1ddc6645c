"""Shard writer: round trip through webdataset, byte determinism, split by source, index."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_schemas import read_records
from data_schemas.atomic import is_temp_name
from data_schemas.config import ShardConfig
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from preprocess.segment.stage import load_masks
from preprocess.shards import split_of, write_shards
from tests.helpers.workspaces import make_workspace


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
        assert sample["mp4"] == Workspace(root).clip_file(key).read_bytes()
        labels = np.load(io.BytesIO(sample["mask.npz"]))["label_map"]
        np.testing.assert_array_equal(labels, load_masks(Workspace(root).mask_file(key))["label_map"])
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
    assert (
        second == first and {s: hashlib.sha256((root / s).read_bytes()).hexdigest() for s in second.shards} == digests
    )
    assert len(first.shards) == 4  # one sample per shard at this target size
    for shard in first.shards:
        with tarfile.open(root / shard) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == sorted(m.name for m in members)
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert not [n for _, _, files in os.walk(root) for n in files if is_temp_name(n)]
    # A later run with bigger shards replaces them all; stale shard files go.
    third = write_shards(root, ShardConfig(val_fraction=0.5))
    assert sorted(p.name for p in Workspace(root).shards.glob("*.tar")) == sorted(s.split("/")[1] for s in third.shards)


def test_split_is_by_source_and_reproducible(workspace):
    root, _ = workspace
    write_shards(root, ShardConfig(val_fraction=0.5, seed=3))
    index = read_records(Workspace(root).shards_index, ShardSample)
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
    for row in read_records(Workspace(root).shards_index, ShardSample):
        with open(Workspace(root).shards / row.shard, "rb") as f:
            f.seek(row.offset)
            header = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
        assert header.name == f"{row.key}.json" and row.size_bytes > 0
