"""The generate flow: drain the job queue (queue/<job_id>.json) into outputs/<job_id>/.

For the queued jobs that are not finished (``outputs/<job_id>/job.json`` with status ok
means finished: never redone; failed jobs are tried again unless ``retry_failed`` is off):

1. check each job's input files (a missing one fails that job, naming the file);
2. driving videos go through the SAME cached tasks as preprocessing: ingest (resampled to
   the job's fps, never cut: one clip), pose, segment. Their products live under
   ``driving/<fps>fps/{clips,poses,masks}/``, apart from the training clips, whose
   manifests and files a driving video must not touch (the same source in both places
   would otherwise be re-cut under the same clip id);
3. one job at a time (the GPU's): the reference pose, retargeting, prompt embeddings,
   sampling and the outputs (tasks.generate.generate_video);
4. ``job.json`` LAST, ok or failed with the error; the other jobs go on after a failure;
5. a table artifact of the jobs run and a markdown artifact of their previews.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ProjectConfig
from data_schemas.atomic import remove_stale_temps
from data_schemas.config import IngestConfig
from data_schemas.job import (
    OUTPUTS_DIR,
    QUEUE_DIR,
    GenerateSummary,
    GenerationResult,
    JobRecord,
    JobSpec,
    queued_files,
    read_queue_entry,
    read_record,
    write_record,
)
from flows.runtime import run_cached
from preprocess.pose.stage import models_digest, resolve_models
from preprocess.segment.stage import sam2_digest
from tasks.generate import generate_video, publish_jobs
from tasks.ingest import hash_file, ingest_video
from tasks.pose import extract_poses
from tasks.segment import segment_clip

DRIVING_DIR = "driving"


def driving_ingest_config(base: IngestConfig, fps: float) -> IngestConfig:
    """Ingest for a driving video: resampled to the output rate, never cut (scene scores
    never exceed 1, and no length limit below the file limit), however short."""
    return base.model_copy(update={"fps": fps, "scene_threshold": 1.0, "min_clip_s": 1.0 / fps, "max_clip_s": base.max_duration_s})


def driving_root(workspace: Path, fps: float) -> Path:
    """Where the driving clips of one output rate and their poses and masks live."""
    return Path(workspace) / DRIVING_DIR / f"{fps:g}fps"


def check_input_files(spec: JobSpec) -> None:
    for role, path in spec.input_files().items():
        if not path.exists():
            raise ValueError(f"{path}: {role} not found")
        if not path.is_file():
            raise ValueError(f"{path}: {role} is not a file")


def _error(exc: BaseException) -> str:
    # Our ValueErrors name the file and the reason; anything else is a bug: keep its type.
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def _pending_jobs(workspace: Path, retry_failed: bool) -> tuple[dict[str, JobSpec | BaseException], list[str], int]:
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
                raise ValueError(f"{path}: the spec inside hashes to {spec.job_id}, not {job_id}: it was edited; submit it again")
            check_input_files(spec)
            pending[job_id] = spec
        except ValueError as exc:
            pending[job_id] = exc
    return pending, skipped, len(entries)


def _prepare_driving(workspace: Path, jobs: dict[str, JobSpec], config: ProjectConfig, pose_files: tuple[Path, Path]) -> dict[str, tuple[Path, Path] | BaseException]:
    """Driving video -> (poses npz, masks npz) per job, through the preprocessing tasks."""
    out: dict[str, tuple[Path, Path] | BaseException] = {}
    hashes = {p: hash_file(p, return_state=True).result(raise_on_failure=False) for p in sorted({s.driving_video for s in jobs.values()})}
    pose_models, sam2_models = models_digest(pose_files), sam2_digest(config.segment)
    for fps in sorted({s.fps for s in jobs.values()}):
        root = driving_root(workspace, fps)
        rel = root.relative_to(workspace)
        group = {i: s for i, s in jobs.items() if s.fps == fps}
        shas = {i: hashes[s.driving_video] for i, s in group.items()}
        out |= {i: sha for i, sha in shas.items() if isinstance(sha, BaseException)}
        videos = {sha: group[i].driving_video for i, sha in shas.items() if not isinstance(sha, BaseException)}
        cfg = driving_ingest_config(config.ingest, fps)
        ingested = run_cached(ingest_video, workspace, {sha: (path, sha, cfg, root) for sha, path in videos.items()},
                              lambda r: [f"{rel}/{c.path}" for c in r.clips], f"ingesting driving videos at {fps:g} fps")  # fmt: skip
        clips = {}
        for sha, result in ingested.items():
            if not isinstance(result, BaseException) and result.status != "ok":
                result = ValueError(result.error)
            clips[sha] = result if isinstance(result, BaseException) else result.clips[0]
        good = {sha: c for sha, c in clips.items() if not isinstance(c, BaseException)}
        posed = run_cached(extract_poses, workspace, {
            sha: (root / c.path, c.clip_id, c.sha256, config.pose, pose_files, pose_models, root) for sha, c in good.items()
        }, lambda r: [f"{rel}/{r.path}"], "driving poses")  # fmt: skip
        masked = run_cached(segment_clip, workspace, {
            sha: (root / good[sha].path, good[sha].clip_id, good[sha].sha256, root / p.path, p.sha256, config.segment, sam2_models, root)
            for sha, p in posed.items() if not isinstance(p, BaseException)
        }, lambda r: [f"{rel}/{r.path}"], "driving masks")  # fmt: skip
        for job_id, sha in shas.items():
            if isinstance(sha, BaseException):
                continue
            failure = next((x for x in (clips[sha], posed.get(sha), masked.get(sha)) if isinstance(x, BaseException)), None)
            if failure is None and clips[sha].num_frames < group[job_id].num_frames:
                failure = ValueError(f"{group[job_id].driving_video}: {clips[sha].num_frames} frames at {fps:g} fps, "
                                     f"the job needs {group[job_id].num_frames}")  # fmt: skip
            out[job_id] = failure if failure is not None else (root / posed[sha].path, root / masked[sha].path)
    return out


def _run_job(workspace: Path, job_id: str, spec: JobSpec | BaseException, driving: tuple[Path, Path] | BaseException | None,
             config: ProjectConfig, pose_files: tuple[Path, Path], prepare_s: float) -> JobRecord:  # fmt: skip
    """Generate one job whose inputs are ready, or record why it cannot run."""
    started, clock = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    outcome = spec if isinstance(spec, BaseException) else driving
    if isinstance(outcome, tuple):
        poses, masks = outcome
        outcome = generate_video(job_id, spec, poses, masks, config.pose, pose_files, workspace, return_state=True).result(raise_on_failure=False)
    fields = dict(job_id=job_id, queue_file=f"{QUEUE_DIR}/{job_id}.json", started_at=started, spec=spec if isinstance(spec, JobSpec) else None)
    if not isinstance(outcome, GenerationResult):
        return JobRecord(**fields, status="failed", error=_error(outcome), seconds=time.perf_counter() - clock)
    shared = {"prepare_driving_s": prepare_s} if spec.driving_video is not None else {}  # the run's driving-video stages
    return JobRecord(**fields, status="ok", seconds=time.perf_counter() - clock, timings=shared | outcome.timings,
                     outputs=outcome.outputs, num_persons=outcome.num_persons, person_map=outcome.person_map, prompt=outcome.prompt)  # fmt: skip


@flow(name="generate", flow_run_name="generate {workspace}")
def generate(workspace: Path, config: ProjectConfig = ProjectConfig(), retry_failed: bool = True) -> GenerateSummary:
    """Generate every queued job that is not finished; failures are recorded and the rest go on.

    ``config``: the pose, segment and ingest stages used on driving videos and reference
    images (each job names its own model profile)."""
    logger = get_run_logger()
    workspace = Path(workspace).absolute()
    for folder in (QUEUE_DIR, OUTPUTS_DIR, DRIVING_DIR):
        for stale in remove_stale_temps(workspace / folder):
            logger.info("removed %s, left by an interrupted run", stale)
    pending, skipped, num_queued = _pending_jobs(workspace, retry_failed)
    logger.info("%d queued job(s): %d finished, %d to run", num_queued, len(skipped), len(pending))
    pose_files = resolve_models(config.pose, workspace) if pending else ()  # a missing weight file stops the run, naming it

    start = time.perf_counter()
    ready = {i: s for i, s in pending.items() if isinstance(s, JobSpec)}
    videos = {i: s for i, s in ready.items() if s.driving_video is not None}
    inputs: dict[str, tuple[Path, Path] | BaseException] = _prepare_driving(workspace, videos, config, pose_files) if videos else {}
    inputs |= {i: (s.poses, s.masks) for i, s in ready.items() if s.driving_video is None}
    prepare_s = round(time.perf_counter() - start, 3)

    records = []
    for job_id, spec in pending.items():
        record = _run_job(workspace, job_id, spec, inputs.get(job_id), config, pose_files, prepare_s)
        if record.status == "failed":
            logger.error("job %s failed: %s", job_id, record.error)
        write_record(workspace, record)  # last: the marker of a finished job
        records.append(record)

    publish_jobs(workspace, records)
    return GenerateSummary(
        num_queued=num_queued, skipped=skipped, ok=[r.job_id for r in records if r.status == "ok"],
        failed=[r.job_id for r in records if r.status == "failed"], outputs_dir=str(workspace / OUTPUTS_DIR),
    )  # fmt: skip
