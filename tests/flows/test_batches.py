"""Batches of keys per task run (flows.runtime.run_pipeline's ``batch``, tasks.batch): the same
per-key outcomes as a task per key, in fewer task runs, with each key cached on its own and
shared with the per-key task both ways; lost products, failing keys and foreign result
files handled per key, inside a batch; the same on Dask worker processes.

What each key's function really ran is counted apart from the code under test: every call
appends a line to a file in the workspace."""

from __future__ import annotations

import errno
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.logging import get_run_logger

from data_schemas.workspace import Workspace
from flows.runtime import PER_KEY_TASKS_UP_TO, Stage, batch_size, run_pipeline
from tasks.common import foreign_result, retry_transient

KEYS = [f"k{i}" for i in range(7)]
TAG = "batch-test-tag"


def _count(workspace: Path, stage: str, key: str) -> None:
    with (workspace / "calls.txt").open("a") as calls:
        calls.write(f"{stage} {key}\n")


def calls(workspace: Path) -> Counter:
    """(stage, key) -> how many times that key's function ran."""
    path = workspace / "calls.txt"
    return Counter(tuple(line.split()) for line in path.read_text().splitlines()) if path.exists() else Counter()


def _product(workspace: Path, name: str) -> str:
    path = workspace / "products" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(name)
    return f"products/{name}"


# The key alone: each test has a workspace, so results of its own.
@task(
    name="a",
    task_run_name="a {key}",
    tags=[TAG],
    cache_key_fn=lambda context, p: f"test-a-{p['key']}",
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def stage_a(key: str, workspace: Path) -> dict:
    _count(workspace, "a", key)
    if key.startswith("bad"):
        raise ValueError(f"{key}: bad input")
    if key.startswith("flaky") and calls(workspace)["a", key] == 1:
        raise OSError(errno.EIO, "a passing hiccup")
    get_run_logger().info("a of %s", key)  # the per-key functions log: inside a batch too
    return {"key": key, "product": _product(workspace, f"a-{key}.txt")}


@task(
    name="b",
    task_run_name="b {upstream[key]}",
    cache_key_fn=lambda context, p: f"test-b-{p['upstream']['key']}",
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def stage_b(upstream: dict, workspace: Path) -> dict:
    _count(workspace, "b", upstream["key"])
    return {"key": upstream["key"], "product": _product(workspace, f"b-{upstream['key']}.txt")}


def _stages(workspace: Path) -> list[Stage]:
    return [
        Stage(stage_a, lambda k, _: (k, workspace), lambda r: [r["product"]], "a"),
        Stage(stage_b, lambda k, done: (done[0], workspace), lambda r: [r["product"]], "b"),
    ]


@flow(name="batches")
def pipeline(workspace: Path, keys: list[str], batch: int | None = None) -> tuple[list[dict], dict]:
    finals = {}
    outcomes = run_pipeline(_stages(workspace), workspace, keys, on_final=finals.__setitem__, batch=batch)
    return outcomes, finals


def _run(workspace: Path, keys: list[str], batch: int | None, runner=None):
    """(outcomes, on_final's calls, the flow's task runs)."""
    workspace.mkdir(parents=True, exist_ok=True)
    state = pipeline.with_options(**({"task_runner": runner} if runner else {}))(
        workspace, keys, batch, return_state=True
    )
    outcomes, finals = state.result()
    return outcomes, finals, _task_runs(state.state_details.flow_run_id)


def _task_runs(flow_run_id, settle_s: float = 1.0, limit_s: float = 20.0) -> list:
    """The flow run's task runs once the server's count stops growing (it records them from
    events, behind the flow)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    seen, since, start = None, time.monotonic(), time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            if seen != len(done):
                seen, since = len(done), time.monotonic()
            elif (len(done) == len(runs) and time.monotonic() - since > settle_s) or time.monotonic() - start > limit_s:
                return runs
            time.sleep(0.2)


def _plain(outcome):
    """Exceptions compare by type and message."""
    return (type(outcome).__name__, str(outcome)) if isinstance(outcome, BaseException) else outcome


def _comparable(outcomes: list[dict]) -> list[dict]:
    return [{k: _plain(o) for k, o in stage.items()} for stage in outcomes]


def _comparable_finals(finals: dict) -> dict:
    return {k: tuple(map(_plain, o)) for k, o in finals.items()}


def test_batches_give_the_per_key_outcomes_in_fewer_task_runs(tmp_path, prefect_api):
    per_key, per_key_finals, per_key_runs = _run(tmp_path / "one", KEYS, batch=1)
    batched, batched_finals, batched_runs = _run(tmp_path / "three", KEYS, batch=3)

    assert _comparable(batched) == _comparable(per_key) and list(batched[0]) == list(batched[1]) == KEYS
    assert batched[1]["k6"] == {"key": "k6", "product": "products/b-k6.txt"}
    assert _comparable_finals(batched_finals) == _comparable_finals(per_key_finals) and set(batched_finals) == set(KEYS)
    assert sorted(r.name for r in per_key_runs) == sorted(f"{s} {k}" for s in "ab" for k in KEYS)
    # 3 + 3 + 1 keys: three runs of the batch task per stage, named by stage, count and keys
    assert sorted(r.name for r in batched_runs) == sorted(
        f"{s} ×{n} ({span})" for s in "ab" for n, span in ((3, "k0…k2"), (3, "k3…k5"), (1, "k6"))
    )
    assert all(r.state.is_completed() for r in batched_runs)
    assert all(TAG in r.tags for r in batched_runs if r.name.startswith("a ")), "the per-key task's tags"
    for ws in (tmp_path / "one", tmp_path / "three"):
        assert calls(ws) == Counter({(s, k): 1 for s in "ab" for k in KEYS})


def test_the_cache_is_shared_by_per_key_and_batched_runs_both_ways(tmp_path, prefect_api):
    once = Counter({(s, k): 1 for s in "ab" for k in KEYS})
    first, _, _ = _run(tmp_path / "per-key-first", KEYS, batch=1)
    again, _, _ = _run(tmp_path / "per-key-first", KEYS, batch=3)
    assert calls(tmp_path / "per-key-first") == once and again == first

    first, _, _ = _run(tmp_path / "batched-first", KEYS[:5], batch=3)
    again, _, runs = _run(tmp_path / "batched-first", KEYS[:5], batch=1)
    assert again == first and {r.state.name for r in runs} == {"Cached"}
    # Two keys more shift every batch's membership: only the new keys are computed.
    grown, _, _ = _run(tmp_path / "batched-first", KEYS[4:] + KEYS[:4], batch=3)
    assert calls(tmp_path / "batched-first") == once and _comparable(grown)[1] == _comparable(first)[1] | {
        k: {"key": k, "product": f"products/b-{k}.txt"} for k in KEYS[5:]
    }


def test_a_lost_product_is_computed_again_alone(tmp_path, prefect_api):
    _run(tmp_path, KEYS, batch=3)
    (tmp_path / "products" / "a-k4.txt").unlink()
    outcomes, _, runs = _run(tmp_path, KEYS, batch=3)
    assert (tmp_path / "products" / "a-k4.txt").read_text() == "a-k4.txt"
    assert calls(tmp_path) == Counter({(s, k): 1 for s in "ab" for k in KEYS}) + Counter({("a", "k4"): 1})
    assert "a ×1 (k4)" in {r.name for r in runs}  # the refresh: that key only
    assert outcomes[0]["k4"] == {"key": "k4", "product": "products/a-k4.txt"} and len(outcomes[1]) == len(KEYS)


def test_a_failing_key_fails_alone_and_a_transient_error_is_retried(tmp_path, prefect_api, caplog):
    keys = ["k0", "bad1", "k2", "flaky3", "k4"]
    per_key, per_key_finals, _ = _run(tmp_path / "one", keys, batch=1)
    batched, finals, runs = _run(tmp_path / "batched", keys, batch=5)

    assert isinstance(batched[0]["bad1"], ValueError) and str(batched[0]["bad1"]) == "bad1: bad input"
    assert "bad1" not in batched[1] and set(batched[1]) == {"k0", "k2", "flaky3", "k4"}
    assert list(finals["bad1"]) == [batched[0]["bad1"]] and len(finals["k4"]) == 2
    assert _comparable(batched) == _comparable(per_key) and _comparable_finals(finals) == _comparable_finals(
        per_key_finals
    )
    assert calls(tmp_path / "batched") == calls(tmp_path / "one")
    assert calls(tmp_path / "batched")["a", "flaky3"] == 2 and calls(tmp_path / "batched")["a", "bad1"] == 1
    assert all(r.state.is_completed() for r in runs)  # a key's failure is its outcome, not the batch's
    assert any("bad1 failed: ValueError('bad1: bad input')" in r.getMessage() for r in caplog.records)

    again, _, _ = _run(tmp_path / "batched", keys, batch=5)  # failures are never cached
    assert calls(tmp_path / "batched")["a", "bad1"] == 2 and calls(tmp_path / "batched")["a", "k0"] == 1
    assert _comparable(again) == _comparable(batched)


class _Planted:
    """Unpickling it creates a file: proof that a planted pickle was read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_foreign_result_file_is_removed_and_computed_again_inside_a_batch(tmp_path, prefect_api):
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore, resolve_serializer

    _run(tmp_path, KEYS, batch=3)
    results = Workspace(tmp_path).results
    assert foreign_result(results / "test-a-k2") is None  # the batch wrote the per-key task's record
    marker = tmp_path / "unpickled"
    ResultStore(result_storage=LocalFileSystem(basepath=str(results)), serializer=resolve_serializer("pickle")).write(
        _Planted(marker), key="test-a-k2"
    )
    assert "pickle" in foreign_result(results / "test-a-k2")

    outcomes, _, _ = _run(tmp_path, KEYS, batch=3)
    assert not marker.exists()
    assert outcomes[0]["k2"] == {"key": "k2", "product": "products/a-k2.txt"}
    assert calls(tmp_path) == Counter({(s, k): 1 for s in "ab" for k in KEYS}) + Counter({("a", "k2"): 1})
    assert foreign_result(results / "test-a-k2") is None


def test_batch_size():
    assert PER_KEY_TASKS_UP_TO == 1000
    assert [batch_size(n) for n in (0, 1, 7, 999, 1000)] == [1] * 5
    assert [batch_size(n) for n in (1001, 2000, 2001, 10_000, 100_000)] == [2, 2, 3, 10, 100]


@pytest.mark.server
def test_batches_on_dask_worker_processes(tmp_path, prefect_api, monkeypatch):
    from distributed import LocalCluster

    from flows.runtime import make_task_runner

    # Workers are separate processes: they reach the same Prefect API through the environment.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        runner = make_task_runner(dask_address=cluster.scheduler_address)
        outcomes, _, runs = _run(tmp_path, KEYS[:4] + ["bad4"], batch=3, runner=runner)
    assert [len(o) for o in outcomes] == [5, 4] and isinstance(outcomes[0]["bad4"], ValueError)
    assert outcomes[1]["k3"] == {"key": "k3", "product": "products/b-k3.txt"}
    assert sorted(r.name for r in runs) == ["a ×2 (k3…bad4)", "a ×3 (k0…k2)", "b ×1 (k3)", "b ×3 (k0…k2)"]
    assert calls(tmp_path) == Counter({(s, k): 1 for s in "ab" for k in KEYS[:4]} | {("a", "bad4"): 1})
