"""Typed, frozen configurations. Profiles are YAML files under ``configs/``.

Frozen pydantic models render as forms in the Prefect UI and hash by value in cache keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_schemas.evaluation import EvalConfig
from data_schemas.job import GenerateConfig
from data_schemas.model import ModelConfig

if TYPE_CHECKING:
    from data_schemas.quality import ClipQuality

VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".m2ts",
    ".wmv",
    ".flv",
    ".3gp",
    ".ogv",
)


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


DWPOSE_HOWTO = (
    "Download yolox_l.onnx and dw-ll_ucoco_384.onnx from the Hugging Face model repository yzd-v/DWPose "
    "(also bundled in ZheWang123/UniAnimate-DiT), put them at these paths or point pose.detector_path and "
    "pose.pose_model_path of your profile at them; or use the random-weight 'tiny' models (pose.models: tiny)."
)


class PoseConfig(_Config):
    """DWPose whole-body extraction (spec A.3-A.8)."""

    models: Literal["tiny", "files", "truth"] = Field(
        "tiny",
        description="'tiny': small random-weight ONNX models built at run time; 'files': the real ONNX files; "
        "'truth': the synthetic generator's exact poses (its videos only, preprocess/truth.py)",
    )
    detector_path: Path = Field(Path("weights/dwpose/yolox_l.onnx"), description="YOLOX-L person detector (ONNX)")
    pose_model_path: Path = Field(
        Path("weights/dwpose/dw-ll_ucoco_384.onnx"), description="DWPose-L whole-body model, 384x288 (ONNX)"
    )
    tiny_seed: int = Field(0, description="seed of the tiny models' random weights")
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="onnxruntime device; auto = CUDA when present")
    channel_order: Literal["bgr", "rgb"] = Field(
        "bgr", description="channel order fed to the models; the reference pipelines feed BGR"
    )
    max_persons: int = Field(7, ge=1, description="more persons in a frame: the largest boxes are kept")
    det_pre_threshold: float = Field(0.1, ge=0, le=1, description="person score a box needs before NMS")
    nms_iou: float = Field(0.45, gt=0, le=1, description="NMS IoU threshold")
    det_threshold: float = Field(0.3, ge=0, le=1, description="person score a box needs after NMS")
    keypoint_threshold: float = Field(0.3, ge=0, le=1, description="keypoints scoring lower are not drawn")
    style: Literal["unianimate", "dwpose"] = Field(
        "unianimate", description="pose image style: the released weights' (body+feet+hands, BGR) or standard DWPose"
    )
    batch_size: int = Field(64, ge=1, description="person crops per pose-model call")
    frames_per_chunk: int = Field(32, ge=1, description="frames decoded and processed at a time")

    def model_files(self) -> tuple[Path, Path]:
        """The real model files; one ValueError naming every missing file and how to get them."""
        files = (self.detector_path, self.pose_model_path)
        missing = [str(p) for p in files if not Path(p).is_file()]
        if missing:
            raise ValueError(f"DWPose weights missing: {', '.join(missing)}. {DWPOSE_HOWTO}")
        return files


SAM2_HOWTO = (
    "Download a SAM2.1 video model in transformers format (e.g. the Hugging Face repository "
    "facebook/sam2.1-hiera-large: config.json, model.safetensors and the processor files) into this folder, "
    "or point segment.sam2_path of your profile at it; or use the random-weight 'tiny' model (segment.models: tiny)."
)


class SegmentConfig(_Config):
    """Per-person masklets with SAM2.1, stable identities, pose assignment (spec B)."""

    models: Literal["tiny", "files", "truth"] = Field(
        "tiny",
        description="'tiny': small random-weight SAM2 built at run time; 'files': SAM2.1 from sam2_path; "
        "'truth': the synthetic generator's exact masks (its videos only, preprocess/truth.py)",
    )
    sam2_path: Path = Field(
        Path("weights/sam2.1-hiera-large"), description="folder of a transformers-format SAM2.1 model"
    )
    tiny_seed: int = Field(0, description="seed of the tiny model's random weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where SAM2 runs; auto = CUDA when present")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="SAM2 precision (bfloat16 on GPUs)")
    state_on_cpu: bool = Field(False, description="keep frames and memories in host RAM while SAM2 runs on the GPU")
    max_persons: int = Field(7, ge=1, le=255, description="persons tracked per clip at most (label pool - 1)")
    new_person_iou: float = Field(
        0.3, gt=0, le=1, description="a box overlapping every known person less starts a new one"
    )
    keypoint_threshold: float = Field(0.3, ge=0, le=1, description="keypoints that count for pose-to-mask assignment")
    frames_per_chunk: int = Field(32, ge=1, description="frames decoded at a time")

    def model_folder(self) -> Path:
        """The real model's folder; one ValueError naming it and what it must hold when missing."""
        folder = Path(self.sam2_path)
        missing = [name for name in ("config.json",) if not (folder / name).is_file()]
        if missing:
            raise ValueError(
                f"SAM2 weights missing: {folder} (needs {', '.join(missing)} and the weights). {SAM2_HOWTO}"
            )
        return folder


class QualityConfig(_Config):
    """Parameters of the measures' definitions (not filters): they go into the measures' cache key."""

    keypoint_threshold: float = Field(0.3, ge=0, le=1, description="a keypoint with a higher score counts as found")
    min_body_share: float = Field(
        0.5, gt=0, le=1, description="a frame has the person's body keypoints when this share of the 17 are found"
    )
    min_visible_share: float = Field(
        0.5, ge=0, le=1, description="a person counts as visible in the clip when present in this share of frames"
    )
    mask_tolerance: float = Field(
        0.01,
        ge=0,
        le=0.2,
        description="a keypoint is inside its mask when own pixels lie this far (x frame height, "
        "at least 1 px, Chebyshev) from it",
    )
    min_judged_keypoints: int = Field(4, ge=1, le=17, description="found body keypoints a pose needs to be judged")
    disagreement_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="pose and mask disagree when fewer of the found body keypoints than this share are inside the mask",
    )
    switch_min_iou: float = Field(
        0.3,
        gt=0,
        le=1,
        description="mask switch: the person's mask overlaps another's previous mask at least this much (IoU)",
    )
    switch_margin: float = Field(
        0.2, ge=0, le=1, description="mask switch: ... and this much more than its own previous mask (IoU)"
    )
    jump_min: float = Field(
        0.05,
        gt=0,
        le=1,
        description="pose jump: the assigned keypoints move at least this far (x frame height, median)",
    )
    jump_ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="pose jump: ... and land within this share of that distance of another's previous keypoints",
    )
    cut_threshold: float = Field(
        0.12,
        gt=0,
        le=1,
        description="camera cut: mean absolute difference of consecutive grey thumbnails (0..1) at least this...",
    )
    cut_ratio: float = Field(4.0, ge=1, description="...and at least this many times the clip's median difference")
    thumbnail_side: int = Field(32, ge=4, le=256, description="side of the grey thumbnails compared for cuts")
    frames_per_chunk: int = Field(32, ge=1, description="frames decoded at a time")


class QualityFilters(_Config):
    """Which clips go into the shards (``shards.filters`` of a profile); None turns a filter off.

    The defaults keep what the release trained on: clips with two or more visible persons.
    A clip whose measure is None (nothing to measure) fails that measure's filter when it is on.
    """

    min_persons: int | None = Field(
        2, ge=0, description="fewest visible persons (num_visible_persons); 2 = what the release trained on"
    )
    max_persons: int | None = Field(None, ge=0, description="most visible persons (num_visible_persons)")
    max_identity_switches: int | None = Field(
        None, ge=0, description="most suspected identity switches (num_identity_switches)"
    )
    min_keypoint_confidence: float | None = Field(
        None, ge=0, le=1, description="lowest body keypoint confidence of any visible person (min_body_confidence)"
    )
    min_person_height: float | None = Field(
        None,
        ge=0,
        le=1,
        description="smallest mean box height / frame height of any visible person (min_person_height)",
    )
    min_motion: float | None = Field(
        None,
        ge=0,
        description="slowest allowed clip: its fastest visible person's mean keypoint speed, frame "
        "heights per frame (motion)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> QualityFilters:
        if self.min_persons is not None and self.max_persons is not None and self.min_persons > self.max_persons:
            raise ValueError(f"shards.filters: min_persons ({self.min_persons}) > max_persons ({self.max_persons})")
        return self

    def explain(self, row: ClipQuality) -> dict[str, str]:
        """{filter name: why the clip fails it} for every filter the clip fails, in field order."""
        failed: dict[str, str] = {}

        def below(name: str, value: float | None, limit: float | None, what: str) -> None:
            if limit is not None and (value is None or value < limit):
                failed[name] = f"{what} {_show(value)} < {limit}"

        def above(name: str, value: float | None, limit: float | None, what: str) -> None:
            if limit is not None and (value is None or value > limit):
                failed[name] = f"{what} {_show(value)} > {limit}"

        below("min_persons", row.num_visible_persons, self.min_persons, "visible persons")
        above("max_persons", row.num_visible_persons, self.max_persons, "visible persons")
        above("max_identity_switches", row.num_identity_switches, self.max_identity_switches, "identity switches")
        below("min_keypoint_confidence", row.min_body_confidence, self.min_keypoint_confidence, "body confidence")
        below("min_person_height", row.min_person_height, self.min_person_height, "person height")
        below("min_motion", row.motion, self.min_motion, "motion")
        return failed

    def reasons(self, row: ClipQuality) -> list[str]:
        """Names of every filter the clip fails (empty: the clip goes into the shards)."""
        return list(self.explain(row))


def _show(value: float | None) -> str:
    if value is None:
        return "none"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


class ShardConfig(_Config):
    """WebDataset shards of the training data."""

    target_shard_bytes: int = Field(512 * 2**20, gt=0, description="a shard is closed once it holds this many bytes")
    val_fraction: float = Field(
        0.05, ge=0, le=1, description="share of SOURCE VIDEOS (not clips) held out for validation"
    )
    seed: int = Field(0, description="seed of the train/validation split")
    caption: str = Field(
        "{count} person are dancing", description="caption of a clip with {count} persons (the seed's wording)"
    )
    filters: QualityFilters = Field(
        default_factory=QualityFilters,
        description="which clips go into the shards, by their "
        "quality measures (manifests/quality.parquet); the defaults keep two or more persons",
    )


class ProjectConfig(_Config):
    """Every stage's configuration; a profile YAML fills some of it."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="the ingest stage")
    pose: PoseConfig = Field(default_factory=PoseConfig, description="the pose stage")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="the segment stage")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="the quality measures' definitions")
    shards: ShardConfig = Field(default_factory=ShardConfig, description="the shard stage")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model: profile, weights, constants")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="batch generation: input roots, job time limit, input bounds"
    )
    evaluate: EvalConfig = Field(
        default_factory=EvalConfig,
        description="held-out evaluation: the protocol, the feature networks' files, the generation of each clip",
    )


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
