"""Prefect tasks of the pose stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.pose
from data_schemas.config import PoseConfig
from data_schemas.pose import PoseRecord
from data_schemas.workspace import ClipRef, Workspace
from preprocess.media import read_frames
from preprocess.pose import convert, dwpose, render, stage
from preprocess.truth import TRUTH, TruthPoses, truth_of
from tasks.common import GPU_TAG, code_version, retry_transient
from tasks.reports import publish_image_grid

POSE_CODE = code_version(stage, dwpose, data_schemas.pose)


def _pose_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # The clip's content, the model files' content, the config and our code: not paths.
    config: PoseConfig = parameters["config"]
    return f"pose-{parameters['ref'].clip.sha256}-{parameters['models']}-{config.digest()}-{POSE_CODE}"


@task(
    name="pose",
    task_run_name="pose {ref.clip_id}",
    tags=[GPU_TAG],  # a concurrency limit on this tag keeps GPU stages from oversubscribing
    cache_key_fn=_pose_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def extract_poses(ref: ClipRef, config: PoseConfig, files: tuple[Path, ...], models: str) -> PoseRecord:
    """DWPose (or the truth model) over one clip, into its workspace (see preprocess.pose.stage)."""
    runner = TruthPoses(truth_of(ref.clip)) if config.models == TRUTH else None
    record = stage.extract_poses(ref.video, ref.clip_id, config, files, models, ref.workspace, runner=runner)
    get_run_logger().info(
        "%s: %d frames, up to %d person(s), %d frame(s) over the limit, on %s",
        ref.clip_id,
        record.num_frames,
        record.max_persons,
        record.frames_over_limit,
        record.provider,
    )
    return record


def publish_contact_sheet(
    workspace: Workspace | Path, records: list[PoseRecord], config: PoseConfig, clips: int = 4, frames: int = 4
) -> Path | None:
    """reports/pose-contact-sheet.png and its artifact: rows are clips, each tile a sampled
    frame beside its rendered pose image."""
    ws = Workspace.of(workspace)
    rows = []
    for record in records[:clips]:
        poses = stage.load_poses(ws.resolve(record.path))
        picks = np.linspace(0, record.num_frames - 1, frames).round().astype(int).tolist()
        images = read_frames(ws.clip_file(record.clip_id), picks)
        row = []
        for t, image in zip(picks, images):
            n = int(poses["num_persons"][t])
            frame = convert.wholebody_to_openpose(
                poses["keypoints"][t, :n],
                poses["scores"][t, :n],
                record.width,
                record.height,
                config.keypoint_threshold,
            )
            row.append(
                np.concatenate(
                    [image, render.draw_pose(frame, record.height, record.width, style=config.style)], axis=1
                )
            )
        rows.append(row)
    if not rows:
        return None
    title = f"Poses ({config.style} style): frames beside their pose images"
    return publish_image_grid(ws.root, ws.relative(ws.pose_contact_sheet), "pose-contact-sheet", title, rows)
