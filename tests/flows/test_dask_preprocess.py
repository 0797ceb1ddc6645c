"""The preprocess flow on a real local Dask cluster whose worker processes each declare one
(fake) GPU and are warmed (``--preload flows.dask_worker``): pose and segment tasks spread
over the workers, each worker builds its models once and imports none of the stages'
libraries in its tasks, a clip's segmentation starts while other clips are still being
posed, shards are written as clips finish, and every product is the same bytes as a
one-worker run's. A cluster without GPU workers is refused with a message saying how to
start them."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest

from data_schemas import ProjectConfig
from data_schemas.workspace import Workspace
from flows.dask_worker import STAGE_MODULES, parse_stages
from preprocess.synthetic import SyntheticSpec, make_synthetic_video

NUM_CLIPS = 6
# The tiny DWPose and tiny SAM2, both built in each worker (the build counts mean something);
# the tiny detector's scores are low: a lower threshold gives it a (meaningless) person a
# frame for SAM2 to track; one thread per worker keeps SAM2's float sums in one order; the
# filters keep every clip.
CONFIG = {
    "ingest": {"min_clip_s": 0.2},
    "pose": {"det_threshold": 0.1, "max_persons": 1},
    "shards": {"val_fraction": 0.5, "filters": {"min_persons": None}},
}


def _cluster(workers: int, gpu: bool = True):
    from distributed import LocalCluster

    from flows.cluster import warm_workers

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        resources={"GPU": 1} if gpu else None,
        host="127.0.0.1",
        dashboard_address=":0",
        **(warm_workers(("preprocess",)) if gpu else {}),
    )


def _loaded_modules(dask_worker=None) -> set[str]:
    return set(sys.modules)


def _products(workspace: Path) -> dict[str, str]:
    """Digest of every product file: poses, masks, manifests, the published shard set."""
    ws = Workspace(workspace)
    files = [*ws.poses.glob("*.npz"), *ws.masks.glob("*.npz"), *ws.manifests.glob("*.parquet")]
    files += [p for p in ws.shards.resolve().iterdir() if p.is_file()]
    return {str(p.relative_to(p.parent.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _run(cluster, folder: Path, workspace: Path):
    """The flow on ``cluster``: its summary, its flow run id, each worker's model builds, the
    workers each task key ran on."""
    from distributed import Client, get_task_stream

    from flows.cluster import stage_model_builds
    from flows.preprocess import preprocess
    from flows.runtime import make_task_runner

    runner = make_task_runner(dask_address=cluster.scheduler_address, stages=("preprocess",))
    with Client(cluster) as client, get_task_stream(client) as stream:
        state = preprocess.with_options(task_runner=runner)(
            folder, workspace, ProjectConfig.model_validate(CONFIG), return_state=True
        )
        builds = client.run(stage_model_builds)
    ran_on: dict[str, set[str]] = {}
    for task in stream.data:
        ran_on.setdefault(task["key"].rsplit("-", 1)[0], set()).add(task["worker"])
    return state.result(), state.state_details.flow_run_id, builds, ran_on


@pytest.mark.slow
@pytest.mark.server
def test_preprocess_on_two_gpu_workers(tmp_path, prefect_api, monkeypatch):
    from distributed import Client

    from flows.cluster import PLUGIN_NAME, held_stage_models

    folder = tmp_path / "in"
    for i in range(NUM_CLIPS):
        make_synthetic_video(SyntheticSpec(width=64, height=48, num_frames=6, num_persons=2, seed=i), folder, f"v{i}")
    # Workers are separate processes: they reach the same Prefect API through the environment.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with _cluster(2) as cluster, Client(cluster) as client:
        before = client.run(_loaded_modules)
        summary, flow_run_id, builds, ran_on = _run(cluster, folder, tmp_path / "two")
        after = client.run(_loaded_modules)
        assert summary.num_segmented == summary.num_clips == summary.num_samples == NUM_CLIPS, summary
        # Pose and segment tasks ran on both workers; each worker built each model once.
        assert len(ran_on["extract_poses"]) == len(ran_on["segment_clip"]) == 2, ran_on
        assert ran_on["ingest_video"], ran_on  # the ingest subflow ran on the cluster too
        assert list(builds.values()) == [{"pose": 1, "segment": 1}] * 2, builds

        # The same cluster with one worker: the same bytes, and the worker kept its SAM2 (the
        # tiny DWPose files of the new workspace are other files: their runner is built anew).
        cluster.scale(1)
        while len(client.scheduler_info(n_workers=-1)["workers"]) > 1:
            time.sleep(0.1)
        one, _, one_builds, _ = _run(cluster, folder, tmp_path / "one")
        assert list(one_builds.values()) == [{"pose": 2, "segment": 1}], one_builds

        # The worker keeps its models until it closes: the plugin's teardown drops them.
        assert set(client.run(held_stage_models).values()) == {3}
        client.unregister_worker_plugin(PLUGIN_NAME)
        assert set(client.run(held_stage_models).values()) == {0}

    # Warm workers: the preprocess stages' libraries were imported as each worker started
    # (and only theirs); its tasks imported nothing of them and next to nothing else (a few
    # lazily loaded modules: building the SAM2 processor loads transformers' tokenizer
    # modules and sentencepiece).
    preloaded = {m.split(".")[0] for m in STAGE_MODULES["preprocess"]} - {"transformers"}
    for worker, modules in before.items():
        assert set(STAGE_MODULES["preprocess"]) <= modules and "diffusers" not in modules
        new = after[worker] - modules
        assert not [m for m in new if m.split(".")[0] in preloaded] and len(new) < len(modules) // 50, sorted(new)

    two, ref = _products(tmp_path / "two"), _products(tmp_path / "one")
    assert len(two) >= 2 * NUM_CLIPS + 5 and two == ref
    assert (one.num_samples, one.shards_index) == (NUM_CLIPS, str(Workspace(tmp_path / "one").shards_index))

    # Pipelined: some clip's segmentation started before the last clip's poses were done.
    runs = _task_runs(flow_run_id)
    pose_ends = [r.end_time for r in runs if r.name.startswith("pose ")]
    segment_starts = [r.start_time for r in runs if r.name.startswith("segment ")]
    assert len(pose_ends) == len(segment_starts) == NUM_CLIPS
    assert min(segment_starts) < max(pose_ends), (segment_starts, pose_ends)
    # ... and the shards were written as clips finished: the first sample before the last clip was through.
    assert summary.first_sample_after is not None and summary.first_sample_after < NUM_CLIPS, summary


def test_warm_stages_are_parsed_and_unknown_ones_named():
    assert parse_stages("preprocess, generate") == ("preprocess", "generate")
    assert parse_stages("") == tuple(STAGE_MODULES)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['pose'\]: choose among preprocess, embed, generate"):
        parse_stages("preprocess,pose")


@pytest.mark.slow
@pytest.mark.server
def test_a_cluster_without_gpu_workers_is_refused(prefect_api):
    from prefect import flow

    from flows.cluster import NoGpuWorkers
    from flows.runtime import gpu_slot, make_task_runner

    with _cluster(1, gpu=False) as cluster:
        # before the flow (the command line's check) ...
        with pytest.raises(NoGpuWorkers) as before:
            make_task_runner(dask_address=cluster.scheduler_address, stages=("preprocess",))
        message = str(before.value)
        assert cluster.scheduler_address in message and "1 worker(s), none declaring the 'GPU' resource" in message
        assert "--resources GPU=1" in message and "CUDA_VISIBLE_DEVICES" in message and "dask cuda worker" in message

        # ... and inside a flow, at its first GPU task, rather than waiting forever for a GPU
        @flow
        def needs_a_gpu():
            with gpu_slot():
                return "submitted"

        with pytest.raises(NoGpuWorkers, match="none declaring the 'GPU' resource"):
            needs_a_gpu.with_options(task_runner=make_task_runner(dask_address=cluster.scheduler_address))()
