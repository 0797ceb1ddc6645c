"""MultiAnimate weights: our own format, and the converter for the released checkpoint.

Our format (a folder)::

    adapter.safetensors   every trained tensor under its MultiAnimateDiT name
                          (transformer.blocks.N....lora_A.default.weight, pose_guider.N.weight, ...)
    config.json           {"format": "multianimate-adapter", "version": 1, label_pool, lora_rank,
                          lora_alpha, dit: {...sizes}}

The released layout (spec D.4): ``output_dir/model-0000K-of-0000N.safetensors`` (+ an
optional ``model.safetensors.index.json``), DeepSpeed's fp32 export of a Lightning module.
Its names and how they map::

    ...pipe.dit.blocks.i.self_attn.{q,k,v,o}.lora_{A,B}.default.weight
        -> transformer.blocks.i.attn1.{to_q,to_k,to_v,to_out.0}.lora_{A,B}.default.weight
    ...pipe.dit.blocks.i.cross_attn.{q,k,v,o}.lora_...   -> ....attn2.{...}
    ...pipe.dit.blocks.i.ffn.{0,2}.lora_...              -> ....ffn.net.{0.proj,2}.lora_...
    ...dwpose_embedding.N.{weight,bias}                  -> pose_guider.N.*
    ...label_embedding.N.{weight,bias}                   -> identifier_adapter.N.* (layer 0 widened)
    ...randomref_embedding_pose.N.{weight,bias}          -> ref_pose_guider.N.*

Anything before ``pipe.dit.`` or before a module name is a wrapper prefix and is dropped,
as the release's own loader does. Frozen base weights that a shard may carry (non-LoRA
``pipe.*`` keys) are skipped and counted. Every other key is an error that names it, and so
is every LoRA or encoder parameter of the model that the checkpoint does not provide.

The LoRA scale: the release trained rank r with alpha r (scale 1) and merges with scale 1,
so a converted checkpoint gets alpha = rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_schemas.atomic import atomic_path
from model.conditions import widen_label_weight
from model.dit import MultiAnimateDiT

FORMAT = "multianimate-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
RELEASED_INDEX = "model.safetensors.index.json"

_MODULES = {
    "dwpose_embedding": "pose_guider",
    "label_embedding": "identifier_adapter",
    "randomref_embedding_pose": "ref_pose_guider",
}
_MODULE_KEY = re.compile(r"(?:^|\.)(dwpose_embedding|label_embedding|randomref_embedding_pose)\.(\d+)\.(weight|bias)$")
_ATTN_LORA = re.compile(r"blocks\.(\d+)\.(self_attn|cross_attn)\.(q|k|v|o)\.lora_(A|B)\.default\.weight")
_FFN_LORA = re.compile(r"blocks\.(\d+)\.ffn\.(0|2)\.lora_(A|B)\.default\.weight")
_ATTN = {"self_attn": "attn1", "cross_attn": "attn2"}
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_FFN = {"0": "net.0.proj", "2": "net.2"}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the keys."""


@dataclass
class LoadReport:
    """What a load placed, and what it skipped on purpose."""

    source: Path
    placed: int = 0
    skipped_base: int = 0
    lora_rank: int | None = None
    widened: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (from, to) channels


def trained_state(dit: MultiAnimateDiT) -> dict[str, torch.Tensor]:
    """The tensors a MultiAnimate checkpoint holds: LoRA and the three encoders."""
    return {
        name: t
        for name, t in dit.state_dict().items()
        if not name.startswith("transformer.") or ".lora_" in name
    }


# ---- our format ----------------------------------------------------------------------


def save_adapter(dit: MultiAnimateDiT, folder: Path, lora_rank: int, lora_alpha: float) -> Path:
    """Write ``adapter.safetensors`` + ``config.json`` (each atomically; config last)."""
    cfg = dit.transformer.config
    return save_adapter_tensors(trained_state(dit), folder, dit.label_pool, lora_rank, lora_alpha, dict(cfg))


def save_adapter_tensors(
    tensors: dict[str, torch.Tensor], folder: Path, label_pool: int, lora_rank: int, lora_alpha: float, dit_config: dict
) -> Path:
    """Our format from a state dict (e.g. gathered from a sharded model on rank 0)."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "label_pool": label_pool,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "dit": {k: dit_config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "image_dim")},
    }
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def is_adapter_folder(folder: Path) -> bool:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_adapter(dit: MultiAnimateDiT, folder: Path) -> LoadReport:
    """Load our format into ``dit`` (adding LoRA of the saved rank when it has none)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_FILE}: format version {config.get('version')}, expected {FORMAT_VERSION}")
    if config["label_pool"] != dit.label_pool:
        raise CheckpointError(f"{folder}: label pool {config['label_pool']} but the model has {dit.label_pool}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    report = LoadReport(source=folder, lora_rank=config["lora_rank"])
    _ensure_lora(dit, config["lora_rank"], config["lora_alpha"], folder)
    _assign(dit, tensors, folder)
    report.placed = len(tensors)
    return report


# ---- the released layout -------------------------------------------------------------


def released_name(key: str) -> str | None:
    """Our name for a released key; None for a frozen base weight (skipped). Raises
    ``KeyError`` for a key that has no place."""
    m = _MODULE_KEY.search(key)
    if m:
        return f"{_MODULES[m.group(1)]}.{m.group(2)}.{m.group(3)}"
    if "pipe.dit." in key:
        tail = key.split("pipe.dit.", 1)[1]
        if m := _ATTN_LORA.fullmatch(tail):
            i, attn, proj, ab = m.groups()
            return f"transformer.blocks.{i}.{_ATTN[attn]}.{_PROJ[proj]}.lora_{ab}.default.weight"
        if m := _FFN_LORA.fullmatch(tail):
            i, layer, ab = m.groups()
            return f"transformer.blocks.{i}.ffn.{_FFN[layer]}.lora_{ab}.default.weight"
    if "lora" not in key and re.search(r"(?:^|\.)pipe[._]", key):
        return None
    raise KeyError(key)


def _released_shards(folder: Path) -> list[Path]:
    index = folder / RELEASED_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {RELEASED_INDEX} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no *.safetensors shards (expected the release's output_dir)")
    return shards


def load_released(dit: MultiAnimateDiT, folder: Path) -> LoadReport:
    """Place every key of the released checkpoint onto ``dit`` or fail naming the keys."""
    folder = Path(folder)
    report = LoadReport(source=folder)
    tensors: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for shard in _released_shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                try:
                    ours = released_name(key)
                except KeyError:
                    unplaced.append(f"{key} ({shard.name})")
                    continue
                if ours is None:
                    report.skipped_base += 1
                elif ours in tensors:
                    unplaced.append(f"{key} ({shard.name}: a second tensor for {ours})")
                else:
                    tensors[ours] = f.get_tensor(key)
    if unplaced:
        raise CheckpointError(f"{folder}: {len(unplaced)} keys could not be placed:\n  " + "\n  ".join(unplaced[:50]))
    ranks = {t.shape[0] for k, t in tensors.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise CheckpointError(f"{folder}: LoRA ranks {sorted(ranks) or 'none'}; expected one rank for all layers")
    rank = ranks.pop()
    report.lora_rank = rank
    _ensure_lora(dit, rank, float(rank), folder)
    label_key = "identifier_adapter.0.weight"
    trained_pool = tensors[label_key].shape[1] if label_key in tensors else dit.label_pool
    if trained_pool != dit.label_pool:
        # Widening (spec D.3) gives a fine-tuning run a larger pool to learn; the channels past
        # the checkpoint's own are copies, so it still animates only the persons it learned.
        report.widened[label_key] = (trained_pool, dit.label_pool)
        tensors[label_key] = widen_label_weight(tensors[label_key], dit.label_pool)
    _assign(dit, tensors, folder)
    dit.max_persons = min(dit.label_pool, trained_pool) - 1
    report.placed = len(tensors)
    return report


def load_multianimate(dit: MultiAnimateDiT, folder: Path) -> LoadReport:
    """Our format when ``config.json`` says so, else the released layout."""
    return load_adapter(dit, folder) if is_adapter_folder(folder) else load_released(dit, folder)


# ---- shared --------------------------------------------------------------------------


def _ensure_lora(dit: MultiAnimateDiT, rank: int, alpha: float, source: Path) -> None:
    if not dit.has_lora:
        dit.add_lora(rank, alpha)
        return
    have = {m.r["default"] for m in dit._lora_layers()}
    if have != {rank}:
        raise CheckpointError(f"{source}: LoRA rank {rank}, but the model already has LoRA of rank {sorted(have)}")


def _assign(dit: MultiAnimateDiT, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = trained_state(dit)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        lines = [f"unexpected: {k}" for k in unknown[:25]] + [f"missing: {k}" for k in missing[:25]]
        raise CheckpointError(
            f"{source}: {len(unknown)} unexpected and {len(missing)} missing keys:\n  " + "\n  ".join(lines)
        )
    wrong = [
        f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
        for k, t in tensors.items()
        if t.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: shapes do not match:\n  " + "\n  ".join(wrong[:25]))
    dit.load_state_dict(tensors, strict=False)
