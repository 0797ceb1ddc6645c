"""Records of the pose stage: one row per clip, pointing at poses/<clip_id>.npz.

The npz holds (T frames, P = the most persons in any frame, padded):
    keypoints   float32 [T, P, 133, 2]  COCO-WholeBody, image pixels, -1 = not found / padding
    scores      float32 [T, P, 133]     SimCC scores, 0 for padding
    boxes       float32 [T, P, 4]       x1, y1, x2, y2 in pixels, 0 for padding
    box_scores  float32 [T, P]
    num_persons int32   [T]             persons really present in each frame
    width, height (int), fps (float)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PoseRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the clip the poses belong to")
    path: str = Field(description="poses/<clip_id>.npz, relative to the workspace")
    sha256: str = Field(description="sha256 of the npz file")
    num_frames: int = Field(description="frames in the clip")
    width: int = Field(description="frame width in pixels")
    height: int = Field(description="frame height in pixels")
    max_persons: int = Field(description="most persons in one frame (P of the arrays)")
    frames_with_persons: int = Field(description="frames where at least one person was found")
    frames_over_limit: int = Field(description="frames with more persons than max_persons (largest kept)")
    models: str = Field(description="digest of the detector and pose model files")
    provider: str = Field(description="onnxruntime execution provider that ran the models")


class PreprocessSummary(BaseModel):
    """What a preprocess run returns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_clips: int = Field(description="clips in the clip manifest")
    num_posed: int = Field(description="clips with poses")
    num_segmented: int = Field(description="clips with masks")
    failed_clips: list[str] = Field(default_factory=list, description="clip ids whose pose or segment task failed")
    poses_manifest: str = Field(description="path of manifests/poses.parquet")
    masks_manifest: str = Field(description="path of manifests/masks.parquet")
    num_samples: int = Field(description="samples in the WebDataset shards")
    shards_index: str = Field(description="path of shards/index.parquet")
    contact_sheet: str | None = Field(default=None, description="path of the rendered-pose contact sheet")
    mask_overlays: str | None = Field(default=None, description="path of the mask overlay sheet")
    num_left_out: int = Field(0, description="clips the quality filters (shards.filters) left out of the shards")
    left_out: dict[str, int] = Field(default_factory=dict, description="clips left out by each filter")
    data_card: str | None = Field(default=None, description="path of reports/data-card.md")
    first_sample_after: int | None = Field(
        default=None,
        description="clips through their stages when the shards' first sample was written (samples are written "
        "as clips finish); None: none written while clips were under way (the published set held them already, "
        "or the set was written at the end)",
    )
