"""Tiny models for tests: random trained-like weights for a fresh DiT, a training config, and
a synthetic checkpoint in the released MultiAnimate layout (spec D.4), with tiny shapes: its
names are spelled here from the spec, independently of model/checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from data_schemas.train import TrainConfig

if TYPE_CHECKING:
    from model.dit import MultiAnimateDiT

ENC_WIDTH = 16


def randomise_encoder_outputs(dit: MultiAnimateDiT) -> None:
    with torch.no_grad():
        for encoder in (dit.pose_guider, dit.identifier_adapter, dit.ref_pose_guider):
            encoder[-1].weight.normal_(0, 0.05)
            encoder[-1].bias.normal_(0, 0.05)


def randomise_lora(dit: MultiAnimateDiT, seed: int = 1) -> None:
    """PEFT starts B at zero (a no-op); tests need a LoRA that changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def run_config(ws: Path, name: str, **overrides) -> TrainConfig:
    """A short 2-process training run on ``ws`` (tiny profile, 6 steps, a checkpoint every 2)."""
    values = {
        "workspace": ws,
        "run_name": name,
        "loader": {"num_frames": 9, "height": 48, "width": 64},
        "max_steps": 6,
        "checkpoint_every": 2,
        "num_workers": 1,
        "nproc": 2,
        "warmup_steps": 2,
    }
    values.update(overrides)
    return TrainConfig(**values)


def released_tensors(
    num_layers: int, dim: int, ffn_dim: int, rank: int, label_channels: int, y_channels: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    t: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                t[f"pipe.dit.blocks.{i}.{attn}.{proj}.lora_A.default.weight"] = rnd(rank, dim)
                t[f"pipe.dit.blocks.{i}.{attn}.{proj}.lora_B.default.weight"] = rnd(dim, rank)
        t[f"pipe.dit.blocks.{i}.ffn.0.lora_A.default.weight"] = rnd(rank, dim)
        t[f"pipe.dit.blocks.{i}.ffn.0.lora_B.default.weight"] = rnd(ffn_dim, rank)
        t[f"pipe.dit.blocks.{i}.ffn.2.lora_A.default.weight"] = rnd(rank, ffn_dim)
        t[f"pipe.dit.blocks.{i}.ffn.2.lora_B.default.weight"] = rnd(dim, rank)
        # a frozen base weight, as a DeepSpeed export of the whole module may carry
        t[f"pipe.dit.blocks.{i}.self_attn.q.base_layer.weight"] = rnd(dim, dim)
    for name, cin in (("dwpose_embedding", 3), ("label_embedding", label_channels)):
        for idx in (0, 2, 4, 6, 8, 10):
            t[f"{name}.{idx}.weight"] = rnd(ENC_WIDTH, cin if idx == 0 else ENC_WIDTH, 3, 3, 3)
            t[f"{name}.{idx}.bias"] = rnd(ENC_WIDTH)
        t[f"{name}.12.weight"] = rnd(dim, ENC_WIDTH, 1, 2, 2)
        t[f"{name}.12.bias"] = rnd(dim)
    for idx in (0, 2, 4, 6, 8, 10):
        cout = y_channels if idx == 10 else ENC_WIDTH
        t[f"randomref_embedding_pose.{idx}.weight"] = rnd(cout, 3 if idx == 0 else ENC_WIDTH, 3, 3)
        t[f"randomref_embedding_pose.{idx}.bias"] = rnd(cout)
    t["pipe.vae.encoder.conv1.weight"] = rnd(4, 3, 3, 3, 3)
    return t


def write_released(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int = 8) -> Path:
    """``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``, as
    DeepSpeed's zero_to_fp32 --safe_serialization writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::num_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
