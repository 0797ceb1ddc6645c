"""The embed flow: captions of the shards + the negative prompt -> cached UMT5 embeddings.

The encoder runs in one task: on a Dask cluster, on a GPU worker (``gpu_slot``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow

from data_schemas.embedding import EmbeddingSummary
from data_schemas.workspace import Workspace
from flows.runtime import gpu_slot, run_cached, workspace_lock
from model.text_encoder import Profile, profile_encoder_id
from tasks.embed import embed_captions


@flow(name="embed", flow_run_name="embed {profile}")
def embed(workspace: Path, profile: Profile = "tiny", weights: Path | None = None) -> EmbeddingSummary:
    """Cache the text embeddings training needs, so it never loads the text encoder.

    ``weights``: the diffusers-layout Wan2.1-I2V-14B-720P folder (profile wan-i2v-14b-720p).
    """
    with workspace_lock(workspace):  # a deployment's run has no CLI holding it
        return _embed(Path(workspace).absolute(), profile, weights)


def _embed(workspace: Path, profile: Profile, weights: Path | None) -> EmbeddingSummary:
    ws = Workspace(workspace)
    index = ws.shards_index
    if not index.is_file():
        raise ValueError(f"{index}: no shards index; run the preprocess flow on this workspace first")
    encoder_id = profile_encoder_id(profile, weights)  # fails first, naming any missing weight file
    shards_sha256 = hashlib.sha256(index.read_bytes()).hexdigest()
    arguments = {"embed": (workspace, index, shards_sha256, profile, weights, encoder_id)}

    def products(summary: EmbeddingSummary) -> list[str]:
        return [ws.relative(ws.embeddings_index)] + [ws.relative(ws.embeddings / name) for name in summary.files]

    with gpu_slot():
        summary = run_cached(embed_captions, workspace, arguments, products, "embedding")["embed"]
    if isinstance(summary, BaseException):
        raise summary
    return summary
