"""Process set-up that must happen before Prefect is imported, and task runner choice."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


def run_cached(task, workspace: Path, arguments: dict, products: Callable[[Any], Iterable[str]], label: str) -> dict:
    """Submit a cached task once per key of ``arguments``; returns each key's record, or the
    exception its task ended with (the others go on).

    ``products(record)`` names the files (relative to the workspace) a record stands for: a
    cache hit whose files have since disappeared is computed again. A progress bar shows on
    a terminal.
    """
    from prefect.futures import as_completed
    from prefect.logging import get_run_logger
    from rich.progress import Progress

    from tasks.common import result_storage

    workspace = Path(workspace)
    task = task.with_options(result_storage=result_storage(workspace))

    def run(run_task, keys: list, what: str) -> dict:
        futures = {run_task.submit(*arguments[key]): key for key in keys}
        outcomes = {}
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            bar = progress.add_task(what, total=len(futures))
            for future in as_completed(list(futures)):
                outcomes[futures[future]] = future.result(raise_on_failure=False)
                progress.advance(bar)
        return outcomes

    outcomes = run(task, list(arguments), label)
    stale = [k for k, o in outcomes.items() if not isinstance(o, BaseException) and not all((workspace / p).exists() for p in products(o))]
    if stale:
        get_run_logger().warning("%d cached result(s) lost their files; recomputing", len(stale))
        outcomes |= run(task.with_options(refresh_cache=True), stale, f"{label} (again)")
    return outcomes


def run_per_clip(task, workspace: Path, arguments: dict[str, tuple]) -> tuple[dict, list[str]]:
    """``run_cached`` for stages whose record names one product file (``record.path``);
    returns (records by clip id, failed clip ids)."""
    outcomes = run_cached(task, workspace, arguments, lambda record: [record.path], task.name)
    records = {i: o for i, o in outcomes.items() if not isinstance(o, BaseException)}
    return records, [i for i, o in outcomes.items() if isinstance(o, BaseException)]
