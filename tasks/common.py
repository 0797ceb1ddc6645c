"""What every task shares: code versions for cache keys, result storage, retry rules."""

from __future__ import annotations

import errno
import hashlib
import inspect
from functools import cache
from pathlib import Path
from types import ModuleType

RESULTS_DIR = ".prefect/results"

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
    return Path(workspace).absolute() / RESULTS_DIR


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: I/O hiccups, not bad input or bugs."""
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    return isinstance(exc, TimeoutError)


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only when the task failed on a transient error."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False
