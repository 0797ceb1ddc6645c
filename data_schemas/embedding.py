"""Records of the prompt-embedding cache: embeddings/index.parquet has one row per entry.

An entry is one (encoder id, exact text) pair; its key is the sha256 of both, and its file
``embeddings/<key>.safetensors`` holds one tensor ``embedding`` [512, dim] (rows past the
text's real token length are zero, as diffusers' Wan pipelines make them). The entry files
are published before the index, so the index only names complete files.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Wan's I2V cross-attention takes the first 512 context tokens as text, the rest as image.
TEXT_LEN = 512
TENSOR_NAME = "embedding"  # the one tensor of an entry file

EmbeddingDtype = Literal["float32", "bfloat16", "float16"]


def embedding_key(encoder_id: str, text: str) -> str:
    """sha256 of (encoder id, text); JSON framing keeps ("ab", "c") and ("a", "bc") apart."""
    return hashlib.sha256(json.dumps([encoder_id, text], ensure_ascii=False).encode()).hexdigest()


class EmbeddingRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    encoder_id: str = Field(description="which text encoder made it (weights + tokenizer + dtype), never a path")
    text: str = Field(description="the exact text as given, before diffusers' prompt_clean")
    key: str = Field(description="sha256 hex of (encoder_id, text)")
    file: str = Field(description="entry file name inside embeddings/: <key>.safetensors")
    dim: int = Field(description="width of the encoder's hidden states")
    dtype: EmbeddingDtype = Field(description="dtype of the stored tensor")
    num_tokens: int = Field(description="real token length (end-of-sequence token included, at most 512)")


class EmbeddingSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    encoder_id: str = Field(description="the encoder the texts were looked up for")
    num_texts: int = Field(description="distinct texts asked for")
    num_new: int = Field(description="texts encoded by this call")
    num_existing: int = Field(description="texts already in the cache")
    files: tuple[str, ...] = Field(description="entry files of the asked texts, relative to the cache folder, sorted")
    index: str = Field(description="path of embeddings/index.parquet")
