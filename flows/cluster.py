"""Dask clusters for the GPU stages: a local cluster of one worker per GPU (``--gpus N``),
the check that a cluster has GPU workers at all (``--dask-address``), and the plugin that
frees a worker's stage models when it closes.

A GPU worker is a Dask worker that declares the resource ``GPU=1`` and sees one GPU (its
``CUDA_VISIBLE_DEVICES``); GPU-stage tasks ask for that resource (``flows.runtime.gpu_slot``),
so each GPU runs one such task at a time and its worker process keeps the stage models it
built for the next clip (the stage modules' per-process caches)."""

from __future__ import annotations

import os
import sys
import time

from distributed import Client, WorkerPlugin

from flows import dask_worker
from flows.runtime import GPU_RESOURCE

# How long a cluster may take to show a GPU worker (workers joining a fresh scheduler).
GPU_WORKER_WAIT_S = 5.0
PLUGIN_NAME = "multianimate-stage-models"
GPU_EXTRA = "pip install 'multianimate[gpu,dask]'"

HOW_TO_START_WORKERS = (
    "start one worker per GPU, each declaring the GPU resource: "
    "CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --resources GPU=1 --nworkers 1 --nthreads 1 "
    "--preload flows.dask_worker (then CUDA_VISIBLE_DEVICES=1, ...), or on each node: "
    "dask cuda worker tcp://HOST:8786 --resources GPU=1 --preload flows.dask_worker; "
    "or run on this node's GPUs with --gpus N instead of --dask-address"
)


class NoGpuWorkers(ValueError):
    """The cluster has no worker that declares the GPU resource: GPU-stage tasks would wait forever."""


def release_stage_models() -> None:
    """Drop the pose and segment models and the generation pipeline this process keeps, and the
    GPU memory they held."""
    from preprocess.pose import stage as pose_stage
    from preprocess.segment import stage as segment_stage

    pose_stage.release_models()
    segment_stage.release_models()
    generate = sys.modules.get("model.generate")  # loaded only where a generation job ran
    if generate is not None:
        generate.release_pipeline()


def stage_model_builds() -> dict[str, int]:
    """How many pose and segment models this process has built (read on each worker with
    ``client.run``: one each per worker, however many clips it ran)."""
    from preprocess.pose import stage as pose_stage
    from preprocess.segment import stage as segment_stage

    return {"pose": pose_stage.model_builds(), "segment": segment_stage.model_builds()}


def held_stage_models() -> int:
    """How many pose and segment models this process keeps for its next clip."""
    from preprocess.pose import stage as pose_stage
    from preprocess.segment import stage as segment_stage

    return pose_stage.models_held() + segment_stage.models_held()


class StageModelsPlugin(WorkerPlugin):
    """Frees a worker's stage models when the worker closes (or the plugin is removed)."""

    idempotent = True  # registered by every flow run: once is enough, and a second time must not drop the models

    def teardown(self, worker) -> None:
        release_stage_models()


def gpu_workers(client: Client) -> list[str]:
    """The addresses of the workers that declare the GPU resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1)


def require_gpu_workers(client: Client, wait_s: float = GPU_WORKER_WAIT_S) -> list[str]:
    """The GPU workers of the cluster (waiting ``wait_s`` for one to join); NoGpuWorkers,
    saying how to start them, when there is none."""
    deadline = time.monotonic() + wait_s
    while not (found := gpu_workers(client)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not found:
        address = client.scheduler.address if client.scheduler is not None else "the scheduler"
        total = len(client.scheduler_info(n_workers=-1)["workers"])
        raise NoGpuWorkers(
            f"the Dask cluster at {address} has {total} worker(s), none declaring the {GPU_RESOURCE!r} resource "
            f"the pose and segment stages need; {HOW_TO_START_WORKERS}"
        )
    return found


def prepare_gpu_workers(client: Client) -> list[str]:
    """Before the first GPU-stage task: the cluster's GPU workers (or NoGpuWorkers), with the
    plugin that frees their models on close registered (once per cluster)."""
    found = require_gpu_workers(client)
    client.register_plugin(StageModelsPlugin(), name=PLUGIN_NAME)
    return found


def check_address(address: str) -> list[str]:
    """Connect to the scheduler at ``address`` and check that it has GPU workers (before a
    flow starts): their addresses, or ValueError saying what is wrong."""
    try:
        client = Client(address, timeout="10s", set_as_default=False)
    except OSError as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        return require_gpu_workers(client)


def local_gpu_cluster_kwargs(gpus: int, stages: tuple[str, ...] = ()) -> dict:
    """The LocalCUDACluster of one worker per GPU for ``--gpus N``, its workers warmed for
    ``stages`` (all without; ``flows.dask_worker``): its keyword arguments, after checking
    that dask-cuda is installed and torch sees N GPUs (ValueError otherwise)."""
    try:
        import dask_cuda  # noqa: F401 - only checked here; the task runner imports it by name
    except ImportError as exc:
        raise ValueError(f"--gpus needs dask-cuda, in the 'gpu' extra: {GPU_EXTRA}") from exc
    import torch

    seen = torch.cuda.device_count()
    if seen < gpus:
        raise ValueError(
            f"--gpus {gpus}: torch sees {seen} GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            f"ask for at most {seen}, or check the driver"
        )
    return {
        "n_workers": gpus,
        "threads_per_worker": 1,  # one GPU task at a time per GPU
        "CUDA_VISIBLE_DEVICES": list(range(gpus)),  # dask-cuda pins worker i to GPU i
        "resources": {GPU_RESOURCE: 1},
        **warm_workers(stages),
    }


def warm_workers(stages: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of a Dask cluster (or ``Nanny``) whose workers import the
    libraries of ``stages`` as they start (``flows.dask_worker``; every stage without)."""
    argv = ["--stages", ",".join(stages)] if stages else []
    return {"preload": [dask_worker.__name__], "preload_argv": argv}
