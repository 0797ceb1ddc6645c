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
    num_hashed = sum(r.sha256 is not None for r in manifest_before)
    states = task_states(run_id, expected=num_contents + num_hashed)
    ingest_states = {name: state for name, state in states.items() if name.startswith("ingest ")}
    assert len(ingest_states) == num_contents
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
        name: state for name, state in task_states(run_id, expected=4).items() if name.startswith("ingest ")
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
