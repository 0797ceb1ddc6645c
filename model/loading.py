"""Load the real DiT without any rank ever holding all of it.

A 14B DiT is 28 GB in bf16. Loading it whole on every rank before FSDP2 shards it costs
8 x 28 GB of host RAM on an 8-GPU node and the full model on each GPU first. Instead:

1. ``meta_transformer`` builds the transformer with its parameters on the meta device (no
   memory) and its buffers (RoPE tables) real, in the dtypes ``from_pretrained`` would give;
2. the caller shards it with FSDP2 (``fully_shard``) as training does;
3. ``load_sharded`` gives each meta parameter real storage holding only this rank's rows
   and reads just those rows from the safetensors files, straight into that storage (plain
   positional reads, no memory map and no full-tensor copy).

So a rank's host memory grows by its shard (plus one tensor slice of staging on GPUs),
not by the model. The safetensors layout (an 8-byte little-endian header length, a JSON
header of dtype/shape/byte offsets, then the raw data) is read directly: the library's
reader memory-maps the file, and the pages a rank touches would count against it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from torch import nn

# safetensors dtype codes
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"


def keep_in_fp32(name: str, modules: list[str] | None) -> bool:
    """diffusers' rule for the modules it keeps in fp32 under ``torch_dtype`` (its
    ``_keep_in_fp32_modules``, matched against the parts of the parameter name)."""
    return bool(modules) and any(m in name.split(".") for m in modules)


def cast_base(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Its parameters in the dtypes ``from_pretrained(torch_dtype=dtype)`` gives them: ``dtype``
    except the modules diffusers keeps in fp32 (``Module.to`` would cast those too)."""
    fp32 = transformer._keep_in_fp32_modules
    for name, param in transformer.named_parameters():
        if not keep_in_fp32(name, fp32):
            param.data = param.data.to(dtype)
    return transformer


def base_bytes(transformer: nn.Module) -> int:
    """The frozen base's bytes in their dtypes (LoRA excluded)."""
    return sum(p.numel() * p.element_size() for n, p in transformer.named_parameters() if ".lora_" not in n)


def meta_transformer(folder: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    """The transformer of ``folder/config.json`` with parameters on the meta device, in the
    dtypes ``from_pretrained(torch_dtype=dtype)`` gives them; buffers real."""
    config = WanTransformer3DModel.load_config(folder)
    with init_empty_weights(include_buffers=False):
        transformer = WanTransformer3DModel.from_config(config)
    return cast_base(transformer, dtype)


class SafetensorsFolder:
    """The tensors of a (possibly sharded) diffusers weights folder: name -> (file, dtype,
    shape, byte offset), read row ranges on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            path = self.folder / name
            with path.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            for key, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, not a float type")
                self.entries[key] = (
                    path,
                    _DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    8 + size + info["data_offsets"][0],
                )

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of ``key`` (dim 0) into ``out`` (any device and float dtype)."""
        path, dtype, shape, offset = self.entries[key]
        row_elems = 1
        for n in shape[1:]:
            row_elems *= n
        item = torch.empty((), dtype=dtype).element_size()
        staging = out if (out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()) else None
        if staging is None:
            staging = torch.empty(out.shape, dtype=dtype)
        buf = staging.view(-1).view(torch.uint8).numpy()
        with path.open("rb", buffering=0) as fh:
            fh.seek(offset + start * row_elems * item)
            got = fh.readinto(buf)
        if got != buf.nbytes:
            raise OSError(f"{path}: tensor {key} is truncated ({got} of {buf.nbytes} bytes)")
        if staging is not out:
            out.copy_(staging)


def _file_key(name: str, prefix: str) -> str:
    # peft renames a wrapped layer's weight to base_layer.weight
    return name.removeprefix(prefix).replace(".base_layer.", ".")


def check_files(model: nn.Module, folder: Path, prefix: str) -> SafetensorsFolder:
    """The weight files of ``folder`` hold every meta parameter of ``model`` under ``prefix``
    with its shape (headers only, no data read); one error naming every problem."""
    source = SafetensorsFolder(folder)
    problems = []
    for name, param in model.named_parameters():
        if not param.is_meta:
            continue
        if not name.startswith(prefix):
            problems.append(f"{name}: on the meta device but not under {prefix!r}")
            continue
        key = _file_key(name, prefix)
        if key not in source.entries:
            problems.append(f"{key}: missing")
        elif source.entries[key][2] != tuple(param.shape):
            problems.append(f"{key}: file {source.entries[key][2]} vs model {tuple(param.shape)}")
    if problems:
        raise ValueError(f"{folder}: the weights do not fit the model:\n  " + "\n  ".join(problems[:25]))
    return source


def load_sharded(model: nn.Module, folder: Path, prefix: str, device: torch.device) -> int:
    """Materialise every meta parameter of ``model`` under ``prefix`` on ``device`` and fill
    it from the safetensors of ``folder``; each FSDP2-sharded parameter gets only this rank's
    rows. Returns the bytes read. Every missing or mis-shaped tensor is one error naming it."""
    source = check_files(model, folder, prefix)
    meta = {name for name, p in model.named_parameters() if p.is_meta}
    # Real storage for the meta parameters only (FSDP2's _apply re-registers its shards).
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    total = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in meta:
                continue
            local = param.to_local() if hasattr(param, "to_local") else param.data
            start = _shard_start(param)
            if local.numel():
                source.read_rows(_file_key(name, prefix), start, start + local.shape[0], local)
                total += local.numel() * local.element_size()
    return total


def _shard_start(param: torch.Tensor) -> int:
    """First global row of this rank's dim-0 shard (FSDP2 chunks like ``torch.chunk``)."""
    if not hasattr(param, "placements"):
        return 0
    (placement,) = param.placements
    if not placement.is_shard(0):
        raise ValueError(f"expected a dim-0 shard, got {placement}")
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = param.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    assert param.to_local().shape[0] == max(0, min(chunk, rows - start)), "unexpected FSDP2 shard layout"
    return start
