"""Generation: reference image + pose images + label map + prompt -> video (spec C.2, C.3,
D.2, D.6, D.8).

Steps: the reference is resized to H x W (squashed, no crop, as the release does); CLIP
features of it; the I2V condition ``y`` = [4 mask channels | VAE latents of (reference,
then T-1 zero frames)] from diffusers' ``WanImageToVideoPipeline.prepare_latents``; the
reference-pose features added to ``y``; pose + identity tokens; flow-matching Euler
sampling over the shifted schedule with classifier-free guidance whose unconditional pass
drops the pose AND identity tokens (and keeps ``y`` with the reference pose); VAE decode.

Long videos (more latent frames than ``ModelConfig.window_latents``) are sampled in
overlapping windows over latent frames, fused by averaging after every step, each window
keeping its first two latents private (spec D.8). Unlike the release's long pipeline, every
window carries its own slice of the label map as well as of the poses (our extension).

Precision: the DiT's compute dtype is that of its frozen base (``patch_embedding``), never
"the first parameter", which may be a float32 LoRA or encoder weight. The three condition
encoders and the VAE and CLIP run in their own (float32) weights, as the release runs its
pose encoders; their outputs are cast to the compute dtype. The sampler's state (latents,
the guided velocity, the window sums) stays float32 as in diffusers; only the DiT's input
is cast (the release keeps bf16 latents, which rounds every Euler step).

Sampling stops with ``DegenerateOutputError`` at the first step whose latents are not finite
(NaN/inf from diverged weights or an extreme guidance scale): decoding them would clamp to a
plausible-looking constant video. ``on_step`` lets a caller stop a call between steps (the
batch's time limit).

Memory (docs/memory.md): ``SamplingConfig.merge_lora`` folds the LoRA into the base weights
for the call (W += scale B A: no extra matmuls per step; in a bf16 base that rounds, as the
release's own merge does); ``offload`` moves whole networks ("model"), DiT blocks ("group")
or single layers ("sequential") to the execution device only while they run, the three
condition encoders included; ``vae_tiling`` decodes in tiles. Every hook is removed when
the call ends; offloaded networks are then on the CPU.

Legend: T pixel frames (4k+1), t = (T-1)/4 + 1 latent frames, H x W pixels.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from data_schemas.atomic import atomic_path
from data_schemas.embedding import TEXT_LEN
from data_schemas.model import check_wan_frames, check_wan_size
from model.components import Components
from model.conditions import inference_channels, stack_channels

Offload = Literal["none", "model", "group", "sequential"]


class SamplingConfig(BaseModel):
    """How one video is sampled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(50, ge=1, le=1000, description="denoising steps (the release: 50)")
    guidance_scale: float = Field(1.5, ge=1.0, description="classifier-free guidance; 1 = one pass per step")
    seed: int = Field(0, description="seed of the initial noise")
    step_cache: Literal["off", "first-block"] = Field(
        "off", description="reuse the block stack's residual on steps whose first block barely changes"
    )
    step_cache_threshold: float = Field(0.05, gt=0, description="relative change below which a step is reused")
    vae_tiling: bool | None = Field(
        None, description="decode in tiles (less memory at full size); default: on for the real profile, off for tiny"
    )
    offload: Offload = Field(
        "none",
        description="keep networks on the CPU and move them to the GPU only while they run (needs a GPU): whole "
        "networks (model), DiT blocks (group) or single layers (sequential)",
    )
    merge_lora: bool = Field(
        True, description="sample with the LoRA folded into the base weights (no extra matmuls per step); undone after"
    )
    progress: bool = Field(True, description="show a progress bar")


@dataclass
class Conditions:
    """Inputs of one generation, at the output size (H, W divisible by 16; T = 4k + 1)."""

    ref_image: np.ndarray  # uint8 [H0, W0, 3], any size (squashed to H x W)
    pose: np.ndarray  # uint8 [T, H, W, 3] rendered pose images
    ref_pose: np.ndarray  # uint8 [H, W, 3] pose image of the reference
    labels: np.ndarray  # uint8 [T, H, W]: 0 background, k = person k
    prompt_embeds: torch.Tensor  # [512, text_dim]
    negative_embeds: torch.Tensor | None = None  # [512, text_dim]; needed when guidance > 1
    num_persons: int | None = None  # default: the largest label

    def check(self, max_persons: int) -> tuple[int, int, int]:
        T, H, W, C = self.pose.shape
        if C != 3 or self.pose.dtype != np.uint8:
            raise ValueError(f"pose must be uint8 [T, H, W, 3], got {self.pose.dtype} {self.pose.shape}")
        check_wan_frames(T, "pose frames")
        check_wan_size(H, "height")
        check_wan_size(W, "width")
        if self.labels.shape != (T, H, W):
            raise ValueError(f"labels {self.labels.shape} must be [T, H, W] = {(T, H, W)}")
        if self.ref_pose.shape != (H, W, 3):
            raise ValueError(f"ref_pose {self.ref_pose.shape} must be [H, W, 3] = {(H, W, 3)}")
        persons = self.persons()
        if persons > max_persons:
            raise ValueError(f"{persons} persons, but this model's label pool supports at most {max_persons}")
        for name, emb in (("prompt_embeds", self.prompt_embeds), ("negative_embeds", self.negative_embeds)):
            if emb is not None and emb.shape[0] != TEXT_LEN:
                raise ValueError(f"{name} has {emb.shape[0]} tokens; the I2V cross-attention needs exactly {TEXT_LEN}")
        return T, H, W

    def persons(self) -> int:
        return self.num_persons if self.num_persons is not None else max(1, int(self.labels.max()))


class DegenerateOutputError(ValueError):
    """The sampler's latents stopped being finite numbers (NaN or inf: diverged weights, an
    extreme guidance scale): there is no video to write, only a failure to record."""


def check_finite(latents: torch.Tensor, step: int, steps: int, guidance: float) -> None:
    """Raise ``DegenerateOutputError`` when ``latents`` hold a NaN or an inf. Checked after
    every step: once non-finite they stay so, and the remaining steps would be wasted (the
    decoder's clamp would then turn them into a plausible-looking all-black video)."""
    if not bool(torch.isfinite(latents).all()):
        raise DegenerateOutputError(
            f"non-finite latents (NaN or inf) after denoising step {step}/{steps} at guidance scale {guidance:g}: "
            "the model's weights or the guidance diverged; no video was written"
        )


@dataclass
class Generated:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: torch.Tensor  # float32 [1, 16, t, H/8, W/8], before decoding
    timings: dict[str, float] = field(default_factory=dict)
    windows: list[list[int]] = field(default_factory=list)  # latent frames of each window


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The release's schedule: s = linspace(1, 0, N+1) without its last entry, shifted to
    shift*s / (1 + (shift-1)*s), then a final 0 (spec C.3); via diffusers' scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return scheduler.sigmas.to(torch.float64)


def latent_windows(num_latents: int, size: int, overlap: int) -> list[list[int]]:
    """Windows over latent frames: starts 0, size-overlap, ... while start < n - overlap; the
    last window is replaced by the final ``size`` latents (spec D.8). One window when the
    video fits."""
    if num_latents <= size:
        return [list(range(num_latents))]
    starts = list(range(0, num_latents - overlap, size - overlap))
    windows = [list(range(s, s + size)) for s in starts]
    windows[-1] = list(range(num_latents - size, num_latents))
    return windows


# ---- memory: the networks, LoRA merging, offloading ------------------------------------


def networks(components: Components) -> dict[str, nn.Module]:
    """Every network a generation runs, in the order of first use (the chain of "model"
    offload, as diffusers' ``model_cpu_offload_seq``; the VAE, used first to encode the
    reference and last to decode, sits at the end, as in diffusers' Wan pipelines)."""
    dit = components.dit
    return {
        "image_encoder": components.image_encoder,
        "ref_pose_guider": dit.ref_pose_guider,
        "pose_guider": dit.pose_guider,
        "identifier_adapter": dit.identifier_adapter,
        "transformer": dit.transformer,
        "vae": components.vae,
    }


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# Room for activations at 480x832x81 next to the weights, computed in docs/memory.md: the
# condition encoders' full-resolution float32 maps (~7.5 GB) outweigh a DiT pass (~3.5 GB);
# plus the CUDA context, library workspaces and the allocator's fragmentation.
ACTIVATION_HEADROOM_BYTES = 10 * 2**30


def choose_offload(components: Components, gpu_bytes: int) -> tuple[Offload, str]:
    """The least offloading that fits a GPU of ``gpu_bytes``: "none" when every network fits
    with the activation headroom, else "model" when the DiT and the VAE do (diffusers' chain
    keeps the VAE resident while sampling), else "group". Returns the mode and why."""
    sizes = {name: module_bytes(m) for name, m in networks(components).items()}
    need = {
        "none": sum(sizes.values()) + ACTIVATION_HEADROOM_BYTES,
        "model": sizes["transformer"] + sizes["vae"] + ACTIVATION_HEADROOM_BYTES,
    }
    gib = 2**30
    for mode in ("none", "model"):
        if gpu_bytes >= need[mode]:
            break
    else:
        mode = "group"
    why = (
        f"GPU {gpu_bytes / gib:.1f} GiB; every network resident needs ~{need['none'] / gib:.1f} GiB, "
        f"the DiT + VAE alone ~{need['model'] / gib:.1f} GiB (weights + {ACTIVATION_HEADROOM_BYTES / gib:.0f} GiB "
        f"activations): offload={mode}"
    )
    return mode, why


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_merged(dit: nn.Module, merged: bool) -> Iterator[None]:
    """Within the block, the DiT's LoRA is folded into the base weights (``merged``) or kept
    as separate matmuls; every layer is put back as it was after. On a base that is not
    float32, merge + unmerge rounds the base weights (about one ulp each time): a pipeline
    that generates many videos merges once (model/generate.py: load_pipeline) instead."""
    toggled = [layer for layer in lora_layers(dit.transformer) if layer.merged != merged]
    if not toggled:
        yield
        return
    base_dtype = dit.transformer.patch_embedding.weight.dtype
    if base_dtype != torch.float32:
        warnings.warn(
            f"{'merging' if merged else 'unmerging'} the LoRA of a {base_dtype} base for one call: undoing it after "
            "rounds the base weights; merge once (dit.merge_lora()) for repeated generation",
            stacklevel=3,
        )
    _set_merged(toggled, merged)
    try:
        yield
    finally:
        _set_merged(toggled, not merged)


def _set_merged(layers: list[nn.Module], merged: bool) -> None:
    for layer in layers:
        if merged:
            layer.merge()
        else:
            layer.unmerge()


def _set_tiling(vae: nn.Module, on: bool) -> None:
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def _check_offload(offload: Offload, device: torch.device) -> None:
    if offload != "none" and device.type != "cuda":
        raise ValueError(
            f"offload={offload!r} moves networks between CPU and GPU: it needs a GPU (execution device {device})"
        )


def _remove_group_offloading(module: nn.Module) -> None:
    # diffusers has no public "disable group offload"; this is what its own
    # _maybe_remove_and_reapply_group_offloading does before re-applying
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


@contextlib.contextmanager
def offloaded(components: Components, offload: Offload, device: torch.device) -> Iterator[None]:
    """Offload hooks on every network (``networks``), removed on exit, when the networks are
    left on the CPU. "model": diffusers' ``enable_model_cpu_offload`` (accelerate's
    ``cpu_offload_with_hook`` chained in the order of use: a network moves to ``device`` when
    it runs and pushes the previous one back). "group": diffusers' block-level group
    offloading, one DiT (or VAE) block at a time; "sequential": leaf-level group offloading
    (every Linear/Conv alone: diffusers' alternative to ``enable_sequential_cpu_offload``,
    whose weights stay real CPU tensors rather than meta ones, so a LoRA can still be merged).
    The condition encoders (3 MB together) move whole in every mode: the Identifier Adapter
    reads its first conv's weight outside that conv's forward, which leaf hooks would miss."""
    nets = networks(components)
    cpu = torch.device("cpu")
    if offload == "model":
        from accelerate import cpu_offload_with_hook
        from accelerate.hooks import remove_hook_from_module

        hooks = []
        try:
            for module in nets.values():
                _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hooks[-1] if hooks else None)
                hooks.append(hook)
            yield
        finally:
            for hook in hooks:
                hook.offload()
                remove_hook_from_module(hook.model, recurse=True)
    else:
        from diffusers.hooks import apply_group_offloading

        big = ("transformer", "vae", "image_encoder")
        try:
            for name, module in nets.items():
                if offload == "sequential" and name in big:
                    apply_group_offloading(module, device, cpu, offload_type="leaf_level")
                else:  # a ModuleList's items one per group; any other child (an encoder's convs) with its parent
                    apply_group_offloading(module, device, cpu, offload_type="block_level", num_blocks_per_group=1)
            yield
        finally:
            for module in nets.values():
                _remove_group_offloading(module)
                module.to(cpu)  # groups a failed forward left on the GPU
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MultiAnimatePipeline:
    """Components + diffusers' I2V helpers (prompt, image and latent preparation).

    ``device`` is the execution device (diffusers' ``_execution_device``): where inputs,
    latents and activations live. Default: where the DiT's base weights are; with offload,
    the current CUDA device. With ``offload="none"`` a call moves the networks to it (a no-op
    when they are there)."""

    def __init__(self, components: Components, device: torch.device | str | None = None):
        self.c = components
        self._device = None if device is None else torch.device(device)
        self._active: torch.device | None = None  # the execution device of the call in progress
        self.wan = WanImageToVideoPipeline(
            tokenizer=None,
            text_encoder=None,
            image_encoder=components.image_encoder,
            image_processor=components.image_processor,
            transformer=components.dit.transformer,
            vae=components.vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=components.config.shift),
        )

    @property
    def device(self) -> torch.device:
        if self._active is not None:
            return self._active
        return self.execution_device("none")

    def execution_device(self, offload: Offload) -> torch.device:
        if self._device is not None:
            if self._device.type == "cuda" and self._device.index is None and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())  # as hooks and tensors report it
            return self._device
        if offload != "none" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return self.c.dit.transformer.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The DiT's compute dtype: its frozen base's (LoRA and encoders may be float32)."""
        return self.c.dit.transformer.patch_embedding.weight.dtype

    @property
    def max_persons(self) -> int:
        dit = self.c.dit
        return getattr(dit, "max_persons", dit.label_pool - 1)

    # ---- the parts -----------------------------------------------------------------

    def encode_reference(self, ref_image: np.ndarray, T: int, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens [1, L, image_dim] and ``y`` [1, 20, t, H/8, W/8] of the reference, in the
        DiT's dtype (CLIP and the VAE compute in their own)."""
        ref = torch.from_numpy(np.ascontiguousarray(ref_image)).permute(2, 0, 1)[None].float()
        ref = torch.nn.functional.interpolate(ref, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
        ref_uint8 = ref.round().clamp(0, 255).to(torch.uint8)
        image_tokens = self.wan.encode_image(ref_uint8[0].permute(1, 2, 0).numpy(), device=self.device)
        video_range = ref_uint8.to(self.device, torch.float32) / 127.5 - 1.0
        _, y = self.wan.prepare_latents(video_range, 1, 16, H, W, T, dtype=self.dtype, device=self.device)
        return image_tokens.to(self.dtype), y

    def condition_tensors(self, cond: Conditions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the device: pose [1,3,T,H,W] and ref_pose [1,3,H,W] uint8, labels [1,T,H,W], and
        the inference identifier channels [1, K+1]."""
        device = self.device
        pose = torch.from_numpy(np.ascontiguousarray(cond.pose)).permute(3, 0, 1, 2)[None].to(device)
        labels = torch.from_numpy(np.ascontiguousarray(cond.labels))[None].to(device)
        ref_pose = torch.from_numpy(np.ascontiguousarray(cond.ref_pose)).permute(2, 0, 1)[None].to(device)
        channels = stack_channels([inference_channels(cond.persons(), self.c.dit.label_pool)]).to(device)
        return pose, labels, ref_pose, channels

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.c.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]  # [1, 3, T, H, W] in [-1, 1]
        frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(1, 2, 3, 0).cpu().numpy()

    def predict(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        timestep: torch.Tensor,
        image: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor | None,
        tokens: torch.Tensor,
        ref_features: torch.Tensor,
        guidance: float,
        cache_key: str = "",
    ) -> torch.Tensor:
        """Guided velocity (float32): uncond + g * (cond - uncond). Both passes share ``y``
        with the reference pose and the CLIP tokens; the unconditional one has the negative
        prompt and NO pose or identity tokens (spec D.6). With g == 1 only the conditional
        runs. ``x`` is cast to the DiT's dtype."""
        dit = self.c.dit
        x = x.to(self.dtype)
        with self._cache_context(f"cond{cache_key}"):
            cond = dit(x, y, timestep, text, image, tokens, ref_features).float()
        if guidance == 1.0:
            return cond
        assert negative is not None
        with self._cache_context(f"uncond{cache_key}"):
            uncond = dit(x, y, timestep, negative, image, None, ref_features).float()
        return uncond + guidance * (cond - uncond)

    def _cache_context(self, name: str) -> contextlib.AbstractContextManager:
        tr = self.c.dit.transformer
        return tr.cache_context(name) if getattr(tr, "is_cache_enabled", False) else contextlib.nullcontext()

    # ---- the whole thing -----------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        cond: Conditions,
        sampling: SamplingConfig | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Generated:
        """``on_step(step, steps)`` runs after every denoising step (1-based), after the
        latents were checked finite: the caller may raise there to stop the call (a time
        limit) at a step boundary."""
        sampling = sampling or SamplingConfig()
        cfg, dit = self.c.config, self.c.dit
        T, H, W = cond.check(self.max_persons)
        if sampling.guidance_scale > 1 and cond.negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_embeds (e.g. of the Wan negative prompt)")
        timings: dict[str, float] = {}
        with self._memory_options(sampling):
            t0 = time.perf_counter()
            dtype, device = self.dtype, self.device
            num_latents = (T - 1) // 4 + 1
            windows = latent_windows(num_latents, cfg.window_latents, cfg.window_overlap)
            window_T = 4 * (len(windows[0]) - 1) + 1
            image, y = self.encode_reference(cond.ref_image, window_T, H, W)
            pose, labels, ref_pose, channels = self.condition_tensors(cond)
            # the encoders compute in their own (float32) weights; the DiT gets its dtype
            ref_features = dit.ref_pose_guider(ref_pose).to(dtype)
            text = cond.prompt_embeds[None].to(device, dtype)
            negative = None if cond.negative_embeds is None else cond.negative_embeds[None].to(device, dtype)
            tokens = [
                dit.condition_tokens(
                    pose[:, :, 4 * w[0] : 4 * w[-1] + 1], labels[:, 4 * w[0] : 4 * w[-1] + 1], channels
                ).to(dtype)
                for w in windows
            ]
            timings["conditions_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            generator = torch.Generator("cpu").manual_seed(sampling.seed)
            latents = torch.randn((1, 16, num_latents, H // 8, W // 8), generator=generator).to(device)
            # the private first two latents of every window (spec D.8), drawn from the same seed
            private = [torch.randn((1, 16, 2, H // 8, W // 8), generator=generator).to(device) for _ in windows]
            sigmas = sampling_sigmas(sampling.steps, cfg.shift)
            for i in tqdm(range(sampling.steps), disable=not sampling.progress, desc="sampling"):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                timestep = torch.full((1,), 1000.0 * sigma, device=device, dtype=dtype)
                if len(windows) == 1:
                    v = self.predict(
                        latents, y, timestep, image, text, negative, tokens[0], ref_features, sampling.guidance_scale
                    )
                    latents = latents + (sigma_next - sigma) * v
                    self._step_done(latents, i + 1, sampling, on_step)
                    continue
                total = torch.zeros_like(latents)
                count = torch.zeros(num_latents, device=device)
                for w, idx in enumerate(windows):
                    x = latents[:, :, idx].clone()
                    x[:, :, :2] = private[w]
                    v = self.predict(
                        x, y, timestep, image, text, negative, tokens[w], ref_features, sampling.guidance_scale, f"-{w}"
                    )
                    stepped = x + (sigma_next - sigma) * v
                    private[w] = stepped[:, :, :2]
                    own = idx if w == 0 else idx[2:]
                    total[:, :, own] += stepped[:, :, len(idx) - len(own) :]
                    count[own] += 1
                latents = total / count.view(1, 1, -1, 1, 1)
                self._step_done(latents, i + 1, sampling, on_step)
            timings["sampling_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            frames = self.decode(latents)
            timings["decode_s"] = time.perf_counter() - t0
        return Generated(frames=frames, latents=latents, timings=timings, windows=windows)

    @staticmethod
    def _step_done(
        latents: torch.Tensor, step: int, sampling: SamplingConfig, on_step: Callable[[int, int], None] | None
    ) -> None:
        check_finite(latents, step, sampling.steps, sampling.guidance_scale)
        if on_step is not None:
            on_step(step, sampling.steps)

    @contextlib.contextmanager
    def _memory_options(self, sampling: SamplingConfig) -> Iterator[None]:
        """Placement or offload hooks, the LoRA merge, VAE tiling and the step cache for one
        call; all undone in reverse order when it ends."""
        tr, vae = self.c.dit.transformer, self.c.vae
        device = self.execution_device(sampling.offload)
        _check_offload(sampling.offload, device)
        tiling = sampling.vae_tiling if sampling.vae_tiling is not None else self.c.config.profile != "tiny"
        with contextlib.ExitStack() as stack:
            if sampling.offload == "none":
                self.c.to(device)
            # merged where the weights are now, before offload hooks move them (on the GPU when resident)
            stack.enter_context(lora_merged(self.c.dit, sampling.merge_lora))
            if sampling.offload != "none":
                stack.enter_context(offloaded(self.c, sampling.offload, device))
            stack.callback(_set_tiling, vae, vae.use_tiling)
            _set_tiling(vae, tiling)
            if sampling.step_cache == "first-block":
                from diffusers.hooks import FirstBlockCacheConfig

                tr.enable_cache(FirstBlockCacheConfig(threshold=sampling.step_cache_threshold))
                stack.callback(tr.disable_cache)
            self._active = device
            stack.callback(setattr, self, "_active", None)
            yield


@torch.no_grad()
def time_denoiser_step(
    pipe: MultiAnimatePipeline,
    merged: bool,
    *,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    guidance_scale: float = 1.5,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> float:
    """Median seconds of one denoiser step as sampling runs it (``predict``: two DiT forwards
    when ``guidance_scale`` > 1, with and without the pose and identity tokens) for a video of
    ``num_frames`` x ``height`` x ``width``, on seeded random inputs, with the LoRA merged into
    the base or not. No offload: the networks are moved to ``pipe.device``. The LoRA is put
    back as it was after (``lora_merged`` says what that costs a bf16 base).
    ``merged_step_speedup = time_denoiser_step(pipe, False) / time_denoiser_step(pipe, True)``."""
    check_wan_frames(num_frames, "num_frames")
    check_wan_size(height, "height")
    check_wan_size(width, "width")
    device, dtype, dit = pipe.device, pipe.dtype, pipe.c.dit
    pipe.c.to(device)
    cfg, clip = dit.transformer.config, pipe.c.image_encoder.config
    t, h, w = (num_frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device, dtype)

    x, y = rand(1, cfg.out_channels, t, h, w), rand(1, cfg.in_channels - cfg.out_channels, t, h, w)
    text, negative = rand(1, TEXT_LEN, cfg.text_dim), rand(1, TEXT_LEN, cfg.text_dim)
    image = rand(1, (clip.image_size // clip.patch_size) ** 2 + 1, cfg.image_dim)  # CLIP's patches + class token
    tokens = rand(1, cfg.num_attention_heads * cfg.attention_head_dim, t, h // 2, w // 2)
    ref_features = rand(1, cfg.in_channels - cfg.out_channels, 1, h, w)
    timestep = torch.full((1,), 500.0, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = []
    with lora_merged(dit, merged):
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            pipe.predict(x, y, timestep, image, text, negative, tokens, ref_features, guidance_scale)
            sync()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# ---- outputs -------------------------------------------------------------------------

VIDEO_FILE = "video.mp4"
PREVIEW_FILE = "preview.mp4"
PREVIEW_IMAGE = "preview.png"


def preview_frames(result: np.ndarray, cond: Conditions) -> np.ndarray:
    """Side by side, per frame: reference | pose | result (uint8 [T, H, 3W, 3])."""
    T, H, W, _ = result.shape
    ref = cv2.resize(cond.ref_image, (W, H), interpolation=cv2.INTER_AREA)
    return np.concatenate([np.broadcast_to(ref, (T, H, W, 3)), cond.pose[:T], result], axis=2)


def write_outputs(result: np.ndarray, cond: Conditions, folder: Path, fps: float) -> dict[str, Path]:
    """``video.mp4``, ``preview.mp4`` (reference | pose | result) and ``preview.png`` (its
    middle frame), each written under a temporary name and renamed."""
    from preprocess.media import write_video  # the project's one atomic mp4 writer

    folder = Path(folder)
    preview = preview_frames(result, cond)
    paths = {
        "video": write_video(result, folder / VIDEO_FILE, fps),
        "preview": write_video(preview, folder / PREVIEW_FILE, fps),
    }
    ok, png = cv2.imencode(".png", np.ascontiguousarray(preview[len(preview) // 2, ..., ::-1]))
    assert ok
    with atomic_path(folder / PREVIEW_IMAGE) as tmp:
        tmp.write_bytes(png.tobytes())
    paths["preview_image"] = folder / PREVIEW_IMAGE
    return paths
