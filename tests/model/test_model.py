"""The model: condition encoders, the Identifier Assigner, injection into diffusers' Wan
transformer, LoRA, and checkpoints (ours and the released layout). Tiny profile, CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_schemas.model import TINY_DIT
from model.checkpoint import (
    CheckpointError,
    load_adapter,
    load_multianimate,
    load_released,
    save_adapter,
    trained_state,
)
from model.conditions import (
    IdentifierAdapter,
    PoseGuider,
    RefPoseGuider,
    inference_channels,
    labels_from_masks,
    stack_channels,
    training_channels,
    widen_label_weight,
)
from model.dit import MultiAnimateDiT, build_transformer
from tests.helpers.models import randomise_encoder_outputs, randomise_lora, released_tensors, write_released

D = TINY_DIT.inner_dim


def make_dit(pool: int = 8, seed: int = 0) -> MultiAnimateDiT:
    """A tiny DiT whose encoders' output convs are random, as trained ones are (fresh ones are
    zero: model/conditions.py)."""
    torch.manual_seed(seed)
    dit = MultiAnimateDiT(build_transformer(TINY_DIT), pool).eval()
    randomise_encoder_outputs(dit)
    return dit


def inputs(T: int, H: int, W: int, persons: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t_lat = (T - 1) // 4 + 1
    return {
        "pose": torch.randint(0, 256, (1, 3, T, H, W), generator=g, dtype=torch.uint8),
        "labels": torch.randint(0, persons + 1, (1, T, H, W), generator=g),
        "latents": torch.randn(1, 16, t_lat, H // 8, W // 8, generator=g),
        "y": torch.randn(1, 20, t_lat, H // 8, W // 8, generator=g),
        "text": torch.randn(1, 512, TINY_DIT.text_dim, generator=g),
        "image": torch.randn(1, 5, TINY_DIT.image_dim, generator=g),
        "timestep": torch.tensor([637.0]),
    }


# ---- encoders ------------------------------------------------------------------------


@pytest.mark.parametrize("T,H,W", [(1, 16, 16), (5, 32, 48), (17, 64, 64), (9, 48, 80)])
@pytest.mark.parametrize("persons", [1, 2, 3, 7])
def test_condition_tokens_match_the_dit_token_grid(T, H, W, persons):
    dit = make_dit()
    x = inputs(T, H, W, persons)
    channels = stack_channels([training_channels(persons, 8, random.Random(persons))])
    with torch.no_grad():
        tokens = dit.condition_tokens(x["pose"], x["labels"], channels)
        patches = dit.transformer.patch_embedding(torch.cat([x["latents"], x["y"]], 1))
        ref = dit.ref_pose_guider(x["pose"][:, :, 0])
    assert tokens.shape == patches.shape == (1, D, (T - 1) // 4 + 1, H // 16, W // 16)
    assert ref.shape == (1, 20, 1, H // 8, W // 8)


def test_full_size_encoders_have_the_released_shapes():
    """Spec D.1 at the real width: every layer's weight shape and the 480x832x81 walk."""
    pose, label, ref = PoseGuider(5120), IdentifierAdapter(8, 5120), RefPoseGuider(20)
    conv3 = [(16, 3, 3, 3, 3)] + [(16, 16, 3, 3, 3)] * 5 + [(5120, 16, 1, 2, 2)]
    assert [tuple(pose[i].weight.shape) for i in range(0, 13, 2)] == conv3
    assert [tuple(label[i].weight.shape) for i in range(0, 13, 2)] == [(16, 8, 3, 3, 3)] + conv3[1:]
    assert [pose[i].stride for i in range(0, 13, 2)] == [(1, 1, 1)] * 3 + [(1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [tuple(ref[i].weight.shape) for i in range(0, 11, 2)] == [(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 4 + [
        (20, 16, 3, 3)
    ]
    assert [ref[i].stride for i in range(0, 11, 2)] == [(1, 1)] * 3 + [(2, 2)] * 3
    assert all(isinstance(m, torch.nn.SiLU) for m in list(pose)[1::2])
    # the shape walk at the real size, through the convs' own arithmetic (no allocation)
    t, h, w = 84, 480, 832
    for i in range(0, 13, 2):
        conv = pose[i]
        t, h, w = (
            (n + 2 * p - k) // s + 1 for n, p, k, s in zip((t, h, w), conv.padding, conv.kernel_size, conv.stride)
        )
    assert (t, h, w) == (21, 30, 52)


def test_identifier_adapter_equals_the_pool_wide_one_hot():
    """Selecting weight channels == scattering the one-hot into a pool-wide one-hot."""
    torch.manual_seed(3)
    adapter = IdentifierAdapter(8, 24).double()
    labels = torch.randint(0, 4, (2, 5, 32, 32))
    channels = stack_channels([[5, 0, 7, 2], [1, 6, 3, 4]])
    out = adapter(labels, channels)
    expected = []
    for b in range(2):
        pool_label = channels[b][torch.cat([labels[b, :1]] * 3 + [labels[b]])]  # first frame repeated 3x
        onehot = F.one_hot(pool_label, 8).permute(3, 0, 1, 2)[None].double()
        x = onehot
        for layer in adapter:
            x = layer(x)
        expected.append(x)
    torch.testing.assert_close(out, torch.cat(expected), rtol=0, atol=1e-12)


def test_identifier_assigner():
    masks = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 1:3] = True  # overlaps person 0 on row 1: the later person wins
    masks[2, 1, 3, 3] = True
    labels = labels_from_masks(masks)
    assert labels.dtype == torch.uint8
    assert labels[0].tolist() == [[1] * 4, [2] * 4, [2] * 4, [0] * 4]
    assert labels[1, 3].tolist() == [0, 0, 0, 3]
    grey = (masks.to(torch.uint8) * 200).numpy()  # 0..255 masks are thresholded at 127.5
    assert torch.equal(labels_from_masks(grey), labels)

    assert inference_channels(3, 8) == [0, 1, 2, 3]
    rng = random.Random(0)
    draws = [training_channels(2, 8, rng) for _ in range(400)]
    assert all(len(set(d)) == 3 and all(0 <= c < 8 for c in d) for d in draws)
    for slot in range(3):  # every channel serves every role, the background included
        assert {d[slot] for d in draws} == set(range(8))
    for bad in (0, 8):
        with pytest.raises(ValueError, match="supports 1..7"):
            training_channels(bad, 8, rng)


def test_widening_tiles_then_cuts():
    w = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(2, 4, 3, 3, 3)
    assert widen_label_weight(w, 8)[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert widen_label_weight(w, 3)[0, :, 0, 0, 0].tolist() == [0, 1, 2]
    assert widen_label_weight(w, 6)[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 1]


# ---- injection and guidance ----------------------------------------------------------


def hand_built(dit: MultiAnimateDiT, hidden: torch.Tensor, extra: torch.Tensor | None, x: dict) -> torch.Tensor:
    """Wan I2V forward written out from its parts: patch embed (+ extra), blocks, head."""
    tr = dit.transformer
    B, _, T, H, W = hidden.shape
    rope = tr.rope(hidden)
    h = tr.patch_embedding(hidden)
    if extra is not None:
        h = h + extra
    h = h.flatten(2).transpose(1, 2)
    temb, proj, text, image = tr.condition_embedder(x["timestep"], x["text"], x["image"])
    proj = proj.unflatten(1, (6, -1))
    context = torch.cat([image, text], dim=1)
    for block in tr.blocks:
        h = block(h, context, proj, rope)
    shift, scale = (tr.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = tr.proj_out(tr.norm_out(h.float()) * (1 + scale) + shift)
    h = h.reshape(B, T, H // 2, W // 2, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def test_injection_is_exact():
    dit = make_dit()
    x = inputs(9, 32, 48, persons=2)
    channels = stack_channels([[4, 1, 6]])
    with torch.no_grad():
        tokens = dit.condition_tokens(x["pose"], x["labels"], channels)
        ref = dit.ref_pose_guider(x["pose"][:, :, 0])
        got = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"], tokens, ref)
        hidden = torch.cat([x["latents"], x["y"] + ref], dim=1)
        want = hand_built(dit, hidden, tokens, x)
        plain = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"])
        want_plain = hand_built(dit, torch.cat([x["latents"], x["y"]], 1), None, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, want_plain, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().mean() > 1e-3  # the conditions matter
    # and the hook leaves no state behind: a plain call afterwards is plain again
    with torch.no_grad():
        torch.testing.assert_close(dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"]), plain)


def test_gradients_reach_the_encoders_and_lora_only():
    dit = make_dit()
    dit.add_lora(4, 4.0)
    randomise_lora(dit)
    trained = dit.set_trainable()
    x = inputs(5, 32, 32, persons=2)
    tokens = dit.condition_tokens(x["pose"], x["labels"], stack_channels([[0, 3, 5]]))
    ref = dit.ref_pose_guider(x["pose"][:, :, 0])
    dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"], tokens, ref).square().mean().backward()
    names = {n for n, p in dit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names and all(".lora_" in n or not n.startswith("transformer.") for n in names)
    assert {n.split(".")[0] for n in names} == {"transformer", "pose_guider", "identifier_adapter", "ref_pose_guider"}
    # channels outside the drawn assignment get no gradient in the adapter's first layer
    g = dit.identifier_adapter[0].weight.grad
    assert g[:, [0, 3, 5]].abs().sum() > 0 and g[:, [1, 2, 4, 6, 7]].abs().sum() == 0
    assert len(trained) == sum(1 for _ in filter(lambda p: p.requires_grad, dit.parameters()))


def test_merged_lora_equals_unmerged():
    dit = make_dit()
    x = inputs(5, 32, 48, persons=1)
    with torch.no_grad():
        base = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"])
        dit.add_lora(8, 8.0)
        randomise_lora(dit)
        unmerged = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"])
        dit.merge_lora()
        merged = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"])
        dit.unmerge_lora()
        again = dit(x["latents"], x["y"], x["timestep"], x["text"], x["image"])
    assert (unmerged - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-4, atol=1e-5)


# ---- checkpoints ---------------------------------------------------------------------


def test_our_format_round_trip(tmp_path):
    dit = make_dit(seed=0)
    dit.add_lora(4, 8.0)
    randomise_lora(dit)
    save_adapter(dit, tmp_path / "ckpt", lora_rank=4, lora_alpha=8.0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapter.safetensors", "config.json"]
    fresh = make_dit(seed=0)  # same base weights, new encoders, no LoRA yet
    with torch.no_grad():
        for p in fresh.pose_guider.parameters():
            p.add_(1.0)
    report = load_multianimate(fresh, tmp_path / "ckpt")
    assert report.placed == len(trained_state(dit))
    for k, v in trained_state(dit).items():
        assert torch.equal(trained_state(fresh)[k], v), k
    x = inputs(5, 32, 32, persons=2)
    ch = stack_channels([[0, 1, 2]])
    with torch.no_grad():
        a = dit(
            x["latents"], x["y"], x["timestep"], x["text"], x["image"], dit.condition_tokens(x["pose"], x["labels"], ch)
        )
        b = fresh(
            x["latents"],
            x["y"],
            x["timestep"],
            x["text"],
            x["image"],
            fresh.condition_tokens(x["pose"], x["labels"], ch),
        )
    # the weights are equal (above); two model instances' floats are not bit-equal on the CPU
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="label pool 8 but the model has 4"):
        load_adapter(make_dit(pool=4), tmp_path / "ckpt")


@pytest.mark.parametrize("label_channels", [4, 8])
def test_released_layout_loads_every_key(tmp_path, label_channels):
    tensors = released_tensors(TINY_DIT.num_layers, D, TINY_DIT.ffn_dim, rank=4, label_channels=label_channels)
    write_released(tmp_path / "output_dir", tensors)
    dit = make_dit(pool=8)
    report = load_released(dit, tmp_path / "output_dir")
    assert report.lora_rank == 4
    assert report.skipped_base == TINY_DIT.num_layers + 1  # the base_layer weights and the VAE key
    assert report.placed == len(trained_state(dit))  # nothing missing
    state = trained_state(dit)
    assert torch.equal(
        state["transformer.blocks.1.attn2.to_out.0.lora_B.default.weight"],
        tensors["pipe.dit.blocks.1.cross_attn.o.lora_B.default.weight"],
    )
    assert torch.equal(
        state["transformer.blocks.0.ffn.net.0.proj.lora_A.default.weight"],
        tensors["pipe.dit.blocks.0.ffn.0.lora_A.default.weight"],
    )
    assert torch.equal(
        state["transformer.blocks.0.ffn.net.2.lora_B.default.weight"],
        tensors["pipe.dit.blocks.0.ffn.2.lora_B.default.weight"],
    )
    assert torch.equal(state["pose_guider.12.bias"], tensors["dwpose_embedding.12.bias"])
    assert torch.equal(state["ref_pose_guider.10.weight"], tensors["randomref_embedding_pose.10.weight"])
    label0 = tensors["label_embedding.0.weight"]
    assert torch.equal(state["identifier_adapter.0.weight"], label0[:, [i % label_channels for i in range(8)]])
    assert report.widened == ({} if label_channels == 8 else {"identifier_adapter.0.weight": (4, 8)})
    # alpha = rank: merging adds exactly B @ A, as the release merges with scale 1
    q = dit.transformer.blocks[0].attn1.to_q
    assert q.scaling["default"] == 1.0


def test_released_layout_with_wrapper_prefixes(tmp_path):
    tensors = released_tensors(TINY_DIT.num_layers, D, TINY_DIT.ffn_dim, rank=4, label_channels=4)
    write_released(tmp_path / "o", {f"_forward_module.{k}": v for k, v in tensors.items()}, num_shards=3)
    assert load_released(make_dit(pool=4), tmp_path / "o").placed > 0


def test_released_layout_renamed_or_missing_key_fails_naming_it(tmp_path):
    tensors = released_tensors(TINY_DIT.num_layers, D, TINY_DIT.ffn_dim, rank=4, label_channels=4)
    renamed = dict(tensors)
    renamed["pipe.dit.blocks.1.self_attn.qq.lora_A.default.weight"] = renamed.pop(
        "pipe.dit.blocks.1.self_attn.q.lora_A.default.weight"
    )
    write_released(tmp_path / "renamed", renamed)
    with pytest.raises(CheckpointError, match=r"pipe\.dit\.blocks\.1\.self_attn\.qq\.lora_A\.default\.weight"):
        load_released(make_dit(), tmp_path / "renamed")

    missing = dict(tensors)
    del missing["label_embedding.4.bias"]
    write_released(tmp_path / "missing", missing)
    with pytest.raises(CheckpointError, match=r"missing: identifier_adapter\.4\.bias"):
        load_released(make_dit(), tmp_path / "missing")

    write_released(tmp_path / "lost", tensors)
    (tmp_path / "lost" / "model-00003-of-00008.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00008.safetensors"):
        load_released(make_dit(), tmp_path / "lost")


def test_full_size_model_matches_the_released_names_and_shapes():
    """At the real size (on the meta device: no memory): every released key of spec D.4,
    with its derived shape, lands on a parameter of that shape, and nothing is left over."""
    from data_schemas.model import WAN_14B_DIT
    from model.checkpoint import released_name

    with torch.device("meta"):
        dit = MultiAnimateDiT(build_transformer(WAN_14B_DIT), label_pool=8)
        dit.add_lora(128, 128.0)
    ours = {k: tuple(v.shape) for k, v in trained_state(dit).items()}
    released: dict[str, tuple[int, ...]] = {}
    r, d, f = 128, 5120, 13824
    for i in range(40):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                released[f"pipe.dit.blocks.{i}.{attn}.{proj}.lora_A.default.weight"] = (r, d)
                released[f"pipe.dit.blocks.{i}.{attn}.{proj}.lora_B.default.weight"] = (d, r)
        released[f"pipe.dit.blocks.{i}.ffn.0.lora_A.default.weight"] = (r, d)
        released[f"pipe.dit.blocks.{i}.ffn.0.lora_B.default.weight"] = (f, r)
        released[f"pipe.dit.blocks.{i}.ffn.2.lora_A.default.weight"] = (r, f)
        released[f"pipe.dit.blocks.{i}.ffn.2.lora_B.default.weight"] = (d, r)
    for name, cin in (("dwpose_embedding", 3), ("label_embedding", 8)):
        for idx in range(0, 12, 2):
            released[f"{name}.{idx}.weight"] = (16, cin if idx == 0 else 16, 3, 3, 3)
            released[f"{name}.{idx}.bias"] = (16,)
        released[f"{name}.12.weight"], released[f"{name}.12.bias"] = (5120, 16, 1, 2, 2), (5120,)
    for idx in range(0, 12, 2):
        cout = 20 if idx == 10 else 16
        released[f"randomref_embedding_pose.{idx}.weight"] = (cout, 3 if idx == 0 else 16, 3, 3)
        released[f"randomref_embedding_pose.{idx}.bias"] = (cout,)
    mapped = {released_name(k): shape for k, shape in released.items()}
    assert len(mapped) == len(released)  # one-to-one
    assert mapped == ours
    lora_params = sum(np.prod(s) for k, s in ours.items() if ".lora_" in k)
    assert round(lora_params / 1e6) == 613  # spec D.4: ~15.3M per block, ~613M in all


def test_real_profile_without_weights_says_what_is_missing(tmp_path):
    from data_schemas.model import MissingWeightsError, ModelConfig
    from model.components import build_components

    (tmp_path / "wan" / "transformer").mkdir(parents=True)
    (tmp_path / "wan" / "transformer" / "config.json").write_text("{}")
    cfg = ModelConfig(
        profile="wan-i2v-14b-720p", wan_folder=tmp_path / "wan", multianimate=tmp_path / "ma" / "x.ckpt" / "output_dir"
    )
    with pytest.raises(MissingWeightsError) as err:
        build_components(cfg)
    text = str(err.value)
    for name in (
        "transformer/*.safetensors",
        "vae/config.json",
        "image_encoder/config.json",
        "image_processor/preprocessor_config.json",
        "output_dir/*.safetensors",
        f"--local-dir {tmp_path / 'ma'}",
    ):
        assert name in text, name
    assert "transformer/config.json" not in text


def test_tiny_vae_normalisation_is_its_own_measurement():
    """The tiny VAE's latents_mean/std are what measure_latent_statistics finds for its seeded
    weights, so its normalised latents have zero mean and unit variance per channel."""
    from data_schemas.model import ModelConfig
    from model.components import TINY_LATENTS_MEAN, TINY_LATENTS_STD, build_components, measure_latent_statistics
    from preprocess.synthetic import SyntheticSpec, render_clip

    vae = build_components(ModelConfig()).vae
    specs = [
        SyntheticSpec(width=64, height=48, num_frames=9, seed=s, background=("texture", "flat")[s % 2])
        for s in range(8)
    ]
    clips = [render_clip(spec).frames for spec in specs]
    mean, std = measure_latent_statistics(vae, np.stack(clips))
    assert vae.config.latents_mean == list(TINY_LATENTS_MEAN) and vae.config.latents_std == list(TINY_LATENTS_STD)
    np.testing.assert_allclose(mean, TINY_LATENTS_MEAN, atol=2e-4)
    np.testing.assert_allclose(std, TINY_LATENTS_STD, atol=2e-4)


def test_tiny_vae_encoder_is_local():
    """The tiny VAE's encoder (components.smooth_init_encoder) makes each latent cell from its
    own 8x8-pixel block only, as a real VAE's latents are local: a change inside one block
    moves that cell and no other, in every latent frame it reaches."""
    from data_schemas.model import ModelConfig
    from model.components import build_components

    vae = build_components(ModelConfig()).vae
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 9, 48, 64, generator=g) * 2 - 1
    changed = video.clone()
    changed[:, :, 5:, 8:16, 16:24] = torch.rand(1, 3, 4, 8, 8, generator=g) * 2 - 1  # block (1, 2), frames 5-8
    with torch.no_grad():
        diff = (vae.encode(changed).latent_dist.mode() - vae.encode(video).latent_dist.mode()).abs().amax(dim=1)[0]
    moved = (diff > 1e-6).nonzero().tolist()
    assert moved == [[2, 1, 2]], moved  # latent frame 2 holds pixel frames 5-8
