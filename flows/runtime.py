"""Process set-up that must happen before Prefect is imported, and task runner choice."""

from __future__ import annotations

import os
from pathlib import Path

MANIFESTS_DIR = "manifests"


def use_workspace(workspace: Path) -> Path:
    """Point Prefect's home at the workspace (unless the user chose one), so that a
    workspace is self-contained and a fresh one starts clean. Call before importing prefect."""
    workspace = Path(workspace).absolute()
    workspace.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", os.fspath(workspace / ".prefect"))
    # Analytics off: with it on, a local SQLite database reports "database is locked".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return workspace


def make_task_runner(dask_address: str | None = None, max_workers: int | None = None):
    """A local thread pool (the work runs in ffmpeg child processes), or a Dask cluster."""
    if dask_address:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ValueError("--dask-address needs the 'dask' extra: pip install 'multianimate[dask]'") from exc
        return DaskTaskRunner(address=dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1)


def run_per_clip(task, workspace: Path, arguments: dict[str, tuple]) -> tuple[dict, list[str]]:
    """Submit a cached per-clip task for every clip; returns (records by clip id, failed clip ids).

    The task's records name their product file (``record.path``, relative to the workspace):
    a cache hit whose file has since disappeared is computed again.
    """
    from tasks.common import result_storage

    task = task.with_options(result_storage=result_storage(workspace))
    futures = {clip_id: task.submit(*args) for clip_id, args in arguments.items()}
    outcomes = {clip_id: future.result(raise_on_failure=False) for clip_id, future in futures.items()}
    stale = [i for i, o in outcomes.items() if not isinstance(o, BaseException) and not (Path(workspace) / o.path).exists()]
    refresh = task.with_options(refresh_cache=True)
    outcomes |= {i: refresh.submit(*arguments[i]).result(raise_on_failure=False) for i in stale}
    records = {i: o for i, o in outcomes.items() if not isinstance(o, BaseException)}
    return records, [i for i, o in outcomes.items() if isinstance(o, BaseException)]
