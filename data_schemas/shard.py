"""Records of the shard stage: shards/index.parquet has one row per sample.

A sample (WebDataset key = clip_id, no dots) holds these members:
    <key>.mp4       the clip (H.264)
    <key>.pose.npz  keypoints float32 [T,K,133,2], scores float32 [T,K,133]: row k is person k+1 of the mask
    <key>.mask.npz  label_map uint8 [T,H,W] (0 background, k = person k)
    <key>.ref.png   the clip's first frame
    <key>.txt       caption
    <key>.json      clip_id, source, fps, width, height, persons, num_frames, split
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SHARDS_DIR = "shards"
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
    shards: tuple[str, ...] = Field(description="shard files, relative to the workspace")
    num_train: int = Field(description="training samples")
    num_val: int = Field(description="validation samples")
    index: str = Field(description="path of shards/index.parquet")
