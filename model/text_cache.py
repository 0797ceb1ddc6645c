"""The prompt-embedding cache: UMT5 outputs on disk, so training never loads the 11 GB encoder.

Layout of the cache folder (``<workspace>/embeddings/``, see data_schemas.embedding):
    <key>.safetensors   one tensor "embedding" [512, D], key = sha256(encoder id, exact text)
    index.parquet       one EmbeddingRecord per entry, of every encoder

Entry files are published (temp name, fsync, rename) before the index that names them, so
readers trust the index only. Texts are kept exactly as given: diffusers' prompt_clean runs
inside the encoder, and two spellings of a prompt are two entries.

Legend: N texts, L = 512 tokens, D = encoder width.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save

from data_schemas.atomic import atomic_path, exclusive_lock
from data_schemas.embedding import (
    TENSOR_NAME,
    TEXT_LEN,
    EmbeddingDtype,
    EmbeddingRecord,
    EmbeddingSummary,
    embedding_key,
)
from data_schemas.io import read_records, write_records
from data_schemas.shard import ShardSample
from data_schemas.workspace import INDEX, LOCK

if TYPE_CHECKING:
    from data_schemas.model import Profile
    from model.text_encoder import TextEncoder

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FILL_HOWTO = (
    "fill it with model.text_cache.fill_cache(folder, encoder, texts), or run the embed flow "
    "(flows.embed.embed(workspace, profile)) over the workspace"
)


class MissingEmbeddingError(KeyError, ValueError):
    """A text has no cached embedding for this encoder; the message says how to fill the cache."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _dtype_name(dtype: torch.dtype) -> EmbeddingDtype:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name  # type: ignore[return-value]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def read_index(folder: Path) -> list[EmbeddingRecord]:
    """Every entry of the cache (all encoders); none when the cache is new."""
    path = Path(folder) / INDEX
    return read_records(path, EmbeddingRecord) if path.exists() else []


def _present(folder: Path, encoder_id: str) -> dict[str, EmbeddingRecord]:
    """text -> record of this encoder's entries whose file is still there."""
    return {r.text: r for r in read_index(folder) if r.encoder_id == encoder_id and (Path(folder) / r.file).is_file()}


def missing_texts(folder: Path, encoder_id: str, texts: Iterable[str]) -> list[str]:
    """The distinct texts (sorted) that have no entry: lets a caller skip loading the encoder."""
    present = _present(folder, encoder_id)
    return sorted({t for t in texts if t not in present})


def _write_entry(
    folder: Path, encoder_id: str, text: str, embedding_LD: torch.Tensor, num_tokens: int, dtype: torch.dtype
) -> EmbeddingRecord:
    key = embedding_key(encoder_id, text)
    record = EmbeddingRecord(
        encoder_id=encoder_id,
        text=text,
        key=key,
        file=f"{key}.safetensors",
        dim=int(embedding_LD.shape[1]),
        dtype=_dtype_name(dtype),
        num_tokens=num_tokens,
    )
    # The metadata makes a lone entry file self-describing; the index stays the authority.
    metadata = {"encoder_id": encoder_id, "text": text, "num_tokens": str(num_tokens)}
    with atomic_path(Path(folder) / record.file) as tmp:
        Path(tmp).write_bytes(
            sorted_header(save({TENSOR_NAME: embedding_LD.to(dtype).contiguous()}, metadata=metadata))
        )
    return record


def sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes metadata in
    hash-map order, which changes from process to process, so the same embedding would not be
    the same bytes. The header stays padded to 8 bytes; the tensor bytes are untouched."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


def _publish_index(folder: Path, new: list[EmbeddingRecord]) -> Path:
    # Re-read just before writing: rows another filler published meanwhile are kept.
    records = {r.key: r for r in read_index(folder)} | {r.key: r for r in new}
    ordered = sorted(records.values(), key=lambda r: (r.encoder_id, r.text))
    return write_records(ordered, EmbeddingRecord, Path(folder) / INDEX)


def fill_cache(
    folder: Path, encoder: TextEncoder, texts: Iterable[str], batch_size: int = 8, dtype: torch.dtype | None = None
) -> EmbeddingSummary:
    """Encode the texts that have no entry yet (deduplicated, in sorted order) and publish them.

    ``dtype``: of the stored tensors; default the encoder's own (bf16 for the real encoder,
    whose outputs diffusers casts to bf16 anyway; float32 for the tiny one). Entries already
    cached keep the dtype they were written in.
    """
    folder = Path(folder)
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(
            f"texts must be strings, got {[type(t).__name__ for t in texts if not isinstance(t, str)][:3]}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = dtype or encoder.dtype
    _dtype_name(dtype)  # fail before encoding anything
    wanted = sorted(set(texts))
    # Sorted batches: the same set of texts is encoded in the same batches, whatever its order.
    todo = missing_texts(folder, encoder.encoder_id, wanted)
    new: list[EmbeddingRecord] = []
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        embeddings_NLD, lengths_N = encoder.encode_with_lengths(batch)
        for text, embedding_LD, length in zip(batch, embeddings_NLD, lengths_N.tolist()):
            new.append(_write_entry(folder, encoder.encoder_id, text, embedding_LD, length, dtype))
    if new:
        _publish_index(folder, new)
    return cached_summary(folder, encoder.encoder_id, wanted, num_new=len(new))


def cached_summary(folder: Path, encoder_id: str, texts: Iterable[str], num_new: int = 0) -> EmbeddingSummary:
    """What the cache holds of ``texts`` for this encoder; ``MissingEmbeddingError`` if not all."""
    wanted = sorted(set(texts))
    missing = missing_texts(folder, encoder_id, wanted)
    if missing:
        raise MissingEmbeddingError(
            f"no cached embedding of {missing!r} for encoder {encoder_id!r} in {folder}; {_FILL_HOWTO}"
        )
    return EmbeddingSummary(
        encoder_id=encoder_id,
        num_texts=len(wanted),
        num_new=num_new,
        num_existing=len(wanted) - num_new,
        files=tuple(sorted(f"{embedding_key(encoder_id, t)}.safetensors" for t in wanted)),
        index=str(Path(folder) / INDEX),
    )


def ensure_cached(
    folder: Path,
    profile: Profile,
    weights: Path | None,
    texts: Iterable[str],
    before_load: Callable[[], None] | None = None,
    encoder_id: str | None = None,
) -> EmbeddingSummary:
    """Make sure the cache holds ``texts`` for the profile's encoder: the encoder is loaded
    (and released) only when some text is missing, and then encodes only those.

    ``before_load``: called just before the encoder loads (e.g. to move a resident pipeline
    off the GPU: the real encoder is 11 GB). ``encoder_id``: the profile's, when the caller
    has it already (``profile_encoder_id`` reads the real weights' folder).
    """
    # Imported here: readers of the cache (training) need no tokenizer or transformers.
    from model.text_encoder import load_profile_encoder, profile_encoder_id

    encoder_id = encoder_id or profile_encoder_id(profile, weights)
    texts = list(texts)
    if not missing_texts(folder, encoder_id, texts):
        return cached_summary(folder, encoder_id, texts)
    # One filler at a time (jobs on several GPU workers fill the same index): the next one
    # waits, then finds its texts cached instead of loading the encoder again.
    with exclusive_lock(Path(folder) / LOCK):
        if not missing_texts(folder, encoder_id, texts):
            return cached_summary(folder, encoder_id, texts)
        if before_load is not None:
            before_load()
        encoder = load_profile_encoder(profile, weights)
        assert encoder.encoder_id == encoder_id, (encoder.encoder_id, encoder_id)
        try:
            return fill_cache(folder, encoder, texts)
        finally:
            del encoder
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the real encoder is 11 GB; the DiT needs the room


class EmbeddingCache:
    """Read side of the cache for one encoder: text -> [512, D] in the stored dtype.

    Entries are loaded on first use and kept (a training run asks for few distinct captions).
    """

    def __init__(self, folder: Path, encoder_id: str) -> None:
        self.folder = Path(folder)
        self.encoder_id = encoder_id
        self._records = {r.text: r for r in read_index(self.folder) if r.encoder_id == encoder_id}
        self._loaded: dict[str, torch.Tensor] = {}

    def __contains__(self, text: object) -> bool:
        return text in self._records

    def __len__(self) -> int:
        return len(self._records)

    @property
    def texts(self) -> list[str]:
        return sorted(self._records)

    def record(self, text: str) -> EmbeddingRecord:
        if text not in self._records:
            raise self._missing([text])
        return self._records[text]

    def get(self, text: str) -> torch.Tensor:
        """The embedding [512, D] of exactly this text."""
        if text not in self._loaded:
            self._loaded[text] = self._load(self.record(text))
        return self._loaded[text]

    def get_many(self, texts: Iterable[str]) -> torch.Tensor:
        """[N, 512, D]; every missing text is named in one error."""
        texts = list(texts)
        if not texts:
            raise ValueError("get_many needs at least one text")
        missing = sorted({t for t in texts if t not in self._records})
        if missing:
            raise self._missing(missing)
        return torch.stack([self.get(t) for t in texts])

    def _missing(self, texts: list[str]) -> MissingEmbeddingError:
        what = f"{texts[0]!r}" if len(texts) == 1 else f"{len(texts)} texts {texts!r}"
        return MissingEmbeddingError(
            f"no cached embedding of {what} for encoder {self.encoder_id!r} in {self.folder} "
            f"({len(self._records)} text(s) cached for it); {_FILL_HOWTO}"
        )

    def _load(self, record: EmbeddingRecord) -> torch.Tensor:
        path = self.folder / record.file
        if not path.is_file():
            raise MissingEmbeddingError(
                f"{path}: entry file of {record.text!r} for encoder {self.encoder_id!r} is gone; {_FILL_HOWTO}"
            )
        with safe_open(path, framework="pt") as f:
            tensor_LD = f.get_tensor(TENSOR_NAME)
        # Files on disk are input: check them against the index that vouches for them.
        if tuple(tensor_LD.shape) != (TEXT_LEN, record.dim) or tensor_LD.dtype != _DTYPES[record.dtype]:
            raise ValueError(
                f"{path}: holds {tuple(tensor_LD.shape)} {tensor_LD.dtype}, index says ({TEXT_LEN}, {record.dim}) {record.dtype}"
            )
        return tensor_LD


def captions_from_shards(shards_index: Path) -> list[str]:
    """The distinct captions of the samples in shards/index.parquet, sorted."""
    return sorted({sample.caption for sample in read_records(Path(shards_index), ShardSample)})
