"""The generate flow: drain the job queue (queue/<job_id>.json) into outputs/<job_id>/.

For the queued jobs that are not finished (``outputs/<job_id>/job.json`` with status ok
means finished: never redone; failed jobs are tried again unless ``retry_failed`` is off):

0. jobs given to the run (the ``jobs`` parameter: through the Prefect API or UI) are
   checked first, confined to the workspace and ``generate.input_roots``, and queued; one
   refused spec refuses the request whole (nothing queued), naming every problem;
1. check each job's input files again (preprocess.job_inputs: a missing, unreadable or
   unusable one fails that job, naming the field, the file and the reason);
2. driving videos go through the SAME cached tasks as preprocessing: ingest (resampled to
   the job's fps, never cut: one clip), pose, segment. Their products live under
   ``driving/<fps>fps/{clips,poses,masks}/``, apart from the training clips, whose
   manifests and files a driving video must not touch (the same source in both places
   would otherwise be re-cut under the same clip id);
3. one job at a time (the GPU's): the reference pose, retargeting, prompt embeddings,
   sampling and the outputs (model.generate.run_job, in the task tasks.generate), into a staging folder, within
   the job's time limit (``generate.job_timeout_s``);
4. ``job.json`` LAST, ok or failed with a reason and the error, and the staging folder
   swapped in as ``outputs/<job_id>/`` by one rename; the other jobs go on after a failure.
   A run killed mid-job leaves only a staging folder (removed by the next run) and the
   next run redoes that job alone: every job's outputs appear once, whole;
5. a table artifact of the jobs run and a markdown artifact of their previews.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ProjectConfig
from data_schemas.atomic import remove_stale_temps
from data_schemas.config import IngestConfig
from data_schemas.job import (
    GenerateSummary,
    GenerationResult,
    JobFailureReason,
    JobRecord,
    JobSpec,
    JobTimeout,
    publish_job,
    queued_files,
    read_queue_entry,
    read_record,
    staging_folder,
    submit_job,
)
from data_schemas.workspace import ClipRef, Workspace
from flows.runtime import run_cached, workspace_lock
from flows.stages import StageModels, pose_and_segment
from model.pipeline import DegenerateOutputError
from preprocess.job_inputs import check_job_inputs
from preprocess.pose.stage import resolve_models
from tasks.generate import generate_video, publish_jobs
from tasks.ingest import hash_file, ingest_video


def driving_ingest_config(base: IngestConfig, fps: float) -> IngestConfig:
    """Ingest for a driving video: resampled to the output rate, never cut (scene scores
    never exceed 1, and no length limit below the file limit), however short."""
    return base.model_copy(
        update={"fps": fps, "scene_threshold": 1.0, "min_clip_s": 1.0 / fps, "max_clip_s": base.max_duration_s}
    )


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


def queue_jobs(workspace: Path, jobs: list[JobSpec], config: ProjectConfig) -> list[str]:
    """Queue specs that arrived through the API, confined to the workspace and
    ``generate.input_roots``; a ValueError naming every problem refuses them all."""
    roots = (Path(workspace), *config.generate.input_roots)
    problems = []
    for spec in jobs:
        try:
            check_job_inputs(spec, config.ingest, config.generate, roots=roots)
        except ValueError as exc:
            problems.append(f"job {spec.job_id}: {exc}")
    if problems:
        raise ValueError(f"refused {len(problems)} of {len(jobs)} job(s), nothing queued: " + "; ".join(problems))
    return [submit_job(workspace, spec)[0] for spec in jobs]


def _pending_jobs(
    workspace: Path, retry_failed: bool, config: ProjectConfig
) -> tuple[dict[str, JobSpec | BaseException], list[str], int]:
    """(job id -> spec, or why it cannot run; finished job ids; queue length)."""
    pending: dict[str, JobSpec | BaseException] = {}
    skipped: list[str] = []
    entries = queued_files(workspace)
    for path in entries:
        job_id = path.stem
        record = read_record(workspace, job_id)
        if record is not None and (record.status == "ok" or not retry_failed):
            skipped.append(job_id)
            continue
        try:
            spec = read_queue_entry(path)
            if spec.job_id != job_id:
                raise ValueError(
                    f"{path}: the spec inside hashes to {spec.job_id}, not {job_id}: it was edited; submit it again"
                )
            # again at run time: files change after submission (a video probed, not decoded:
            # the driving stages decode it whole)
            check_job_inputs(spec, config.ingest, config.generate, decode=False)
            pending[job_id] = spec
        except ValueError as exc:
            pending[job_id] = exc
    return pending, skipped, len(entries)


def _prepare_driving(
    workspace: Path, jobs: dict[str, JobSpec], config: ProjectConfig, pose_files: tuple[Path, Path]
) -> dict[str, tuple[Path, Path] | BaseException]:
    """Driving video -> (poses npz, masks npz) per job, through the preprocessing tasks (the
    same pose and segment sequence as preprocessing: flows.stages.pose_and_segment)."""
    out: dict[str, tuple[Path, Path] | BaseException] = {}
    ws = Workspace(workspace)
    hashes = {
        p: hash_file(p, return_state=True).result(raise_on_failure=False)
        for p in sorted({s.driving_video for s in jobs.values()})
    }
    models = StageModels.of(config, pose_files)
    for fps in sorted({s.fps for s in jobs.values()}):
        held = Workspace(ws.driving_at(fps))  # laid out like a workspace, apart from the training clips
        group = {i: s for i, s in jobs.items() if s.fps == fps}
        shas = {i: hashes[s.driving_video] for i, s in group.items()}
        out |= {i: sha for i, sha in shas.items() if isinstance(sha, BaseException)}
        videos = {sha: group[i].driving_video for i, sha in shas.items() if not isinstance(sha, BaseException)}
        cfg = driving_ingest_config(config.ingest, fps)
        ingested = run_cached(
            ingest_video,
            workspace,
            {sha: (path, sha, cfg, held.root) for sha, path in videos.items()},
            lambda r, held=held: [ws.relative(held.resolve(c.path)) for c in r.clips],
            f"ingesting driving videos at {fps:g} fps",
        )
        clips = {}
        for sha, result in ingested.items():
            if not isinstance(result, BaseException) and result.status != "ok":
                result = ValueError(result.error)
            clips[sha] = result if isinstance(result, BaseException) else result.clips[0]
        refs = {sha: ClipRef(c, held) for sha, c in clips.items() if not isinstance(c, BaseException)}
        posed, masked, failed = pose_and_segment(refs, config, models, ws, "driving")
        for job_id, sha in shas.items():
            if isinstance(sha, BaseException):
                continue
            failure = clips[sha] if isinstance(clips[sha], BaseException) else failed.get(sha)
            if failure is None and clips[sha].num_frames < group[job_id].num_frames:
                failure = ValueError(
                    f"{group[job_id].driving_video}: {clips[sha].num_frames} frames at {fps:g} fps, "
                    f"the job needs {group[job_id].num_frames}"
                )
            out[job_id] = (
                failure if failure is not None else (held.resolve(posed[sha].path), held.resolve(masked[sha].path))
            )
    return out


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
    folder (outputs and job.json, or job.json alone for a failure) in one rename."""
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


@flow(name="generate", flow_run_name="generate {workspace}")
def generate(
    workspace: Path,
    config: ProjectConfig = ProjectConfig(),
    retry_failed: bool = True,
    jobs: list[JobSpec] | None = None,
) -> GenerateSummary:
    """Generate every queued job that is not finished; failures are recorded and the rest go on.

    ``config``: the pose, segment and ingest stages used on driving videos and reference
    images, and the generation limits (``generate``: input roots, job time limit); each job
    names its own model profile. ``jobs``: specs to queue first (from the API or UI): their
    files must lie inside the workspace or ``generate.input_roots``."""
    with workspace_lock(workspace):  # a deployment's run has no CLI holding it
        return _generate(Path(workspace).absolute(), config, retry_failed, jobs)


def _generate(
    workspace: Path, config: ProjectConfig, retry_failed: bool, jobs: list[JobSpec] | None
) -> GenerateSummary:
    logger = get_run_logger()
    ws = Workspace(workspace)
    for folder in (ws.queue, ws.outputs, ws.driving):
        for stale in remove_stale_temps(folder):
            logger.info("removed %s, left by an interrupted run", stale)
    queued = queue_jobs(workspace, jobs, config) if jobs else []
    pending, skipped, num_queued = _pending_jobs(workspace, retry_failed, config)
    logger.info("%d queued job(s): %d finished, %d to run", num_queued, len(skipped), len(pending))
    pose_files = (
        resolve_models(config.pose, workspace) if pending else ()
    )  # a missing weight file stops the run, naming it

    start = time.perf_counter()
    ready = {i: s for i, s in pending.items() if isinstance(s, JobSpec)}
    videos = {i: s for i, s in ready.items() if s.driving_video is not None}
    inputs: dict[str, tuple[Path, Path] | BaseException] = (
        _prepare_driving(workspace, videos, config, pose_files) if videos else {}
    )
    inputs |= {i: (s.poses, s.masks) for i, s in ready.items() if s.driving_video is None}
    prepare_s = round(time.perf_counter() - start, 3)

    records = []
    for job_id, spec in pending.items():
        record = run_job_and_publish(workspace, job_id, spec, inputs.get(job_id), config, pose_files, prepare_s)
        if record.status == "failed":
            logger.error("job %s failed (%s): %s", job_id, record.reason, record.error)
        records.append(record)

    publish_jobs(workspace, records)
    return GenerateSummary(
        num_queued=num_queued,
        skipped=skipped,
        ok=[r.job_id for r in records if r.status == "ok"],
        failed=[r.job_id for r in records if r.status == "failed"],
        queued=queued,
        outputs_dir=str(ws.outputs),
    )
