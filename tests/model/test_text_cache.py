"""Text encoder and prompt-embedding cache: diffusers' recipe, determinism, cache round trips, the embed flow."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_schemas.embedding import EmbeddingRecord, embedding_key
from data_schemas.io import read_records, write_records
from data_schemas.shard import ShardSample
from data_schemas.workspace import INDEX as INDEX_NAME
from data_schemas.workspace import LOCK, Workspace
from model.text_cache import EmbeddingCache, MissingEmbeddingError, captions_from_shards, fill_cache, read_index
from model.text_encoder import (
    TEXT_LEN,
    WAN_NEGATIVE_PROMPT,
    MissingWeightsError,
    build_tiny_text_encoder,
    default_caption,
    load_text_encoder,
    profile_encoder_id,
)

ROOT = Path(__file__).resolve().parents[2]
LONG_TEXT = " ".join(["two person are dancing on a stage"] * 120)  # ~840 tokens: truncated to 512
TEXTS = [
    "two person are dancing",
    "  three person\n are   dancing &amp;amp; jumping  ",  # prompt_clean: whitespace and double-escaped HTML
    WAN_NEGATIVE_PROMPT,
    "",
    LONG_TEXT,
]

# Prints what must not differ between processes: token ids and weights (bit for bit), outputs
# (as float32 bytes: two processes' CPU floats are not bit-equal, they are compared within a tolerance).
_FINGERPRINT = """
import base64, hashlib, json, sys
import torch
from model.text_encoder import build_tiny_text_encoder
texts = json.loads(sys.argv[1])
enc = build_tiny_text_encoder(seed=0, dim=32)
weights = hashlib.sha256()
for name, tensor in sorted(enc.model.state_dict().items()):
    weights.update(name.encode() + tensor.numpy().tobytes())
out = enc.encode(texts)
print(json.dumps({"ids": enc.tokenizer(texts).input_ids, "weights": weights.hexdigest(),
                  "out": base64.b64encode(out.numpy().tobytes()).decode(), "shape": list(out.shape), "id": enc.encoder_id}))
"""


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_text_encoder()


def _fingerprint_process(hash_seed: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONHASHSEED": hash_seed}  # set iteration order must not leak into the vocabulary
    return subprocess.Popen(
        [sys.executable, "-c", _FINGERPRINT, json.dumps(TEXTS)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


def test_tiny_encoder_is_identical_across_processes():
    procs = [_fingerprint_process(seed) for seed in ("1", "2")]  # in parallel: each pays the imports
    outputs = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    out = [np.frombuffer(base64.b64decode(o.pop("out")), np.float32).reshape(o["shape"]) for o in outputs]
    assert outputs[0] == outputs[1]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)
    assert outputs[0]["id"] == "tiny-umt5-d32-s0"


def test_tiny_build_is_fast_seeded_and_leaves_the_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    start = time.perf_counter()
    again = build_tiny_text_encoder()
    assert time.perf_counter() - start < 2.0
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    other = build_tiny_text_encoder(seed=1, dim=16)
    assert other.encoder_id == "tiny-umt5-d16-s1" and other.dim == 16
    assert other.encode(["two person are dancing"]).shape == (1, TEXT_LEN, 16)


def test_tiny_tokenizer_knows_every_character_of_the_negative_prompt(tiny):
    ids = tiny.tokenizer(WAN_NEGATIVE_PROMPT).input_ids
    assert tiny.tokenizer.unk_token_id not in ids and ids[-1] == tiny.tokenizer.eos_token_id
    assert tiny.tokenizer.pad_token_id == 0 and tiny.tokenizer.eos_token_id == 1


def test_encode_is_exactly_diffusers_get_t5_prompt_embeds(tiny):
    from diffusers import WanImageToVideoPipeline

    pipe = SimpleNamespace(tokenizer=tiny.tokenizer, text_encoder=tiny.model)
    with torch.no_grad():  # as the pipeline's __call__ runs it (grad mode picks other kernels: ~1e-6 apart)
        expected = WanImageToVideoPipeline._get_t5_prompt_embeds(
            pipe, TEXTS, max_sequence_length=512, device=torch.device("cpu"), dtype=torch.float32
        )
    assert torch.equal(tiny.encode(TEXTS), expected)


def test_rows_past_the_real_length_are_zero_and_the_rest_ignores_padding(tiny):
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    embeddings, lengths = tiny.encode_with_lengths(TEXTS)
    assert embeddings.shape == (len(TEXTS), TEXT_LEN, tiny.dim) and embeddings.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        # Independently: the text alone, unpadded, no attention mask.
        ids = tiny.tokenizer(prompt_clean(text), truncation=True, max_length=TEXT_LEN).input_ids
        with torch.no_grad():
            alone = tiny.model(torch.tensor([ids])).last_hidden_state[0]
        assert lengths[i] == len(ids) and ids[-1] == tiny.tokenizer.eos_token_id
        torch.testing.assert_close(embeddings[i, : len(ids)], alone, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(embeddings[i, len(ids) :]) == 0
        assert torch.count_nonzero(embeddings[i, : len(ids)].abs().sum(-1)) == len(ids)
    assert lengths.tolist()[3:] == [1, TEXT_LEN]  # "" is the eos token alone; the long text is cut at 512
    assert tiny.encode([]).shape == (0, TEXT_LEN, tiny.dim)


def test_fill_then_get_returns_exactly_what_encode_returned(tiny, tmp_path):
    asked = TEXTS + TEXTS[:2]  # duplicates are encoded once
    summary = fill_cache(tmp_path, tiny, asked, batch_size=8)
    assert (summary.num_texts, summary.num_new, summary.num_existing) == (len(TEXTS), len(TEXTS), 0)
    cache = EmbeddingCache(tmp_path, tiny.encoder_id)
    expected = tiny.encode(sorted(TEXTS))  # fill_cache encodes the sorted distinct texts, one batch here
    for text, embedding in zip(sorted(TEXTS), expected):
        got = cache.get(text)
        assert got.dtype == torch.float32 and torch.equal(got, embedding)
    assert torch.equal(
        cache.get_many(TEXTS[:2] + TEXTS[:1]),
        torch.stack([expected[sorted(TEXTS).index(t)] for t in TEXTS[:2] + TEXTS[:1]]),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME, *summary.files])


def test_second_fill_encodes_nothing_and_rewrites_nothing(tiny, tmp_path):
    fill_cache(tmp_path, tiny, TEXTS[:3], batch_size=2)
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = fill_cache(tmp_path, tiny, list(reversed(TEXTS[:3])))
    assert (again.num_new, again.num_existing) == (0, 3)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == stats
    more = fill_cache(tmp_path, tiny, TEXTS)
    assert (more.num_new, more.num_existing) == (len(TEXTS) - 3, 3)


def test_a_missing_text_names_the_text_the_encoder_and_the_fix(tiny, tmp_path):
    fill_cache(tmp_path, tiny, ["two person are dancing"])
    cache = EmbeddingCache(tmp_path, tiny.encoder_id)
    with pytest.raises(MissingEmbeddingError) as info:
        cache.get("three person are dancing")
    message = str(info.value)
    assert "'three person are dancing'" in message and tiny.encoder_id in message and "fill_cache" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(MissingEmbeddingError, match="four person"):
        cache.get_many(["two person are dancing", "three person are dancing", "four person are dancing"])
    with pytest.raises(MissingEmbeddingError, match="tiny-umt5-d32-s1"):  # another encoder's entries do not count
        EmbeddingCache(tmp_path, "tiny-umt5-d32-s1").get("two person are dancing")


def test_index_round_trip_with_two_encoders_and_dtypes(tiny, tmp_path):
    other = build_tiny_text_encoder(seed=1)
    fill_cache(tmp_path, tiny, TEXTS)
    fill_cache(tmp_path, other, TEXTS[:2], dtype=torch.bfloat16)
    records = read_index(tmp_path)
    assert records == read_records(tmp_path / INDEX_NAME, EmbeddingRecord)
    assert [(r.encoder_id, r.text) for r in records] == sorted((r.encoder_id, r.text) for r in records)
    _, lengths = tiny.encode_with_lengths(TEXTS)
    by_text = {r.text: r for r in records if r.encoder_id == tiny.encoder_id}
    for text, length in zip(TEXTS, lengths.tolist()):
        record = by_text[text]
        assert record.key == embedding_key(tiny.encoder_id, text) and record.file == f"{record.key}.safetensors"
        assert (record.dim, record.dtype, record.num_tokens) == (32, "float32", length)
    bf16 = EmbeddingCache(tmp_path, other.encoder_id)
    assert len(bf16) == 2 and {r.dtype for r in records if r.encoder_id == other.encoder_id} == {"bfloat16"}
    got = bf16.get_many(sorted(TEXTS[:2]))
    assert got.dtype == torch.bfloat16 and torch.equal(got, other.encode(sorted(TEXTS[:2])).to(torch.bfloat16))
    # The index is what readers trust: rewriting it identically changes nothing they see.
    write_records(records, EmbeddingRecord, tmp_path / INDEX_NAME)
    assert read_index(tmp_path) == records


def test_missing_real_weights_name_every_file_and_the_download(tmp_path):
    folder = tmp_path / "wan"
    with pytest.raises(MissingWeightsError) as info:
        load_text_encoder(folder, torch.float32)
    message = str(info.value)
    for name in (
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/tokenizer.json",
    ):
        assert str(folder / name) in message
    assert (
        f"huggingface-cli download Wan-AI/Wan2.1-I2V-14B-720P-Diffusers --include 'text_encoder/*' 'tokenizer/*' --local-dir {folder}"
        in message
    )
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="needs weights"):
        profile_encoder_id("wan-i2v-14b-720p", None)


def _save_as_wan_folder(encoder, folder: Path) -> Path:
    encoder.model.save_pretrained(folder / "text_encoder", max_shard_size="50KB")  # sharded, like the real one
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_a_diffusers_layout_folder_loads_and_a_lost_shard_is_named(tiny, tmp_path):
    folder = _save_as_wan_folder(tiny, tmp_path / "wan")
    loaded = load_text_encoder(folder, torch.float32, device="cpu")
    saved, reloaded = tiny.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == reloaded.keys() and all(
        torch.equal(saved[k], reloaded[k]) for k in saved
    )  # byte copies: exact
    # two model instances' floats are not bit-equal on the CPU
    torch.testing.assert_close(loaded.encode(TEXTS), tiny.encode(TEXTS), rtol=1e-5, atol=1e-6)
    assert loaded.encoder_id.startswith("umt5-") and loaded.encoder_id.endswith("-float32")
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert (
        profile_encoder_id("wan-i2v-14b-720p", moved).replace("bfloat16", "float32") == loaded.encoder_id
    )  # ids never hold paths
    shard = sorted((moved / "text_encoder").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingWeightsError) as info:
        load_text_encoder(moved, torch.float32)
    assert str(shard) in str(info.value) and "config.json" not in str(info.value).split("Get them")[0]


def test_default_caption_is_the_shard_stage_caption():
    assert default_caption(2) == "two person are dancing"
    assert default_caption(4) == "four person are dancing"
    with pytest.raises(ValueError, match="num_persons"):
        default_caption(-1)


def _sample(key: str, persons: int) -> ShardSample:
    return ShardSample(
        key=key,
        shard="train-000000.tar",
        offset=0,
        size_bytes=1,
        split="train",
        source_sha256="0" * 64,
        num_frames=12,
        persons=persons,
        width=128,
        height=96,
        fps=25.0,
        caption=default_caption(persons),
    )


def write_shards_index(workspace: Path) -> Path:
    """The shards index alone (the embed flow reads nothing else): three samples, two captions."""
    samples = [_sample("a-000", 2), _sample("a-001", 2), _sample("b-000", 3)]
    return write_records(samples, ShardSample, Workspace(workspace).shards_index)


def test_captions_from_shards_are_distinct_and_sorted(tmp_path):
    assert captions_from_shards(write_shards_index(tmp_path)) == ["three person are dancing", "two person are dancing"]


@pytest.mark.slow
def test_embed_flow_caches_captions_and_negative_prompt(tmp_path, prefect_api):
    from flows.embed import embed

    workspace = tmp_path / "ws"
    write_shards_index(workspace)
    texts = ["three person are dancing", "two person are dancing", WAN_NEGATIVE_PROMPT]
    summary = embed(workspace)
    assert (summary.encoder_id, summary.num_texts, summary.num_new) == ("tiny-umt5-d32-s0", 3, 3)
    folder = Workspace(workspace).embeddings
    assert sorted(p.name for p in folder.iterdir()) == sorted(  # LOCK: held by whoever fills the cache
        [INDEX_NAME, LOCK] + [f"{embedding_key(summary.encoder_id, t)}.safetensors" for t in texts]
    )
    cache = EmbeddingCache(folder, summary.encoder_id)
    # the flow's encoder and this one are two instances: their CPU floats are not bit-equal
    torch.testing.assert_close(
        cache.get_many(sorted(texts)), build_tiny_text_encoder().encode(sorted(texts)), rtol=1e-5, atol=1e-6
    )

    stats = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert embed(workspace) == summary  # a cache hit: nothing loaded, nothing written
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stats

    (folder / summary.files[0]).unlink()  # a lost entry is made again, and only it
    again = embed(workspace)
    assert (again.num_new, again.num_existing) == (1, 2) and (folder / summary.files[0]).is_file()

    with pytest.raises(MissingWeightsError, match="text_encoder/config.json"):
        embed(workspace, profile="wan-i2v-14b-720p", weights=tmp_path / "no-weights")
