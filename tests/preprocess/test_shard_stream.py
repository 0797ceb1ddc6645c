"""Shards written as clips finish (preprocess.shards.ShardStream): clips offered in any order
give the bytes of the one-pass writer; writing starts before the last clip is in; a rerun
that changes nothing writes nothing, one that changes a clip writes from it; an error leaves
the published set and no temporary folder."""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from pathlib import Path

import pytest

from data_schemas.config import ShardConfig
from data_schemas.workspace import Workspace
from preprocess.shards import (
    INPUTS,
    SampleEntry,
    ShardStream,
    manifest_records,
    published_inputs,
    verify_shard_set,
    write_shards,
)
from tests.helpers.workspaces import make_workspace

CONFIG = ShardConfig(val_fraction=0.5, target_shard_bytes=1)  # a tar per sample: several files to compare
RECIPE = "recipe-1"
NUM_CLIPS = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    make_workspace(root, num_clips=NUM_CLIPS)
    return root


def fresh(inputs: Path, to: Path) -> Workspace:
    """A copy of the clips, poses and masks without any shards."""
    shutil.copytree(inputs, to, ignore=shutil.ignore_patterns("shard*"))
    return Workspace(to)


def set_bytes(ws: Workspace) -> dict[str, str]:
    """Digest of every file of the published set."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ws.shards.resolve().iterdir())}


def entries(ws: Workspace) -> list[SampleEntry]:
    return [SampleEntry(c, p, m) for c, p, m in manifest_records(ws)]


def temporaries(ws: Workspace) -> list[str]:
    return [p.name for p in ws.shard_sets.iterdir() if p.name.startswith(".set")]


def test_clips_offered_in_any_order_give_the_one_pass_bytes(inputs, tmp_path):
    reference = fresh(inputs, tmp_path / "one-pass")
    write_shards(reference, CONFIG, recipe=RECIPE)
    ws = fresh(inputs, tmp_path / "streamed")
    shuffled = entries(ws)
    random.Random(0).shuffle(shuffled)
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in shuffled], RECIPE) as stream:
        for entry in shuffled:
            stream.offer(entry.clip.clip_id, entry)
        summary = stream.finish()
    assert summary is not None and summary.num_samples == NUM_CLIPS
    assert set_bytes(ws) == set_bytes(reference) and len(set_bytes(ws)) >= NUM_CLIPS + 2
    assert summary.set_dir == Workspace(reference.root).relative(reference.shards.resolve())
    assert verify_shard_set(ws.shards) == [] and temporaries(ws) == []


def test_writing_starts_before_the_last_clip_is_in(inputs, tmp_path):
    ws = fresh(inputs, tmp_path / "ws")
    ordered = entries(ws)
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE) as stream:
        for entry in ordered[:-1]:
            stream.offer(entry.clip.clip_id, entry)
        # The samples of every clip offered so far reach their tars while the last is awaited.
        deadline = time.monotonic() + 60
        while len(list(ws.shard_sets.glob(".set*/*.tar"))) < NUM_CLIPS - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(ws.shard_sets.glob(".set*/*.tar"))) == NUM_CLIPS - 1
        assert stream.through_at_first_write is not None and stream.through_at_first_write < NUM_CLIPS
        assert not ws.shards.exists()  # published only when whole
        stream.offer(ordered[-1].clip.clip_id, ordered[-1])
        summary = stream.finish()
    assert summary is not None and summary.num_samples == NUM_CLIPS and verify_shard_set(ws.shards) == []


def test_a_rerun_writes_nothing_or_from_the_first_changed_clip(inputs, tmp_path):
    ws = fresh(inputs, tmp_path / "ws")
    first = write_shards(ws, CONFIG, recipe=RECIPE)
    published = ws.shards.resolve()
    ordered = entries(ws)
    assert published_inputs(ws, RECIPE) == {e.clip.clip_id: e.digest for e in ordered}
    assert published_inputs(ws, "another recipe") == {}

    # Nothing changed: nothing written, and the end-of-run writer keeps the set as it is.
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE) as stream:
        for entry in reversed(ordered):
            stream.offer(entry.clip.clip_id, entry)
        assert stream.finish() is None and stream.through_at_first_write is None
    stamp = (published / INPUTS).stat().st_mtime_ns
    assert write_shards(ws, CONFIG, recipe=RECIPE) == first
    assert ws.shards.resolve() == published and (published / INPUTS).stat().st_mtime_ns == stamp

    # The fourth clip left out now (and the second failed): written from the second clip on,
    # the clips before it from the held entries; the bytes of a one-pass write of the same.
    changed = [
        SampleEntry(e.clip, e.pose, e.mask, ("min_persons",)) if i == 3 else (None if i == 1 else e)
        for i, e in enumerate(ordered)
    ]
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE) as stream:
        for clip, entry in zip(ordered, changed):
            stream.offer(clip.clip.clip_id, entry)
        summary = stream.finish()
    assert summary is not None and stream.through_at_first_write == 2
    assert (summary.num_samples, summary.num_left_out, summary.left_out) == (NUM_CLIPS - 2, 1, {"min_persons": 1})
    reference = fresh(inputs, tmp_path / "reference")
    kept = [(e.clip, e.pose, e.mask) for i, e in enumerate(ordered) if i != 1]
    quality_free = write_shards(reference, CONFIG, kept, recipe=RECIPE)  # no filtering: the left-out clip is in
    assert quality_free.num_samples == NUM_CLIPS - 1
    index = {n: d for n, d in set_bytes(ws).items() if n.endswith(".tar")}
    assert set(index.items()) < set(set_bytes(reference).items())  # its tars, one fewer
    assert not published.exists() and verify_shard_set(ws.shards) == []


def test_an_error_while_writing_leaves_the_published_set(inputs, tmp_path):
    ws = fresh(inputs, tmp_path / "ws")
    write_shards(ws, CONFIG, recipe="old")
    before = set_bytes(ws)
    calls = []

    def failing_open(path: Path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        return open(path, "xb")

    ordered = entries(ws)
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE, open_file=failing_open) as stream:
        for entry in ordered:
            stream.offer(entry.clip.clip_id, entry)
        with pytest.raises(OSError, match="No space left"):
            stream.finish()
    assert set_bytes(ws) == before and temporaries(ws) == []

    # Clips that never come through: refused, nothing left behind.
    with ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE) as stream:
        stream.offer(ordered[0].clip.clip_id, ordered[0])
        with pytest.raises(RuntimeError, match=f"{NUM_CLIPS - 1} clip\\(s\\) never came through"):
            stream.finish()
    assert set_bytes(ws) == before and temporaries(ws) == []

    # An error in the flow while clips are under way: what was written goes.
    with pytest.raises(KeyError), ShardStream(ws, CONFIG, [e.clip.clip_id for e in ordered], RECIPE) as stream:
        stream.offer(ordered[0].clip.clip_id, ordered[0])
        raise KeyError("a stage's bug")
    assert set_bytes(ws) == before and temporaries(ws) == []
