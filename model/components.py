"""Build every network a profile names: random tiny ones in code, or real ones from local
folders by the same code path (``from_pretrained(..., local_files_only=True)``).

The text encoder is not part of this set: training and generation read prompt embeddings
from the cache (model/text_cache.py); the pipeline loads an encoder only when it is asked
to encode a new prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from data_schemas.model import ModelConfig
from model.checkpoint import LoadReport, load_multianimate
from model.dit import MultiAnimateDiT, build_transformer
from model.loading import cast_base, meta_transformer

# Wan's image path: the whole frame squashed (aspect not kept) to the CLIP size, bicubic,
# normalised with CLIP's mean and std (spec C.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP_SIZE = 32


@dataclass
class Components:
    """The networks of one profile (the text encoder is separate, see the module doc)."""

    dit: MultiAnimateDiT
    vae: AutoencoderKLWan
    image_encoder: CLIPVisionModel
    image_processor: CLIPImageProcessor
    config: ModelConfig
    loaded: LoadReport | None = None

    def to(self, device: torch.device | str) -> Components:
        for m in (self.dit, self.vae, self.image_encoder):
            m.to(device)
        return self


def _squashing_processor(size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# The tiny VAE's own latent normalisation, measured by measure_latent_statistics over 8
# synthetic two-person clips (9 frames, 64x48; textured and flat backgrounds alternately;
# re-measured by tests/model/test_model.py). Wan's published constants belong to the real VAE: on
# the random tiny one they leave the picture content at ~6 % of the noise's scale, and a
# tiny model then has almost nothing to learn from.
TINY_LATENTS_MEAN = (
    0.7818,
    0.5057,
    -0.0751,
    0.5233,
    0.1579,
    -0.3689,
    0.7367,
    -0.0794,
    -0.0575,
    -0.4688,
    -0.1384,
    -0.8362,
    0.1851,
    0.6319,
    -0.8351,
    0.5557,
)
TINY_LATENTS_STD = (
    0.1128,
    0.2312,
    0.1401,
    0.1424,
    0.1954,
    0.0631,
    0.2023,
    0.0605,
    0.0964,
    0.0735,
    0.1310,
    0.1255,
    0.1441,
    0.0878,
    0.3301,
    0.0871,
)


def measure_latent_statistics(vae: AutoencoderKLWan, clips_NTHWC: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a VAE's latents (posterior mode) over ``clips_NTHWC``
    (uint8 RGB, T = 4k+1): how Wan's published ``latents_mean``/``latents_std`` normalise its
    latents, measured for the tiny VAE (the clips are the caller's: model/ does not make data)."""
    video = torch.from_numpy(np.asarray(clips_NTHWC)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(video.to(vae.dtype)).latent_dist.mode().double()
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()


def smooth_init_encoder(vae: AutoencoderKLWan, seed: int = 0) -> None:
    """Initialise the tiny VAE's encoder as a smooth, local one: per-pixel random colour
    features (``conv_in``), 2x2 average pooling at each spatial downsampling, a 3-frame
    average at each temporal one, residual branches and the mid attention switched off
    (zero output convs), then ``norm_out`` + SiLU + per-cell random features (``conv_out``).
    A latent cell is then a function of its 8x8-pixel, ~4-frame block's mean colour features,
    as a real VAE's low frequencies are. With random He-initialised convs (and a random
    spatial attention) the latents were a chaotic function of sub-cell detail: even a
    supervised regressor from the poses, labels and reference latents could not predict a
    held-out clip's person cells better than a copy of the first frame (0.41 against 0.42),
    so no briefly trained model could show that it follows the poses."""
    gen = torch.Generator().manual_seed(seed)
    enc = vae.encoder
    with torch.no_grad():
        for name, module in enc.named_modules():
            if name.endswith(("conv2", "attentions.0.proj")):  # residual branches -> identity
                module.weight.zero_()
                module.bias.zero_()
            elif name.endswith("resample.1"):  # stride-2 3x3 conv after a (0,1,0,1) pad -> 2x2 mean
                module.weight.zero_()
                module.bias.zero_()
                for c in range(module.weight.shape[0]):
                    module.weight[c, c, :2, :2] = 0.25
            elif name.endswith("time_conv"):  # stride-2 (3,1,1) causal conv -> 3-frame mean
                module.weight.zero_()
                module.bias.zero_()
                for c in range(module.weight.shape[0]):
                    module.weight[c, c, :, 0, 0] = 1 / 3
        for conv in (enc.conv_in, enc.conv_out):  # current frame, centre tap only: no edges
            conv.weight.zero_()
            conv.weight[:, :, -1, 1, 1] = (
                torch.randn(conv.weight.shape[:2], generator=gen) / conv.weight.shape[1] ** 0.5
            )
            conv.bias.copy_(0.5 * torch.randn(conv.bias.shape, generator=gen))


def build_tiny(cfg: ModelConfig) -> Components:
    """Seeded random weights: the same config gives the same networks in every process."""
    assert cfg.profile == "tiny"
    torch.manual_seed(cfg.seed)
    cfg.require_weights()
    transformer = (
        WanTransformer3DModel.from_pretrained(cfg.tiny_transformer, local_files_only=True)
        if cfg.tiny_transformer is not None
        else build_transformer(cfg.dit)
    )
    dit = MultiAnimateDiT(transformer, cfg.label_pool)
    torch.manual_seed(cfg.seed + 1)  # the VAE's own stream: its measured statistics hold for any DiT shape
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=list(TINY_LATENTS_MEAN),
        latents_std=list(TINY_LATENTS_STD),
    )
    smooth_init_encoder(vae)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=cfg.dit.image_dim,
            intermediate_size=2 * cfg.dit.image_dim,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=TINY_CLIP_SIZE,
            patch_size=8,
            projection_dim=cfg.dit.image_dim,
        )
    )
    return Components(dit.eval(), vae.eval(), clip.eval(), _squashing_processor(TINY_CLIP_SIZE), cfg)


def load_real(cfg: ModelConfig, dit_on_meta: bool = False) -> Components:
    """Wan2.1-I2V-14B-720P (diffusers layout) from ``cfg.wan_folder``; never downloads.

    The frozen DiT base in ``cfg.dtype`` (diffusers keeps its norms, time embedder and
    modulation in fp32); the condition encoders fp32 master weights; VAE and CLIP fp32.
    ``dit_on_meta``: the DiT's parameters stay on the meta device for training to shard
    and fill per rank (model/loading.py) instead of every rank loading all of it."""
    cfg.require_weights()
    assert cfg.wan_folder is not None
    folder = cfg.wan_folder
    # the VAE stays float32: diffusers' Wan examples do so, bf16 decoding bands visibly
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32, local_files_only=True)
    clip = CLIPVisionModel.from_pretrained(folder / "image_encoder", torch_dtype=torch.float32, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder / "image_processor", local_files_only=True)
    size = processor.crop_size.get("height", 224) if processor.crop_size else 224
    return Components(load_real_dit(cfg, dit_on_meta).eval(), vae.eval(), clip.eval(), _squashing_processor(size), cfg)


def load_real_dit(cfg: ModelConfig, on_meta: bool = False) -> MultiAnimateDiT:
    """The real DiT base in ``cfg.dtype`` (on the meta device when ``on_meta``) with fresh
    fp32 condition encoders; no LoRA yet (``attach_trained``)."""
    assert cfg.wan_folder is not None
    folder = cfg.wan_folder / "transformer"
    if on_meta:
        transformer = meta_transformer(folder, cfg.torch_dtype)
    else:
        transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=cfg.torch_dtype, local_files_only=True)
    return MultiAnimateDiT(transformer, cfg.label_pool)


def attach_trained(dit: MultiAnimateDiT, cfg: ModelConfig) -> LoadReport | None:
    """MultiAnimate weights from ``cfg.multianimate``, else a LoRA of ``cfg.lora_rank`` at
    PEFT's no-op initialisation (fp32 either way)."""
    if cfg.multianimate is not None:
        return load_multianimate(dit, cfg.multianimate)
    dit.add_lora(cfg.lora_rank, cfg.lora_alpha)
    return None


def build_components(cfg: ModelConfig, dit_on_meta: bool = False) -> Components:
    """The profile's networks, with MultiAnimate weights loaded when ``cfg.multianimate`` is set
    (else a LoRA of ``cfg.lora_rank`` at PEFT's no-op initialisation). ``dit_on_meta`` (real
    profiles): the DiT base is left on the meta device for ``model.loading.load_sharded``."""
    comps = build_tiny(cfg) if cfg.profile == "tiny" else load_real(cfg, dit_on_meta=dit_on_meta)
    if cfg.profile == "tiny" and cfg.dtype != "float32":
        cast_base(comps.dit.transformer, cfg.torch_dtype)  # so tests can run the bf16 path
    comps.loaded = attach_trained(comps.dit, cfg)
    return comps
