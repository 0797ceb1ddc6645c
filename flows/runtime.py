"""Process set-up that must happen before Prefect is imported, the workspace lock, the one-line
cause of a failure, and task runner choice."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import json
import os
import queue
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas.workspace import Workspace

# Prefect's temporary server migrates its database on a workspace's first run: over a minute
# on a loaded machine, where Prefect's default (20 s) made a newcomer's first command fail.
SERVER_STARTUP_TIMEOUT_S = 300
# Below this, no verb can finish (Prefect's database alone takes a few MB): refuse up front,
# naming the folder, rather than fail later behind the API's "500 Internal Server Error".
MIN_FREE_BYTES = 64 << 20
PROBE_BYTES = 1 << 20

_current_workspace: Path | None = None


def use_workspace(workspace: Path, wait: bool = False, lock: bool = True) -> Path:
    """Point Prefect's home at the workspace (unless the user chose one), so that a
    workspace is self-contained and a fresh one starts clean; hold the workspace lock for the
    rest of the process (``wait``: queue behind a run that holds it, else refuse; ``lock``
    False: a verb that writes only a folder of its own, under its own lock, such as a training
    run that lasts days while generation and preprocessing go on); check that the disk can
    take writes. Call before importing prefect."""
    global _current_workspace
    workspace = Path(workspace).absolute()
    workspace.mkdir(parents=True, exist_ok=True)
    _current_workspace = workspace
    os.environ.setdefault("PREFECT_HOME", os.fspath(Workspace(workspace).prefect_home))
    # Analytics off: with it on, a local SQLite database reports "database is locked".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_TIMEOUT_S))
    check_api_url(os.environ.get("PREFECT_API_URL"))
    if lock:
        _acquire(workspace, wait)  # never released: the process's exit releases it
    from tasks.common import remove_incomplete_results

    for path in remove_incomplete_results(workspace):
        print(f"removed {path}: a result file cut short by an earlier run", file=sys.stderr)
    for folder in _write_places():
        problem = probe_writes(folder)
        if problem is not None:
            raise problem
        free = shutil.disk_usage(folder).free
        if free < MIN_FREE_BYTES:
            raise OSError(
                errno.ENOSPC,
                f"{os.strerror(errno.ENOSPC)}: {free >> 20} MiB free under {folder}, "
                f"a run needs at least {MIN_FREE_BYTES >> 20} MiB",
            )
    return workspace


def check_api_url(url: str | None, timeout_s: float = 10.0) -> None:
    """ValueError, naming the URL and what to do, when ``PREFECT_API_URL`` is set but nothing
    answers there (instead of the Prefect client's connection error after its retries).

    With the variable set, a verb uses that server (e.g. ``prefect server start``) instead of
    starting a temporary one: a run then saves the server's start and stop, several seconds.
    The workspace stays self-contained all the same: results, caches and the lock live in the
    workspace; only the run history goes to the server. Any HTTP answer counts (a server
    that wants a key says so itself); only no answer at all is refused."""
    if not url:
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(
            f"PREFECT_API_URL={url}: no Prefect server answers there ({reason}); start one "
            "(prefect server start) or unset PREFECT_API_URL to run on a temporary server in the workspace"
        ) from None


# ---- one run per workspace ---------------------------------------------------------------
#
# Two runs on one workspace would share Prefect's SQLite database (two temporary servers
# migrating it at once crash) and rewrite each other's manifests, so a verb that writes holds
# an exclusive flock on <workspace>/.lock. The kernel drops it when the process ends, however
# it ends (no stale locks); descriptors are close-on-exec, so ffmpeg, torchrun or the Prefect
# server never inherit it. Flows that deployments run take it themselves (``workspace_lock``);
# within one process it is re-entrant (the CLI's verb, then its flows and subflows).


class WorkspaceBusy(RuntimeError):
    """Another live process holds the workspace lock."""


_held: dict[Path, list[int]] = {}  # workspace -> [descriptor, depth]
_held_guard = threading.Lock()


def _lock_path(workspace: Path) -> Path:
    return Workspace(Path(workspace).absolute()).lock


def lock_holder(workspace: Path) -> str:
    """Who holds the workspace lock, as its holder wrote it: pid, host, command, since when."""
    try:
        info = json.loads(_lock_path(workspace).read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} ({info['command']}), since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def _acquire(workspace: Path, wait: bool) -> None:
    workspace = Path(workspace).absolute()
    with _held_guard:
        if workspace in _held:
            _held[workspace][1] += 1
            return
        workspace.mkdir(parents=True, exist_ok=True)
        fd = os.open(_lock_path(workspace), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(workspace)
                if not wait:
                    raise WorkspaceBusy(
                        f"workspace {workspace} is in use by {holder}; run one verb at a time on a "
                        "workspace, or pass --wait to start when it is free"
                    ) from None
                print(f"waiting for workspace {workspace}: in use by {holder}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": _command_line(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[workspace] = [fd, 1]


def _command_line() -> str:
    """This process's command as a user would type it (``python -m flows.cli`` is the CLI too)."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(sys.argv[0]).name == "multianimate" or getattr(main, "name", None) == "flows.cli":
        return shlex.join(["multianimate", *sys.argv[1:]])
    return shlex.join(sys.argv) or sys.executable


def _release(workspace: Path) -> None:
    workspace = Path(workspace).absolute()
    with _held_guard:
        entry = _held[workspace]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[workspace]
            os.close(entry[0])  # closing the last descriptor drops the flock


@contextlib.contextmanager
def workspace_lock(workspace: Path, wait: bool = False) -> Iterator[Path]:
    """Hold the workspace lock for a block (re-entrant in one process); raises WorkspaceBusy
    naming the holder when another process has it and ``wait`` is off."""
    _acquire(workspace, wait)
    try:
        yield Path(workspace).absolute()
    finally:
        _release(workspace)


# ---- the cause of a failure, on one line --------------------------------------------------


def _write_places() -> list[Path]:
    """Where a verb writes: the workspace, and Prefect's home when the user put it elsewhere."""
    places = [] if _current_workspace is None else [_current_workspace]
    home = os.environ.get("PREFECT_HOME")
    if home and _current_workspace is not None and not Path(home).absolute().is_relative_to(_current_workspace):
        places.append(Path(home).absolute())
    return [p for p in places if p.is_dir()]


def probe_writes(folder: Path, nbytes: int = PROBE_BYTES) -> OSError | None:
    """Write, fsync and delete ``nbytes`` under ``folder``: the OSError a full disk, a quota,
    a read-only mount or a failing device gives, or None when the write went through."""
    from data_schemas.atomic import temp_path_for  # a killed probe is a dead writer's temp: removed by the next run

    probe = temp_path_for(Path(folder) / "write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            block = b"\0" * min(nbytes, 1 << 16)
            for start in range(0, nbytes, len(block)):
                os.write(fd, block[: nbytes - start])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # named after the folder: the probe's own name means nothing to a user
        return type(exc)(exc.errno, exc.strerror, os.fspath(folder))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it was raised from or during, and group members: top first."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(getattr(current, "exceptions", ()) or ())
        todo.append(
            current.__cause__ if current.__cause__ is not None or current.__suppress_context__ else current.__context__
        )
    return seen


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """An exception on one line: ours (ValueError) as they say it, a Prefect API error by its
    status and call, others with their type."""
    if isinstance(exc, ValueError):  # ours name the file and the reason
        return _one_line(str(exc))
    try:  # an HTTP error of the Prefect client: its status and call, without the long URL and advice
        return f"the Prefect API answered {exc.response.status_code} {exc.response.reason_phrase} ({exc.request.method} {exc.request.url.path})"
    except (AttributeError, RuntimeError):
        return _one_line(f"{type(exc).__name__}: {exc}")


def _describe_os_error(exc: OSError) -> str:
    """e.g. "No space left on device [ENOSPC]: /ws/clips/x.mp4", plus the message when it says more."""
    text = f"{os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]" + (
        f": {exc.filename}" if exc.filename else ""
    )
    if str(exc) != str(OSError(exc.errno, os.strerror(exc.errno), *((exc.filename,) if exc.filename else ()))):
        text += f" ({type(exc).__name__}: {exc})"
    return _one_line(text)


# Texts of a full disk from code that drops the errno (SQLite, some C++ libraries)
_FULL_DISK_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")


def _is_api_failure(exc: BaseException) -> bool:
    """The Prefect API failed (answered 5xx, or its temporary server did not come up): its
    own cause is in the server, not in this process."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", 0) >= 500:
        return True
    return "Prefect API" in str(exc) or type(exc).__module__.startswith("httpx")


def failure_cause(exc: BaseException) -> str:
    """The cause of a failed verb on one line: the OS error at the root of the chain (not the
    "500 Internal Server Error" the Prefect API answered when its database could not be
    written), or, when the chain does not hold it, what a test write into the workspace
    meets (a full disk fails every writer, whichever reported first)."""
    chain = _chain(exc)
    os_error = next((e for e in reversed(chain) if isinstance(e, OSError) and e.errno), None)
    places = _write_places()
    disk = next(((folder, problem) for folder in places if (problem := probe_writes(folder)) is not None), None)
    if disk is not None and (os_error is None or os_error.errno != disk[1].errno):
        folder, problem = disk
        return _one_line(
            f"{os.strerror(problem.errno)} [{errno.errorcode.get(problem.errno, problem.errno)}] writing under {folder} "
            f"(the run failed with: {describe(chain[-1])})"
        )
    if os_error is not None:
        return _describe_os_error(os_error)
    for e in reversed(chain):
        if any(text in str(e).lower() for text in _FULL_DISK_TEXTS):
            return _one_line(f"{os.strerror(errno.ENOSPC)} [ENOSPC]: {describe(e)}")
    api = next((e for e in chain if _is_api_failure(e)), None)
    if api is not None and api is chain[-1]:
        return _one_line(f"{describe(api)}; the server's own error is in its log above")
    return describe(chain[-1])


# ---- task runners and cached tasks --------------------------------------------------------


def make_task_runner(
    dask_address: str | None = None,
    max_workers: int | None = None,
    gpus: int | None = None,
    stages: tuple[str, ...] = (),
):
    """A local thread pool of ``max_workers`` threads (the work runs in ffmpeg child
    processes); a Dask cluster at ``dask_address``; or, for ``gpus``, a local cluster of one
    Dask worker per GPU, started with the flow and closed with it. ``stages``: the flow's GPU
    stages (``flows.dask_worker.STAGES``), so a cluster none of whose workers declares the GPU
    resource is refused (ValueError saying how to start them), and ``--gpus`` workers import
    those stages' libraries as they start."""
    if dask_address and gpus:
        raise ValueError("--dask-address and --gpus both choose the cluster: pass one of them")
    if not (dask_address or gpus):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1)
    try:
        from prefect_dask import DaskTaskRunner

        from flows import cluster
    except ImportError as exc:
        raise ValueError("--dask-address and --gpus need the 'dask' extra: pip install 'multianimate[dask]'") from exc
    if gpus:
        return DaskTaskRunner(
            cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=cluster.local_gpu_cluster_kwargs(gpus, stages)
        )
    if stages:
        cluster.check_address(dask_address)
    return DaskTaskRunner(address=dask_address)


# The Dask worker resource a GPU stage needs: workers declare one per GPU they own
# (``dask worker --resources GPU=1``), so a worker runs one GPU task at a time.
GPU_RESOURCE = "GPU"


def dask_runner():
    """The running flow's DaskTaskRunner, or None (no flow, or another runner)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    return runner if any(c.__name__ == "DaskTaskRunner" for c in type(runner).__mro__) else None


def on_this_cluster(subflow):
    """``subflow`` to be called from the running flow, on that flow's Dask cluster when it runs
    on one: a subflow otherwise takes a task runner of its own (a thread pool in the flow's
    process), so an ingest of a large folder would never reach the other workers and nodes."""
    runner = dask_runner()
    if runner is None:
        return subflow
    from prefect_dask import DaskTaskRunner

    return subflow.with_options(task_runner=DaskTaskRunner(address=runner.client.scheduler.address))


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Tasks submitted inside run on a Dask worker that owns a GPU, one at a time per GPU;
    on the local thread pool (no Dask), nothing changes. The first use on a cluster checks
    that it has GPU workers (flows.cluster.NoGpuWorkers: its tasks would wait forever) and
    has them free their models when they close."""
    runner = dask_runner()
    if runner is None:
        yield
        return
    if not getattr(runner, "_gpu_workers_ready", False):
        from flows.cluster import prepare_gpu_workers

        prepare_gpu_workers(runner.client)
        runner._gpu_workers_ready = True
    import dask

    with dask.annotate(resources={GPU_RESOURCE: 1}):
        yield


# Submissions in flight per task slot (a worker thread, a GPU): enough to keep every slot busy
# while results come back, few enough that 100,000 clips never hold 100,000 futures at once.
WINDOW_PER_SLOT = 4
MIN_WINDOW = 8


def submission_window() -> int:
    """How many tasks a flow keeps submitted at once on its runner."""
    runner = dask_runner()
    if runner is not None:
        slots = sum(runner.client.nthreads().values())
    else:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        slots = getattr(context.task_runner if context else None, "_max_workers", None) or os.cpu_count() or 1
    return max(MIN_WINDOW, WINDOW_PER_SLOT * slots)


class SubmissionWindow:
    """Submitted task futures, at most ``size`` in flight; ``next_done`` waits for whichever
    finishes first. Each future carries a tag: what the caller needs to know about it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._in_flight: dict = {}  # future -> tag
        self._finished: queue.SimpleQueue = queue.SimpleQueue()

    def __len__(self) -> int:
        return len(self._in_flight)

    def has_room(self) -> bool:
        return len(self._in_flight) < self.size

    def add(self, future, tag) -> None:
        self._in_flight[future] = tag
        future.add_done_callback(self._finished.put)

    def next_done(self) -> tuple[Any, Any]:
        """(tag, the task's result or the exception it ended with) of the next future to finish."""
        future = self._finished.get()
        return self._in_flight.pop(future), future.result(raise_on_failure=False)


@dataclass(frozen=True)
class Stage:
    """One cached per-key task of a pipeline (``run_pipeline``)."""

    task: Any
    # (key, the records of the earlier stages for that key) -> the task's positional arguments
    arguments: Callable[[Any, tuple], tuple]
    # the files (relative to the run's workspace) a record stands for: a cache hit without them runs again
    products: Callable[[Any], Iterable[str]]
    label: str
    gpu: bool = False  # submitted inside gpu_slot


# One task run per key costs the flow ~13 ms and Prefect's SQLite server ~35-59 ms to record,
# and the flow keeps ~51 KiB per task run until it ends; at 10,000 the server dropped events
# (bench/scale.py). Up to this many keys a stage runs a task per key, beyond as many batches.
PER_KEY_TASKS_UP_TO = 1000


def batch_size(num_keys: int) -> int:
    """Keys per task run of a ``run_pipeline`` over ``num_keys`` keys: 1 (a task per key) up to
    PER_KEY_TASKS_UP_TO keys, beyond that ceil(num_keys / PER_KEY_TASKS_UP_TO), so that a
    stage never has more than about PER_KEY_TASKS_UP_TO task runs."""
    return max(1, -(-num_keys // PER_KEY_TASKS_UP_TO))


def run_cached(
    task,
    workspace: Path,
    arguments: dict,
    products: Callable[[Any], Iterable[str]],
    label: str,
    gpu: bool = False,
    batch: int | None = None,
) -> dict:
    """Submit a cached task once per key of ``arguments``; returns each key's record, or the
    exception its task ended with (the others go on). A one-stage ``run_pipeline`` (``batch``
    as there).

    Results persist as JSON under the workspace (``tasks.common.persisted``); a result file
    at a key that is not one our serializer wrote (a pickle, someone else's class) is removed
    before Prefect reads it, and the task runs again. ``products(record)`` names the files
    (relative to the workspace) a record stands for: a cache hit whose files have since
    disappeared is computed again. A progress bar shows on a terminal.
    """
    stage = Stage(task, lambda key, _: arguments[key], products, label, gpu)
    return run_pipeline([stage], workspace, list(arguments), batch=batch)[0]


def run_pipeline(
    stages: list[Stage],
    workspace: Path,
    keys: Iterable,
    window: int | None = None,
    on_final: Callable[[Any, tuple], None] | None = None,
    batch: int | None = None,
) -> list[dict]:
    """Each key through the cached tasks of ``stages`` in turn: a key's next stage is submitted
    as soon as its previous one finished (not after every key's), at most ``window`` tasks
    in flight (default ``submission_window``). Returns, per stage, each key's record or the
    exception its task ended with, in the order of ``keys``; a key whose task failed goes no
    further, the others go on. ``on_final(key, outcomes)``, when given, is called (in the
    calling thread) as soon as a key is through: its outcomes of every stage it reached, the
    last an exception when it failed there.

    ``batch``: keys per task run (default ``batch_size`` of the number of keys). 1 runs each
    stage's task per key; more groups consecutive keys, each stage of a group one run of
    ``tasks.batch.run_batch``, whose keys keep the per-key task's cache entries (a key
    cached by either is a hit for both) and fail alone; the keys of a group that come
    through a stage go on together.

    Caching as ``run_cached``: a result file our serializer did not write is removed first;
    a cache hit whose ``products`` are gone runs again (refreshing its cache, for those keys
    only). On Dask, later stages have priority: workers finish clips under way before
    starting new ones."""
    from prefect import tags
    from prefect.logging import get_run_logger
    from rich.progress import Progress

    from tasks.batch import run_batch
    from tasks.common import persisted, remove_foreign_results

    if batch is None:
        keys = list(keys)
        batch = batch_size(len(keys))
    if batch < 1:
        raise ValueError(f"batch: {batch} keys per task run; give 1 or more (or None to choose)")
    workspace = Path(workspace)
    cached = [persisted(s.task, workspace) for s in stages]
    refreshing = [t.with_options(refresh_cache=True) for t in cached]
    outcomes: list[dict] = [{} for _ in stages]
    order: list = []  # keys as they came: the order of the outcomes
    ready: collections.deque = collections.deque()  # (stage, keys, refresh): later stages of started keys first
    pending = SubmissionWindow(window or submission_window())  # tagged (stage, keys, refresh)
    fresh = iter(keys)
    lost = [0] * len(stages)
    on_dask = dask_runner() is not None

    def submit(i: int, group: tuple, refresh: bool) -> None:
        calls = [stages[i].arguments(key, tuple(outcomes[j][key] for j in range(i))) for key in group]
        with contextlib.ExitStack() as annotations:
            if stages[i].gpu:
                annotations.enter_context(gpu_slot())
            if on_dask:
                import dask

                annotations.enter_context(dask.annotate(priority=i))
            if batch == 1:
                if not refresh:
                    for path, why in remove_foreign_results(stages[i].task, workspace, calls):
                        get_run_logger().warning("removed %s: %s; it is computed again", path, why)
                future = (refreshing if refresh else cached)[i].submit(*calls[0])
            else:  # the per-key task's tags on the batch: a concurrency limit on them holds
                annotations.enter_context(tags(*stages[i].task.tags))
                future = run_batch.submit(stages[i].task, workspace, list(group), calls, refresh)
            pending.add(future, (i, group, refresh))

    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        bars = [progress.add_task(s.label, total=None) for s in stages]
        while True:
            while pending.has_room():
                if ready:
                    submit(*ready.popleft())
                    continue
                group = tuple(itertools.islice(fresh, batch))
                if not group:
                    break
                order.extend(group)
                progress.update(bars[0], total=len(order))
                submit(0, group, False)
            if not pending:
                break
            (i, group, refresh), result = pending.next_done()
            if batch == 1:
                per_key = [result]
            else:  # a batch's list, or what the batch task itself ended with (a lost worker): every key's
                per_key = result if isinstance(result, list) else [result] * len(group)
            lost_keys, going_on = [], []
            for key, outcome in zip(group, per_key, strict=True):
                ok = not isinstance(outcome, BaseException)
                if ok and not refresh and not all((workspace / p).exists() for p in stages[i].products(outcome)):
                    lost_keys.append(key)
                    continue
                outcomes[i][key] = outcome
                progress.advance(bars[i])
                if ok and i + 1 < len(stages):
                    going_on.append(key)
                elif on_final is not None:
                    on_final(key, tuple(outcomes[j][key] for j in range(i + 1)))
            if lost_keys:
                lost[i] += len(lost_keys)
                ready.appendleft((i, tuple(lost_keys), True))
            if going_on:
                ready.appendleft((i + 1, tuple(going_on), False))
                progress.update(bars[i + 1], total=(progress.tasks[i + 1].total or 0) + len(going_on))
    for stage, count in zip(stages, lost):
        if count:
            get_run_logger().warning("%s: %d cached result(s) lost their files; recomputed", stage.label, count)
    return [{k: o[k] for k in order if k in o} for o in outcomes]
