"""Typed model configuration and its two profiles.

``tiny``: every network is built in code with seeded random weights (a 2-block DiT with
2 heads of 16 dims, a VAE with base_dim 8, a 2-layer CLIP tower, a tiny UMT5). It runs on
a CPU in seconds and is what the tests and the demo use.

``wan-i2v-14b-720p``: Wan2.1-I2V-14B-720P in diffusers layout from a local folder plus,
optionally, MultiAnimate weights (the released checkpoint folder or our own format).
Nothing is ever downloaded at run time: missing files raise ``MissingWeightsError``,
which names every missing file and says how to get it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Profile = Literal["tiny", "wan-i2v-14b-720p"]

# Hidden width of the three condition encoders (the release's concat_dim=4 -> 16).
ENCODER_WIDTH = 16

# diffusers-layout subfolders of the Wan folder that the model needs.
WAN_SUBFOLDERS = ("transformer", "vae", "image_encoder", "image_processor")
WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
MULTIANIMATE_REPO = "N00B0DY/MultiAnimate"


def check_wan_frames(n: int, name: str = "num_frames") -> int:
    """Wan's VAE keeps the first frame and compresses the rest 4x: frame counts must be 4k+1
    (diffusers would round silently)."""
    if (n - 1) % 4:
        raise ValueError(f"{name}={n}: Wan needs 4k+1 frames (e.g. {n - (n - 1) % 4} or {n + 4 - (n - 1) % 4})")
    return n


def check_wan_size(n: int, name: str) -> int:
    """Heights and widths must be divisible by 16 (the VAE's 8x and the patch's 2x)."""
    if n % 16:
        raise ValueError(f"{name}={n} must be divisible by 16 (Wan's VAE and patch sizes)")
    return n


class MissingWeightsError(ValueError):
    """Real weights are not where the configuration says; the message says how to get them."""


class DiTShape(BaseModel):
    """Sizes of ``WanTransformer3DModel`` (diffusers config names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int = Field(ge=1, description="transformer blocks")
    num_attention_heads: int = Field(ge=1, description="attention heads")
    attention_head_dim: int = Field(ge=2, description="width of one head")
    ffn_dim: int = Field(ge=1, description="hidden width of the feed-forward")
    text_dim: int = Field(ge=1, description="width of the text encoder's output")
    image_dim: int = Field(ge=1, description="width of the image encoder's tokens")
    freq_dim: int = Field(ge=2, description="sinusoidal timestep embedding width")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# 128 wide: narrower than a patch's 64 latent values (16 channels x 2 x 2), the residual
# stream could not carry the noisy latent through, and no training would get far
TINY_DIT = DiTShape(
    num_layers=2, num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=32, image_dim=24, freq_dim=32
)
WAN_14B_DIT = DiTShape(
    num_layers=40,
    num_attention_heads=40,
    attention_head_dim=128,
    ffn_dim=13824,
    text_dim=4096,
    image_dim=1280,
    freq_dim=256,
)


class ModelConfig(BaseModel):
    """Which networks, which weights, and the method's constants (spec C and D)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: Profile = Field("tiny", description="tiny = random weights in code; wan-i2v-14b-720p = real weights")
    wan_folder: Path | None = Field(None, description="diffusers-layout Wan2.1-I2V-14B-720P folder (real profile)")
    tiny_transformer: Path | None = Field(
        None,
        description="tiny profile: a pretrained tiny base transformer (diffusers layout, written by "
        "model/pretrain.py) in place of the seeded random one",
    )
    multianimate: Path | None = Field(
        None, description="MultiAnimate weights: the released output_dir of shards, or a folder in our format"
    )
    label_pool: int = Field(
        8, ge=2, le=64, description="identifier channels: up to label_pool - 1 persons + background"
    )
    # None (filled in by _profile_defaults) must be valid in the JSON schema too: the UI's run
    # form sends it, and the server checks parameters against the schema
    lora_rank: int | None = Field(
        None, ge=1, description="LoRA rank of the DiT's attention and FFN projections (default 128; tiny: 8)"
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (default = rank)"
    )
    shift: float = Field(5.0, gt=0, description="flow-matching sigma shift (the release trains and samples with 5)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the frozen DiT base (default: bfloat16 for real profiles, float32 for tiny); LoRA and "
        "the condition encoders stay float32 master weights, the VAE and CLIP float32",
    )
    seed: int = Field(0, description="seed of the tiny profile's random weights")
    window_latents: int = Field(21, ge=3, description="latent frames per window of a long video (21 = 81 frames)")
    window_overlap: int = Field(4, ge=2, description="latent frames shared by consecutive windows")

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("lora_rank") is None:
                data["lora_rank"] = 8 if data.get("profile", "tiny") == "tiny" else 128
            if data.get("lora_alpha") is None:
                data["lora_alpha"] = float(data["lora_rank"])
            if data.get("dtype") is None:
                # a real profile that omitted it would otherwise load the 14B DiT as ~57 GB of fp32
                data["dtype"] = "float32" if data.get("profile", "tiny") == "tiny" else "bfloat16"
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.profile != "tiny" and self.tiny_transformer is not None:
            raise ValueError("tiny_transformer belongs to the tiny profile; the real one loads wan_folder/transformer")
        if self.profile != "tiny" and self.wan_folder is None:
            raise ValueError(f"profile {self.profile!r} needs wan_folder (a diffusers-layout {WAN_REPO} folder)")
        if self.window_overlap >= self.window_latents:
            raise ValueError("window_overlap must be smaller than window_latents")
        return self

    @property
    def dit(self) -> DiTShape:
        return TINY_DIT if self.profile == "tiny" else WAN_14B_DIT

    @property
    def max_persons(self) -> int:
        return self.label_pool - 1

    @property
    def torch_dtype(self):
        """The frozen base's ``torch.dtype``."""
        import torch

        assert self.dtype is not None  # filled by the profile's default before validation
        return getattr(torch, self.dtype)

    def digest(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def missing_weights(self) -> list[str]:
        """Every expected file or folder that is absent (empty for ``tiny``)."""
        if self.profile == "tiny":
            folder = self.tiny_transformer
            if folder is not None and not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
                return [f"{folder}/config.json and *.safetensors"]
            return []
        assert self.wan_folder is not None
        missing = [
            str(self.wan_folder / sub / "config.json")
            for sub in ("transformer", "vae", "image_encoder")
            if not (self.wan_folder / sub / "config.json").is_file()
        ]
        if not (self.wan_folder / "image_processor" / "preprocessor_config.json").is_file():
            missing.append(str(self.wan_folder / "image_processor" / "preprocessor_config.json"))
        for sub in ("transformer", "vae", "image_encoder"):
            folder = self.wan_folder / sub
            if folder.is_dir() and not any(folder.glob("*.safetensors")):
                missing.append(f"{folder}/*.safetensors")
        if self.multianimate is not None and not (
            self.multianimate.is_dir() and any(self.multianimate.glob("*.safetensors"))
        ):
            missing.append(f"{self.multianimate}/*.safetensors")
        return missing

    def require_weights(self) -> None:
        """Raise one ``MissingWeightsError`` listing everything missing and how to get it."""
        missing = self.missing_weights()
        if missing and self.profile == "tiny":
            raise MissingWeightsError(
                f"profile 'tiny': missing the pretrained tiny transformer {missing[0]}; write it with "
                "`python -m model.pretrain --config RUN.json --out FOLDER`, or leave tiny_transformer unset "
                "for seeded random weights"
            )
        if missing:
            ma = self.multianimate
            ma_dir = ma.parent.parent if ma is not None and ma.name == "output_dir" else "<folder>"
            raise MissingWeightsError(
                f"profile {self.profile!r}: missing weights:\n  "
                + "\n  ".join(missing)
                + "\nGet them with (no download happens at run time):\n"
                f"  huggingface-cli download {WAN_REPO} --local-dir {self.wan_folder}\n"
                f"  huggingface-cli download {MULTIANIMATE_REPO} --include "
                f"'epoch=23-step=4200-multi.ckpt/output_dir/*' --local-dir {ma_dir}\n"
                "and point wan_folder / multianimate at them (multianimate = the output_dir folder)."
            )
