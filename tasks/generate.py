"""Prefect tasks of batch generation: one job's video (GPU), and the run's artifacts.

The job itself is ``model.generate.run_job`` (its docstring: the resident pipeline, memory
and the time limit); this task adds the GPU tag, no caching (a job publishes its own
outputs) and no retries (a failure is recorded in the job's job.json, and the queue's next
run tries it again).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from data_schemas.config import PoseConfig
from data_schemas.job import GenerationResult, JobRecord, JobSpec
from data_schemas.workspace import Workspace
from model.generate import run_job
from model.pipeline import SamplingConfig
from tasks.common import GPU_TAG
from tasks.reports import inline_image

PREVIEW_WIDTH = 768  # thumbnails in the markdown artifact: artifacts live in Prefect's database
MAX_PREVIEWS = 16


@task(name="generate", task_run_name="generate {job_id}", tags=[GPU_TAG], cache_policy=NO_CACHE, retries=0)
def generate_video(
    job_id: str,
    spec: JobSpec,
    poses: Path,
    masks: Path,
    pose_config: PoseConfig,
    pose_files: tuple[Path, Path],
    workspace: Path,
    out_dir: Path,
    timeout_s: float,
    memory: SamplingConfig | None = None,
) -> GenerationResult:
    """One job (``job_id`` is ``spec.job_id``, named for the run) into ``out_dir``: see
    ``model.generate.run_job``."""
    return run_job(
        spec, poses, masks, pose_config, pose_files, workspace, out_dir, timeout_s, memory, logger=get_run_logger()
    )


def publish_jobs(workspace: Path, records: list[JobRecord]) -> None:
    """A table of the jobs this run ran, and their previews inline in a markdown artifact."""
    ws = Workspace(workspace)
    rows = [
        {
            "job": r.job_id,
            "status": r.status,
            "seconds": round(r.seconds, 2),
            "output": r.outputs.get("video", r.error or ""),
        }
        for r in records
    ]
    create_table_artifact(key="generate-jobs", table=rows, description="Generation: the jobs of this run")
    lines = ["### Generated videos (reference | pose | result)", ""]
    for record in [r for r in records if r.status == "ok"][:MAX_PREVIEWS]:
        preview = inline_image(ws.resolve(record.outputs["preview_image"]), "preview", max_width=PREVIEW_WIDTH)
        lines += [f"#### `{record.job_id}`", "", f"`{ws.resolve(record.outputs['video'])}`", "", preview, ""]
    lines += [f"- `{r.job_id}` failed: {r.error}" for r in records if r.status == "failed"]
    if not records:
        lines.append("Nothing to do: every queued job is finished.")
    create_markdown_artifact(
        key="generate-previews", markdown="\n".join(lines), description="Generation: previews and errors"
    )
