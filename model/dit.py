"""MultiAnimate around diffusers' ``WanTransformer3DModel``, without editing diffusers.

Where the conditions enter (spec D.2):

* pose + identity tokens [B, D, t, h, w] are ADDED to the output of
  ``transformer.patch_embedding`` (a forward hook), i.e. right after the patch embedding of
  concat[noisy latents, y] and before the blocks;
* the reference-pose features [B, 20, 1, H/8, W/8] are added to every latent frame of the
  20-channel I2V condition ``y`` before the concatenation.

The unconditional pass of guidance passes ``condition_tokens=None`` (pose AND identity
dropped) but keeps the reference-pose features in ``y`` (spec D.6).

Legend: latents_BCTHW [B, 16, t, H/8, W/8]; y_BCTHW [B, 20, t, H/8, W/8];
text_BLD [B, 512, text_dim]; image_BLD [B, 257, image_dim]; tokens_BDthw [B, D, t, H/16, W/16].
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig
from torch import nn

from data_schemas.model import DiTShape
from model.conditions import IdentifierAdapter, PoseGuider, RefPoseGuider

# The release's PEFT targets "q,k,v,o,ffn.0,ffn.2" in diffusers' names: self- and
# cross-attention q/k/v/o (not the image keys add_k_proj/add_v_proj) and both FFN layers.
LORA_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
ADAPTER = "default"


def build_transformer(shape: DiTShape) -> WanTransformer3DModel:
    """An I2V Wan transformer of the given sizes with random weights (call under a seed)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=shape.num_attention_heads,
        attention_head_dim=shape.attention_head_dim,
        in_channels=36,
        out_channels=16,
        text_dim=shape.text_dim,
        freq_dim=shape.freq_dim,
        ffn_dim=shape.ffn_dim,
        num_layers=shape.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=shape.image_dim,
        added_kv_proj_dim=shape.inner_dim,
        rope_max_seq_len=1024,
    )


class MultiAnimateDiT(nn.Module):
    """The Wan transformer plus the pose guider, the Identifier Adapter and the
    reference-pose guider. Parameter names: ``transformer.*`` (diffusers), ``pose_guider.N``,
    ``identifier_adapter.N``, ``ref_pose_guider.N`` (N = the release's Sequential index)."""

    def __init__(self, transformer: WanTransformer3DModel, label_pool: int):
        super().__init__()
        cfg = transformer.config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.transformer = transformer
        self.pose_guider = PoseGuider(dim)
        self.identifier_adapter = IdentifierAdapter(label_pool, dim)
        self.ref_pose_guider = RefPoseGuider(cfg.in_channels - cfg.out_channels)
        # Persons the loaded weights were trained for: lower than the pool's label_pool - 1
        # when a checkpoint's label layer was widened for fine-tuning (model/checkpoint.py).
        self.max_persons = label_pool - 1
        self._pending: torch.Tensor | None = None
        transformer.patch_embedding.register_forward_hook(self._add_condition)

    @property
    def label_pool(self) -> int:
        return self.identifier_adapter.pool

    def _add_condition(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            return out
        if self._pending.shape != out.shape:
            raise ValueError(
                f"condition tokens {tuple(self._pending.shape)} do not match the patch grid {tuple(out.shape)}: "
                "pose/labels must have 4k+1 frames and the video's size"
            )
        return out + self._pending.to(out.dtype)

    def condition_tokens(
        self, pose_BCTHW: torch.Tensor, labels_BTHW: torch.Tensor, channels_BK: torch.Tensor
    ) -> torch.Tensor:
        """Pose guider + Identifier Adapter -> tokens_BDthw (computed once per video, not per step)."""
        return self.pose_guider(pose_BCTHW) + self.identifier_adapter(labels_BTHW, channels_BK)

    def forward(
        self,
        latents_BCTHW: torch.Tensor,
        y_BCTHW: torch.Tensor,
        timestep_B: torch.Tensor,
        text_BLD: torch.Tensor,
        image_BLD: torch.Tensor | None,
        condition_tokens: torch.Tensor | None = None,
        ref_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The velocity prediction [B, 16, t, H/8, W/8]."""
        if ref_features is not None:
            y_BCTHW = y_BCTHW + ref_features.to(y_BCTHW.dtype)
        x = torch.cat([latents_BCTHW, y_BCTHW.to(latents_BCTHW.dtype)], dim=1)
        self._pending = condition_tokens
        try:
            return self.transformer(x, timestep_B, text_BLD, image_BLD, return_dict=False)[0]
        finally:
            self._pending = None

    # ---- LoRA ----------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA (peft) on the release's targets; A kaiming-uniform, B zero, as PEFT initialises.
        LoRA weights are float32 master weights whatever the base's dtype (the release upcasts
        them too): in bf16, AdamW at lr 1e-4 would lose most updates to rounding. On a base
        built on the meta device, they are made real on the CPU and initialised here."""
        self.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=True),
            adapter_name=ADAPTER,
        )
        for module in self._lora_layers():
            pair = (module.lora_A[ADAPTER], module.lora_B[ADAPTER])
            if any(p.is_meta for m in pair for p in m.parameters()):
                for m in pair:
                    m.to_empty(device="cpu")
                module.reset_lora_parameters(ADAPTER, init_lora_weights=True)
            for m in pair:
                m.float()

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def merge_lora(self) -> None:
        """Fold W + (alpha/r) B A into the base weights (faster inference); undo with unmerge_lora."""
        for module in self._lora_layers():
            module.merge()

    def unmerge_lora(self) -> None:
        for module in self._lora_layers():
            module.unmerge()

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]

    def set_trainable(self) -> list[nn.Parameter]:
        """Freeze the DiT except LoRA; train the three encoders. Returns the trained parameters."""
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("transformer.") or ".lora_" in name)
        return [p for p in self.parameters() if p.requires_grad]
