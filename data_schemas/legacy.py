"""Records of the legacy importer: the seed's training and demo layouts as our clips."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LegacyClip(BaseModel):
    """What one import produced. Paths are relative to the workspace (POSIX separators)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="legacy-<first 16 hex of sha256 over the input files>")
    kind: Literal["training", "demo"] = Field(description="which seed layout was imported")
    source_folder: str = Field(description="absolute path of the imported folder")
    num_frames: int = Field(description="frames in the clip (= pose images = mask frames)")
    width: int = Field(description="clip and label-map width in pixels (even)")
    height: int = Field(description="clip and label-map height in pixels (even)")
    num_persons: int = Field(description="persons (mask files / folders)")
    person_names: tuple[str, ...] = Field(description="person names in label order (label k = names[k-1])")
    fps: float = Field(description="frame rate the clip was written at")
    clip_path: str = Field(description="clips/<clip_id>.mp4")
    poses_path: str = Field(description="poses/<clip_id>.images.npz")
    masks_path: str = Field(description="masks/<clip_id>.npz")
    reference_path: str | None = Field(default=None, description="references/<clip_id>.png (demo only)")
