"""The typed configuration of a training run (also the ``train`` flow's parameter form) and
of the training data loader it reads with (``LoaderConfig``, model/data.py)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from data_schemas.model import ModelConfig, check_wan_frames, check_wan_size
from data_schemas.workspace import Workspace


class LoaderConfig(BaseModel):
    """How clips are sampled, augmented and streamed (spec D.5)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_frames: int = Field(81, ge=1, description="frames per sample; Wan needs 4k+1 (81 in the seed)")
    height: int = Field(480, ge=16, description="output height in pixels, divisible by 16")
    width: int = Field(832, ge=16, description="output width in pixels, divisible by 16")
    max_stride: int = Field(1, ge=1, description="largest frame stride drawn per sample (the seed uses 1)")
    min_stride: int = Field(
        1, ge=1, description="smallest frame stride drawn (evaluation at a fixed stride: min = max)"
    )
    crop_fraction: float = Field(
        1.0 / 14.0,
        ge=0.0,
        lt=0.5,
        description="each side loses 0..floor(size*fraction) px, drawn independently (seed: W//14, H//14); 0 = no crop",
    )
    shuffle_buffer: int = Field(
        100,
        ge=0,
        description="samples held for shuffling per worker (raw bytes: mind memory); 0 = no shard or sample shuffle",
    )
    resampled: bool = Field(
        False,
        description="draw shards with replacement forever (use epoch_samples); False = each sample once per epoch",
    )
    seed: int | None = Field(
        0, ge=0, description="seed of shuffling and augmentation (mixed with epoch, rank, worker); None = fresh entropy"
    )
    pose_style: Literal["unianimate", "dwpose"] = Field("unianimate", description="pose renderer style")
    keypoint_threshold: float = Field(0.3, ge=0.0, le=1.0, description="keypoint score threshold of the renderer")
    max_consecutive_skips: int = Field(
        100,
        ge=1,
        description="a reader that skips this many samples or shards in a row, none usable, raises LoaderStalled",
    )
    max_member_bytes: int = Field(
        2**32, ge=1, description="largest tar member read (bytes); a larger header is refused, naming shard and member"
    )

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        return check_wan_frames(v)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int, info: ValidationInfo) -> int:
        return check_wan_size(v, info.field_name or "size")

    @model_validator(mode="after")
    def _strides(self) -> LoaderConfig:
        if self.min_stride > self.max_stride:
            raise ValueError(f"min_stride {self.min_stride} exceeds max_stride {self.max_stride}")
        return self


# What a run decides of its loader itself (TrainConfig.run_loader): setting them has no effect.
RUN_LOADER_FIELDS = ("resampled", "seed")
# Fields a TrainConfig held itself before they moved into its ``loader`` section.
MOVED_TO_LOADER = ("num_frames", "height", "width", "max_stride", "min_stride")


class TrainConfig(BaseModel):
    """One LoRA fine-tuning run (spec D.5 defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workspace: Path = Field(
        Path("workspace"), description="workspace with shards/ and embeddings/; the run goes to runs/<run_name>"
    )
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name under runs/")
    shards: str = Field("shards/train-*.tar", description="training shards, a glob relative to the workspace")
    model: ModelConfig = Field(default_factory=ModelConfig, description="profile, weights and constants")
    loader: LoaderConfig = Field(
        default_factory=LoaderConfig,
        description="clip shape, strides and augmentation of the samples; the run itself "
        "draws shards with replacement, seeded by seed (loader.resampled and loader.seed have no effect)",
    )
    batch_size: int = Field(1, ge=1, description="samples per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of the run")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (the release: 1e-4)")
    encoder_lr: float | None = Field(
        None, gt=0, description="learning rate of the condition encoders, trained from scratch; None = lr (the release)"
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (torch's default)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    grad_clip: float | None = Field(
        None, gt=0, description="gradient norm clipping; None = off, as the release trains (the norm is still logged)"
    )
    pose_dropout: float = Field(
        0.05, ge=0, le=1, description="P(pose, identity and reference-pose features are zeroed)"
    )
    image_dropout: float = Field(0.10, ge=0, le=1, description="P(CLIP features and the I2V condition y are zeroed)")
    pose_condition: bool = Field(True, description="False: a pose-blind control (pose tokens always zero)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="compute dtype under FSDP2; auto = the frozen base's dtype (model.dtype)"
    )
    activation_checkpointing: bool = Field(True, description="recompute block activations in the backward pass")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between resumable checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="resumable checkpoints kept (oldest deleted)")
    seed: int = Field(0, description="seed of data order, noise, timesteps, dropout and identifier draws")
    nproc: int = Field(1, ge=1, description="processes (GPUs) per node for torchrun")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="optimizer steps between held-out evaluations (val_loss, val_loss_pose_off and "
        "val_pose_gain in metrics.csv, model/held_out.py); None = off",
    )
    eval_clips: int = Field(4, ge=1, description="held-out clips each evaluation scores")
    eval_shards: str = Field(
        "shards/val-*.tar", description="held-out shards (the validation split), a glob relative to the workspace"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_shape(cls, data: Any) -> Any:
        # a run's config.json from before the loader section: say what moved rather than "extra input"
        moved = [name for name in MOVED_TO_LOADER if isinstance(data, dict) and name in data]
        if moved:
            raise ValueError(
                f"{', '.join(moved)}: moved into the loader section, write loader: {{{moved[0]}: "
                f"{data[moved[0]]!r}, ...}} (a run's config.json from before the move needs this edit)"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        ignored = [
            f"loader.{n}" for n in RUN_LOADER_FIELDS if getattr(self.loader, n) != LoaderConfig.model_fields[n].default
        ]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)}: no effect in training (a run draws shards with replacement, seeded by seed)",
                stacklevel=2,
            )
        if self.model.multianimate is not None and self.model.multianimate.resolve() == self.run_dir.resolve():
            raise ValueError("model.multianimate must not be the run's own folder")
        return self

    @property
    def compute_dtype(self):
        """The dtype FSDP2 computes in; trained weights stay float32 whatever it is."""
        import torch

        if self.precision == "auto":
            return self.model.torch_dtype
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def run_dir(self) -> Path:
        return Workspace(self.workspace).run(self.run_name)

    def run_loader(self, num_shards: int, seed: int) -> LoaderConfig:
        """The loader a run reads with: ``loader`` drawn endlessly (resampled shards, so the
        stream can be cut into epochs of ``checkpoint_every`` steps, model/train.py) from
        ``seed``, its shuffle buffer at most 4 samples per shard."""
        update = {"resampled": True, "seed": seed, "shuffle_buffer": min(self.loader.shuffle_buffer, 4 * num_shards)}
        return self.loader.model_copy(update=update)

    def digest(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrainResult(BaseModel):
    """What a finished run left behind, with its headline figures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: Path
    final_weights: Path = Field(description="our safetensors format: load with model.checkpoint.load_multianimate")
    loss_curve: Path
    steps: int
    final_loss: float
    mean_step_time_s: float
    samples_per_s: float
    peak_mem_gib: float
