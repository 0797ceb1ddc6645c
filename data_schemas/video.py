"""Records of the ingest stage: one row per input file, one row per clip."""

from __future__ import annotations

import enum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class VideoStatus(enum.StrEnum):
    ok = "ok"
    failed = "failed"
    duplicate = "duplicate"


class FailureReason(enum.StrEnum):
    """Why an input file was rejected: a short, stable code; the message says more."""

    unreadable = "unreadable"
    symlink_loop = "symlink_loop"
    too_large = "too_large"
    not_a_video = "not_a_video"
    no_video_stream = "no_video_stream"
    zero_frames = "zero_frames"
    undecodable = "undecodable"
    too_short = "too_short"
    too_small = "too_small"
    timeout = "timeout"
    io_error = "io_error"
    internal_error = "internal_error"


# Failures that say nothing about the content (the machine was slow, a disk or a network
# failed): never cached, so the next run tries the file again (so is an internal error).
PASSING_REASONS = frozenset({FailureReason.timeout, FailureReason.io_error})


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProbeInfo(_Record):
    """Facts ffprobe reports about an input file's first video stream."""

    container: str = Field(description="ffprobe format_name, e.g. 'mov,mp4,m4a,3gp,3g2,mj2'")
    codec: str = Field(description="codec_name of the first video stream")
    width: int = Field(description="coded width in pixels, before rotation")
    height: int = Field(description="coded height in pixels, before rotation")
    rotation: int = Field(description="clockwise display rotation in degrees (0, 90, 180, 270)")
    avg_fps: float | None = Field(description="average frame rate (avg_frame_rate)")
    r_fps: float | None = Field(description="real base frame rate (r_frame_rate)")
    variable_frame_rate: bool = Field(description="avg_frame_rate and r_frame_rate disagree")
    duration_s: float | None = Field(description="duration in seconds (stream, else container), as the file claims")
    num_frames: int | None = Field(description="frame count the container claims, if any (the decode decides)")
    has_audio: bool = Field(description="the file has at least one audio stream")

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown, i.e. after rotation."""
        if self.rotation % 180 == 90:
            return self.height, self.width
        return self.width, self.height


class VideoRecord(_Record):
    """One input file: what it is and what became of it. Flat, so it maps onto Parquet.

    The manifest lists every file of every folder ever ingested into the workspace (one row
    per path); only ``multianimate remove`` takes rows out."""

    # 2: folder, claimed_frames, damaged_frames; num_frames is the decode's count.
    SCHEMA_VERSION: ClassVar[int] = 2

    path: str = Field(description="path of the file as found under the ingested folder")
    folder: str | None = Field(default=None, description="the folder whose ingest last listed this file")
    size_bytes: int | None = Field(description="file size in bytes")
    sha256: str | None = Field(description="sha256 of the content; None when unreadable")
    status: VideoStatus = Field(description="ok | failed | duplicate")
    reason: FailureReason | None = Field(default=None, description="why it failed (None when not failed)")
    error: str | None = Field(default=None, description="human readable error naming the file")
    duplicate_of: str | None = Field(default=None, description="path of the file processed in its place")
    container: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    rotation: int | None = None
    avg_fps: float | None = None
    r_fps: float | None = None
    variable_frame_rate: bool | None = None
    duration_s: float | None = Field(default=None, description="duration the file claims, seconds")
    claimed_frames: int | None = Field(default=None, description="frame count the container claims")
    num_frames: int | None = Field(default=None, description="frames the normalising decode gave, at the clip rate")
    damaged_frames: int | None = Field(
        default=None, description="frames the decoder lost or concealed (any rejects the file); None when not decoded"
    )
    has_audio: bool | None = None
    num_clips: int = Field(default=0, description="clips this file produced")


class ClipRecord(_Record):
    """One normalised clip cut from an input file between scene cuts."""

    clip_id: str = Field(description="<first 16 hex of source sha256>-<clip index, 3 digits>")
    source_sha256: str = Field(description="sha256 of the input file")
    source_path: str = Field(description="path of the input file")
    clip_index: int = Field(description="index of the clip within its source")
    start_s: float = Field(description="start time in the source, seconds")
    end_s: float = Field(description="end time in the source, seconds (exclusive)")
    num_frames: int = Field(description="frames in the clip, counted by decord")
    fps: float = Field(description="frame rate of the clip")
    width: int = Field(description="width in pixels")
    height: int = Field(description="height in pixels")
    path: str = Field(description="clip path relative to the workspace: clips/<clip_id>.mp4")
    sha256: str = Field(description="sha256 of the clip file")
    size_bytes: int = Field(description="clip file size in bytes")
    persons: int | None = Field(default=None, description="persons found (filled by the pose stage)")


class IngestSummary(_Record):
    """What an ingest run returns: counts and where the manifests are."""

    num_files: int = Field(description="candidate files found under the folder")
    num_ok: int = Field(description="files of the folder that produced clips")
    num_failed: int = Field(description="files of the folder rejected, with a reason in the manifest")
    num_passing: int = Field(
        default=0,
        description="of the failed files, those that failed for a passing reason (timeout, I/O): retried next run",
    )
    num_duplicates: int = Field(
        description="files whose content is listed under another name (this folder or an earlier one)"
    )
    num_sources: int = Field(default=0, description="files the videos manifest lists, from every folder ingested")
    num_clips: int = Field(description="clips in the clip manifest (every folder ingested)")
    videos_manifest: str = Field(description="path of manifests/videos.parquet")
    clips_manifest: str = Field(description="path of manifests/clips.parquet")
