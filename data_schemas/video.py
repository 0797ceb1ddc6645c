"""Records of the ingest stage: one row per input file, one row per clip."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class VideoStatus(str, enum.Enum):
    ok = "ok"
    failed = "failed"
    duplicate = "duplicate"


class FailureReason(str, enum.Enum):
    """Why an input file was rejected: a short, stable code; the message says more."""

    unreadable = "unreadable"
    symlink_loop = "symlink_loop"
    too_large = "too_large"
    not_a_video = "not_a_video"
    no_video_stream = "no_video_stream"
    zero_frames = "zero_frames"
    undecodable = "undecodable"
    too_short = "too_short"
    timeout = "timeout"
    internal_error = "internal_error"


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
    duration_s: float | None = Field(description="duration in seconds (stream, else container)")
    num_frames: int | None = Field(description="frame count the container reports, if any")
    has_audio: bool = Field(description="the file has at least one audio stream")

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown, i.e. after rotation."""
        if self.rotation % 180 == 90:
            return self.height, self.width
        return self.width, self.height


class VideoRecord(_Record):
    """One input file: what it is and what became of it. Flat, so it maps onto Parquet."""

    path: str = Field(description="path of the file as found under the ingested folder")
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
    duration_s: float | None = None
    num_frames: int | None = Field(default=None, description="frames decoded at the source rate")
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

    num_files: int = Field(description="candidate files found")
    num_ok: int = Field(description="files that produced clips")
    num_failed: int = Field(description="files rejected, with a reason in the manifest")
    num_duplicates: int = Field(description="files whose content was already seen under another name")
    num_clips: int = Field(description="clips in the clip manifest")
    videos_manifest: str = Field(description="path of manifests/videos.parquet")
    clips_manifest: str = Field(description="path of manifests/clips.parquet")
