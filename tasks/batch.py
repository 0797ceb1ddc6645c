"""One task run for a batch of keys of a cached per-key task (``flows.runtime.run_pipeline``
beyond ``PER_KEY_TASKS_UP_TO`` keys): a task run per key costs the flow and Prefect's server
more than a stage's work once there are thousands (bench/scale.py).

Each key keeps its own cache entry, the per-key task's: the same key (its ``cache_key_fn``),
the same result file, storage and serializer, read and written through Prefect's
``ResultStore``. A key that a per-key run computed is a hit here and the other way round,
whichever batch it falls in: the batches' membership shifts as a folder grows, so the batch
task has no cache of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.results import ResultStore

from tasks.common import cache_key, call_retrying, persisted, remove_foreign_results


def batch_title(per_key: Task, keys: list) -> str:
    """A batch's task run name: the stage, the count and the keys, e.g. "pose ×10 (c000…c009)"."""
    span = str(keys[0]) if len(keys) == 1 else f"{keys[0]}…{keys[-1]}"
    return f"{per_key.name} ×{len(keys)} ({span})"


def _run_name(parameters: dict) -> str:
    return batch_title(parameters["per_key"], parameters["keys"])


@task(name="batch", task_run_name=_run_name, cache_policy=NO_CACHE, persist_result=False, retries=0)
def run_batch(per_key: Task, workspace: Path, keys: list, calls: list[tuple], refresh: bool = False) -> list:
    """``per_key``'s function on each of ``calls`` (its positional arguments, one tuple per key
    of ``keys``), each through ``per_key``'s cache under ``workspace`` (``refresh``: computed
    and written again, as ``refresh_cache``). Returns per key its record, or the exception
    it ended with: a failing key fails alone. A transient error (``tasks.common.is_transient``)
    is retried as often as ``per_key`` retries."""
    assert per_key.cache_key_fn is not None, "a batch shares the per-key cache through the task's key function"
    store = ResultStore().update_for_task(persisted(per_key, workspace), _sync=True)
    logger = get_run_logger()
    outcomes: list[Any] = []
    for key, args in zip(keys, calls, strict=True):
        try:
            outcomes.append(_through_cache(per_key, store, workspace, key, args, refresh))
        except Exception as exc:  # that key's outcome, as its own task run's would be; logged as Prefect logs one
            logger.error("%s failed: %r", key, exc, exc_info=exc)
            outcomes.append(exc)
    return outcomes


def _through_cache(per_key: Task, store: ResultStore, workspace: Path, key, args: tuple, refresh: bool):
    result_key = cache_key(per_key, args)
    if not refresh:
        # Checked before Prefect reads it: Prefect decodes a file with the serializer it names.
        for path, why in remove_foreign_results(per_key, workspace, [args]):
            get_run_logger().warning("removed %s: %s; it is computed again", path, why)
        if store.exists(result_key):  # as a per-key run's transaction: an unreadable record is computed again
            return store.read(result_key).result
    record = _call(per_key, key, args)
    store.write(obj=record, key=result_key)
    return record


def _call(per_key: Task, key, args: tuple):
    """``per_key``'s function, retried on transient errors as the stage tasks' retry_transient does."""
    return call_retrying(per_key.fn, args, per_key.retries, per_key.retry_delay_seconds, key)
