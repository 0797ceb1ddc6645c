"""The preprocess flow: raw videos -> clips -> poses -> masks -> WebDataset shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from data_schemas import ClipRecord, PoseRecord, ProjectConfig, read_records, write_records
from data_schemas.mask import MaskRecord
from data_schemas.pose import PreprocessSummary
from data_schemas.quality import ClipQuality
from data_schemas.workspace import ClipRef, Workspace
from flows.ingest import ingest
from flows.runtime import Stage, describe, on_this_cluster, run_cached, run_pipeline, workspace_lock
from flows.stages import StageModels, pose_and_segment_stages, split_failures
from preprocess.pose.stage import resolve_models
from preprocess.shards import SampleEntry, ShardStream, left_out_by
from tasks.pose import publish_contact_sheet
from tasks.quality import measure_quality, publish_data_card
from tasks.segment import publish_overlays
from tasks.shards import shards_recipe, write_shards


@flow(name="preprocess", flow_run_name="preprocess {folder}")
def preprocess(folder: Path, workspace: Path, config: ProjectConfig = ProjectConfig()) -> PreprocessSummary:
    """Ingest ``folder``, extract whole-body poses of every clip, track every person, write shards."""
    with workspace_lock(workspace):  # a deployment's run has no CLI holding it
        return _preprocess(Path(folder), Path(workspace).absolute(), config)


def _preprocess(folder: Path, workspace: Path, config: ProjectConfig) -> PreprocessSummary:
    logger = get_run_logger()
    ws = Workspace(workspace)
    models = StageModels.of(config, resolve_models(config.pose, ws))  # fails first, naming any missing weights
    on_this_cluster(ingest)(folder, workspace, config.ingest)
    clips = {c.clip_id: c for c in read_records(ws.clips_manifest, ClipRecord)}

    refs = {i: ClipRef(c, ws) for i, c in sorted(clips.items())}
    # Per clip: poses, then masks as soon as the poses exist, then quality as soon as the masks
    # do, then its sample into the shards as soon as the clips before it are through.
    quality_stage = Stage(measure_quality, lambda i, done: (refs[i], *done, config.quality), lambda row: [], "quality")
    with ShardStream(ws, config.shards, refs, shards_recipe(config.shards)) as stream:

        def through(clip_id: str, outcomes: tuple) -> None:
            if len(outcomes) < 3:  # its poses or masks failed: no sample
                stream.offer(clip_id, None)
                return
            pose, mask, measures = outcomes
            measures = None if isinstance(measures, BaseException) else measures
            stream.offer(clip_id, SampleEntry(clips[clip_id], pose, mask, left_out_by(config.shards, measures)))

        posed, masked, measured = run_pipeline(
            [*pose_and_segment_stages(refs, config, models, ws), quality_stage], workspace, refs, on_final=through
        )
        try:
            streamed = stream.finish()
        except Exception as error:  # the end-of-run writer below tries again, with its retry
            logger.warning("writing the shards as clips finished failed (%s); writing them now", error)
            streamed = None
    if streamed is not None:
        logger.info(
            "shards written as clips finished: the first sample when %d of %d clip(s) were through",
            stream.through_at_first_write,
            len(refs),
        )
    (poses, pose_failed), (masks, mask_failed) = split_failures(posed), split_failures(masked)
    # by clip id, not in the order tasks finished: manifests and reports are then the same bytes every run
    poses, masks = dict(sorted(poses.items())), dict(sorted(masks.items()))
    failures = pose_failed | mask_failed
    failed = list(failures)
    # the cause here, the traceback in the clip's task run (a batch's, beyond 1,000 clips)
    for clip_id, error in failures.items():
        logger.error("clip %s failed: %s", clip_id, describe(error))
    quality, quality_failed = split_failures(measured)
    for clip_id, error in quality_failed.items():
        logger.error(
            "clip %s: quality measures failed (%s); the filters leave it out",
            clip_id,
            describe(error),
        )

    write_records(list(poses.values()), PoseRecord, ws.poses_manifest)
    write_records(list(masks.values()), MaskRecord, ws.masks_manifest)
    write_records([quality[i] for i in sorted(quality)], ClipQuality, ws.quality_manifest)
    inputs = hashlib.sha256(
        "".join(f"{i}:{clips[i].sha256}:{poses[i].sha256}:{m.sha256};" for i, m in sorted(masks.items())).encode()
        + config.quality.digest().encode()
    ).hexdigest()[:16]
    records = [(clips[i], poses[i], m) for i, m in masks.items()]  # what the manifests above list, clips with both
    shards = run_cached(
        write_shards,
        workspace,
        {"shards": (workspace, config.shards, inputs, records, quality)},
        lambda s: [*s.shards, s.set_dir],
        "sharding",
    )["shards"]
    if isinstance(shards, BaseException):
        raise shards
    card = publish_data_card(workspace, config.shards.filters)
    sheet = publish_contact_sheet(workspace, list(poses.values()), config.pose)
    overlays = publish_overlays(workspace, list(masks.values()))
    logger.info("poses of %d clip(s), masks of %d; %d failed", len(poses), len(masks), len(failed))
    return PreprocessSummary(
        num_clips=len(clips),
        num_posed=len(poses),
        num_segmented=len(masks),
        failed_clips=failed,
        poses_manifest=str(ws.poses_manifest),
        masks_manifest=str(ws.masks_manifest),
        num_samples=shards.num_samples,
        shards_index=shards.index,
        contact_sheet=str(sheet) if sheet else None,
        mask_overlays=str(overlays) if overlays else None,
        num_left_out=shards.num_left_out,
        left_out=shards.left_out,
        data_card=str(card),
        first_sample_after=stream.through_at_first_write if streamed is not None else None,
    )
