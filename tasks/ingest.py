"""Prefect tasks of the ingest stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.video
from data_schemas.config import IngestConfig
from data_schemas.video import VideoRecord
from preprocess import media, video
from preprocess.video import IngestResult
from tasks.common import call_retrying, code_version, retry_transient

INGEST_CODE = code_version(video, media, data_schemas.video)


def _hash_run_name() -> str:
    from prefect.runtime import task_run

    paths = task_run.parameters["paths"]
    return f"hash {Path(paths[0]).name}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")


@task(name="hash-files", task_run_name=_hash_run_name)
def hash_files(paths: list[Path], attempts: int = 3, delay_s: float = 1.0) -> list[str | OSError]:
    """sha256 of each file's content, in order. A file that cannot be read gives its error in
    its place (a transient one after ``attempts`` tries) and the other files go on. Never
    cached: the content is what we do not know yet."""
    digests: list[str | OSError] = []
    for path in paths:
        try:
            digests.append(call_retrying(video.sha256_file, (path,), attempts - 1, delay_s, path))
        except OSError as exc:
            digests.append(exc)
    return digests


def _ingest_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # Content, not path: a renamed file hits the cache, a file changed in place does not.
    return f"ingest-{parameters['sha256']}-{parameters['config'].digest()}-{INGEST_CODE}"


@task(
    name="ingest-video",
    task_run_name="ingest {path.name}",
    cache_key_fn=_ingest_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
)
def ingest_video(path: Path, sha256: str, config: IngestConfig, workspace: Path) -> IngestResult:
    """Probe, validate and normalise one file into clips (see preprocess.video)."""
    result = video.ingest_video(path, sha256, config, workspace)
    logger = get_run_logger()
    if result.status == "ok":
        logger.info("%s: %d clip(s)", path, len(result.clips))
        claimed, decoded = result.probe.duration_s if result.probe else None, (result.num_frames or 0) / config.fps
        if claimed and decoded < 0.9 * claimed - 0.1:
            logger.warning(
                "%s claims %.2f s but decodes cleanly to %.2f s: the decode's count is used", path, claimed, decoded
            )
    else:
        logger.warning("rejected (%s): %s", result.reason.value if result.reason else "?", result.error)
    return result


def publish_summary(records: list[VideoRecord], num_clips: int) -> str:
    """A table artifact of counts by status and reason; returns its markdown-free summary line."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        key = (record.status.value, record.reason.value if record.reason else "")
        counts[key] = counts.get(key, 0) + 1
    rows = [{"status": s, "reason": r, "files": n} for (s, r), n in sorted(counts.items())]
    rows.append({"status": "clips", "reason": "", "files": num_clips})
    create_table_artifact(key="ingest-summary", table=rows, description="Ingest: input files by status and reason")
    return ", ".join(f"{n} {s}{' (' + r + ')' if r else ''}" for (s, r), n in sorted(counts.items()))
