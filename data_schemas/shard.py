"""Records of the shard stage: shards/index.parquet has one row per sample.

``shards`` in the workspace is a symlink to the current shard set, ``shard-sets/<set id>/``
(its tars and index.parquet, published together; see preprocess/shards.py).

A sample (WebDataset key = clip_id, no dots) holds these members:
    <key>.mp4       the clip (H.264)
    <key>.pose.npz  keypoints float32 [T,K,133,2], scores float32 [T,K,133]: row k is person k+1 of the mask
    <key>.mask.npz  label_map uint8 [T,H,W] (0 background, k = person k)
    <key>.ref.png   the clip's first frame
    <key>.txt       caption
    <key>.json      clip_id, source, fps, width, height, persons, num_frames, split
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field

from data_schemas.workspace import SHARD_SETS

NO_MEASURES = "no_measures"  # why a clip without quality measures is left out when filters apply
READERS_SUFFIX = ".readers"  # shard-sets/.<set id>.readers: shared locks of the runs reading a set


def readers_file(set_dir: Path) -> Path:
    """The lock file whose shared locks keep a set from being removed while it is read."""
    return set_dir.parent / f".{set_dir.name}{READERS_SUFFIX}"


def hold_for_reading(shards: list[Path]) -> list[IO]:
    """Shared locks on the sets that ``shards`` (through the ``shards`` link) belong to, for
    as long as the returned handles stay open (a training run holds them for its life): a
    newer set's publication leaves these sets in place, removed by a later one."""
    held: list[IO] = []
    for set_dir in sorted({Path(os.path.realpath(p)).parent for p in shards}):
        if set_dir.parent.name != SHARD_SETS:
            continue  # shards outside a workspace's sets: nobody removes them
        handle = open(readers_file(set_dir), "a")  # noqa: SIM115 - held open: the lock lives as long as the handle
        fcntl.flock(handle, fcntl.LOCK_SH)
        held.append(handle)
    return held


MEMBERS = ("json", "mask.npz", "mp4", "pose.npz", "ref.png", "txt")  # sorted: the order inside a sample


class ShardSample(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(description="WebDataset key: the clip id")
    shard: str = Field(description="shard file name, e.g. train-000000.tar")
    offset: int = Field(description="byte offset of the sample's first tar header in the shard")
    size_bytes: int = Field(description="bytes of the sample's members, tar headers included")
    split: Literal["train", "val"] = Field(description="train or val; decided per source video")
    source_sha256: str = Field(description="sha256 of the source video (the split unit)")
    num_frames: int = Field(description="frames in the clip")
    persons: int = Field(description="persons in the label map")
    width: int = Field(description="frame width")
    height: int = Field(description="frame height")
    fps: float = Field(description="frame rate")
    caption: str = Field(description="the sample's caption")


class ShardSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(description="samples written")
    shards: tuple[str, ...] = Field(description="shard files, relative to the workspace (through the shards link)")
    num_train: int = Field(description="training samples")
    num_val: int = Field(description="validation samples")
    index: str = Field(description="path of shards/index.parquet")
    set_dir: str = Field(description="the published set, relative to the workspace: shard-sets/<set id>")
    num_left_out: int = Field(0, description="clips the quality filters (shards.filters) left out")
    left_out: dict[str, int] = Field(
        default_factory=dict,
        description="clips left out by each filter (a clip counts under "
        f"every filter it fails; '{NO_MEASURES}': a clip without quality measures)",
    )
