"""A verb against an already-running ``prefect server start`` (PREFECT_API_URL), as a user
who reruns often does: no temporary server, results and caches still in the workspace."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from data_schemas.workspace import Workspace
from preprocess.synthetic import SyntheticSpec, make_synthetic_video
from tests.helpers.cli import cli_env
from tests.helpers.prefect_server import free_port, prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.server]
CLI = [sys.executable, "-m", "flows.cli"]


def test_preprocess_on_a_running_server_keeps_the_workspace_self_contained(tmp_path):
    folder, workspace = tmp_path / "in", tmp_path / "ws"
    for i in range(2):
        make_synthetic_video(
            SyntheticSpec(width=160, height=120, num_frames=30, num_persons=2, seed=i), folder, f"v{i}"
        )
    profile = tmp_path / "truth.yaml"
    profile.write_text("pose:\n  models: truth\nsegment:\n  models: truth\n")
    args = [*CLI, "preprocess", str(folder), "-w", str(workspace), "-c", str(profile)]
    with prefect_server(tmp_path / "server") as url:
        runs = [subprocess.run(args, env=cli_env(url), capture_output=True, text=True, timeout=300) for _ in range(2)]
        for done in runs:
            assert done.returncode == 0, done.stderr[-3000:]
            assert "temporary server" not in done.stderr  # the running server, not one of its own
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            names = sorted(run.name for run in client.read_flow_runs())
    assert names.count(f"preprocess {folder}") == 2  # the runs' history is on that server
    # The rerun redid nothing: every pose and segment task of both clips was a cache hit.
    stages = [
        line
        for line in runs[1].stderr.splitlines()
        if "Finished in state" in line and ("Task run 'pose " in line or "Task run 'segment " in line)
    ]
    assert len(stages) == 2 * 2 and all("Cached(type=COMPLETED)" in line for line in stages), stages
    ws = Workspace(workspace)
    assert any(ws.results.iterdir())  # results and caches stay in the workspace...
    assert not list(workspace.rglob("*.db"))  # ...but no Prefect database of its own


def test_a_prefect_api_url_where_nothing_answers_is_refused_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    folder = tmp_path / "in"
    folder.mkdir()
    start = time.monotonic()
    done = subprocess.run(
        [*CLI, "ingest", str(folder), "-w", str(tmp_path / "ws")],
        env=cli_env(url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: PREFECT_API_URL={url}: no Prefect server answers there"), last
    assert "prefect server start" in last and "unset PREFECT_API_URL" in last
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 60  # refused up front, not after the client's retries
