"""Stage sequences that more than one flow runs: pose then segment of a set of clips, the
same cached tasks for training clips (flows/preprocess.py) and driving videos
(flows/generate.py)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from data_schemas import ProjectConfig
from data_schemas.mask import MaskRecord
from data_schemas.pose import PoseRecord
from data_schemas.workspace import ClipRef, Workspace
from flows.runtime import run_cached
from preprocess.pose.stage import models_name
from preprocess.segment.stage import sam2_digest
from tasks.pose import extract_poses
from tasks.segment import segment_clip

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class StageModels:
    """The pose and segment models of a run, resolved once (hashing real weights is costly)."""

    pose_files: tuple[Path, ...]  # the DWPose files; none for the truth model
    pose: str  # what pose records and cache keys call them
    segment: str  # what segment cache keys call SAM2

    @classmethod
    def of(cls, config: ProjectConfig, pose_files: tuple[Path, ...]) -> StageModels:
        """Raises, naming the folder, when the profile's SAM2 weights are missing."""
        return cls(pose_files, models_name(config.pose, pose_files), sam2_digest(config.segment))


def pose_and_segment(
    refs: Mapping[K, ClipRef], config: ProjectConfig, models: StageModels, workspace: Workspace, label: str = ""
) -> tuple[dict[K, PoseRecord], dict[K, MaskRecord], dict[K, BaseException]]:
    """The pose task on every clip of ``refs``, then the segment task on every clip posed.

    Results are cached under ``workspace`` (the run's); each clip's products go to its own
    ref's workspace. Returns (poses, masks, failures) by key: a clip whose pose failed has
    neither, one whose segmentation failed has poses only; failures list pose failures first.
    ``label`` names the clips in progress bars (e.g. "driving")."""
    held = {ref.clip_id: ref.workspace for ref in refs.values()}
    assert len(held) == len(refs), "one ref per clip: products are found by clip id"

    def products(record: PoseRecord | MaskRecord) -> list[str]:  # the record's file, as run_cached checks it
        return [workspace.relative(held[record.clip_id].resolve(record.path))]

    def run(task, arguments: dict) -> tuple[dict, dict]:
        outcomes = run_cached(task, workspace.root, arguments, products, " ".join(filter(None, (label, task.name))))
        done = {k: o for k, o in outcomes.items() if not isinstance(o, BaseException)}
        return done, {k: o for k, o in outcomes.items() if isinstance(o, BaseException)}

    poses, pose_failed = run(
        extract_poses, {k: (ref, config.pose, models.pose_files, models.pose) for k, ref in refs.items()}
    )
    masks, mask_failed = run(segment_clip, {k: (refs[k], p, config.segment, models.segment) for k, p in poses.items()})
    return poses, masks, pose_failed | mask_failed
