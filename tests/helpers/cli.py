"""Running the pipeline as users do: the CLI's environment, temp files a run leaves behind,
and the task states the Prefect API recorded for a flow run."""

from __future__ import annotations

import os
import time
from pathlib import Path

from data_schemas.atomic import is_temp_name

ROOT = Path(__file__).resolve().parents[2]


def cli_env(
    api_url: str | None = None,
    *,
    keep_api_url: bool = False,
    path_prefix: Path | str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The user's environment: no test Prefect home or API, so the CLI uses the workspace's.

    ``api_url``: a running Prefect API to use instead; ``keep_api_url``: keep the caller's
    ``PREFECT_API_URL`` (tests share their server rather than each child starting its own);
    ``path_prefix``: a folder put first on PATH (fake tools); ``extra``: further variables."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or (keep_api_url and k == "PREFECT_API_URL")
    }
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "400"  # rich wraps error boxes at the terminal width
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env | extra


def temp_files(root: Path) -> list[Path]:
    """Every file or folder under ``root`` with a temp name (a write that did not finish)."""
    return [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files if is_temp_name(n)]


def task_states(flow_run_id, expected: int) -> dict[str, str]:
    """Task run name -> final state name, as the Prefect API recorded them. Task states
    reach the API as events, a moment after the flow returns: wait for all of them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {run.name: run.state.name for run in runs if run.state and run.state.is_final()}
            if len(states) >= expected or time.monotonic() > deadline:
                return states
            time.sleep(0.2)
