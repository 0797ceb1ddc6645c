"""What every task shares: code versions for cache keys, result storage and its format, retry
rules, the gpu tag."""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from data_schemas.workspace import Workspace

# Tasks that hold a GPU carry this tag; `multianimate deploy` puts a concurrency limit on it.
GPU_TAG = "gpu"
# Prefect's JSON serializer: our records are pydantic models, stored as
# {"__class__": "<module>.<Record>", "data": {...}} and validated back into the class. The
# default (cloudpickle) would make every result file code that a cache lookup runs.
RESULT_SERIALIZER = "json"
# The only classes a result file may name: the decoder imports whatever module a name points to.
_OUR_PACKAGES = ("data_schemas.", "preprocess.", "model.", "tasks.", "flows.")

# OS errors that a retry cannot fix: they are facts about the input.
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP, errno.ENOTDIR}


@cache
def code_version(*modules: ModuleType) -> str:
    """Hash of the library modules a task runs: editing them invalidates its cache."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]


def result_storage(workspace: Path) -> Path:
    """Prefect results live in the workspace, so a workspace is self-contained."""
    return Workspace(Path(workspace).absolute()).results


def persisted(task, workspace: Path):
    """The task as its results are kept: persisted, as JSON, under the workspace."""
    return task.with_options(
        result_storage=result_storage(workspace), result_serializer=RESULT_SERIALIZER, persist_result=True
    )


def foreign_result(path: Path) -> str | None:
    """Why the file at a result key is not a result our serializer wrote, or None when it is.

    Prefect decodes a result file with the serializer the FILE names (pickle included), and
    the JSON decoder imports any class a file names: a workspace from elsewhere could run
    code at a cache lookup. Only complete records in our JSON format, naming our own
    pydantic records, pass."""
    if path.is_symlink():
        return "a symlink, not a result file"
    try:
        record = json.loads(path.read_bytes())
        if (
            not isinstance(record, dict)
            or set(record) != {"metadata", "result"}
            or not isinstance(record["metadata"], dict)
        ):
            return "not a Prefect result record"
        serializer = record["metadata"].get("serializer")
        if serializer != _our_serializer():
            kind = serializer.get("type") if isinstance(serializer, dict) else serializer
            return f"written with serializer {kind!r}, not our JSON serializer"
        if not isinstance(record["result"], str):
            return "its result is not JSON text"
        return _foreign_object(json.loads(record["result"]))
    except (OSError, ValueError) as exc:  # a truncated write, bytes that are not JSON
        return f"not a complete JSON record ({type(exc).__name__})"


@cache
def _our_serializer() -> dict:
    """The serializer field of the records we write: RESULT_SERIALIZER with Prefect's defaults
    (its json library, its encoder and decoder, no extra arguments)."""
    from prefect.results import resolve_serializer

    return resolve_serializer(RESULT_SERIALIZER).model_dump(mode="json")


def _foreign_object(value) -> str | None:
    if isinstance(value, list):
        return next(filter(None, map(_foreign_object, value)), None)
    if not isinstance(value, dict):
        return None
    if "__exc_type__" in value:
        return "it holds an exception, not a record"
    name = value.get("__class__")
    if name is not None and not _is_our_record(name):
        return f"it names class {name!r}, not one of our records"
    return next(filter(None, map(_foreign_object, value.values())), None)


def _is_our_record(name: object) -> bool:
    if not isinstance(name, str) or not name.startswith(_OUR_PACKAGES):
        return False
    from prefect.utilities.importtools import from_qualified_name
    from pydantic import BaseModel

    try:
        cls = from_qualified_name(name)  # our own modules only: importing them runs no foreign code
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def remove_incomplete_results(workspace: Path) -> list[Path]:
    """Delete result files that are not whole JSON: Prefect writes them in place, so a full
    disk or a kill leaves them cut short (its failure records, under random names, are never
    read again; a cut record at a cache key would be refused anyway)."""
    folder, removed = result_storage(workspace), []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            json.loads(path.read_bytes())
        except ValueError:
            path.unlink()
            removed.append(path)
        except OSError:  # a folder, a dangling link: not written by Prefect, not ours to judge
            continue
    return removed


def cache_key(task, args: tuple) -> str:
    """The key ``task`` (one with a ``cache_key_fn``) caches its run on ``args`` (its
    positional arguments) under: its key function on the parameters as Prefect hands them."""
    bound = inspect.signature(task.fn).bind(*args)
    bound.apply_defaults()
    return task.cache_key_fn(None, bound.arguments)  # our key functions read only the parameters


def remove_foreign_results(task, workspace: Path, calls: Iterable[tuple]) -> list[tuple[Path, str]]:
    """Before a cached task runs on each of ``calls`` (its positional arguments): delete the
    result file at each call's cache key that ``foreign_result`` refuses, so that Prefect
    computes it again instead of decoding it. Returns (file, why) of each removed."""
    if getattr(task, "cache_key_fn", None) is None:  # keys that hold the run id cannot be planted in advance
        return []
    folder, removed = result_storage(workspace), []
    for args in calls:
        path = folder / cache_key(task, args)
        if not (path.exists() or path.is_symlink()):
            continue
        why = foreign_result(path)
        if why is not None:
            path.unlink()
            removed.append((path, why))
    return removed


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: I/O hiccups, not bad input or bugs."""
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    return isinstance(exc, TimeoutError)


def call_retrying(fn, args: tuple, retries: int, delay: float | list[float] | None, label) -> Any:
    """``fn(*args)``, tried again up to ``retries`` times when it fails on a transient error,
    as a task with ``retry_transient`` is: ``delay`` seconds before each new try (a number,
    or one per try as Prefect's ``retry_delay_seconds``). The last try's error is raised."""
    for attempt in range(retries):
        try:
            return fn(*args)
        except Exception as exc:
            if not is_transient(exc):
                raise
            wait = delay[min(attempt, len(delay) - 1)] if isinstance(delay, list) else delay or 0
            _run_logger().warning("%s: %r, a transient error; trying again in %s s", label, exc, wait)
            time.sleep(wait)
    return fn(*args)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger; the module's outside a run (a task's function called directly)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only when the task failed on a transient error."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False
