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

A job's files are written into a temporary folder beside ``outputs/<job_id>/`` and
published with ``job.json`` by one rename (``publish_job``): a killed run leaves no
half-finished output folder, only a temporary one that the next run removes.

Each job is done once: the process that runs it holds an exclusive flock on its claim file
``.claims/<job_id>.lock`` for the job's duration (``claim_job``) and looks at the job's
record again once it holds it. The kernel drops the claim when that process dies, however
it dies, so a job whose worker was killed can be taken by another; a live holder's job is
never started a second time, whichever flow, host or Dask worker asks.

Every numeric field is bounded (sizes within the model's limits, finite floats): a spec
that would ask for a terabyte or a NaN guidance is refused when it is made, naming the
field. The input files are checked separately (``preprocess.job_inputs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_schemas.atomic import atomic_write_bytes, fsync_file, temp_path_for
from data_schemas.model import ModelConfig, check_wan_frames, check_wan_size
from data_schemas.workspace import Workspace

RECORD_FILE = "job.json"
JOB_ID_LENGTH = 16  # hex digits of sha256: collisions are out of reach for any real queue

# Bounds of a job. Sizes: Wan2.1 was trained up to 1280x720; 2048 leaves room for other
# aspect ratios. The pose images, label map and condition tokens grow with H x W x T (the
# windows bound the DiT, not them): at most four 81-frame 720p videos' worth of pixels.
MAX_SIDE = 2048
MAX_FRAMES = 1001
MAX_PIXEL_FRAMES = 4 * 1280 * 720 * 81
MAX_GUIDANCE = 20.0  # the release samples at 1.5, diffusers' Wan pipelines at 5: ample room, no overflow
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds
MAX_PROMPT_CHARS = 4000  # UMT5 reads 512 tokens; longer text is cut anyway
MAX_PERSON_LABEL = 255  # label maps are uint8


class JobTimeout(TimeoutError):
    """A job ran past its time limit and was stopped (``JobRecord.reason`` "timeout")."""


JobFailureReason = Literal["invalid_input", "timeout", "degenerate_output", "internal_error"]


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
        None,
        description="the reference image's poses: a poses npz whose first frame holds them; default: DWPose on the image",
    )
    person_map: dict[int, int] | None = Field(
        None,
        description="driving person k (label k of the masks) -> reference person j (1 = leftmost in the reference "
        "image); driving persons left out are not animated; default: both sides matched left to right",
    )
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="text prompt; default: the training caption for the person count"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the initial noise")
    steps: int = Field(50, ge=1, le=1000, description="denoising steps (the release: 50)")
    guidance_scale: float = Field(
        1.5,
        ge=1.0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="classifier-free guidance (the release: 1.5; 1 = one pass)",
    )
    height: int = Field(480, ge=16, le=MAX_SIDE, description="output height in pixels (divisible by 16)")
    width: int = Field(832, ge=16, le=MAX_SIDE, description="output width in pixels (divisible by 16)")
    num_frames: int = Field(81, ge=1, le=MAX_FRAMES, description="output frames, 4k+1 (the release: 81)")
    fps: float = Field(
        15.0,
        ge=1.0,
        le=120.0,
        allow_inf_nan=False,
        description="output frame rate (the release: 15); a driving video is resampled to it",
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
        if self.height * self.width * self.num_frames > MAX_PIXEL_FRAMES:
            raise ValueError(
                f"height x width x num_frames = {self.height}x{self.width}x{self.num_frames} is over the bound of "
                f"{MAX_PIXEL_FRAMES:,} pixel-frames (four 81-frame 1280x720 videos): fewer frames or a smaller size"
            )
        if self.person_map is not None:
            if not self.person_map:
                raise ValueError("person_map is empty: map at least one driving person, or leave it out")
            if min(self.person_map) < 1 or min(self.person_map.values()) < 1:
                raise ValueError(f"person_map {self.person_map}: persons are numbered from 1")
            if max(self.person_map) > MAX_PERSON_LABEL or max(self.person_map.values()) > MAX_PERSON_LABEL:
                raise ValueError(f"person_map {self.person_map}: persons are numbered up to {MAX_PERSON_LABEL}")
            if len(set(self.person_map.values())) != len(self.person_map):
                raise ValueError(f"person_map {self.person_map}: two driving persons share one reference person")
            if len(self.person_map) > self.model.max_persons:
                raise ValueError(
                    f"person_map has {len(self.person_map)} persons; the model supports {self.model.max_persons}"
                )
        return self

    def canonical_json(self) -> str:
        """Every field (defaults included) with sorted keys: equal specs give equal text."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:JOB_ID_LENGTH]

    def input_files(self) -> dict[str, Path]:
        """What the job reads, by field name (for the up-front checks that name the file)."""
        files = {"reference": self.reference}
        if self.reference_poses is not None:
            files["reference_poses"] = self.reference_poses
        if self.driving_video is not None:
            files["driving_video"] = self.driving_video
        else:
            assert self.poses is not None and self.masks is not None
            files |= {"poses": self.poses, "masks": self.masks}
        return files

    def model_paths(self) -> dict[str, Path]:
        """The weight folders the job's model loads, by field name (confined like the inputs
        when a job arrives through the API)."""
        fields = ("wan_folder", "multianimate", "tiny_transformer")
        return {f"model.{name}": path for name in fields if (path := getattr(self.model, name)) is not None}


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the field and the value: ``height=1000000000: Input
    should be less than or equal to 2048`` (pydantic's own text adds URLs and types)."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        text = repr(value) if len(repr(value)) <= 80 else repr(value)[:76] + "...'"
        shown = f"{field}={text}" if field and not isinstance(value, dict) else field
        lines.append(f"{shown}: {message}" if shown else message)
    return "; ".join(lines)


DEFAULT_JOB_TIMEOUT_S = {"tiny": 600.0, "real": 3 * 3600.0}


class GenerateConfig(BaseModel):
    """Limits of batch generation: what a job may read and how long it may run (the profile's
    ``generate:`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_roots: tuple[Path, ...] = Field(
        (),
        description="folders, besides the workspace, whose files jobs submitted through the Prefect API (the generate "
        "flow's jobs parameter) may read: every input and weight path must resolve (symlinks followed) inside one; "
        "jobs queued with the command line read what their user can",
    )
    job_timeout_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="a job running longer is stopped at its next denoising step and recorded as failed (timeout); the "
        "model's load is not counted. Default: 600 s for the tiny profile, 3 h for the real one (meant to cover "
        "a 50-step 81-frame 720p job with offload on a 24 GB GPU; set it from the seconds your jobs' records show)",
    )
    min_reference_side: int = Field(32, ge=1, description="reference images smaller than this on a side are refused")
    max_reference_pixels: int = Field(4096 * 4096, gt=0, description="reference images with more pixels are refused")
    max_driving_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="longer driving videos are refused: their poses and masks are extracted whole (cut them first)",
    )
    max_array_bytes: int = Field(
        4 * 2**30, gt=0, description="poses/masks npz files whose arrays would take more memory are refused"
    )

    def timeout_for(self, model: ModelConfig) -> float:
        if self.job_timeout_s is not None:
            return self.job_timeout_s
        return DEFAULT_JOB_TIMEOUT_S["tiny" if model.profile == "tiny" else "real"]


class JobRecord(BaseModel):
    """What became of one job: ``outputs/<job_id>/job.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(description="the job's id (hash of its spec)")
    status: Literal["ok", "failed"] = Field(description="ok: every output was written; failed: see error")
    reason: JobFailureReason | None = Field(
        None,
        description="why it failed: invalid_input (a file or value the job cannot use), timeout (stopped at its time "
        "limit), degenerate_output (NaN/inf latents or a constant video), internal_error (a bug or the environment)",
    )
    error: str | None = Field(None, description="why it failed, naming the file and the reason")
    spec: JobSpec | None = Field(None, description="the job as submitted (None when its queue file was unreadable)")
    queue_file: str = Field(description="the queue entry, relative to the workspace")
    started_at: str = Field(description="UTC start time, ISO 8601")
    seconds: float = Field(
        description="wall-clock seconds of the job's own work (shared driving-video stages: see timings)"
    )
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step of the generation")
    outputs: dict[str, str] = Field(
        default_factory=dict, description="video, preview, preview_image: paths relative to the workspace"
    )
    num_persons: int | None = Field(None, description="persons animated")
    person_map: dict[int, int] | None = Field(None, description="driving person -> reference person, as applied")
    prompt: str | None = Field(None, description="the prompt used")
    worker: str | None = Field(None, description="the process that ran it: host, pid and Dask worker (this_process)")


class JobRun(BaseModel):
    """What one job's task did (``tasks.generate.run_claimed_job``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    outcome: Literal["ran", "done_elsewhere", "claimed_elsewhere"] = Field(
        description="ran: this run ran it and published its record; done_elsewhere: another run published a record "
        "since this one read the queue (not redone); claimed_elsewhere: another live process is running it"
    )
    record: JobRecord | None = Field(None, description="the job's record (ran, done_elsewhere)")
    holder: str | None = Field(None, description="claimed_elsewhere: who holds the claim (claim_holder)")


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
    skipped: list[str] = Field(
        default_factory=list,
        description="jobs not run: finished (never redone), or failed before when retry_failed is off",
    )
    ok: list[str] = Field(default_factory=list, description="jobs generated by this run")
    failed: list[str] = Field(default_factory=list, description="jobs that failed in this run (see their job.json)")
    queued: list[str] = Field(default_factory=list, description="jobs this run queued from its jobs parameter")
    elsewhere: list[str] = Field(
        default_factory=list,
        description="jobs another run (a flow, host or worker) finished or failed while this one ran: not redone",
    )
    outputs_dir: str = Field(description="the folder of the jobs' outputs")


def queue_path(workspace: Path, job_id: str) -> Path:
    return Workspace(workspace).queue_file(job_id)


def record_path(workspace: Path, job_id: str) -> Path:
    return Workspace(workspace).output(job_id) / RECORD_FILE


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
    folder = Workspace(workspace).queue
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


def staging_folder(workspace: Path, job_id: str) -> Path:
    """A new temporary folder beside ``outputs/<job_id>/`` for the job's files (its name
    marks the writer, so a later run removes it when the writer is dead)."""
    folder = temp_path_for(Workspace(workspace).output(job_id))
    folder.mkdir(parents=True)
    return folder


def publish_job(workspace: Path, record: JobRecord, staging: Path | None = None) -> Path:
    """Write ``record`` as ``job.json`` into ``staging`` (the job's files; a new, empty
    folder when None) and swap it in as ``outputs/<job_id>/`` by one rename, so the folder
    is whole or absent. An earlier folder of the job (a failure) is moved to a temporary
    name first and deleted after; a killed run between the two renames leaves no folder
    (the job runs again). A job finished meanwhile by another run is kept: ours is dropped."""
    final = Workspace(workspace).output(record.job_id)
    staging = staging_folder(workspace, record.job_id) if staging is None else Path(staging)
    if is_finished(workspace, record.job_id):
        shutil.rmtree(staging, ignore_errors=True)
        return final
    (staging / RECORD_FILE).write_bytes((record.model_dump_json(indent=2) + "\n").encode())
    for path in staging.iterdir():
        fsync_file(path)
    old = None
    if final.exists():
        old = temp_path_for(final)
        os.rename(final, old)
    os.rename(staging, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- claims: each job run by one process at a time -------------------------------------


def this_process() -> str:
    """This process as a record names it: host and pid, and the Dask worker's address when
    it is one (imported only where Dask already is)."""
    name = f"{socket.gethostname()} pid {os.getpid()}"
    if "distributed" in sys.modules:
        with contextlib.suppress(ValueError, ImportError):
            from distributed import get_worker

            name += f" (dask worker {get_worker().address})"
    return name


@contextlib.contextmanager
def claim_job(workspace: Path, job_id: str, wait: bool = False) -> Iterator[bool]:
    """Hold the job's claim for a block: yields True once held, or False when another live
    process holds it (``wait``: block until it is free instead). An exclusive flock on its
    own open of ``.claims/<job_id>.lock``: two threads of one process exclude each other too,
    the kernel releases it when the holder dies (no stale claims), and the descriptor is not
    inherited by child processes."""
    path = Workspace(workspace).job_claim(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        holder = {"process": this_process(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)  # for messages only: the flock is the claim
        yield True
    finally:
        os.close(fd)  # drops the flock


def claim_holder(workspace: Path, job_id: str) -> str:
    """Who holds (or last held) the job's claim, as the holder wrote it."""
    try:
        info = json.loads(Workspace(workspace).job_claim(job_id).read_text() or "{}")
        return f"{info['process']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"
