"""The ingest flow: a folder of raw videos -> manifests/videos.parquet, clips.parquet, clips/.

Workspaces grow: a folder's files are added to those of the folders ingested before (see
preprocess.video, "the manifests"); content already listed is a duplicate, not a replacement.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, IngestConfig, IngestSummary, VideoRecord, write_records
from data_schemas.atomic import remove_stale_temps
from data_schemas.video import PASSING_REASONS, FailureReason, VideoStatus
from data_schemas.workspace import Workspace
from flows.runtime import batch_size, run_cached
from preprocess.video import (
    FoundFile,
    IngestResult,
    find_videos,
    manifest_lock,
    merge_manifests,
    read_clips_manifest,
    read_videos_manifest,
    settled_sources,
    video_record,
)
from tasks.common import is_transient
from tasks.ingest import hash_files, ingest_video, publish_summary


@flow(name="ingest", flow_run_name="ingest {folder}")
def ingest(folder: Path, workspace: Path, config: IngestConfig = IngestConfig()) -> IngestSummary:
    """Walk ``folder``, validate and deduplicate every video, cut and normalise clips, and
    add them to the workspace's manifests."""
    logger = get_run_logger()
    folder, workspace = Path(folder).absolute(), Path(workspace).absolute()
    for stale in remove_stale_temps(workspace):
        logger.info("removed %s, left by an interrupted run", stale)
    ws = Workspace(workspace)
    videos_path, clips_path = ws.videos_manifest, ws.clips_manifest
    earlier = read_videos_manifest(videos_path)  # fails first on a manifest it cannot read

    found = [_size_check(f, config) for f in find_videos(folder, config.extensions)]
    logger.info("%d candidate file(s) under %s", len(found), folder)
    sha_of, found = _hash_all(found)
    settled = settled_sources(earlier, {str(f.path): sha_of.get(f.path) for f in found})
    listed = {r.sha256: Path(r.path) for r in earlier if r.sha256 and r.status != VideoStatus.duplicate}

    primary: dict[str, Path] = {}  # content hash -> the path processed for it in this run
    for f in found:
        sha = sha_of.get(f.path)
        if sha is not None and sha not in settled:
            # The path listed before keeps its content when this scan found it again.
            keep = listed.get(sha)
            primary.setdefault(sha, keep if keep is not None and sha_of.get(keep) == sha else f.path)
    results = _ingest_unique(primary, config, workspace)

    records: list[VideoRecord] = []
    for f in found:
        sha = sha_of.get(f.path)
        if sha is None:  # unreadable: the row says why
            records.append(video_record(f, None, None, folder=str(folder)))
        elif sha in settled or primary[sha] != f.path:
            records.append(
                video_record(f, sha, None, duplicate_of=settled.get(sha) or str(primary[sha]), folder=str(folder))
            )
        else:
            records.append(video_record(f, sha, results[sha], folder=str(folder)))
    new_clips = {sha: r.clips for sha, r in results.items() if r.status == VideoStatus.ok}
    found_paths = {str(f.path) for f in found}
    if gone := [r.path for r in earlier if r.path.startswith(f"{folder}{os.sep}") and r.path not in found_paths]:
        logger.warning(
            "%d file(s) listed from %s before are not there any more: still listed, with their clips "
            "(`multianimate remove PATH` takes them out), e.g. %s",
            len(gone),
            folder,
            gone[0],
        )

    with manifest_lock(workspace):  # another run may have written since: merge into what is there now
        rows, clips = merge_manifests(
            read_videos_manifest(videos_path), read_clips_manifest(clips_path), records, new_clips
        )
        write_records(rows, VideoRecord, videos_path)
        write_records(clips, ClipRecord, clips_path)
    counts = publish_summary(records, len(clips))
    logger.info("ingest of %s: %s; %d clip(s) from %d listed file(s)", folder, counts, len(clips), len(rows))
    by_status = [r.status for r in records]
    passing = [r for r in records if r.reason in PASSING_REASONS]
    for record in passing:
        logger.error("not processed, try again: %s", record.error)
    return IngestSummary(
        num_files=len(records),
        num_ok=by_status.count(VideoStatus.ok),
        num_failed=by_status.count(VideoStatus.failed),
        num_passing=len(passing),
        num_duplicates=by_status.count(VideoStatus.duplicate),
        num_sources=len(rows),
        num_clips=len(clips),
        videos_manifest=str(videos_path),
        clips_manifest=str(clips_path),
    )


def _size_check(found: FoundFile, config: IngestConfig) -> FoundFile:
    if found.reason is None and (found.size_bytes or 0) > config.max_file_bytes:
        message = f"{found.path}: {found.size_bytes} bytes exceeds max_file_bytes={config.max_file_bytes}"
        return FoundFile(found.path, found.size_bytes, FailureReason.too_large, message)
    return found


# A task run costs some 0.1-0.3 s of orchestration; sha256 reads about 1 GB/s. Files are hashed
# in batches of at least this many bytes (a file per batch for typical raw videos, a few
# batches for a folder of small files) and at most PER_KEY_TASKS_UP_TO batches per run.
HASH_BATCH_BYTES = 256 << 20


def hash_batches(found: list[FoundFile]) -> list[list[FoundFile]]:
    """``found`` in consecutive batches, each closed once it holds HASH_BATCH_BYTES and
    ``batch_size(len(found))`` files (the last takes what is left)."""
    least = batch_size(len(found))
    batches: list[list[FoundFile]] = [[]]
    held = 0
    for f in found:
        if len(batches[-1]) >= least and held >= HASH_BATCH_BYTES:
            batches.append([])
            held = 0
        batches[-1].append(f)
        held += f.size_bytes or 0
    return [b for b in batches if b]


def _hash_all(found: list[FoundFile]) -> tuple[dict[Path, str], list[FoundFile]]:
    readable = [f for f in found if f.reason is None]
    futures = [(batch, hash_files.submit([f.path for f in batch])) for batch in hash_batches(readable)]
    outcome_of: dict[Path, str | BaseException] = {}
    for batch, future in futures:
        digests = future.result(raise_on_failure=False)
        if isinstance(digests, BaseException):  # the batch itself failed: each of its files says why
            digests = [digests] * len(batch)
        outcome_of |= {f.path: d for f, d in zip(batch, digests, strict=True)}
    sha_of: dict[Path, str] = {}
    checked: list[FoundFile] = []
    for f in found:
        outcome = outcome_of.get(f.path)
        if isinstance(outcome, BaseException):
            # An I/O error that outlived the retries is no verdict on the file: io_error, tried again next run.
            reason = FailureReason.io_error if is_transient(outcome) else FailureReason.unreadable
            f = FoundFile(f.path, f.size_bytes, reason, f"{f.path}: cannot be read ({outcome})")
        elif outcome is not None:
            sha_of[f.path] = outcome
        checked.append(f)
    return sha_of, checked


def _ingest_unique(primary: dict[str, Path], config: IngestConfig, workspace: Path) -> dict[str, IngestResult]:
    """The cached per-file task once per distinct content. Bad input comes back as a result
    (a verdict, cached); a task that raised is recorded, never cached, and the others go on:
    a timeout or an I/O error that outlived the retries as a passing failure (tried again by
    the next run), anything else as an internal error."""
    arguments = {sha: (path, sha, config, workspace) for sha, path in primary.items()}
    outcomes = run_cached(
        ingest_video, workspace, arguments, lambda result: [c.path for c in result.clips], "ingesting"
    )
    results: dict[str, IngestResult] = {}
    for sha, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            path = primary[sha]
            if is_transient(outcome):
                reason = FailureReason.timeout if isinstance(outcome, TimeoutError) else FailureReason.io_error
                message = f"{path}: {outcome} (a passing failure: nothing cached, the next run tries again)"
                outcome = IngestResult.failed(reason, message)
            else:
                get_run_logger().error("%s: ingest crashed: %r", path, outcome)
                outcome = IngestResult.failed(FailureReason.internal_error, f"{path}: ingest crashed ({outcome!r})")
        results[sha] = outcome
    return results
