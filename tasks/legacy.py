"""Prefect task of the legacy importer."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from data_schemas.legacy import LegacyClip
from preprocess import legacy


@task(name="import-legacy", task_run_name="import {folder.name}")
def import_legacy_folder(kind: str, folder: Path, workspace: Path, trust_pickles: bool, fps: float) -> LegacyClip:
    """Import one seed folder; bad input raises LegacyImportError (no retry: it is a fact about the input)."""
    if kind == "training":
        clip = legacy.import_training_video(folder, workspace, trust_pickles=trust_pickles, fps=fps)
    else:
        clip = legacy.import_demo_folder(folder, workspace, fps=fps)
    get_run_logger().info("%s -> %s: %d frames, %d person(s)", folder, clip.clip_id, clip.num_frames, clip.num_persons)
    return clip
