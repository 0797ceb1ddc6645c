"""Prefect tasks of the segment stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.mask
from data_schemas.config import SegmentConfig
from data_schemas.mask import MaskRecord
from data_schemas.pose import PoseRecord
from data_schemas.workspace import ClipRef, Workspace
from preprocess.media import read_frames
from preprocess.segment import identity, stage
from preprocess.truth import TRUTH, truth_of
from tasks.common import GPU_TAG, code_version, retry_transient
from tasks.reports import publish_image_grid

SEGMENT_CODE = code_version(stage, identity, data_schemas.mask)
# Person k's overlay colour (k = 1..): saturated and far apart.
PERSON_COLOURS = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
    ],
    np.uint8,
)


def _segment_cache_key(context: TaskRunContext, parameters: dict) -> str:
    config: SegmentConfig = parameters["config"]
    return f"segment-{parameters['ref'].clip.sha256}-{parameters['poses'].sha256}-{parameters['models']}-{config.digest()}-{SEGMENT_CODE}"


@task(
    name="segment",
    task_run_name="segment {ref.clip_id}",
    tags=[GPU_TAG],
    cache_key_fn=_segment_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def segment_clip(ref: ClipRef, poses: PoseRecord, config: SegmentConfig, models: str) -> MaskRecord:
    """SAM2 (or truth) masklets, stable identities and pose assignment for one clip with its
    ``poses``, into its workspace (see preprocess.segment)."""
    make_segmenter, source = (
        stage.truth_factory(truth_of(ref.clip)) if config.models == TRUTH else stage.sam2_factory(config)
    )
    record = stage.segment_clip(
        ref.video, ref.clip_id, ref.workspace.resolve(poses.path), make_segmenter, source, config, ref.workspace
    )
    get_run_logger().info(
        "%s: %d person(s) tracked by %s, %d ignored beyond the limit",
        ref.clip_id,
        record.num_persons,
        source,
        record.ignored_arrivals,
    )
    return record


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Each person's pixels tinted with their colour."""
    colours = PERSON_COLOURS[np.minimum(labels, len(PERSON_COLOURS) - 1)]
    tinted = (frame * (1 - alpha) + colours * alpha).astype(np.uint8)
    return np.where(labels[..., None] > 0, tinted, frame)


def publish_overlays(
    workspace: Workspace | Path, records: list[MaskRecord], clips: int = 4, frames: int = 4
) -> Path | None:
    """reports/mask-overlays.png and its artifact: sampled frames with persons tinted by number."""
    ws = Workspace.of(workspace)
    rows = []
    for record in records[:clips]:
        labels = stage.load_masks(ws.resolve(record.path))["label_map"]
        picks = np.linspace(0, record.num_frames - 1, frames).round().astype(int).tolist()
        images = read_frames(ws.clip_file(record.clip_id), picks)
        rows.append([overlay(image, labels[t]) for t, image in zip(picks, images)])
    if not rows:
        return None
    return publish_image_grid(
        ws.root, ws.relative(ws.mask_overlays), "mask-overlays", "Masks: person k tinted with colour k", rows
    )
