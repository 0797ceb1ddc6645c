"""The generation pipeline on the tiny profile: schedule, guidance, sizes, long-video
windows, step caching, the written outputs, and the memory options: LoRA merging, a bf16 base
beside float32 LoRA and encoders, VAE tiling, the execution device and offloading (its
hooks run on the CPU here; tests marked ``gpu`` move the networks for real)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from pathlib import Path

import numpy as np
import pytest
import torch

import model.pipeline as pipeline_module
from data_schemas.model import ModelConfig
from model.components import build_components
from model.conditions import labels_from_masks
from model.pipeline import (
    Conditions,
    MultiAnimatePipeline,
    SamplingConfig,
    latent_windows,
    lora_layers,
    networks,
    sampling_sigmas,
    time_denoiser_step,
    write_outputs,
)
from tests.helpers.models import randomise_encoder_outputs, randomise_lora

QUIET = {"progress": False}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def conditions(T: int, H: int, W: int, persons: int, seed: int = 0) -> Conditions:
    rng = np.random.default_rng(seed)
    masks = np.zeros((persons, T, H, W), dtype=bool)
    for k in range(persons):  # vertical stripes that drift right, one per person
        x0 = (k * W) // persons
        for t in range(T):
            masks[k, t, :, (x0 + t) % W : min(W, (x0 + t) % W + W // (2 * persons) + 1)] = True
    g = torch.Generator().manual_seed(seed)
    return Conditions(
        ref_image=rng.integers(0, 256, (H + 20, W + 30, 3), dtype=np.uint8),
        pose=rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
        ref_pose=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        labels=labels_from_masks(masks).numpy(),
        prompt_embeds=torch.randn(512, 32, generator=g),
        negative_embeds=torch.randn(512, 32, generator=g),
    )


@pytest.fixture(scope="module")
def pipe() -> MultiAnimatePipeline:
    comps = build_components(ModelConfig())
    randomise_encoder_outputs(comps.dit)  # fresh encoders add nothing; these tests need them to
    return MultiAnimatePipeline(comps)


def test_schedule_is_the_releases():
    steps, shift = 7, 5.0
    s = np.linspace(1, 0, steps + 1)[:-1]
    want = np.append(shift * s / (1 + (shift - 1) * s), 0.0)
    np.testing.assert_allclose(sampling_sigmas(steps, shift).numpy(), want, rtol=1e-6, atol=1e-7)


def test_latent_windows_follow_the_spec():
    w = latent_windows(40, 21, 4)  # starts 0, 17, 34 -> the last becomes the final 21
    assert [x[0] for x in w] == [0, 17, 19] and all(len(x) == 21 for x in w) and w[-1][-1] == 39
    assert latent_windows(21, 21, 4) == [list(range(21))]
    for n in range(22, 90):
        ws = latent_windows(n, 21, 4)
        assert sorted(set(functools.reduce(operator.iadd, ws, []))) == list(range(n))  # every latent frame is covered
        assert all(b[0] <= a[-1] - 1 for a, b in itertools.pairwise(ws))  # consecutive windows overlap by >= 2


@pytest.mark.parametrize("persons", [1, 2, 3, 7])
def test_video_has_the_requested_frames_and_size(pipe, persons):
    out = pipe(conditions(9, 48, 80, persons), SamplingConfig(steps=2, guidance_scale=1.5, **QUIET))
    assert out.frames.shape == (9, 48, 80, 3) and out.frames.dtype == np.uint8
    assert out.latents.shape == (1, 16, 3, 6, 10)


def test_same_seed_same_video_other_seed_other_video(pipe):
    cond = conditions(5, 32, 32, 2)
    a = pipe(cond, SamplingConfig(steps=2, seed=3, **QUIET)).latents
    b = pipe(cond, SamplingConfig(steps=2, seed=3, **QUIET)).latents
    c = pipe(cond, SamplingConfig(steps=2, seed=4, **QUIET)).latents
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_passes_differ_exactly_as_the_spec_says(pipe):
    """Conditional pass: prompt + pose/identity tokens; unconditional: negative prompt, no
    tokens; both: the same latents, the same y with the reference pose, the same CLIP tokens."""
    dit = pipe.c.dit
    calls: list[dict] = []

    def record(module, args, kwargs):
        x, timestep, text, image = args[:4]
        calls.append(
            {
                "x": x.clone(),
                "t": timestep.clone(),
                "text": text.clone(),
                "image": image.clone(),
                "tokens": dit._pending,
            }
        )

    outputs: list[torch.Tensor] = []
    h1 = dit.transformer.register_forward_pre_hook(record, with_kwargs=True)
    h2 = dit.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    cond = conditions(5, 32, 48, 2)
    try:
        pipe(cond, SamplingConfig(steps=3, guidance_scale=2.5, **QUIET))
    finally:
        h1.remove()
        h2.remove()
    assert len(calls) == 6  # two passes per step
    for step in range(3):
        c, u = calls[2 * step], calls[2 * step + 1]
        assert torch.equal(c["x"], u["x"]) and torch.equal(c["t"], u["t"]) and torch.equal(c["image"], u["image"])
        assert torch.equal(c["text"][0], cond.prompt_embeds) and torch.equal(u["text"][0], cond.negative_embeds)
        assert c["tokens"] is not None and u["tokens"] is None
        # y (channels 16..35) carries the reference-pose features in both passes
        assert not torch.equal(c["x"][:, 16:], pipe.encode_reference(cond.ref_image, 5, 32, 48)[1])
    # the Euler step used exactly uncond + g * (cond - uncond)
    sig = sampling_sigmas(3, 5.0)
    v0 = outputs[1] + 2.5 * (outputs[0] - outputs[1])
    torch.testing.assert_close(calls[2]["x"][:, :16], calls[0]["x"][:, :16] + float(sig[1] - sig[0]) * v0)

    calls.clear()
    h1 = dit.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(cond, SamplingConfig(steps=3, guidance_scale=1.0, **QUIET))
    finally:
        h1.remove()
    assert len(calls) == 3 and all(c["tokens"] is not None for c in calls)


def test_long_video_windows_fuse_without_a_seam():
    """With a denoiser that treats every frame alike, windows agree on their overlaps: the
    fused result must equal one pass over the whole video (frames 0-1 start from window 0's
    private noise), i.e. no trace of the window boundaries."""
    cfg = ModelConfig(window_latents=5, window_overlap=3)
    pipe = MultiAnimatePipeline(build_components(cfg))
    per_frame_calls: list[int] = []

    class ElementwisePipe(MultiAnimatePipeline):
        def predict(self, x, *args, **kwargs):
            per_frame_calls.append(x.shape[2])
            return 0.7 * x - 0.2 * torch.tanh(x)  # any per-element field

    long = ElementwisePipe(pipe.c)
    T = 4 * 11 + 1  # 12 latent frames -> windows [0..4], [2..6], [4..8], [6..10], [7..11]
    cond = conditions(T, 32, 32, 2)
    steps, seed = 4, 11
    out = long(cond, SamplingConfig(steps=steps, seed=seed, guidance_scale=1.0, **QUIET))
    assert [w[0] for w in out.windows] == [0, 2, 4, 6, 7] and set(per_frame_calls) == {5}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 16, 12, 4, 4), generator=g)
    x[:, :, :2] = torch.randn((1, 16, 2, 4, 4), generator=g)  # window 0's private start
    sig = sampling_sigmas(steps, 5.0)
    for i in range(steps):
        x = x + float(sig[i + 1] - sig[i]) * (0.7 * x - 0.2 * torch.tanh(x))
    torch.testing.assert_close(out.latents, x, rtol=1e-5, atol=1e-6)
    assert out.frames.shape == (T, 32, 32, 3)

    # and with the real (tiny) DiT the long video runs, window by window
    real = pipe(cond, SamplingConfig(steps=2, guidance_scale=1.5, **QUIET))
    assert real.frames.shape == (T, 32, 32, 3) and len(real.windows) == 5


def test_step_cache_skips_the_block_stack(pipe):
    block_calls = []
    hook = pipe.c.dit.transformer.blocks[-1].ffn.register_forward_hook(lambda *a: block_calls.append(1))
    cond = conditions(5, 32, 32, 2)
    try:
        plain = pipe(cond, SamplingConfig(steps=6, guidance_scale=1.0, **QUIET))
        n_plain = len(block_calls)
        block_calls.clear()
        cached = pipe(
            cond,
            SamplingConfig(steps=6, guidance_scale=1.0, step_cache="first-block", step_cache_threshold=1e9, **QUIET),
        )
        n_cached = len(block_calls)
        block_calls.clear()
        again = pipe(cond, SamplingConfig(steps=6, guidance_scale=1.0, **QUIET))  # the cache is off again
    finally:
        hook.remove()
    assert n_plain == 6 and n_cached == 1 and len(block_calls) == 6
    assert torch.equal(plain.latents, again.latents) and not torch.equal(plain.latents, cached.latents)


def test_bad_conditions_fail_clearly(pipe):
    cond = conditions(8, 32, 32, 2)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        pipe(cond, SamplingConfig(steps=1, **QUIET))
    cond = conditions(5, 40, 32, 2)
    with pytest.raises(ValueError, match="divisible by 16"):
        pipe(cond, SamplingConfig(steps=1, **QUIET))
    cond = conditions(5, 32, 32, 2)
    cond.prompt_embeds = cond.prompt_embeds[:77]
    with pytest.raises(ValueError, match="exactly 512"):
        pipe(cond, SamplingConfig(steps=1, **QUIET))
    cond = conditions(5, 32, 32, 2)
    cond.negative_embeds = None
    with pytest.raises(ValueError, match="negative_embeds"):
        pipe(cond, SamplingConfig(steps=1, guidance_scale=2.0, **QUIET))
    with pytest.raises(ValueError, match="at most 3"):
        MultiAnimatePipeline(build_components(ModelConfig(label_pool=4)))(
            conditions(5, 32, 32, 5), SamplingConfig(steps=1, **QUIET)
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a GPU"):
            pipe(conditions(5, 32, 32, 1), SamplingConfig(steps=1, offload="group", **QUIET))


def test_outputs_are_written_and_decode(pipe, tmp_path):
    # imported here, after cv2 (model.pipeline): decord loaded first breaks cv2's PNG codec
    # ("libpng error: bad parameters to zlib") for every later test of the session
    import decord

    cond = conditions(9, 32, 64, 2)  # (decord misreads some tiny widths such as 48)
    out = pipe(cond, SamplingConfig(steps=1, **QUIET))
    paths = write_outputs(out.frames, cond, tmp_path / "job", fps=15)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["preview.mp4", "preview.png", "video.mp4"]
    video = decord.VideoReader(str(paths["video"]))
    preview = decord.VideoReader(str(paths["preview"]))
    assert len(video) == len(preview) == 9
    assert video[0].shape == (32, 64, 3) and preview[0].shape == (32, 192, 3)


# ---- memory options --------------------------------------------------------------------


def lora_pipeline(device: str | None = None) -> MultiAnimatePipeline:
    """The tiny profile with encoders and a LoRA that change the output."""
    comps = build_components(ModelConfig())
    randomise_encoder_outputs(comps.dit)
    randomise_lora(comps.dit)
    return MultiAnimatePipeline(comps, device=device)


@pytest.fixture(scope="module")
def lora_pipe() -> MultiAnimatePipeline:
    return lora_pipeline()


def hooks_left(modules) -> list[str]:
    """Names of modules that still carry an accelerate or diffusers hook, or a replaced forward."""
    left = []
    for module in modules:
        for name, m in module.named_modules():
            registry = getattr(m, "_diffusers_hook", None)
            forward = m.__dict__.get("forward")
            if (
                hasattr(m, "_hf_hook")
                or hasattr(m, "_old_forward")
                or (registry is not None and registry.hooks)
                or (forward is not None and getattr(forward, "__func__", None) is not type(m).forward)
            ):
                left.append(f"{type(module).__name__}.{name}")
    return left


def test_merged_lora_samples_the_same_video_and_leaves_the_weights(lora_pipe):
    dit = lora_pipe.c.dit
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    lora_calls = []
    layer = lora_layers(dit.transformer)[0]
    hook = layer.lora_A["default"].register_forward_hook(lambda *a: lora_calls.append(1))
    cond = conditions(5, 32, 48, 2)
    try:
        merged = lora_pipe(cond, SamplingConfig(steps=3, **QUIET))
        merged_calls = len(lora_calls)
        unmerged = lora_pipe(cond, SamplingConfig(steps=3, merge_lora=False, **QUIET))
    finally:
        hook.remove()
    assert merged_calls == 0 and len(lora_calls) == 6  # merged: no LoRA matmul; else one per pass
    torch.testing.assert_close(merged.latents, unmerged.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(merged.frames.astype(int) - unmerged.frames.astype(int)).max() <= 1
    assert not any(layer.merged for layer in lora_layers(dit.transformer))
    after = dit.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():  # fp32: W + BA - BA is W up to rounding
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6, msg=name)


def test_the_device_is_the_execution_device_not_a_parameters(pipe, monkeypatch):
    weights = pipe.c.dit.transformer.patch_embedding.weight.device
    assert pipe.device == weights == pipe.execution_device("none")
    # a given device wins (nothing is allocated until a call)
    assert MultiAnimatePipeline(pipe.c, device="cuda:1").device == torch.device("cuda", 1)
    # with offload the weights stay on the CPU, the work happens on the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pipe.execution_device("group") == torch.device("cuda", 0) != weights
    assert pipe.execution_device("none") == weights


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_hooks_cover_every_network_and_are_removed(lora_pipe, mode, monkeypatch):
    """The hooks' plumbing, with the CPU as the "GPU" (the device checks are bypassed):
    every network, the three condition encoders included, is hooked during the call; the
    video is the unhooked one's; no hook is left."""
    monkeypatch.setattr(pipeline_module, "_check_offload", lambda *a: None)
    pipe = MultiAnimatePipeline(lora_pipe.c, device="cpu")
    cond = conditions(5, 32, 48, 2)
    plain = pipe(cond, SamplingConfig(steps=2, **QUIET))
    nets = networks(pipe.c)
    hooked: dict[str, bool] = {}

    def record(*args):
        for name, module in nets.items():
            hooked[name] = bool(hooks_left([module]))

    probe = pipe.c.dit.transformer.register_forward_pre_hook(record)
    try:
        out = pipe(cond, SamplingConfig(steps=2, offload=mode, **QUIET))
    finally:
        probe.remove()
    assert hooked == dict.fromkeys(nets, True)
    assert hooks_left(nets.values()) == []
    torch.testing.assert_close(out.latents, plain.latents, rtol=1e-5, atol=1e-5)


def test_vae_tiling_is_on_for_the_call_only_and_decodes_alike(pipe, monkeypatch):
    vae = pipe.c.vae
    tiled: list[int] = []
    untiled_decode = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: tiled.append(1) or untiled_decode(*a, **k))
    cond = conditions(5, 32, 272, 2)  # wider than the default 256-pixel tile
    plain = pipe(cond, SamplingConfig(steps=1, **QUIET))  # tiny profile: tiling off by default
    assert not tiled
    tiles = pipe(cond, SamplingConfig(steps=1, vae_tiling=True, **QUIET))
    assert len(tiled) == 1 and not vae.use_tiling
    torch.testing.assert_close(tiles.latents, plain.latents)
    # the random tiny decoder sees far across a tile border; the blend hides most of it
    assert np.abs(tiles.frames.astype(int) - plain.frames.astype(int)).mean() < 1.5

    real = dataclasses.replace(pipe.c, config=ModelConfig(profile="wan-i2v-14b-720p", wan_folder=Path("/nowhere")))
    MultiAnimatePipeline(real)(cond, SamplingConfig(steps=1, **QUIET))  # the real profile tiles by default
    assert len(tiled) == 2 and not vae.use_tiling


@pytest.mark.parametrize("keep_fp32", [False, True], ids=["all-bf16-base", "diffusers-fp32-modules"])
def test_a_bf16_base_with_float32_lora_and_encoders_samples(keep_fp32):
    """The real profile's precision on the tiny one: the frozen base bf16 (optionally with
    diffusers' float32 modules), LoRA and the condition encoders float32."""
    reference = lora_pipeline()
    pipe = lora_pipeline()
    tr = pipe.c.dit.transformer
    fp32_modules = tr._keep_in_fp32_modules if keep_fp32 else []
    for name, p in tr.named_parameters():
        if ".lora_" not in name and not any(m in name for m in fp32_modules):
            p.data = p.data.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.c.dit.pose_guider[0].weight.dtype == torch.float32
    seen: dict[str, torch.dtype] = {}

    def input_dtype(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, args[0].dtype)

        return hook

    hooks = [
        pipe.c.dit.pose_guider[0].register_forward_pre_hook(input_dtype("pose_guider")),
        pipe.c.dit.ref_pose_guider[0].register_forward_pre_hook(input_dtype("ref_pose_guider")),
        tr.patch_embedding.register_forward_pre_hook(input_dtype("dit")),
    ]
    cond = conditions(5, 32, 48, 2)
    want = reference(cond, SamplingConfig(steps=3, **QUIET)).latents
    try:
        with pytest.warns(UserWarning, match="rounds the base weights"):
            merged = pipe(cond, SamplingConfig(steps=3, **QUIET))
        unmerged = pipe(cond, SamplingConfig(steps=3, merge_lora=False, **QUIET))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"ref_pose_guider": torch.float32, "pose_guider": torch.float32, "dit": torch.bfloat16}
    for out in (merged, unmerged):
        assert out.latents.dtype == torch.float32 and out.frames.shape == (5, 32, 48, 3)
        assert (out.latents - want).abs().max() < 0.1 * want.abs().max()  # bf16 rounding, not another video


def test_denoiser_step_timing_leaves_the_lora_as_it_was(lora_pipe):
    kwargs = dict(height=32, width=48, num_frames=5, repeats=2, warmup=1)
    merged, unmerged = time_denoiser_step(lora_pipe, True, **kwargs), time_denoiser_step(lora_pipe, False, **kwargs)
    assert merged > 0 and unmerged > 0
    assert not any(layer.merged for layer in lora_layers(lora_pipe.c.dit.transformer))


# ---- on a GPU ----------------------------------------------------------------------------


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_on_the_gpu_gives_the_same_video_and_leaves_no_hooks(mode):
    pipe = lora_pipeline(device="cuda")
    cond = conditions(9, 32, 48, 2)
    plain = pipe(cond, SamplingConfig(steps=2, **QUIET))  # moves every network to the GPU
    assert pipe.c.dit.transformer.patch_embedding.weight.is_cuda and plain.latents.is_cuda
    nets = networks(pipe.c)
    ran_on: dict[str, torch.device] = {}
    watched = {**nets, "vae.encoder": pipe.c.vae.encoder, "vae.decoder": pipe.c.vae.decoder}
    watched.pop("vae")  # its encode/decode, not its forward, run
    probes = [
        m.register_forward_hook(lambda mod, args, out, name=name: ran_on.setdefault(name, _first_tensor(out).device))
        for name, m in watched.items()
    ]
    try:
        out = pipe(cond, SamplingConfig(steps=2, offload=mode, **QUIET))
    finally:
        for probe in probes:
            probe.remove()
    assert set(ran_on) == set(watched) and all(d.type == "cuda" for d in ran_on.values()), ran_on
    assert hooks_left(nets.values()) == []
    assert all(p.device.type == "cpu" for m in nets.values() for p in m.parameters())  # offloaded: home is the CPU
    torch.testing.assert_close(out.latents, plain.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(out.frames.astype(int) - plain.frames.astype(int)).max() <= 1
    again = pipe(cond, SamplingConfig(steps=2, **QUIET))  # and back to no offload
    torch.testing.assert_close(again.latents, plain.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_a_bf16_base_on_the_gpu_with_group_offload():
    pipe = lora_pipeline(device="cuda")
    for name, p in pipe.c.dit.transformer.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    cond = conditions(9, 32, 48, 2)
    plain = pipe(cond, SamplingConfig(steps=2, merge_lora=False, **QUIET))
    out = pipe(cond, SamplingConfig(steps=2, merge_lora=False, offload="group", **QUIET))
    torch.testing.assert_close(out.latents, plain.latents, rtol=1e-3, atol=1e-3)
    assert hooks_left(networks(pipe.c).values()) == []
