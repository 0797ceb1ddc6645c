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
3. the jobs (the task tasks.generate.generate_job): on the local thread pool one at a time
   (one GPU); on a Dask cluster (``make_task_runner(dask_address=...)``, ``--gpus``) in
   parallel, one per GPU worker (``gpu_slot``). Each is claimed by the process that runs it
   (a flock on ``.claims/<job_id>.lock``, data_schemas.job.claim_job), its record looked at
   again, then the reference pose, retargeting, prompt embeddings, sampling and the outputs
   (model.generate.run_job) written into a staging folder, within the job's time limit
   (``generate.job_timeout_s``);
4. ``job.json`` LAST, ok or failed with a reason and the error, and the staging folder
   swapped in as ``outputs/<job_id>/`` by one rename; the other jobs go on after a failure.
   A run killed mid-job leaves only a staging folder (removed by the next run) and the
   next run redoes that job alone: every job's outputs appear once, whole. A Dask worker
   killed mid-job drops its claim with it; Dask runs the task again on another worker and
   the flow gets that run's result. A job another process is running (another flow's
   worker) is waited for, then taken only if that process died without publishing it;
5. a table artifact of the jobs run and a markdown artifact of their previews.

The workspace lock (``workspace_lock``) already keeps two flows of one workspace apart when
their processes lock the same file, one at a time; the claims make "once" hold without it:
for a Dask task run twice (a worker taken for dead while it still runs), two flows of one
process (the lock is re-entrant), or runs whose locks differ (a workspace reached through
another lock file, a verb that does not lock). Claims and locks are flocks: across hosts
they need a shared filesystem whose locks every client sees (NFSv4, most cluster
filesystems).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ProjectConfig
from data_schemas.atomic import remove_stale_temps
from data_schemas.config import IngestConfig
from data_schemas.job import (
    GenerateSummary,
    JobRecord,
    JobRun,
    JobSpec,
    claim_job,
    queued_files,
    read_queue_entry,
    read_record,
    submit_job,
)
from data_schemas.workspace import ClipRef, Workspace
from flows.runtime import SubmissionWindow, dask_runner, gpu_slot, run_cached, submission_window, workspace_lock
from flows.stages import StageModels, pose_and_segment
from preprocess.job_inputs import check_job_inputs
from preprocess.pose.stage import resolve_models
from tasks.generate import generate_job, publish_jobs, run_claimed_job
from tasks.ingest import hash_files, ingest_video


def driving_ingest_config(base: IngestConfig, fps: float) -> IngestConfig:
    """Ingest for a driving video: resampled to the output rate, never cut (scene scores
    never exceed 1, and no length limit below the file limit), however short."""
    return base.model_copy(
        update={"fps": fps, "scene_threshold": 1.0, "min_clip_s": 1.0 / fps, "max_clip_s": base.max_duration_s}
    )


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
) -> tuple[dict[str, JobSpec | BaseException], dict[str, JobRecord | None], list[str], int]:
    """(job id -> spec, or why it cannot run; job id -> its record as read (None: none);
    finished job ids; queue length)."""
    pending: dict[str, JobSpec | BaseException] = {}
    seen: dict[str, JobRecord | None] = {}
    skipped: list[str] = []
    entries = queued_files(workspace)
    for path in entries:
        job_id = path.stem
        record = read_record(workspace, job_id)
        if record is not None and (record.status == "ok" or not retry_failed):
            skipped.append(job_id)
            continue
        seen[job_id] = record
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
    return pending, seen, skipped, len(entries)


def _prepare_driving(
    workspace: Path, jobs: dict[str, JobSpec], config: ProjectConfig, pose_files: tuple[Path, Path]
) -> dict[str, tuple[Path, Path] | BaseException]:
    """Driving video -> (poses npz, masks npz) per job, through the preprocessing tasks (the
    same pose and segment sequence as preprocessing: flows.stages.pose_and_segment)."""
    out: dict[str, tuple[Path, Path] | BaseException] = {}
    ws = Workspace(workspace)
    videos = sorted({s.driving_video for s in jobs.values()})
    hashes: dict[Path, str | BaseException] = dict(zip(videos, hash_files(videos) if videos else [], strict=True))
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
    pending, seen, skipped, num_queued = _pending_jobs(workspace, retry_failed, config)
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

    runs: dict[str, JobRun] = {}
    arguments = {}
    for job_id, spec in pending.items():
        driving = inputs.get(job_id)
        args = (workspace, job_id, spec, driving, config, pose_files, prepare_s, seen[job_id])
        if isinstance(spec, JobSpec) and isinstance(driving, tuple):
            arguments[job_id] = args
        else:  # fails before any GPU work: its record is published from here
            runs[job_id] = run_claimed_job(*args)
    runs |= _run_jobs(arguments)
    for stale in remove_stale_temps(ws.outputs):  # a killed worker's staging folder, its job done by another
        logger.info("removed %s, left by a worker that died", stale)

    records = [runs[i].record for i in pending if runs[i].outcome == "ran"]
    for record in records:
        if record.status == "failed":
            logger.error("job %s failed (%s): %s", record.job_id, record.reason, record.error)
    publish_jobs(workspace, records)
    return GenerateSummary(
        num_queued=num_queued,
        skipped=skipped,
        ok=[r.job_id for r in records if r.status == "ok"],
        failed=[r.job_id for r in records if r.status == "failed"],
        queued=queued,
        elsewhere=[i for i in pending if runs[i].outcome == "done_elsewhere"],
        outputs_dir=str(ws.outputs),
    )


def _run_jobs(arguments: dict[str, tuple]) -> dict[str, JobRun]:
    """Every job of ``arguments`` (job id -> generate_job's arguments) done once. A job that
    another live process holds is waited for (its claim, here in the flow: no GPU is held
    meanwhile) and submitted again: that run finds it done, or takes it when its holder
    died without publishing it."""
    logger = get_run_logger()
    runs: dict[str, JobRun] = {}
    todo = list(arguments)
    while todo:
        outcomes = _submit_jobs({i: arguments[i] for i in todo})
        failures = [o for o in outcomes.values() if isinstance(o, BaseException)]
        if failures:  # not a job's failure (those are records): the publication or the cluster failed
            raise failures[0]
        runs |= {i: r for i, r in outcomes.items() if r.outcome != "claimed_elsewhere"}
        todo = [i for i, r in outcomes.items() if r.outcome == "claimed_elsewhere"]
        for job_id in todo:
            logger.info("job %s is being run by %s: waiting for it to end", job_id, outcomes[job_id].holder)
            workspace = arguments[job_id][0]
            with claim_job(workspace, job_id, wait=True):
                pass
    return runs


def _submit_jobs(arguments: dict[str, tuple]) -> dict[str, JobRun | BaseException]:
    """generate_job per job: on Dask, up to the submission window at once, each on a GPU
    worker of its own; on the local thread pool one at a time (one GPU). Returns each job's
    JobRun, or the exception its task ended with."""
    pending = SubmissionWindow(submission_window() if dask_runner() is not None else 1)  # tagged by job id
    outcomes: dict[str, JobRun | BaseException] = {}
    todo = iter(arguments)
    while True:
        while pending.has_room() and (job_id := next(todo, None)) is not None:
            with gpu_slot():
                pending.add(generate_job.submit(*arguments[job_id]), job_id)
        if not pending:
            return outcomes
        job_id, outcome = pending.next_done()
        outcomes[job_id] = outcome
