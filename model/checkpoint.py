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

Training checkpoints (``runs/<run>/checkpoints/step-NNNNNNN/``) are torch.distributed.checkpoint
folders plus ``trainer.json``, written under ``.step-NNNNNNN.tmp`` and renamed into place when
whole, so a disk-full or a kill during a save leaves the previous checkpoint as it was and no
final-named partial one. Reading them runs no code from the files: DCP's own reader unpickles
``.metadata`` and ``torch.load``s byte items with ``weights_only=False``; ours allow only the
classes DCP metadata is made of, and load byte items with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from data_schemas.atomic import atomic_path, publish
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
    return {name: t for name, t in dit.state_dict().items() if not name.startswith("transformer.") or ".lora_" in name}


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
        "dit": {
            k: dit_config[k]
            for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "image_dim")
        },
    }
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        _sort_safetensors_header(tmp)
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place. safetensors keeps the
    metadata in a hash map whose order changes from process to process, so equal weights
    would not give equal files; sorting changes no length (the same compact JSON)."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise AssertionError(f"{path}: the sorted header is longer than the written one")
        fh.seek(8)
        fh.write(text.ljust(size))


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
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: format version {config.get('version')}, expected {FORMAT_VERSION}"
        )
    if config["label_pool"] != dit.label_pool:
        raise CheckpointError(f"{folder}: label pool {config['label_pool']} but the model has {dit.label_pool}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
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
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
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


# ---- training checkpoints (torch.distributed.checkpoint) ---------------------------------

CHECKPOINTS_DIR = "checkpoints"
TRAINER_FILE = "trainer.json"
METADATA_FILE = ".metadata"
# "RANK:STEP:BYTES:enospc|kill": that rank's save at that step fails after BYTES bytes reach its
# files, as a full disk fails it (enospc, for as long as the variable is set) or as a kill
# does (kill, once per run folder). For the fault-injection tests and bench/faults.py.
SAVE_FAULT_ENV = "MULTIANIMATE_FAULT_SAVE"
SAVE_FAULT_MARKER = ".save-fault-fired"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that asks for more than checkpoint data (code, paths outside it)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def temp_checkpoint_dir(final: Path) -> Path:
    """Where the save of ``final`` is written; ``latest_checkpoint`` never looks at it."""
    return final.with_name(f".{final.name}.tmp")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (only a whole one carries the final name)."""
    done = sorted(p for p in (Path(run_dir) / CHECKPOINTS_DIR).glob("step-*") if (p / TRAINER_FILE).is_file())
    return done[-1] if done else None


def _discard(path: Path) -> None:
    """Unpublish a checkpoint by one rename, then delete it: a kill halfway through the delete
    leaves a hidden leftover, never a final-named folder with files missing."""
    gone = path.with_name(f".{path.name}.old")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def remove_checkpoint_leftovers(run_dir: Path) -> list[Path]:
    """Delete what killed or failed saves left (``.step-*.tmp``, ``.step-*.old``). Only the run
    folder's owner calls this, so no save of another process can be in flight."""
    found = sorted((Path(run_dir) / CHECKPOINTS_DIR).glob(".step-*"))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def publish_checkpoint(tmp: Path, final: Path, trainer: dict, keep: int) -> Path:
    """Rank 0, after every rank's part of ``tmp`` is written (DCP fsyncs each file and writes
    ``.metadata`` last): add ``trainer.json``, rename the folder into place, drop all but the
    newest ``keep`` checkpoints."""
    with atomic_path(tmp / TRAINER_FILE) as path:
        path.write_text(json.dumps(trainer))
    if final.exists():  # the same step saved again (a resumed run redid it)
        _discard(final)
    publish(tmp, final)
    for old in sorted(final.parent.glob("step-*"))[:-keep]:
        _discard(old)
    return final


@dataclass
class _SaveFault:
    budget: int
    kind: str
    marker: Path
    written: int = 0

    def write(self, raw_write, data, name: str) -> int:
        room = self.budget - self.written
        if len(data) <= room:
            n = raw_write(data)
            self.written += n
            return n
        if room > 0:  # a full disk takes what fits, then refuses
            self.written += raw_write(memoryview(data)[:room])
        if self.kind == "kill":
            self.marker.write_text(f"pid {os.getpid()} killed itself after {self.written} bytes of {name}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def _save_fault(rank: int, step: int, run_dir: Path) -> _SaveFault | None:
    spec = os.environ.get(SAVE_FAULT_ENV)
    if not spec:
        return None
    fault_rank, fault_step, budget, kind = spec.split(":")
    if kind not in ("enospc", "kill"):
        raise ValueError(f"{SAVE_FAULT_ENV}={spec!r}: the kind must be enospc or kill")
    marker = Path(run_dir) / SAVE_FAULT_MARKER
    if int(fault_rank) != rank or int(fault_step) != step or (kind == "kill" and marker.exists()):
        return None
    return _SaveFault(int(budget), kind, marker)


class _SaveFile(io.FileIO):
    def __init__(self, path, fs: _SaveFileSystem):
        super().__init__(path, "wb")
        self._fs = fs

    def write(self, data) -> int:
        try:
            if self._fs.fault is not None:
                return self._fs.fault.write(lambda b: io.FileIO.write(self, b), data, str(self.name))
            return super().write(data)
        except OSError as exc:
            self._fs.error = self._fs.error or exc
            raise


class _SaveFileSystem(FileSystem):
    """DCP's file system for a save, which remembers the first failed write: torch.save's zip
    writer turns it into an unrelated RuntimeError ("unexpected pos 704 vs 598"), and a full
    disk would go unnamed. Carries the injected fault, if any."""

    def __init__(self, fault: _SaveFault | None):
        super().__init__()
        self.fault = fault
        self.error: OSError | None = None

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
        else:
            with io.BufferedWriter(_SaveFile(path, self)) as stream:
                yield stream


def save_checkpoint_files(state: dict, path: Path, rank: int, step: int) -> None:
    """Every rank's part of a checkpoint (a collective): DCP's file writer, every file fsynced
    before ``.metadata``, its marker, is written; the fault of ``SAVE_FAULT_ENV`` injected when
    it names this rank and step. A failed write is raised as itself (the OSError of a full
    disk), whatever DCP made of it."""
    writer = FileSystemWriter(path, sync_files=True)
    fs = writer.fs = _SaveFileSystem(_save_fault(rank, step, Path(path).parent.parent))
    try:
        dcp.save(state, storage_writer=writer)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if fs.error is not None:
            raise fs.error from exc
        raise


# What a DCP ``.metadata`` pickle is made of (torch 2.x): its records, sizes, dtypes (and the
# layout and memory-format constants), the checkpoint id as a path. Nothing that runs code.
_METADATA_GLOBALS = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath")),
        ("collections", "OrderedDict"),
    }
)
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load {module}.{name}: checkpoint metadata holds only DCP records, sizes and "
            "dtypes, and unpickling anything else can run code (is this workspace from someone you trust?)"
        )


def read_checkpoint_metadata(path: Path) -> Metadata:
    """A checkpoint's ``.metadata`` (``path``: the folder or the file), unpickled with only the
    classes DCP metadata needs; its data files must lie inside the checkpoint folder."""
    path = Path(path)
    file = path / METADATA_FILE if path.is_dir() else path
    with open(file, "rb") as fh:
        try:
            metadata = _MetadataUnpickler(fh, file).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: not readable checkpoint metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise UnsafeCheckpointError(f"{file}: names a data file {name!r} outside its checkpoint folder")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read (safely) beforehand: DCP would swallow an error
    of ``read_metadata`` and report only that no metadata was found."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor items (the optimizer's hyper-parameters) are read
    with ``torch.load(weights_only=True)``: plain numbers, tuples and lists, never code."""

    def __init__(self, source: Path):
        super().__init__()
        self.source = source

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's message: a preamble, then the line that names the global
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "not plain data")
            raise UnsafeCheckpointError(f"{self.source}: item {fqn} refused, it would run code: {reason}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.source}: item {fqn} unreadable ({type(exc).__name__}: {exc})") from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_checkpoint(path: Path, state: dict) -> dict:
    """Load a training checkpoint into ``state`` in place (a collective under a process group);
    returns its ``trainer.json``. A file that asks to run code is refused, naming it."""
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    try:
        dcp.load(state, storage_reader=_SafeReader(path, metadata), planner=_SafeLoadPlanner(path))
    except dcp.api.CheckpointException as exc:  # DCP wraps every rank's error; ours name the file
        ours = [e for e, _ in exc.failures.values() if isinstance(e, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise
    return json.loads((path / TRAINER_FILE).read_text())
