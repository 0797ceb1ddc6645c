"""Prefect tasks of the pose stage."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.pose
from data_schemas.atomic import atomic_write_bytes
from data_schemas.config import PoseConfig
from data_schemas.pose import PoseRecord
from preprocess.media import read_frames
from preprocess.pose import convert, dwpose, render, stage
from tasks.common import code_version, retry_transient

POSE_CODE = code_version(stage, dwpose, data_schemas.pose)
CONTACT_SHEET = "reports/pose-contact-sheet.png"


def _pose_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # The clip's content, the model files' content, the config and our code: not paths.
    config: PoseConfig = parameters["config"]
    return f"pose-{parameters['clip_sha256']}-{parameters['models']}-{config.digest()}-{POSE_CODE}"


@task(
    name="pose",
    task_run_name="pose {clip_id}",
    tags=["gpu"],  # a concurrency limit on this tag keeps GPU stages from oversubscribing
    cache_key_fn=_pose_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def extract_poses(clip: Path, clip_id: str, clip_sha256: str, config: PoseConfig, files: tuple[Path, Path], models: str, workspace: Path) -> PoseRecord:
    """DWPose over one clip (see preprocess.pose.stage)."""
    record = stage.extract_poses(clip, clip_id, config, files, models, workspace)
    get_run_logger().info(
        "%s: %d frames, up to %d person(s), %d frame(s) over the limit, on %s",
        clip_id, record.num_frames, record.max_persons, record.frames_over_limit, record.provider,
    )  # fmt: skip
    return record


def contact_sheet(workspace: Path, records: list[PoseRecord], config: PoseConfig, clips: int = 4, frames: int = 4) -> np.ndarray:
    """A grid of sampled frames (rows: clips), each frame beside its rendered pose image."""
    tiles = []
    for record in records[:clips]:
        poses = stage.load_poses(Path(workspace) / record.path)
        picks = np.linspace(0, record.num_frames - 1, frames).round().astype(int).tolist()
        images = read_frames(Path(workspace) / "clips" / f"{record.clip_id}.mp4", picks)
        row = []
        for t, image in zip(picks, images):
            n = int(poses["num_persons"][t])
            frame = convert.wholebody_to_openpose(poses["keypoints"][t, :n], poses["scores"][t, :n], record.width, record.height, config.keypoint_threshold)
            drawn = render.draw_pose(frame, record.height, record.width, style=config.style)
            pair = np.concatenate([image, drawn], axis=1)
            row.append(cv2.resize(pair, (256 * 2, int(256 * record.height / record.width)), interpolation=cv2.INTER_AREA))
        height = max(r.shape[0] for r in row)
        tiles.append(np.concatenate([np.pad(r, ((0, height - r.shape[0]), (0, 4), (0, 0))) for r in row], axis=1))
    width = max(t.shape[1] for t in tiles)
    return np.concatenate([np.pad(t, ((0, 4), (0, width - t.shape[1]), (0, 0))) for t in tiles], axis=0)


def publish_contact_sheet(workspace: Path, records: list[PoseRecord], config: PoseConfig) -> Path | None:
    """Write reports/pose-contact-sheet.png and show it in a markdown artifact."""
    if not records:
        return None
    sheet = contact_sheet(workspace, records, config)
    ok, png = cv2.imencode(".png", sheet[..., ::-1])
    assert ok
    path = atomic_write_bytes(Path(workspace) / CONTACT_SHEET, png.tobytes())
    thumb = cv2.resize(sheet, (min(1024, sheet.shape[1]), int(sheet.shape[0] * min(1024, sheet.shape[1]) / sheet.shape[1])))
    _, jpeg = cv2.imencode(".jpg", thumb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    markdown = (
        f"### Poses ({config.style} style)\n\nEach row a clip, each pair a frame and its pose image. "
        f"Full size: `{path}`\n\n![pose contact sheet](data:image/jpeg;base64,{base64.b64encode(jpeg.tobytes()).decode()})"
    )
    create_markdown_artifact(key="pose-contact-sheet", markdown=markdown, description="Rendered poses over sampled frames")
    return path
