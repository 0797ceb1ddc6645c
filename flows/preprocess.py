"""The preprocess flow: raw videos -> clips -> poses -> masks -> WebDataset shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, PoseRecord, ProjectConfig, read_records, write_records
from data_schemas.mask import MaskRecord
from data_schemas.pose import PreprocessSummary
from data_schemas.quality import QUALITY_MANIFEST, ClipQuality
from flows.ingest import ingest
from flows.runtime import MANIFESTS_DIR, run_cached, run_per_clip, workspace_lock
from preprocess.pose.stage import models_name, resolve_models
from preprocess.segment.stage import sam2_digest
from tasks.pose import extract_poses, publish_contact_sheet
from tasks.segment import publish_overlays, segment_clip
from tasks.quality import measure_quality, publish_data_card
from tasks.shards import write_shards


@flow(name="preprocess", flow_run_name="preprocess {folder}")
def preprocess(folder: Path, workspace: Path, config: ProjectConfig = ProjectConfig()) -> PreprocessSummary:
    """Ingest ``folder``, extract whole-body poses of every clip, track every person, write shards."""
    with workspace_lock(workspace):  # a deployment's run has no CLI holding it
        return _preprocess(Path(folder), Path(workspace).absolute(), config)


def _preprocess(folder: Path, workspace: Path, config: ProjectConfig) -> PreprocessSummary:
    logger = get_run_logger()
    pose_files = resolve_models(config.pose, workspace)  # fails first, naming any missing weights
    sam2_models = sam2_digest(config.segment)
    ingest(folder, workspace, config.ingest)
    clips = {c.clip_id: c for c in read_records(workspace / MANIFESTS_DIR / "clips.parquet", ClipRecord)}

    pose_models = models_name(config.pose, pose_files)
    poses, pose_failed = run_per_clip(extract_poses, workspace, {
        i: (c, config.pose, pose_files, pose_models, workspace) for i, c in clips.items()
    })  # fmt: skip
    masks, mask_failed = run_per_clip(segment_clip, workspace, {
        i: (clips[i], workspace / p.path, p.sha256, config.segment, sam2_models, workspace) for i, p in poses.items()
    })  # fmt: skip
    for clip_id in pose_failed + mask_failed:
        logger.error("clip %s failed, see its task run", clip_id)

    measured = run_cached(measure_quality, workspace, {
        i: (clips[i], poses[i], m, config.quality, workspace) for i, m in masks.items()
    }, lambda row: [], "quality")  # fmt: skip
    quality = {i: q for i, q in measured.items() if not isinstance(q, BaseException)}
    for clip_id in (i for i, q in measured.items() if isinstance(q, BaseException)):
        logger.error("clip %s: quality measures failed, see its task run; the filters leave it out", clip_id)

    manifests = workspace / MANIFESTS_DIR
    write_records(list(poses.values()), PoseRecord, manifests / "poses.parquet")
    write_records(list(masks.values()), MaskRecord, manifests / "masks.parquet")
    write_records([quality[i] for i in sorted(quality)], ClipQuality, workspace / QUALITY_MANIFEST)
    inputs = hashlib.sha256(
        "".join(f"{i}:{clips[i].sha256}:{poses[i].sha256}:{m.sha256};" for i, m in sorted(masks.items())).encode()
        + config.quality.digest().encode()
    ).hexdigest()[:16]
    shards = run_cached(write_shards, workspace, {"shards": (workspace, config.shards, inputs, quality)},
                        lambda s: [*s.shards, s.set_dir], "sharding")["shards"]  # fmt: skip
    if isinstance(shards, BaseException):
        raise shards
    card = publish_data_card(workspace, config.shards.filters)
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
        num_left_out=shards.num_left_out,
        left_out=shards.left_out,
        data_card=str(card),
    )
