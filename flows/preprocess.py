"""The preprocess flow: raw videos -> clips -> poses -> masks -> WebDataset shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, PoseRecord, ProjectConfig, read_records, write_records
from data_schemas.mask import MaskRecord
from data_schemas.pose import PreprocessSummary
from flows.ingest import ingest
from flows.runtime import MANIFESTS_DIR, run_cached, run_per_clip
from preprocess.pose.stage import models_digest, resolve_models
from preprocess.segment.stage import sam2_digest
from tasks.pose import extract_poses, publish_contact_sheet
from tasks.segment import publish_overlays, segment_clip
from tasks.shards import write_shards


@flow(name="preprocess", flow_run_name="preprocess {folder}")
def preprocess(folder: Path, workspace: Path, config: ProjectConfig = ProjectConfig()) -> PreprocessSummary:
    """Ingest ``folder``, extract whole-body poses of every clip, track every person, write shards."""
    logger = get_run_logger()
    workspace = Path(workspace).absolute()
    pose_files = resolve_models(config.pose, workspace)  # fails first, naming any missing weights
    sam2_models = sam2_digest(config.segment)
    ingest(folder, workspace, config.ingest)
    clips = {c.clip_id: c for c in read_records(workspace / MANIFESTS_DIR / "clips.parquet", ClipRecord)}

    pose_models = models_digest(pose_files)
    poses, pose_failed = run_per_clip(extract_poses, workspace, {
        i: (workspace / c.path, i, c.sha256, config.pose, pose_files, pose_models, workspace) for i, c in clips.items()
    })  # fmt: skip
    masks, mask_failed = run_per_clip(segment_clip, workspace, {
        i: (workspace / clips[i].path, i, clips[i].sha256, workspace / p.path, p.sha256, config.segment, sam2_models, workspace)
        for i, p in poses.items()
    })  # fmt: skip
    for clip_id in pose_failed + mask_failed:
        logger.error("clip %s failed, see its task run", clip_id)

    manifests = workspace / MANIFESTS_DIR
    write_records(list(poses.values()), PoseRecord, manifests / "poses.parquet")
    write_records(list(masks.values()), MaskRecord, manifests / "masks.parquet")
    inputs = hashlib.sha256(
        "".join(f"{i}:{clips[i].sha256}:{poses[i].sha256}:{m.sha256};" for i, m in sorted(masks.items())).encode()
    ).hexdigest()[:16]
    shards = run_cached(write_shards, workspace, {"shards": (workspace, config.shards, inputs)}, lambda s: s.shards, "sharding")["shards"]
    if isinstance(shards, BaseException):
        raise shards
    sheet = publish_contact_sheet(workspace, list(poses.values()), config.pose)
    overlays = publish_overlays(workspace, list(masks.values()))
    logger.info("poses of %d clip(s), masks of %d; %d failed", len(poses), len(masks), len(pose_failed + mask_failed))
    return PreprocessSummary(
        num_clips=len(clips),
        num_posed=len(poses),
        num_segmented=len(masks),
        failed_clips=pose_failed + mask_failed,
        poses_manifest=str(manifests / "poses.parquet"),
        masks_manifest=str(manifests / "masks.parquet"),
        num_samples=shards.num_samples,
        shards_index=shards.index,
        contact_sheet=str(sheet) if sheet else None,
        mask_overlays=str(overlays) if overlays else None,
    )
