"""Prefect task of the prompt-embedding stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.embedding
from data_schemas.embedding import EmbeddingSummary
from data_schemas.workspace import Workspace
from model import text_cache, text_encoder
from model.text_encoder import WAN_NEGATIVE_PROMPT, Profile
from tasks.common import GPU_TAG, code_version, retry_transient

EMBED_CODE = code_version(text_cache, text_encoder, data_schemas.embedding)


def _embed_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # The captions' source by content, the encoder by its id (weights, tokenizer, dtype), our code.
    return f"embed-{parameters['shards_sha256']}-{parameters['encoder_id']}-{EMBED_CODE}"


@task(
    name="embed-captions",
    tags=[GPU_TAG],  # the real encoder is 11 GB: one at a time on a GPU
    cache_key_fn=_embed_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def embed_captions(
    workspace: Path, shards_index: Path, shards_sha256: str, profile: Profile, weights: Path | None, encoder_id: str
) -> EmbeddingSummary:
    """Cache the embeddings of every caption in the shards index and of the negative prompt
    (model.text_cache.ensure_cached: the encoder is loaded only when some text is missing)."""
    logger = get_run_logger()
    texts = text_cache.captions_from_shards(shards_index) + [WAN_NEGATIVE_PROMPT]
    summary = text_cache.ensure_cached(Workspace(workspace).embeddings, profile, weights, texts, encoder_id=encoder_id)
    logger.info(
        "%d text(s) for encoder %s: %d encoded, %d already cached",
        summary.num_texts,
        encoder_id,
        summary.num_new,
        summary.num_existing,
    )
    return summary
