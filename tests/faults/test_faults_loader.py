"""The loader cannot hang on crafted shards: a member header claiming 2^62 bytes is an error
naming the shard and the member, and a reader that skips max_consecutive_skips samples or
shards in a row raises LoaderStalled with the counts by reason. Shards here are the shard
stage's own tars, altered byte by byte (bench/fault_cases/shards.py)."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import pytest

from bench.fault_cases.shards import (
    HUGE,
    LOADER,
    case_huge_header,
    case_undecodable_resampled,
    make_inputs,
    shard_config,
    with_huge_member,
)
from data_schemas import batch as B
from data_schemas.workspace import Workspace
from model.data import LoaderConfig, LoaderStalled, make_dataset, make_loader
from preprocess.shards import write_shards


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(workspace, its one train shard, the shard's keys in order)."""
    ws = make_inputs(tmp_path_factory.mktemp("ws"))
    write_shards(ws, shard_config({"val_fraction": 0.0}))
    path = Workspace(ws).shards / "train-000000.tar"
    with tarfile.open(path) as tar:
        keys = sorted({m.name.split(".")[0] for m in tar})
    return ws, path, keys


def cfg(**fields) -> LoaderConfig:
    return LoaderConfig(**LOADER, shuffle_buffer=0, **fields)


def with_bad_videos(source: Path, dest: Path, bad: set[int]) -> Path:
    """``source`` with the mp4 of the samples numbered in ``bad`` replaced by non-video bytes."""
    out = io.BytesIO()
    with tarfile.open(source) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        keys: list[str] = []
        for member in src:
            key = member.name.split(".")[0]
            keys += [key] if key not in keys else []
            data = src.extractfile(member).read()
            if member.name.endswith(".mp4") and len(keys) - 1 in bad:
                data = b"not a video " * 100
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dest.write_bytes(out.getvalue())
    return dest


@pytest.mark.timeout(60)
def test_huge_header_of_a_skipped_member(shard, tmp_path, caplog):
    # ref.png is never read: tarfile would seek past its 2^62 bytes by reading forever.
    _, path, keys = shard
    crafted = with_huge_member(path, tmp_path / "huge-000000.tar", ".ref.png", sample=1)
    ds = make_dataset(str(crafted), cfg(), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="model.data"):
        assert [s[B.CLIP_ID] for s in ds] == keys[:1]
    counts = ds.skips.counts()
    assert counts["shard_error"] == 1 and counts["missing_member"] == 1  # the stub of sample 1 (no txt)
    refusal = next(r.getMessage() for r in caplog.records if "unreadable shard" in r.getMessage())
    assert (
        str(crafted) in refusal
        and f"'{keys[1]}.ref.png'" in refusal
        and str(HUGE) in refusal
        and "file ends at byte" in refusal
    )


@pytest.mark.timeout(60)
def test_huge_header_of_a_read_member(shard, tmp_path):
    # The json of sample 2: the samples before it are whole and delivered.
    _, path, keys = shard
    crafted = with_huge_member(path, tmp_path / "huge-000000.tar", ".json", sample=2)
    ds = make_dataset(str(crafted), cfg(), rank=0, world_size=1)
    assert [s[B.CLIP_ID] for s in ds] == keys[:2]
    assert ds.skips.counts()["shard_error"] == 1 and ds.skips.samples == 0


@pytest.mark.timeout(60)
def test_huge_header_in_a_stream_is_bounded_by_max_member_bytes(shard, tmp_path):
    # A stream's length is unknown: the member size limit is the bound.
    _, path, keys = shard
    crafted = with_huge_member(path, tmp_path / "huge-000000.tar", ".ref.png", sample=1)
    ds = make_dataset(f"pipe:cat {crafted}", cfg(), rank=0, world_size=1)
    assert [s[B.CLIP_ID] for s in ds] == keys[:1]
    assert ds.skips.counts()["oversized_member"] == 1
    small = make_dataset(str(path), cfg(max_member_bytes=1000), rank=0, world_size=1)
    assert list(small) == [] and small.skips.counts()["oversized_member"] == 1


@pytest.mark.timeout(120)
def test_resampled_shard_where_nothing_decodes_stalls_with_counts(shard, tmp_path):
    _, path, _ = shard
    bad = with_bad_videos(path, tmp_path / "bad-000000.tar", {0, 1, 2, 3})
    loader = make_loader(
        str(bad), cfg(resampled=True), batch_size=1, num_workers=2, epoch_samples=10, rank=0, world_size=1
    )
    with pytest.raises(LoaderStalled) as caught:
        next(iter(loader))
    cause = str(caught.value).strip().splitlines()[-1]  # DataLoader puts the worker's message last
    assert "100 samples or shards skipped in a row" in cause and "max_consecutive_skips=100" in cause
    assert "'bad_video': 100" in cause and "not a video" not in cause.split("last:")[0]
    # Configurable; in one process the counter shows exactly the streak.
    ds = make_dataset(str(bad), cfg(resampled=True, max_consecutive_skips=7), epoch_samples=10, rank=0, world_size=1)
    with pytest.raises(LoaderStalled, match=r"7 samples or shards skipped in a row.*\{'bad_video': 7\}"):
        list(ds)
    assert ds.skips.counts()["bad_video"] == 7


@pytest.mark.timeout(60)
def test_a_usable_sample_ends_the_streak(shard, tmp_path):
    # good, bad, bad, good, repeated: runs of two bad samples at most.
    _, path, keys = shard
    mixed = with_bad_videos(path, tmp_path / "mixed-000000.tar", {1, 2})
    ds = make_dataset(str(mixed), cfg(resampled=True, max_consecutive_skips=3), epoch_samples=10, rank=0, world_size=1)
    assert {s[B.CLIP_ID] for s in ds} == {keys[0], keys[3]}
    assert ds.skips.counts()["bad_video"] >= 8
    strict = make_dataset(
        str(mixed), cfg(resampled=True, max_consecutive_skips=2), epoch_samples=10, rank=0, world_size=1
    )
    with pytest.raises(LoaderStalled, match=r"\{'bad_video': 2\}"):
        list(strict)


@pytest.mark.timeout(60)
def test_empty_or_missing_shards_stall_instead_of_looping(tmp_path):
    empty = tmp_path / "empty-000000.tar"
    tarfile.open(empty, "w").close()
    ds = make_dataset(str(empty), cfg(resampled=True), epoch_samples=4, rank=0, world_size=1)
    with pytest.raises(LoaderStalled, match=r"\{'empty_shard': 100\}"):
        list(ds)
    assert list(make_dataset(str(empty), cfg(), rank=0, world_size=1)) == []  # one pass: ends, counted once
    gone = make_dataset(str(tmp_path / "gone-000000.tar"), cfg(resampled=True), epoch_samples=4, rank=0, world_size=1)
    with pytest.raises(LoaderStalled, match=r"'shard_error': 100.*No such file"):
        list(gone)


def test_shard_paths_are_pinned_to_their_set(shard):
    # Through workspace/shards (a link), the dataset reads the set the link named when it was made.
    _ws, path, _ = shard
    ds = make_dataset(str(path), cfg(), rank=0, world_size=1)
    assert ds.urls == [os.path.realpath(path)] and "/shard-sets/" in ds.urls[0]


@pytest.mark.timeout(200)
def test_bench_cases_refuse_in_bounded_time(tmp_path):
    for case in (case_huge_header, case_undecodable_resampled):
        folder = tmp_path / case.__name__
        folder.mkdir()
        ok, detail = case(folder)
        assert ok, detail
