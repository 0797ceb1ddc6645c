"""The generate flow on a real local Dask cluster of two worker processes that each declare one
(fake) GPU: queued jobs run in parallel, one per worker, and each is done once, when a
worker is killed mid-job and when two flows drain the same queue at once. Jobs are tiny
(5 frames of 64x64, 2 steps, ground-truth poses): about a second each on a CPU.

"Done once" is counted apart from the claims that ensure it: from the Prefect API (the
completed ``generate`` task runs, one per video actually generated) and from what each flow
says it ran, besides the published records."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.fault_cases.generate import COMPLETE, job_inputs
from data_schemas import ProjectConfig
from data_schemas.job import JobSpec, claim_holder, claim_job, read_record, submit_job
from data_schemas.workspace import Workspace
from tests.helpers.cli import ROOT, temp_files

pytestmark = [pytest.mark.slow, pytest.mark.server]

CONFIG = ProjectConfig(pose={"models": "truth"})  # the jobs bring their reference poses: no pose models


@pytest.fixture(scope="module")
def cluster(prefect_api):
    """Two worker processes of one thread each, each declaring one GPU; they report to the
    tests' Prefect API (its address reaches them through the environment)."""
    import importlib

    import dask
    from distributed import Client, LocalCluster

    # A loaded CI machine can leave a worker importing torch unresponsive past Dask's 30 s.
    # No work stealing: a killed worker's job goes to the worker alive at that moment, not to
    # its replacement (the nanny starts one), so the test knows which worker finishes it.
    settings = {"distributed.comm.timeouts.tcp": "300s", "distributed.scheduler.work-stealing": False}
    with pytest.MonkeyPatch.context() as env, dask.config.set(settings):
        env.setenv("PREFECT_API_URL", prefect_api)
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                resources={"GPU": 1},
            ) as cluster,
            Client(cluster) as client,
        ):
            # the generation stack imported on each worker (in its task thread) before the tests
            workers = list(client.scheduler_info(n_workers=-1)["workers"])
            client.gather(
                [client.submit(importlib.import_module, "flows.generate", workers=[w], pure=False) for w in workers]
            )
            yield cluster, client


def queue_jobs(folder: Path, seeds: list[int]) -> tuple[Path, list[str]]:
    """A workspace with one small job per seed queued, in that order; (workspace, job ids)."""
    workspace = folder / "ws"
    inputs = job_inputs(folder / "in")
    ids = []
    for seed in seeds:
        spec = JobSpec(
            reference=inputs["reference"],
            reference_poses=inputs["reference_poses"],
            poses=inputs["poses"],
            masks=inputs["masks"],
            num_frames=5,
            height=64,
            width=64,
            steps=2,
            seed=seed,
        )
        ids.append(submit_job(workspace, spec)[0])
        time.sleep(0.01)  # the queue is ordered by submission time
    return workspace, ids


def run_flow(workspace: Path, address: str):
    from flows.generate import generate
    from flows.runtime import make_task_runner

    runner = make_task_runner(dask_address=address)
    return generate.with_options(task_runner=runner)(workspace, CONFIG, return_state=True)


def generated(flow_run_ids: list, expected: int) -> Counter:
    """Job id -> completed ``generate`` task runs (videos generated) of these flow runs, as the
    Prefect API recorded them (task states arrive as events: wait for ``expected``, then
    look once more for late ones)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def count() -> Counter:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        return Counter(
            r.name.removeprefix("generate ") for r in runs if r.name.startswith("generate ") and r.state.is_completed()
        )

    deadline = time.monotonic() + 60
    while sum(count().values()) < expected and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)
    return count()


def dask_worker(record) -> str:
    """The Dask worker address a record names (data_schemas.job.this_process)."""
    return re.search(r"dask worker (\S+)\)", record.worker).group(1)


def assert_published_once_whole(workspace: Path, ids: list[str]) -> None:
    outputs = Workspace(workspace).outputs
    assert sorted(p.name for p in outputs.iterdir()) == sorted(ids)  # no temporary folder left either
    for job_id in ids:
        assert sorted(p.name for p in (outputs / job_id).iterdir()) == COMPLETE
        assert read_record(workspace, job_id).status == "ok"
    assert temp_files(workspace / "outputs") == []


def test_a_claim_is_exclusive_and_dies_with_its_holder(tmp_path):
    """Another process's claim is refused (and named) while it lives; its death frees it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from data_schemas.job import claim_job\n"
            "with claim_job(sys.argv[1], 'j1') as held:\n"
            "    print(held, flush=True)\n"
            "    time.sleep(600)\n",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        with claim_job(tmp_path, "j1") as held:
            assert not held
        assert f"pid {holder.pid}" in claim_holder(tmp_path, "j1")
        with claim_job(tmp_path, "j2") as other:  # claims are per job
            assert other
            with claim_job(tmp_path, "j2") as again:  # a second open in one process is refused too
                assert not again
    finally:
        holder.kill()
        holder.wait()
    with claim_job(tmp_path, "j1") as held:
        assert held


def test_four_jobs_run_on_both_workers_each_once(tmp_path, cluster):
    cluster, client = cluster
    workspace, ids = queue_jobs(tmp_path, [1, 2, 3, 4])
    state = run_flow(workspace, cluster.scheduler_address)
    summary = state.result()
    assert sorted(summary.ok) == sorted(ids) and summary.failed == summary.elsewhere == summary.skipped == []
    assert_published_once_whole(workspace, ids)
    assert generated([state.state_details.flow_run_id], 4) == Counter(ids)
    workers = {dask_worker(read_record(workspace, i)) for i in ids}
    assert workers == set(client.scheduler_info(n_workers=-1)["workers"])  # both took part


def test_two_flows_draining_one_queue_never_run_a_job_twice(tmp_path, cluster):
    """Two flows of one process (the workspace lock is re-entrant there: only the claims keep
    them apart), on the same cluster, started together over the same four jobs."""
    cluster, _ = cluster
    workspace, ids = queue_jobs(tmp_path, [5, 6, 7, 8])
    states: list = [None, None]

    def drain(i: int) -> None:
        states[i] = run_flow(workspace, cluster.scheduler_address)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    summaries = [s.result() for s in states]
    ran = Counter(i for s in summaries for i in s.ok)
    assert ran == Counter(ids), [s.model_dump() for s in summaries]
    # what one flow did not run, the other did while it ran (or before it read the queue)
    for mine, theirs in (summaries, summaries[::-1]):
        assert sorted(mine.ok + mine.elsewhere + mine.skipped) == sorted(ids)
        assert set(mine.elsewhere) <= set(theirs.ok)
    assert sum(len(s.elsewhere) for s in summaries) > 0  # the flows did meet over some job
    assert generated([s.state_details.flow_run_id for s in states], 4) == Counter(ids)
    assert_published_once_whole(workspace, ids)


def test_a_worker_killed_mid_job_and_the_job_is_finished_by_another_once(tmp_path, cluster):
    """The worker running the second job SIGKILLs itself once, its video written but not
    published (tasks.generate.FAULT_ENV). Dask runs the job's task again on another worker,
    whose claim is free (the kernel dropped the dead one's): every job once, whole."""
    from tasks.generate import FAULT_ENV

    cluster, client = cluster
    workspace, ids = queue_jobs(tmp_path, [11, 12, 13, 14])
    victim = ids[1]
    before = client.run(os.getpid)  # worker address -> pid
    client.run(lambda key, value: os.environ.update({key: value}), FAULT_ENV, victim)
    try:
        state = run_flow(workspace, cluster.scheduler_address)
    finally:
        client.run(lambda key: os.environ.pop(key, None), FAULT_ENV)
    summary = state.result()
    marker = (Workspace(workspace).claims / f"{victim}.fault-fired").read_text()
    killed = int(re.search(r"pid (\d+)", marker).group(1))
    assert killed in before.values()  # the hook fired, in a worker
    assert sorted(summary.ok) == sorted(ids) and summary.failed == summary.elsewhere == []
    assert_published_once_whole(workspace, ids)  # the dead worker's staging folder is gone too
    assert generated([state.state_details.flow_run_id], 4) == Counter(ids)
    (survivor,) = set(before.values()) - {killed}
    finisher = read_record(workspace, victim).worker
    assert f"pid {survivor} " in finisher, (finisher, before)  # the other worker finished it
