"""Records of the segment stage: one row per clip, pointing at masks/<clip_id>.npz.

The npz holds (T frames, K persons, H x W pixels):
    label_map    uint8 [T, H, W]  0 background, k = person k (person k's mask: label_map == k)
    pose_index   int16 [T, K]     row of person k in that frame's poses (poses/<clip_id>.npz), -1 = none
    first_frame  int32 [K]        frame where person k first appears
    source       str              what made the masks (sam2, sam2-tiny, ground-truth, legacy-...)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MaskRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the clip the masks belong to")
    path: str = Field(description="masks/<clip_id>.npz, relative to the workspace")
    sha256: str = Field(description="sha256 of the npz file")
    num_frames: int = Field(description="frames in the clip")
    width: int = Field(description="frame width in pixels")
    height: int = Field(description="frame height in pixels")
    num_persons: int = Field(description="persons tracked (K)")
    frames_with_persons: int = Field(description="frames where at least one person has pixels")
    ignored_arrivals: int = Field(description="persons seen after max_persons were already tracked")
    source: str = Field(description="sam2 | sam2-tiny | ground-truth | legacy-training | legacy-demo")
