"""Prefect task of the quality measures (preprocess/quality.py)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

import data_schemas.quality
from data_schemas.config import QualityConfig, QualityFilters
from data_schemas.mask import MaskRecord
from data_schemas.pose import PoseRecord
from data_schemas.quality import ClipQuality
from data_schemas.workspace import ClipRef
from preprocess import data_card, quality
from tasks.common import code_version, retry_transient

QUALITY_CODE = code_version(quality, data_schemas.quality)


def _quality_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # The measured files' content, the measures' definitions and our code; never the filters,
    # so new filter values rewrite the shards without measuring again.
    ref, poses, masks = parameters["ref"], parameters["poses"], parameters["masks"]
    return f"quality-{ref.clip.sha256}-{poses.sha256}-{masks.sha256}-{parameters['config'].digest()}-{QUALITY_CODE}"


@task(
    name="quality",
    task_run_name="quality {ref.clip_id}",
    cache_key_fn=_quality_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def measure_quality(ref: ClipRef, poses: PoseRecord, masks: MaskRecord, config: QualityConfig) -> ClipQuality:
    """Per-clip and per-person quality measures of one clip with its poses and masks (see preprocess.quality)."""
    ws = ref.workspace
    return quality.measure_clip_files(ref.clip_id, ref.video, ws.resolve(poses.path), ws.resolve(masks.path), config)


def publish_data_card(workspace: Path, filters: QualityFilters) -> Path:
    """reports/data-card.md (see preprocess.data_card) and a markdown artifact of it."""
    path = data_card.write_data_card(workspace, filters)
    create_markdown_artifact(
        key="data-card",
        description="Data card: counts, measures, what the filters remove",
        markdown=f"Full card with figures: `{path}`\n\n" + path.read_text(),
    )
    return path
