"""`multianimate weights --random-real-architecture`: random weights in the real layout load
through the real code path (sharded bf16 transformer, UMT5-XXL, CLIP ViT-H, the VAE, the
released MultiAnimate checkpoint). One write (about a minute, 5.3 GB) shared by the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.real_architecture import (
    MARKER_FILE,
    MULTIANIMATE_FOLDER,
    PROFILE_FILE,
    VAE_LATENTS_MEAN,
    VAE_LATENTS_STD,
    WAN_FOLDER,
    released_tensors,
)

CLI = [sys.executable, "-m", "flows.cli", "weights"]
NUM_LAYERS = 2


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    env["COLUMNS"] = "400"  # rich wraps error boxes at the terminal width
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def written(real_architecture) -> Path:
    folder, stdout = real_architecture  # written once per session by the command (conftest.py), default depth
    assert "total" in stdout and f"profile: {folder / PROFILE_FILE}" in stdout
    return folder


def shards_of(index: Path) -> list[str]:
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


@pytest.mark.slow  # the module's write takes about a minute
def test_layout(written):
    assert sorted(p.name for p in written.iterdir()) == sorted([WAN_FOLDER, "MultiAnimate", PROFILE_FILE, MARKER_FILE])
    assert not [p for p in written.parent.iterdir() if p.name != written.name]  # no temporary sibling left
    wan = written / WAN_FOLDER
    parts = ["image_encoder", "image_processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    assert sorted(p.name for p in wan.iterdir()) == sorted([*parts, "model_index.json"])
    index = json.loads((wan / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert sorted(k for k in index if not k.startswith("_")) == parts
    for sub, index_name in (
        ("transformer", "diffusion_pytorch_model.safetensors.index.json"),
        ("text_encoder", "model.safetensors.index.json"),
    ):
        shards = shards_of(wan / sub / index_name)
        assert len(shards) > 1
        assert sorted(p.name for p in (wan / sub).glob("*.safetensors")) == shards
    out = written / MULTIANIMATE_FOLDER
    names = [f"model-{k:05d}-of-00008.safetensors" for k in range(1, 9)]
    assert sorted(p.name for p in out.iterdir()) == [*names, "model.safetensors.index.json"]
    assert shards_of(out / "model.safetensors.index.json") == names
    scheduler = json.loads((wan / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler" and scheduler["use_flow_sigmas"]


@pytest.mark.slow  # the module's write takes about a minute
def test_transformer_loads_sharded_bf16_with_the_real_sizes(written):
    from diffusers import WanTransformer3DModel

    folder = written / WAN_FOLDER / "transformer"
    model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True)
    c = model.config
    assert c.num_attention_heads * c.attention_head_dim == 5120 and c.num_attention_heads == 40
    assert (c.ffn_dim, c.in_channels, c.out_channels) == (13824, 36, 16)
    assert (c.image_dim, c.text_dim, c.freq_dim, c.added_kv_proj_dim) == (1280, 4096, 256, 5120)
    assert (c.qk_norm, c.cross_attn_norm, c.eps, c.rope_max_seq_len) == ("rms_norm_across_heads", True, 1e-6, 1024)
    assert tuple(c.patch_size) == (1, 2, 2) and c.num_layers == NUM_LAYERS == len(model.blocks)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for shard in shards_of(folder / "diffusion_pytorch_model.safetensors.index.json"):
        with safe_open(str(folder / shard), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - safe_open is not iterable


@pytest.mark.slow  # the module's write takes about a minute
def test_vae_clip_processor_and_tokenizer_load(written):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    wan = written / WAN_FOLDER
    vae = AutoencoderKLWan.from_pretrained(wan / "vae", torch_dtype=torch.float32, local_files_only=True)
    v = vae.config
    assert (v.base_dim, v.z_dim, list(v.dim_mult), v.num_res_blocks) == (96, 16, [1, 2, 4, 4], 2)
    assert list(v.temperal_downsample) == [False, True, True]
    assert vae.config.latents_mean == list(VAE_LATENTS_MEAN) and vae.config.latents_std == list(VAE_LATENTS_STD)
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531  # Wan2.1_VAE.pth: 508 MB of fp32
    clip = CLIPVisionModel.from_pretrained(wan / "image_encoder", torch_dtype=torch.float32, local_files_only=True)
    c = clip.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads) == (1280, 5120, 16)
    assert (c.patch_size, c.image_size) == (14, 224)
    assert (c.projection_dim, c.hidden_act, c.layer_norm_eps, c.num_hidden_layers) == (1024, "gelu", 1e-5, 2)
    processor = CLIPImageProcessor.from_pretrained(wan / "image_processor", local_files_only=True)
    crop, size = processor.crop_size, processor.size
    assert (crop["height"], crop["width"], size["shortest_edge"]) == (224, 224, 224)
    assert processor.do_center_crop and processor.resample == 3
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    tokenizer = AutoTokenizer.from_pretrained(wan / "tokenizer", local_files_only=True)
    assert tokenizer.padding_side == "right"
    assert tokenizer("two person are dancing").input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow  # the module's write takes about a minute
def test_text_encoder_encodes_a_prompt(written):
    from model.text_encoder import load_text_encoder

    encoder = load_text_encoder(written / WAN_FOLDER, device="cpu")
    assert encoder.dtype == torch.bfloat16 and encoder.model.config.vocab_size == 256384
    t = encoder.model.config
    assert (t.d_model, t.d_ff, t.num_heads, t.d_kv, t.feed_forward_proj) == (4096, 10240, 64, 64, "gated-gelu")
    embeddings, lengths = encoder.encode_with_lengths(["two person are dancing"])
    assert embeddings.shape == (1, 512, 4096)
    n = int(lengths[0])
    assert torch.isfinite(embeddings).all() and embeddings[0, :n].abs().sum(dim=1).gt(0).all()
    assert embeddings[0, n:].abs().sum() == 0


@pytest.mark.slow  # the module's write takes about a minute
def test_profile_points_into_the_folder(written):
    from data_schemas import load_config

    cfg = load_config(written / PROFILE_FILE)
    assert cfg.model.profile == "wan-i2v-14b-720p" and cfg.model.dtype == "bfloat16"
    assert cfg.model.wan_folder == written / WAN_FOLDER
    assert cfg.model.multianimate == written / MULTIANIMATE_FOLDER
    assert cfg.model.wan_folder.is_absolute()
    assert cfg.model.missing_weights() == []
    assert cfg.pose.models == "tiny" and cfg.segment.models == "tiny"


@pytest.mark.slow  # the module's write takes about a minute
def test_released_checkpoint_loads_onto_the_real_dit(written):
    from diffusers import WanTransformer3DModel

    from model.checkpoint import load_released
    from model.dit import MultiAnimateDiT

    transformer = WanTransformer3DModel.from_pretrained(
        written / WAN_FOLDER / "transformer", torch_dtype=torch.bfloat16, local_files_only=True
    )
    dit = MultiAnimateDiT(transformer, label_pool=8)
    report = load_released(dit, written / MULTIANIMATE_FOLDER)
    assert report.lora_rank == 128 and report.skipped_base == 0
    assert report.widened == {"identifier_adapter.0.weight": (4, 8)}
    assert report.placed == NUM_LAYERS * 20 + 14 + 14 + 12  # 10 LoRA pairs a block; the three encoders
    with safe_open(str(written / MULTIANIMATE_FOLDER / "model-00001-of-00008.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 - safe_open is not iterable
    # the adapter changes what a layer computes (B is not PEFT's zero init)
    layer = dit.transformer.blocks[0].ffn.net[2]
    x = torch.randn(3, 13824, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        delta = (layer(x) - layer.base_layer(x)).float()
    assert delta.abs().mean() > 1e-3


@pytest.mark.slow  # the module's write takes about a minute
def test_components_build_from_the_profile(written):
    """The lead's real path: load_real + the release's checkpoint, from the profile alone."""
    from data_schemas import load_config
    from model.components import build_components

    comps = build_components(load_config(written / PROFILE_FILE).model)
    assert comps.loaded is not None and comps.loaded.lora_rank == 128
    assert comps.dit.label_pool == 8 and comps.dit.transformer.dtype == torch.bfloat16


@pytest.mark.slow  # the module's write takes about a minute
def test_rerun_is_a_no_op_and_other_contents_are_refused(written, tmp_path):
    marker = (written / MARKER_FILE).stat().st_mtime_ns
    done = run_cli("--random-real-architecture", str(written), "--num-layers", str(NUM_LAYERS))
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stdout and (written / MARKER_FILE).stat().st_mtime_ns == marker
    done = run_cli("--random-real-architecture", str(written), "--num-layers", "3")
    assert done.returncode != 0 and "num_layers 2 (wanted 3)" in done.stderr
    (tmp_path / "keep.txt").write_text("mine")
    done = run_cli("--random-real-architecture", str(tmp_path))
    assert done.returncode != 0 and "not empty" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_released_tensors_are_seeded():
    a, b, c = released_tensors(1, seed=0), released_tensors(1, seed=0), released_tensors(1, seed=1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["label_embedding.0.weight"], c["label_embedding.0.weight"])
    assert a["label_embedding.0.weight"].shape == (16, 4, 3, 3, 3)
    assert a["pipe.dit.blocks.0.ffn.0.lora_B.default.weight"].shape == (13824, 128)
    assert all(a[k].abs().sum() > 0 for k in a if ".lora_B." in k)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import model.real_architecture as ra

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ra, "write_vae", fail)
    monkeypatch.setattr(ra, "write_transformer", lambda *args: None)
    monkeypatch.setattr(ra, "write_text_encoder", lambda *args: None)
    with pytest.raises(OSError, match="disk full"):
        ra.write_random_real_architecture(tmp_path / "w")
    assert list(tmp_path.iterdir()) == []
