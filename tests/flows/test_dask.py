"""The ingest flow on a real local Dask cluster of two worker processes."""

from __future__ import annotations

import os

import pytest

from data_schemas import ClipRecord, IngestConfig, VideoRecord, read_records
from data_schemas.workspace import Workspace
from preprocess.synthetic import SyntheticSpec, make_synthetic_video

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_ingest_on_a_dask_cluster(tmp_path, prefect_api, monkeypatch):
    from distributed import Client, LocalCluster, get_task_stream

    from flows.ingest import ingest
    from flows.runtime import make_task_runner

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    for i in range(3):
        make_synthetic_video(SyntheticSpec(num_frames=30, num_persons=2, seed=i), folder, f"v{i}")
    (folder / "broken.mp4").write_text("not a video")
    # Workers are separate processes: they reach the same Prefect API through the environment.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        runner = make_task_runner(dask_address=cluster.scheduler_address)
        with Client(cluster) as client, get_task_stream(client) as stream:
            summary = ingest.with_options(task_runner=runner)(folder, workspace, IngestConfig())
    # The hash task (one for these small files) and every ingest task ran on the cluster's
    # workers, and both took part.
    assert len(stream.data) == 1 + 4 and len({task["worker"] for task in stream.data}) == 2
    videos = read_records(Workspace(workspace).videos_manifest, VideoRecord)
    assert sorted((os.path.basename(v.path), v.status.value) for v in videos) == [
        ("broken.mp4", "failed"),
        ("v0.mp4", "ok"),
        ("v1.mp4", "ok"),
        ("v2.mp4", "ok"),
    ]
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    assert summary.num_clips == len(clips) == 3 and all((workspace / c.path).exists() for c in clips)
