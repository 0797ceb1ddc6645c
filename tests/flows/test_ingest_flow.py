"""The ingest flow under a real (temporary) Prefect API: bad input, caching, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_schemas import ClipRecord, IngestConfig, VideoRecord, read_records
from data_schemas.workspace import Workspace
from preprocess import media
from tests.helpers.cli import task_states, temp_files
from tests.helpers.media import CLIPS, EXPECTED, build_media_folder

pytestmark = pytest.mark.slow


def run_ingest(folder: Path, workspace: Path, config: IngestConfig | None = None):
    """Run the flow; return (summary, the flow run id)."""
    from flows.ingest import ingest

    state = ingest(folder, workspace, config or IngestConfig(), return_state=True)
    return state.result(), state.state_details.flow_run_id


def clip_stats(workspace: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Workspace(workspace).clips.iterdir()}


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    return build_media_folder(tmp_path_factory.mktemp("media") / "in")


@pytest.fixture(scope="module")
def ingested(media_folder, tmp_path_factory, prefect_api):
    workspace = tmp_path_factory.mktemp("ws")
    summary, run_id = run_ingest(media_folder, workspace)
    return workspace, summary, run_id


def test_every_input_gets_its_status_and_reason(media_folder, ingested):
    workspace, summary, _ = ingested
    records = {
        Path(r.path).relative_to(media_folder).as_posix(): r
        for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)
    }
    assert set(records) == set(EXPECTED)
    got = {name: (r.status.value, r.reason.value if r.reason else None) for name, r in records.items()}
    assert got == EXPECTED
    for name, record in records.items():
        if record.status == "failed":
            assert record.error and str(media_folder / name) in record.error, record.error
    assert records["sub/copy of two people.MP4"].duplicate_of == str(media_folder / "good_two_people.mp4")
    assert records["rotated_90.mp4"].rotation in (90, 270)
    assert records["variable_rate.mp4"].variable_frame_rate is True
    assert records["audio_only.mp4"].sha256 and records["loop.mp4"].sha256 is None
    counts = (summary.num_files, summary.num_ok, summary.num_duplicates)
    assert counts == (len(EXPECTED), sum(s == "ok" for s, _ in EXPECTED.values()), 1)


def test_good_files_all_become_decodable_clips(media_folder, ingested):
    workspace, summary, _ = ingested
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    by_source: dict[str, list[ClipRecord]] = {}
    for clip in clips:
        by_source.setdefault(Path(clip.source_path).relative_to(media_folder).as_posix(), []).append(clip)
    assert {name: [(c.width, c.height) for c in cs] for name, cs in by_source.items()} == CLIPS
    assert summary.num_clips == len(clips) == sum(map(len, CLIPS.values()))
    for clip in clips:
        path = workspace / clip.path
        assert media.count_and_check_frames(path) == (clip.num_frames, clip.width, clip.height)
        expected_frames = (clip.end_s - clip.start_s) * clip.fps
        assert abs(clip.num_frames - expected_frames) <= 2, (clip, expected_frames)
    assert sorted(p.name for p in Workspace(workspace).clips.iterdir()) == sorted(Path(c.path).name for c in clips)
    assert temp_files(workspace) == []


def test_summary_artifact_counts_by_status_and_reason(ingested):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, _, run_id = ingested
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    table = {(r["status"], r["reason"]): r["files"] for r in rows}
    assert table[("failed", "not_a_video")] == 3 and table[("duplicate", "")] == 1
    assert table[("clips", "")] == sum(map(len, CLIPS.values()))


def test_rerun_redoes_nothing(media_folder, ingested):
    workspace, _, _ = ingested
    before = clip_stats(workspace)
    manifest_before = read_records(Workspace(workspace).videos_manifest, VideoRecord)
    _, run_id = run_ingest(media_folder, workspace)
    num_contents = len({r.sha256 for r in manifest_before if r.sha256})
    states = task_states(run_id, expected=num_contents + 1)
    ingest_states = {name: state for name, state in states.items() if name.startswith("ingest ")}
    assert len(ingest_states) == num_contents
    # the folder's small files hashed by one task run (a run per file only beyond 256 MiB)
    num_hashed = sum(r.sha256 is not None for r in manifest_before)
    hash_runs = [name for name in states if name.startswith("hash ")]
    assert len(hash_runs) == 1 and hash_runs[0].endswith(f" and {num_hashed - 1} more"), states
    assert set(ingest_states.values()) == {"Cached"}, ingest_states
    assert clip_stats(workspace) == before  # no clip was rewritten
    assert read_records(Workspace(workspace).videos_manifest, VideoRecord) == manifest_before


def test_file_changed_in_place_is_processed_again(tmp_path, prefect_api):
    from preprocess.synthetic import SyntheticSpec, make_synthetic_video

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    make_synthetic_video(SyntheticSpec(num_frames=30, seed=5), folder, "a")
    make_synthetic_video(SyntheticSpec(num_frames=30, seed=6), folder, "b")
    run_ingest(folder, workspace)
    first = {r.path: r.sha256 for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)}
    make_synthetic_video(SyntheticSpec(num_frames=40, seed=7), folder, "a")  # same name, new content
    _, run_id = run_ingest(folder, workspace)
    ingest_states = {
        name: state for name, state in task_states(run_id, expected=3).items() if name.startswith("ingest ")
    }
    assert ingest_states == {"ingest a.mp4": "Completed", "ingest b.mp4": "Cached"}
    second = {r.path: r.sha256 for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)}
    a = str(folder / "a.mp4")
    assert second[a] != first[a] and second[str(folder / "b.mp4")] == first[str(folder / "b.mp4")]
    (clip,) = [c for c in read_records(Workspace(workspace).clips_manifest, ClipRecord) if c.source_path == a]
    assert clip.num_frames == 40


def test_deleted_clips_are_made_again(tmp_path, prefect_api):
    from preprocess.synthetic import SyntheticSpec, make_synthetic_video

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    make_synthetic_video(SyntheticSpec(num_frames=30, seed=5), folder, "a")
    run_ingest(folder, workspace)
    (clip_file,) = Workspace(workspace).clips.iterdir()
    clip_file.unlink()
    run_ingest(folder, workspace)
    assert clip_file.exists()


def test_files_are_hashed_in_batches_of_256_mib_and_at_most_1000_batches():
    from flows.ingest import HASH_BATCH_BYTES, hash_batches
    from preprocess.video import FoundFile

    def files(sizes):
        return [FoundFile(Path(f"f{i}"), size) for i, size in enumerate(sizes)]

    def shape(found):
        return [len(batch) for batch in hash_batches(found)]

    big, small = 300 << 20, 1 << 10
    assert shape(files([small] * 10)) == [10]  # a folder of small files: one task run
    assert shape(files([big] * 3)) == [1, 1, 1]  # raw videos: a run per file
    assert shape(files([small] * 5 + [big] + [small] * 3)) == [6, 3]
    assert shape(files([HASH_BATCH_BYTES // 2] * 5)) == [2, 2, 1]
    many = files([big] * 2500)
    batches = hash_batches(many)
    assert len(batches) <= 1000 and {len(b) for b in batches} == {3, 1}  # ceil(2500 / 1000) files each
    assert [f for b in batches for f in b] == many  # each file once, in order
    assert hash_batches([]) == []


def test_a_hash_batch_retries_transient_errors_and_names_each_unreadable_file(tmp_path, monkeypatch):
    import errno
    import hashlib

    from preprocess import video
    from tasks.ingest import hash_files

    good, flaky, failing = (tmp_path / n for n in ("good.mp4", "flaky.mp4", "failing.mp4"))
    for path in (good, flaky, failing):
        path.write_bytes(path.name.encode())
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "gone.mp4")
    calls: dict[str, int] = {}
    real = video.sha256_file

    def disk(path):
        calls[path.name] = calls.get(path.name, 0) + 1
        if path == failing or (path == flaky and calls[path.name] == 1):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(video, "sha256_file", disk)
    digests = hash_files.fn([good, dangling, flaky, failing], delay_s=0)
    assert (
        digests[0] == hashlib.sha256(b"good.mp4").hexdigest() and digests[2] == hashlib.sha256(b"flaky.mp4").hexdigest()
    )
    assert isinstance(digests[1], FileNotFoundError) and calls["dangling.mp4"] == 1  # permanent: not retried
    assert isinstance(digests[3], OSError) and digests[3].errno == errno.EIO and calls["failing.mp4"] == 3
    assert calls["flaky.mp4"] == 2
