"""Warm Dask workers: a worker started with ``--preload flows.dask_worker`` imports the libraries
its stage tasks run on while it starts, before it joins the scheduler, so that its first clip
does not wait for them. On a 2-core machine that is ~8 s per worker for preprocessing (torch,
SAM2's transformers modules, onnxruntime, OpenCV, Prefect's task engine) and ~5 s more for
generation's diffusers: paid by every worker of a cold cluster at once, in each run's critical
path, and by none of a warm one::

    dask worker tcp://HEAD:8786 --resources GPU=1 --preload flows.dask_worker
    dask worker tcp://HEAD:8786 --preload flows.dask_worker --preload-argv "--stages preprocess"

Without ``--stages``, a worker is warmed for every stage. ``--gpus N`` starts its workers with
this preload, warmed for the command's own stages (``flows.cluster.local_gpu_cluster_kwargs``).
Models are not built here: which weights to load is the run's config, and a worker builds
them on its first clip and keeps them (``flows.cluster``)."""

from __future__ import annotations

import importlib
import logging
import time

import click

# What each command's tasks import when they run (the modules they import lazily included);
# tests/flows/test_dask_preprocess.py checks that a warmed worker's tasks import no more of them.
# Every stage's: Prefect's task engine and the runner's client, the plugin that frees a GPU
# worker's models (flows.cluster), torch.
_ANY_STAGE = ("prefect.task_engine", "prefect_dask", "flows.cluster", "torch")
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "preprocess": (
        *_ANY_STAGE,
        "flows.preprocess",
        "tasks.ingest",
        "tasks.pose",
        "tasks.segment",
        "tasks.quality",
        "onnxruntime",
        "cv2",
        "decord",
        "pyarrow.dataset",
        "preprocess.pose.onnx_models",
        "preprocess.segment.sam2",
    ),
    "embed": (*_ANY_STAGE, "flows.embed", "tasks.embed", "transformers"),
    "generate": (*_ANY_STAGE, "flows.generate", "tasks.generate", "diffusers"),
}
STAGES = tuple(STAGE_MODULES)

logger = logging.getLogger("multianimate.dask_worker")


def warm(stages: tuple[str, ...] = STAGES) -> float:
    """Import what the tasks of ``stages`` run on; returns the seconds it took."""
    start = time.perf_counter()
    for stage in stages:
        for name in STAGE_MODULES[stage]:
            importlib.import_module(name)
    return time.perf_counter() - start


def parse_stages(value: str) -> tuple[str, ...]:
    """``"preprocess,generate"`` -> the stages it names (ValueError naming an unknown one)."""
    stages = tuple(s.strip() for s in value.split(",") if s.strip())
    if unknown := [s for s in stages if s not in STAGE_MODULES]:
        raise ValueError(f"unknown stage(s) {unknown}: choose among {', '.join(STAGES)}")
    return stages or STAGES


@click.command()
@click.option(
    "--stages",
    default=",".join(STAGES),
    show_default=True,
    help="comma-separated stages whose libraries the worker imports as it starts",
)
def dask_setup(worker, stages: str) -> None:
    """Dask's preload hook: runs in the worker process before it registers with the scheduler."""
    try:
        chosen = parse_stages(stages)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    took = warm(chosen)
    logger.info("worker %s warmed for %s in %.1f s", worker.address, ", ".join(chosen), took)
