"""Prefect tasks of batch generation: one job, claimed, run and published (``generate_job``,
on a GPU worker), its video (``generate_video``), and the run's artifacts.

The video is ``model.generate.run_job`` (its docstring: the resident pipeline, memory and
the time limit); its task adds the GPU tag, no caching (a job publishes its own outputs)
and no retries (a failure is recorded in the job's job.json, and the queue's next run tries
it again). ``generate_job`` holds the job's claim (data_schemas.job.claim_job) around the
video and the publication, in the process that runs them: on Dask, a worker; a worker that
dies drops its claim with it, and Dask runs the task again on another.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from data_schemas import ProjectConfig
from data_schemas.config import PoseConfig
from data_schemas.job import (
    GenerationResult,
    JobFailureReason,
    JobRecord,
    JobRun,
    JobSpec,
    JobTimeout,
    claim_holder,
    claim_job,
    publish_job,
    read_record,
    staging_folder,
    this_process,
)
from data_schemas.workspace import Workspace
from model.generate import run_job
from model.pipeline import DegenerateOutputError, SamplingConfig
from tasks.common import GPU_TAG
from tasks.reports import inline_image

# "JOB_ID": the process running that job SIGKILLs itself once (per workspace), its video
# written but neither returned nor published (resilience tests: another worker must take it).
FAULT_ENV = "MULTIANIMATE_FAULT_GENERATE_KILL"

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
    result = run_job(
        spec, poses, masks, pose_config, pose_files, workspace, out_dir, timeout_s, memory, logger=get_run_logger()
    )
    _fault_kill(workspace, job_id)
    return result


def _error(exc: BaseException) -> str:
    # Our ValueErrors and timeouts name the file or job and the reason; anything else is a
    # bug: keep its type.
    return str(exc) if isinstance(exc, (ValueError, JobTimeout)) else f"{type(exc).__name__}: {exc}"


def _reason(exc: BaseException) -> JobFailureReason:
    if isinstance(exc, JobTimeout):
        return "timeout"
    if isinstance(exc, DegenerateOutputError):  # a ValueError too: first
        return "degenerate_output"
    return "invalid_input" if isinstance(exc, ValueError) else "internal_error"


def _fault_kill(workspace: Path, job_id: str) -> None:
    if os.environ.get(FAULT_ENV) != job_id:
        return
    marker = Workspace(workspace).claims / f"{job_id}.fault-fired"
    if not marker.exists():
        marker.write_text(f"{this_process()} killed itself during job {job_id}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def run_job_and_publish(
    workspace: Path,
    job_id: str,
    spec: JobSpec | BaseException,
    driving: tuple[Path, Path] | BaseException | None,
    config: ProjectConfig,
    pose_files: tuple[Path, Path],
    prepare_s: float,
) -> JobRecord:
    """Generate one job whose inputs are ready, or record why it cannot run; publish its
    folder (outputs and job.json, or job.json alone for a failure) in one rename. The
    caller holds the job's claim (``run_claimed_job``) or the workspace alone."""
    started, clock = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    outcome = spec if isinstance(spec, BaseException) else driving
    staging = staging_folder(workspace, job_id)
    try:
        if isinstance(outcome, tuple):
            poses, masks = outcome
            timeout = config.generate.timeout_for(spec.model)
            outcome = generate_video(
                job_id, spec, poses, masks, config.pose, pose_files, workspace, staging, timeout, return_state=True
            ).result(raise_on_failure=False)
        ws = Workspace(workspace)
        fields = dict(
            job_id=job_id,
            queue_file=ws.relative(ws.queue_file(job_id)),
            started_at=started,
            spec=spec if isinstance(spec, JobSpec) else None,
            worker=this_process(),
        )
        if not isinstance(outcome, GenerationResult):
            for partial in staging.iterdir():  # a failed job publishes its record alone
                partial.unlink()
            record = JobRecord(
                **fields,
                status="failed",
                reason=_reason(outcome),
                error=_error(outcome),
                seconds=time.perf_counter() - clock,
            )
        else:
            shared = (
                {"prepare_driving_s": prepare_s} if spec.driving_video is not None else {}
            )  # the run's driving-video stages
            record = JobRecord(
                **fields,
                status="ok",
                seconds=time.perf_counter() - clock,
                timings=shared | outcome.timings,
                outputs=outcome.outputs,
                num_persons=outcome.num_persons,
                person_map=outcome.person_map,
                prompt=outcome.prompt,
            )
        publish_job(workspace, record, staging)  # last: the marker of a finished job, with its files
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def run_claimed_job(
    workspace: Path,
    job_id: str,
    spec: JobSpec | BaseException,
    driving: tuple[Path, Path] | BaseException | None,
    config: ProjectConfig,
    pose_files: tuple[Path, Path],
    prepare_s: float,
    seen: JobRecord | None,
) -> JobRun:
    """``run_job_and_publish`` under the job's claim, unless another live process holds it;
    ``seen``: the job's record when the queue was read. Once claimed, a record that is ok,
    or another than ``seen``, means another run did the job meanwhile: it is not redone."""
    with claim_job(workspace, job_id) as claimed:
        if not claimed:
            return JobRun(job_id=job_id, outcome="claimed_elsewhere", holder=claim_holder(workspace, job_id))
        current = read_record(workspace, job_id)
        if current is not None and (current.status == "ok" or current != seen):
            return JobRun(job_id=job_id, outcome="done_elsewhere", record=current)
        record = run_job_and_publish(workspace, job_id, spec, driving, config, pose_files, prepare_s)
        return JobRun(job_id=job_id, outcome="ran", record=record)


# No GPU tag: it is generate_video's (a tag's concurrency slot held here too would leave
# none for the video under a limit of 1); on Dask the flow submits it inside gpu_slot.
@task(name="job", task_run_name="job {job_id}", cache_policy=NO_CACHE, retries=0)
def generate_job(
    workspace: Path,
    job_id: str,
    spec: JobSpec,
    driving: tuple[Path, Path],
    config: ProjectConfig,
    pose_files: tuple[Path, Path],
    prepare_s: float,
    seen: JobRecord | None,
) -> JobRun:
    """One queued job, claimed, generated and published in this process: see ``run_claimed_job``."""
    return run_claimed_job(workspace, job_id, spec, driving, config, pose_files, prepare_s, seen)


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
