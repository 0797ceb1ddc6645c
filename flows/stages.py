"""Stage sequences that more than one flow runs: pose then segment of a set of clips, the
same cached tasks for training clips (flows/preprocess.py) and driving videos
(flows/generate.py), pipelined per clip (a clip's segmentation starts when its poses exist)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from data_schemas import ProjectConfig
from data_schemas.mask import MaskRecord
from data_schemas.pose import PoseRecord
from data_schemas.workspace import ClipRef, Workspace
from flows.runtime import Stage, run_pipeline
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


def pose_and_segment_stages(
    refs: Mapping[K, ClipRef], config: ProjectConfig, models: StageModels, workspace: Workspace, label: str = ""
) -> list[Stage]:
    """The pose then segment stages of the clips of ``refs`` (by key), for ``run_pipeline``
    under the run's ``workspace``: both GPU stages, each clip's products in its own ref's
    workspace."""
    held = {ref.clip_id: ref.workspace for ref in refs.values()}
    assert len(held) == len(refs), "one ref per clip: products are found by clip id"

    def products(record: PoseRecord | MaskRecord) -> list[str]:  # the record's file, as run_pipeline checks it
        return [workspace.relative(held[record.clip_id].resolve(record.path))]

    def name(task) -> str:
        return " ".join(filter(None, (label, task.name)))

    return [
        Stage(
            extract_poses,
            lambda k, _: (refs[k], config.pose, models.pose_files, models.pose),
            products,
            name(extract_poses),
            gpu=True,
        ),
        Stage(
            segment_clip,
            lambda k, done: (refs[k], done[0], config.segment, models.segment),
            products,
            name(segment_clip),
            gpu=True,
        ),
    ]


def pose_and_segment(
    refs: Mapping[K, ClipRef], config: ProjectConfig, models: StageModels, workspace: Workspace, label: str = ""
) -> tuple[dict[K, PoseRecord], dict[K, MaskRecord], dict[K, BaseException]]:
    """The pose task on every clip of ``refs``, and the segment task on each clip as soon as
    its poses exist.

    Results are cached under ``workspace`` (the run's); each clip's products go to its own
    ref's workspace. Returns (poses, masks, failures) by key: a clip whose pose failed has
    neither, one whose segmentation failed has poses only; failures list pose failures first.
    ``label`` names the clips in progress bars (e.g. "driving")."""
    posed, masked = run_pipeline(pose_and_segment_stages(refs, config, models, workspace, label), workspace.root, refs)
    poses, pose_failed = split_failures(posed)
    masks, mask_failed = split_failures(masked)
    return poses, masks, pose_failed | mask_failed


def split_failures(outcomes: Mapping[K, object]) -> tuple[dict, dict[K, BaseException]]:
    """(the records, the exceptions) of a stage's outcomes, by key."""
    done = {k: o for k, o in outcomes.items() if not isinstance(o, BaseException)}
    return done, {k: o for k, o in outcomes.items() if isinstance(o, BaseException)}
