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

Legend: T pixel frames (4k+1), t = (T-1)/4 + 1 latent frames, H x W pixels.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from data_schemas.atomic import atomic_path
from data_schemas.model import check_wan_frames, check_wan_size
from model.components import Components
from model.conditions import inference_channels, stack_channels

TEXT_LEN = 512  # Wan's I2V cross-attention splits image and text tokens by this length


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
    vae_tiling: bool = Field(False, description="decode in tiles (less memory at full size)")
    offload: Literal["none", "model", "group"] = Field(
        "none", description="move networks to the CPU between uses (needs a GPU): whole models or block groups"
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


@dataclass
class Generated:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: torch.Tensor  # [1, 16, t, H/8, W/8], before decoding
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


class MultiAnimatePipeline:
    """Components + diffusers' I2V helpers (prompt, image and latent preparation)."""

    def __init__(self, components: Components):
        self.c = components
        self.wan = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, image_encoder=components.image_encoder,
            image_processor=components.image_processor, transformer=components.dit.transformer,
            vae=components.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=components.config.shift),
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.c.dit.parameters()).device

    # ---- the parts -----------------------------------------------------------------

    def encode_reference(self, ref_image: np.ndarray, T: int, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens [1, L, image_dim] and ``y`` [1, 20, t, H/8, W/8] of the reference."""
        ref = torch.from_numpy(np.ascontiguousarray(ref_image)).permute(2, 0, 1)[None].float()
        ref = torch.nn.functional.interpolate(ref, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
        ref_uint8 = ref.round().clamp(0, 255).to(torch.uint8)
        image_tokens = self.wan.encode_image(ref_uint8[0].permute(1, 2, 0).numpy(), device=self.device)
        video_range = ref_uint8.to(self.device, torch.float32) / 127.5 - 1.0
        dtype = next(self.c.dit.transformer.parameters()).dtype
        _, y = self.wan.prepare_latents(video_range, 1, 16, H, W, T, dtype=dtype, device=self.device)
        return image_tokens.to(dtype), y

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
        """Guided velocity: uncond + g * (cond - uncond). Both passes share ``y`` with the
        reference pose and the CLIP tokens; the unconditional one has the negative prompt
        and NO pose or identity tokens (spec D.6). With g == 1 only the conditional runs."""
        dit = self.c.dit
        with self._cache_context(f"cond{cache_key}"):
            cond = dit(x, y, timestep, text, image, tokens, ref_features)
        if guidance == 1.0:
            return cond
        assert negative is not None
        with self._cache_context(f"uncond{cache_key}"):
            uncond = dit(x, y, timestep, negative, image, None, ref_features)
        return uncond + guidance * (cond - uncond)

    def _cache_context(self, name: str) -> contextlib.AbstractContextManager:
        tr = self.c.dit.transformer
        return tr.cache_context(name) if getattr(tr, "is_cache_enabled", False) else contextlib.nullcontext()

    # ---- the whole thing -----------------------------------------------------------

    @torch.no_grad()
    def __call__(self, cond: Conditions, sampling: SamplingConfig | None = None) -> Generated:
        sampling = sampling or SamplingConfig()
        cfg, dit = self.c.config, self.c.dit
        T, H, W = cond.check(dit.label_pool - 1)
        if sampling.guidance_scale > 1 and cond.negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_embeds (e.g. of the Wan negative prompt)")
        timings: dict[str, float] = {}
        with self._memory_options(sampling):
            t0 = time.perf_counter()
            dtype = next(dit.transformer.parameters()).dtype
            device = self.device
            num_latents = (T - 1) // 4 + 1
            windows = latent_windows(num_latents, cfg.window_latents, cfg.window_overlap)
            window_T = 4 * (len(windows[0]) - 1) + 1
            image, y = self.encode_reference(cond.ref_image, window_T, H, W)
            pose, labels, ref_pose, channels = self.condition_tensors(cond)
            ref_features = dit.ref_pose_guider(ref_pose).to(dtype)
            text = cond.prompt_embeds[None].to(device, dtype)
            negative = None if cond.negative_embeds is None else cond.negative_embeds[None].to(device, dtype)
            tokens = [
                dit.condition_tokens(pose[:, :, 4 * w[0] : 4 * w[-1] + 1], labels[:, 4 * w[0] : 4 * w[-1] + 1], channels).to(dtype)
                for w in windows
            ]
            timings["conditions_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            generator = torch.Generator("cpu").manual_seed(sampling.seed)
            latents = torch.randn((1, 16, num_latents, H // 8, W // 8), generator=generator).to(device, dtype)
            # the private first two latents of every window (spec D.8), drawn from the same seed
            private = [torch.randn((1, 16, 2, H // 8, W // 8), generator=generator).to(device, dtype) for _ in windows]
            sigmas = sampling_sigmas(sampling.steps, cfg.shift)
            for i in tqdm(range(sampling.steps), disable=not sampling.progress, desc="sampling"):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                timestep = torch.full((1,), 1000.0 * sigma, device=device, dtype=dtype)
                if len(windows) == 1:
                    v = self.predict(latents, y, timestep, image, text, negative, tokens[0], ref_features, sampling.guidance_scale)
                    latents = latents + (sigma_next - sigma) * v
                    continue
                total = torch.zeros_like(latents, dtype=torch.float32)
                count = torch.zeros(num_latents, device=device)
                for w, idx in enumerate(windows):
                    x = latents[:, :, idx].clone()
                    x[:, :, :2] = private[w]
                    v = self.predict(x, y, timestep, image, text, negative, tokens[w], ref_features, sampling.guidance_scale, f"-{w}")
                    stepped = x + (sigma_next - sigma) * v
                    private[w] = stepped[:, :, :2]
                    own = idx if w == 0 else idx[2:]
                    total[:, :, own] += stepped[:, :, len(idx) - len(own) :].float()
                    count[own] += 1
                latents = (total / count.view(1, 1, -1, 1, 1)).to(dtype)
            timings["sampling_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            frames = self.decode(latents)
            timings["decode_s"] = time.perf_counter() - t0
        return Generated(frames=frames, latents=latents, timings=timings, windows=windows)

    @contextlib.contextmanager
    def _memory_options(self, sampling: SamplingConfig) -> Iterator[None]:
        tr, vae = self.c.dit.transformer, self.c.vae
        if sampling.offload != "none" and not torch.cuda.is_available():
            raise ValueError(f"offload={sampling.offload!r} moves networks between CPU and GPU: it needs a GPU")
        if sampling.vae_tiling:
            vae.enable_tiling()
        if sampling.offload == "model":
            self.wan.enable_model_cpu_offload()
        elif sampling.offload == "group":
            tr.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1)
        if sampling.step_cache == "first-block":
            from diffusers.hooks import FirstBlockCacheConfig

            tr.enable_cache(FirstBlockCacheConfig(threshold=sampling.step_cache_threshold))
        try:
            yield
        finally:
            if sampling.step_cache != "off":
                tr.disable_cache()
            if sampling.vae_tiling:
                vae.disable_tiling()


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
    from preprocess.synthetic import write_video  # the project's one atomic mp4 writer

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
