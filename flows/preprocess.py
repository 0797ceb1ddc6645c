"""The preprocess flow: raw videos -> clips -> poses (-> masks, shards as their stages land)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, PoseRecord, ProjectConfig, read_records, write_records
from data_schemas.pose import PreprocessSummary
from flows.ingest import ingest
from flows.runtime import MANIFESTS_DIR
from preprocess.pose.stage import models_digest, resolve_models
from tasks.common import result_storage
from tasks.pose import extract_poses, publish_contact_sheet


@flow(name="preprocess", flow_run_name="preprocess {folder}")
def preprocess(folder: Path, workspace: Path, config: ProjectConfig = ProjectConfig()) -> PreprocessSummary:
    """Ingest ``folder``, then extract whole-body poses of every clip."""
    logger = get_run_logger()
    workspace = Path(workspace).absolute()
    files = resolve_models(config.pose, workspace)  # fails first, naming any missing weights
    ingest(folder, workspace, config.ingest)
    clips = read_records(workspace / MANIFESTS_DIR / "clips.parquet", ClipRecord)

    models = models_digest(files)
    task = extract_poses.with_options(result_storage=result_storage(workspace))

    def submit(clip: ClipRecord, refresh: bool = False):
        run = task.with_options(refresh_cache=True) if refresh else task
        return run.submit(workspace / clip.path, clip.clip_id, clip.sha256, config.pose, files, models, workspace)

    by_id = {clip.clip_id: clip for clip in clips}
    futures = {clip.clip_id: submit(clip) for clip in clips}
    outcomes = {clip_id: future.result(raise_on_failure=False) for clip_id, future in futures.items()}
    # A cache hit whose poses file was deleted since: compute it again.
    stale = [i for i, o in outcomes.items() if not isinstance(o, BaseException) and not (workspace / o.path).exists()]
    outcomes |= {i: submit(by_id[i], refresh=True).result(raise_on_failure=False) for i in stale}

    records = [o for o in outcomes.values() if not isinstance(o, BaseException)]
    failed = [i for i, o in outcomes.items() if isinstance(o, BaseException)]
    for clip_id in failed:
        logger.error("pose of clip %s failed: %r", clip_id, outcomes[clip_id])
    manifest = write_records(records, PoseRecord, workspace / MANIFESTS_DIR / "poses.parquet")
    sheet = publish_contact_sheet(workspace, records, config.pose)
    logger.info("poses of %d clip(s) written, %d failed", len(records), len(failed))
    return PreprocessSummary(
        num_clips=len(clips),
        num_posed=len(records),
        failed_clips=failed,
        poses_manifest=str(manifest),
        contact_sheet=str(sheet) if sheet else None,
    )
