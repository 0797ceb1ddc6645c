"""The typed configuration of a training run (also the ``train`` flow's parameter form)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from data_schemas.model import ModelConfig, check_wan_frames, check_wan_size


class TrainConfig(BaseModel):
    """One LoRA fine-tuning run (spec D.5 defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workspace: Path = Field(Path("workspace"), description="workspace with shards/ and embeddings/; the run goes to runs/<run_name>")
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name under runs/")
    shards: str = Field("shards/train-*.tar", description="training shards, a glob relative to the workspace")
    model: ModelConfig = Field(default_factory=ModelConfig, description="profile, weights and constants")
    num_frames: int = Field(81, ge=1, description="frames per sample (4k+1)")
    height: int = Field(480, ge=16, description="sample height, divisible by 16")
    width: int = Field(832, ge=16, description="sample width, divisible by 16")
    max_stride: int = Field(1, ge=1, description="largest frame stride drawn per sample")
    min_stride: int = Field(1, ge=1, description="smallest frame stride drawn per sample")
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
    pose_dropout: float = Field(0.05, ge=0, le=1, description="P(pose, identity and reference-pose features are zeroed)")
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

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        return check_wan_frames(v)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int, info: ValidationInfo) -> int:
        return check_wan_size(v, info.field_name)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_stride > self.max_stride:
            raise ValueError(f"min_stride {self.min_stride} exceeds max_stride {self.max_stride}")
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
        return self.workspace / "runs" / self.run_name

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
