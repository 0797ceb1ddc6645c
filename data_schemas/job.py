"""Generation jobs: what to animate (``JobSpec``), what became of it (``JobRecord``), the queue.

Workspace layout::

    queue/<job_id>.json          one submitted JobSpec (written once, kept as history)
    outputs/<job_id>/video.mp4   the generated video
    outputs/<job_id>/preview.mp4 reference | pose | result, side by side
    outputs/<job_id>/preview.png its middle frame
    outputs/<job_id>/job.json    the JobRecord, written LAST: a job is finished when this
                                 file says status "ok", and a finished job is never redone

``job_id`` is a hash of the spec's canonical JSON (every field, defaults included), so
submitting the same spec again names the same job. Paths are part of the spec, not the
files' content: a reference image changed in place under the same name is the same job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_schemas.atomic import atomic_write_bytes
from data_schemas.model import ModelConfig, check_wan_frames, check_wan_size

QUEUE_DIR = "queue"
OUTPUTS_DIR = "outputs"
RECORD_FILE = "job.json"
JOB_ID_LENGTH = 16  # hex digits of sha256: collisions are out of reach for any real queue


class JobSpec(BaseModel):
    """One video to generate: a reference image animated by a driving video (or by poses and
    masks already extracted from one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: Path = Field(description="reference image (absolute path): the persons to animate")
    driving_video: Path | None = Field(
        None, description="driving video (absolute path); its poses and masks are extracted by the preprocessing stages"
    )
    poses: Path | None = Field(None, description="instead of a video: a poses npz as the pose stage writes it")
    masks: Path | None = Field(None, description="with poses: the masks npz the segment stage wrote for the same clip")
    reference_poses: Path | None = Field(
        None, description="the reference image's poses: a poses npz whose first frame holds them; default: DWPose on the image"
    )
    person_map: dict[int, int] | None = Field(
        None,
        description="driving person k (label k of the masks) -> reference person j (1 = leftmost in the reference "
        "image); driving persons left out are not animated; default: both sides matched left to right",
    )
    prompt: str | None = Field(None, description="text prompt; default: the training caption for the person count")
    seed: int = Field(0, description="seed of the initial noise")
    steps: int = Field(50, ge=1, le=1000, description="denoising steps (the release: 50)")
    guidance_scale: float = Field(1.5, ge=1.0, description="classifier-free guidance (the release: 1.5; 1 = one pass)")
    height: int = Field(480, ge=16, description="output height in pixels (divisible by 16)")
    width: int = Field(832, ge=16, description="output width in pixels (divisible by 16)")
    num_frames: int = Field(81, ge=1, description="output frames, 4k+1 (the release: 81)")
    fps: float = Field(
        15.0, gt=0, le=240, description="output frame rate (the release: 15); a driving video is resampled to it"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model: profile, weights, constants")

    @field_validator("reference", "driving_video", "poses", "masks", "reference_poses")
    @classmethod
    def _absolute(cls, path: Path | None, info) -> Path | None:
        # A queued job runs later, maybe elsewhere: a relative path would mean another file.
        if path is not None and not path.is_absolute():
            raise ValueError(f"{info.field_name} must be an absolute path, got {str(path)!r}")
        return path

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        arrays = (self.poses is not None, self.masks is not None)
        if self.driving_video is not None and any(arrays):
            raise ValueError("give either driving_video or poses + masks, not both")
        if self.driving_video is None and not all(arrays):
            raise ValueError("give a driving_video, or both poses and masks (one clip's npz files)")
        check_wan_frames(self.num_frames)
        check_wan_size(self.height, "height")
        check_wan_size(self.width, "width")
        if self.person_map is not None:
            if not self.person_map:
                raise ValueError("person_map is empty: map at least one driving person, or leave it out")
            if min(self.person_map) < 1 or min(self.person_map.values()) < 1:
                raise ValueError(f"person_map {self.person_map}: persons are numbered from 1")
            if len(set(self.person_map.values())) != len(self.person_map):
                raise ValueError(f"person_map {self.person_map}: two driving persons share one reference person")
            if len(self.person_map) > self.model.max_persons:
                raise ValueError(f"person_map has {len(self.person_map)} persons; the model supports {self.model.max_persons}")
        return self

    def canonical_json(self) -> str:
        """Every field (defaults included) with sorted keys: equal specs give equal text."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:JOB_ID_LENGTH]

    def input_files(self) -> dict[str, Path]:
        """What the job reads, by role (for the up-front check that names a missing file)."""
        files = {"reference image": self.reference}
        if self.reference_poses is not None:
            files["reference poses"] = self.reference_poses
        if self.driving_video is not None:
            files["driving video"] = self.driving_video
        else:
            assert self.poses is not None and self.masks is not None
            files |= {"poses": self.poses, "masks": self.masks}
        return files


class JobRecord(BaseModel):
    """What became of one job: ``outputs/<job_id>/job.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(description="the job's id (hash of its spec)")
    status: Literal["ok", "failed"] = Field(description="ok: every output was written; failed: see error")
    error: str | None = Field(None, description="why it failed, naming the file and the reason")
    spec: JobSpec | None = Field(None, description="the job as submitted (None when its queue file was unreadable)")
    queue_file: str = Field(description="the queue entry, relative to the workspace")
    started_at: str = Field(description="UTC start time, ISO 8601")
    seconds: float = Field(description="wall-clock seconds of the job's own work (shared driving-video stages: see timings)")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step of the generation")
    outputs: dict[str, str] = Field(default_factory=dict, description="video, preview, preview_image: paths relative to the workspace")
    num_persons: int | None = Field(None, description="persons animated")
    person_map: dict[int, int] | None = Field(None, description="driving person -> reference person, as applied")
    prompt: str | None = Field(None, description="the prompt used")


class GenerationResult(BaseModel):
    """What the generation task returns (paths and figures, never frames)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outputs: dict[str, str] = Field(description="video, preview, preview_image: paths relative to the workspace")
    timings: dict[str, float] = Field(description="seconds per step")
    num_persons: int = Field(description="persons animated")
    person_map: dict[int, int] = Field(description="driving person -> reference person, as applied")
    prompt: str = Field(description="the prompt used (the default caption when the spec has none)")


class GenerateSummary(BaseModel):
    """What a generate run returns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_queued: int = Field(description="jobs in the queue")
    skipped: list[str] = Field(default_factory=list, description="jobs not run: finished (never redone), or failed before when retry_failed is off")
    ok: list[str] = Field(default_factory=list, description="jobs generated by this run")
    failed: list[str] = Field(default_factory=list, description="jobs that failed in this run (see their job.json)")
    outputs_dir: str = Field(description="the folder of the jobs' outputs")


def queue_path(workspace: Path, job_id: str) -> Path:
    return Path(workspace) / QUEUE_DIR / f"{job_id}.json"


def record_path(workspace: Path, job_id: str) -> Path:
    return Path(workspace) / OUTPUTS_DIR / job_id / RECORD_FILE


def submit_job(workspace: Path, spec: JobSpec) -> tuple[str, bool]:
    """Queue ``spec`` as ``queue/<job_id>.json``; (job id, whether it was new). Submitting a
    spec that is already queued writes nothing."""
    path = queue_path(workspace, spec.job_id)
    if path.exists():
        return spec.job_id, False
    atomic_write_bytes(path, (spec.model_dump_json(indent=2) + "\n").encode())
    return spec.job_id, True


def read_queue_entry(path: Path) -> JobSpec:
    """One queue file; a ValueError names the file and what is wrong with it."""
    try:
        return JobSpec.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the queue entry ({exc.strerror or exc})") from exc
    except ValidationError as exc:
        raise ValueError(f"{path}: not a valid job spec: {exc}") from exc


def queued_files(workspace: Path) -> list[Path]:
    """Queue entries, oldest first (file name breaks ties, so the order is stable)."""
    folder = Path(workspace) / QUEUE_DIR
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.json") if not p.name.startswith(".")]  # temporaries start with a dot
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_record(workspace: Path, job_id: str) -> JobRecord | None:
    """The job's record, or None when it has none (or an unreadable one: then it is redone)."""
    path = record_path(workspace, job_id)
    try:
        return JobRecord.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def is_finished(workspace: Path, job_id: str) -> bool:
    record = read_record(workspace, job_id)
    return record is not None and record.status == "ok"


def write_record(workspace: Path, record: JobRecord) -> Path:
    """Publish ``outputs/<job_id>/job.json`` (temp name, fsync, rename)."""
    return atomic_write_bytes(record_path(workspace, record.job_id), (record.model_dump_json(indent=2) + "\n").encode())
