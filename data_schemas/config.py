"""Typed, frozen configurations. Profiles are YAML files under ``configs/``.

Frozen pydantic models render as forms in the Prefect UI and hash by value in cache keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".wmv", ".flv", ".3gp", ".ogv",
)  # fmt: skip


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """A stable hash of the values, for cache keys."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class IngestConfig(_Config):
    """How raw videos become normalised clips."""

    extensions: tuple[str, ...] = Field(
        VIDEO_EXTENSIONS, description="file name endings considered (case-insensitive); content decides"
    )
    fps: float = Field(25.0, gt=0, le=240, description="frame rate of every clip")
    max_side: int = Field(1024, ge=16, description="clips are scaled down so their longer side is at most this")
    min_clip_s: float = Field(1.0, gt=0, description="shorter scenes are dropped; shorter videos are rejected")
    max_clip_s: float = Field(20.0, gt=0, description="longer scenes are split into pieces of at most this")
    scene_threshold: float = Field(
        0.35, gt=0, le=1, description="ffmpeg scene score above which a frame starts a new scene"
    )
    max_file_bytes: int = Field(20 * 2**30, gt=0, description="larger files are rejected as too large")
    max_pixels: int = Field(4096 * 4096, gt=0, description="frames with more pixels are rejected as too large")
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longer videos are rejected as too large")
    keyframe_interval_s: float = Field(
        1.0, gt=0, description="longest gap between keyframes: short GOPs make random access and cutting cheap"
    )
    crf: int = Field(18, ge=0, le=51, description="x264 constant rate factor of the clips")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = Field(
        "fast", description="x264 preset of the clips"
    )
    probe_timeout_s: float = Field(30.0, gt=0, description="ffprobe of one file is killed after this")
    decode_timeout_factor: float = Field(
        2.0, gt=0, description="a full decode or encode may take this many times the video's duration..."
    )
    decode_timeout_min_s: float = Field(60.0, gt=0, description="...but at least this many seconds")

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if self.max_clip_s < self.min_clip_s:
            raise ValueError(f"max_clip_s ({self.max_clip_s}) must be >= min_clip_s ({self.min_clip_s})")
        bad = [e for e in self.extensions if not e.startswith(".")]
        if bad:
            raise ValueError(f"extensions must start with a dot: {bad}")
        return self


class ProjectConfig(_Config):
    """Every stage's configuration; a profile YAML fills some of it."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="the ingest stage")


def load_config(path: Path | None = None) -> ProjectConfig:
    """Load a profile YAML (``None``: the defaults). Unknown keys are errors naming the key."""
    if path is None:
        return ProjectConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from exc
    try:
        return ProjectConfig.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: invalid config: {exc}") from exc
