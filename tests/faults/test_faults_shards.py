"""The shard set is published as one unit: disk full, a real file-size limit, SIGKILL of the
writer and the crash windows of publication leave the previous set linked and consistent,
and a rerun produces exactly what an uninterrupted run produces."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from bench.fault_cases.shards import (
    NEW,
    OLD,
    case_file_size_limit,
    copy_inputs,
    disk_full_at,
    kill_after,
    make_inputs,
    published_old_set,
    reference_digests,
    rerun_problems,
    set_digests,
    set_problems,
    shard_config,
)
from data_schemas import read_records, write_records
from data_schemas.atomic import temp_path_for
from data_schemas.shard import ShardSample
from data_schemas.workspace import INDEX, Workspace
from preprocess.shards import verify_shard_set, write_shards

SET_BYTES = 4 * 51_200  # the NEW set's four tars (one ~40 KB sample each, padded to 10 KB records)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = make_inputs(tmp_path_factory.mktemp("inputs"))
    return root, reference_digests(root, tmp_path_factory.mktemp("reference"))


def dead_writer_name(path: Path) -> Path:
    """A temporary name of ``path`` as a writer that no longer runs would have left it."""
    tmp = temp_path_for(path)
    return tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", "-999999999-"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("budget", [0, 20_000, 51_200, 120_000, SET_BYTES - 1])
def test_disk_full_leaves_the_previous_set_and_a_rerun_completes(inputs, tmp_path, budget):
    # 0: the first byte; 51,200: right after the first tar; SET_BYTES - 1: the last end-of-archive byte.
    root, expected = inputs
    ok, detail = disk_full_at(tmp_path, budget, inputs=root, expected=expected)
    assert ok, detail


def test_disk_full_while_writing_the_index(inputs, tmp_path, monkeypatch):
    # Every tar is whole; the index write (its own temp + rename inside the set) runs out of space.
    import preprocess.shards

    root, expected = inputs
    ws, old, _ = published_old_set(tmp_path, inputs=root, expected=expected)

    def index_on_a_full_disk(records, model, path):
        write_records(records, model, path)  # the bytes land, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(preprocess.shards, "write_records", index_on_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_shards(ws, shard_config(NEW))
    monkeypatch.undo()
    assert set_problems(ws, old, "after ENOSPC") == []
    assert [p.name for p in Workspace(ws).shard_sets.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []
    assert not rerun_problems(ws, expected)


def test_the_set_fits_when_the_disk_has_room(inputs, tmp_path):
    # The bound above is tight: with exactly the set's bytes free, the writer succeeds.
    root, expected = inputs
    ok, detail = disk_full_at(tmp_path, SET_BYTES + 100_000, inputs=root, expected=expected)
    assert not ok and "no fault happened" in detail


@pytest.mark.timeout(300)
def test_kernel_file_size_limit(inputs, tmp_path):
    root, expected = inputs
    ok, detail = case_file_size_limit(tmp_path, inputs=root, expected=expected)
    assert ok, detail


@pytest.mark.timeout(300)
@pytest.mark.parametrize("budget", [20_000, SET_BYTES - 5_000])
def test_sigkill_of_the_writer(inputs, tmp_path, budget):
    # SIGKILL from outside while the child blocks in a write: inside the first tar, inside the last.
    root, expected = inputs
    ok, detail = kill_after(tmp_path, budget, inputs=root, expected=expected)
    assert ok, detail


def test_killed_between_rename_and_link_swap(inputs, tmp_path):
    """The new set is whole under its final name, the temporary link not yet swapped in."""
    root, expected = inputs
    ws = copy_inputs(root, tmp_path / "ws")
    layout = Workspace(ws)
    write_shards(ws, shard_config(OLD))
    old = set_digests(layout.shards)
    scratch = copy_inputs(root, tmp_path / "scratch")
    new_set = Path(write_shards(scratch, shard_config(NEW)).set_dir)
    shutil.copytree(scratch / new_set, ws / new_set)
    os.symlink(str(new_set), dead_writer_name(layout.shard_sets / layout.shards.name))
    # Readers still see the old set, whole (the unlinked one is under a final name: the state
    # of a writer killed between the two steps, which set_problems names).
    assert not verify_shard_set(layout.shards) and set_digests(layout.shards) == old
    assert set_problems(ws, old, "killed") == [f"killed: other sets under final names: ['{new_set.name}']"]
    assert not rerun_problems(ws, expected)


def test_a_folder_from_before_shard_sets_is_migrated(inputs, tmp_path):
    root, expected = inputs
    ws = copy_inputs(root, tmp_path / "ws")
    layout = Workspace(ws)
    write_shards(ws, shard_config(OLD))
    legacy = tmp_path / "legacy"
    shutil.copytree(layout.shards, legacy)  # the files, not the link
    shutil.rmtree(layout.shard_sets)
    layout.shards.unlink()
    legacy.rename(layout.shards)
    assert layout.shards.is_dir() and not layout.shards.is_symlink()
    assert not rerun_problems(ws, expected)


def test_killed_while_migrating(inputs, tmp_path):
    """The old real folder already moved aside (then the writer died), no link yet."""
    root, expected = inputs
    ws = copy_inputs(root, tmp_path / "ws")
    scratch = copy_inputs(root, tmp_path / "scratch")
    new_set = Path(write_shards(scratch, shard_config(NEW)).set_dir)
    shutil.copytree(scratch / new_set, ws / new_set)
    write_shards(copy_inputs(root, tmp_path / "old"), shard_config(OLD))
    shutil.copytree(Workspace(tmp_path / "old").shards, dead_writer_name(Workspace(ws).shard_sets / "legacy"))
    assert not Workspace(ws).shards.exists()
    assert not rerun_problems(ws, expected)


def test_rerun_with_the_same_inputs_changes_nothing(inputs, tmp_path):
    root, expected = inputs
    ws = copy_inputs(root, tmp_path / "ws")
    layout = Workspace(ws)
    first = write_shards(ws, shard_config(NEW))
    link, stat = os.readlink(layout.shards), os.stat(ws / first.set_dir / "train-000000.tar")
    second = write_shards(ws, shard_config(NEW))
    assert second == first and os.readlink(layout.shards) == link == first.set_dir
    assert os.stat(ws / first.set_dir / "train-000000.tar").st_ino == stat.st_ino  # the published files were kept
    assert set_digests(layout.shards) == expected
    assert sorted(p.name for p in layout.shard_sets.iterdir()) == sorted([".lock", Path(first.set_dir).name])


def test_the_consistency_check_finds_what_disagrees(inputs, tmp_path):
    """verify_shard_set (which the cases above rely on) fails on each kind of disagreement."""
    root, _ = inputs
    ws = copy_inputs(root, tmp_path / "ws")
    summary = write_shards(ws, shard_config(NEW))
    assert verify_shard_set(Workspace(ws).shards) == []

    def damaged(name: str, change) -> list[str]:
        copy = tmp_path / name
        shutil.copytree(ws / summary.set_dir, copy)
        change(copy)
        return verify_shard_set(copy)

    rows = read_records(Workspace(ws).shards_index, ShardSample)
    shifted = [rows[0].model_copy(update={"offset": rows[0].offset + 512}), *rows[1:]]
    assert "the index says" in " ".join(damaged("offset", lambda d: write_records(shifted, ShardSample, d / INDEX)))
    assert "does not list" in " ".join(
        damaged("extra", lambda d: shutil.copy(d / "train-000000.tar", d / "train-000009.tar"))
    )
    assert "missing" in " ".join(damaged("gone", lambda d: (d / "val-000001.tar").unlink()))
    cut = lambda d: (d / "train-000001.tar").write_bytes((d / "train-000001.tar").read_bytes()[:30_000])
    assert damaged("cut", cut)
    assert "index.parquet" in " ".join(damaged("noindex", lambda d: (d / INDEX).unlink()))


def test_a_set_being_read_outlives_its_replacement(inputs, tmp_path):
    """A training run holds the set it reads (data_schemas.shard.hold_for_reading): a newer
    publication links the new set and leaves the read one whole; the next publication after
    the reader is done removes it."""
    from data_schemas.shard import hold_for_reading

    ws = copy_inputs(inputs[0], tmp_path / "ws")
    layout = Workspace(ws)
    first = Path(write_shards(ws, shard_config(OLD)).set_dir)
    reading = hold_for_reading(sorted(layout.shards.glob("*.tar")))
    second = Path(write_shards(ws, shard_config(NEW)).set_dir)
    assert second != first and os.readlink(layout.shards) == str(second)
    assert verify_shard_set(ws / first) == [] and verify_shard_set(layout.shards) == []
    for handle in reading:
        handle.close()
    write_shards(
        ws, shard_config(OLD)
    )  # publishes the first set again: the held-then-freed one is reused or rebuilt whole
    write_shards(ws, shard_config(NEW))
    assert sorted(p.name for p in layout.shard_sets.iterdir() if not p.name.startswith(".")) == [second.name]
