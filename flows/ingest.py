"""The ingest flow: a folder of raw videos -> manifests/videos.parquet, clips.parquet, clips/."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, IngestConfig, IngestSummary, VideoRecord, write_records
from data_schemas.atomic import remove_stale_temps
from data_schemas.video import FailureReason, VideoStatus
from flows.runtime import MANIFESTS_DIR, run_cached
from preprocess.video import FoundFile, IngestResult, find_videos, video_record
from tasks.ingest import hash_file, ingest_video, publish_summary


@flow(name="ingest", flow_run_name="ingest {folder}")
def ingest(folder: Path, workspace: Path, config: IngestConfig = IngestConfig()) -> IngestSummary:
    """Walk ``folder``, validate and deduplicate every video, cut and normalise clips."""
    logger = get_run_logger()
    folder, workspace = Path(folder).absolute(), Path(workspace).absolute()
    for stale in remove_stale_temps(workspace):
        logger.info("removed %s, left by an interrupted run", stale)

    found = [_size_check(f, config) for f in find_videos(folder, config.extensions)]
    logger.info("%d candidate file(s) under %s", len(found), folder)
    sha_of, found = _hash_all(found)

    primary: dict[str, Path] = {}  # content hash -> first path (sorted order) holding it
    for f in found:
        if f.path in sha_of:
            primary.setdefault(sha_of[f.path], f.path)
    results = _ingest_unique(primary, config, workspace)

    records: list[VideoRecord] = []
    clips: list[ClipRecord] = []
    for f in found:
        sha = sha_of.get(f.path)
        result = results.get(sha) if sha else None
        if sha is not None and primary[sha] != f.path:
            records.append(video_record(f, sha, result, duplicate_of=str(primary[sha])))
            continue
        records.append(video_record(f, sha, result))
        if result is not None:
            clips.extend(c.model_copy(update={"source_path": str(f.path)}) for c in result.clips)

    manifests = workspace / MANIFESTS_DIR
    write_records(records, VideoRecord, manifests / "videos.parquet")
    write_records(clips, ClipRecord, manifests / "clips.parquet")
    logger.info("ingest: %s; %d clip(s)", publish_summary(records, len(clips)), len(clips))
    by_status = [r.status for r in records]
    return IngestSummary(
        num_files=len(records),
        num_ok=by_status.count(VideoStatus.ok),
        num_failed=by_status.count(VideoStatus.failed),
        num_duplicates=by_status.count(VideoStatus.duplicate),
        num_clips=len(clips),
        videos_manifest=str(manifests / "videos.parquet"),
        clips_manifest=str(manifests / "clips.parquet"),
    )


def _size_check(found: FoundFile, config: IngestConfig) -> FoundFile:
    if found.reason is None and (found.size_bytes or 0) > config.max_file_bytes:
        message = f"{found.path}: {found.size_bytes} bytes exceeds max_file_bytes={config.max_file_bytes}"
        return FoundFile(found.path, found.size_bytes, FailureReason.too_large, message)
    return found


def _hash_all(found: list[FoundFile]) -> tuple[dict[Path, str], list[FoundFile]]:
    futures = {f.path: hash_file.submit(f.path) for f in found if f.reason is None}
    sha_of: dict[Path, str] = {}
    checked: list[FoundFile] = []
    for f in found:
        if f.path not in futures:
            checked.append(f)
            continue
        outcome = futures[f.path].result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            f = FoundFile(f.path, f.size_bytes, FailureReason.unreadable, f"{f.path}: cannot be read ({outcome})")
        else:
            sha_of[f.path] = outcome
        checked.append(f)
    return sha_of, checked


def _ingest_unique(primary: dict[str, Path], config: IngestConfig, workspace: Path) -> dict[str, IngestResult]:
    """The cached per-file task once per distinct content. A crash (not bad input: that comes
    back as a result) is recorded as an internal error and the others go on."""
    arguments = {sha: (path, sha, config, workspace) for sha, path in primary.items()}
    outcomes = run_cached(ingest_video, workspace, arguments, lambda result: [c.path for c in result.clips], "ingesting")
    results: dict[str, IngestResult] = {}
    for sha, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            path = primary[sha]
            get_run_logger().error("%s: ingest crashed: %r", path, outcome)
            outcome = IngestResult.failed(FailureReason.internal_error, f"{path}: ingest crashed ({outcome!r})")
        results[sha] = outcome
    return results
