"""The three condition encoders and the Identifier Assigner (spec D.1-D.3).

Legend (B batch, T pixel frames, H x W pixels, P label pool, K persons, D DiT width)::

    pose_BCTHW      uint8/float [B, 3, T, H, W]  rendered pose images, 0..255
    labels_BTHW     int         [B, T, H, W]     0 background, k = person k
    channels_BK     int64       [B, K + 1]       pool channel of each label (row 0 = background)
    ref_pose_BCHW   uint8/float [B, 3, H, W]     pose image of the reference frame, 0..255

The encoders are ``nn.Sequential`` stacks with SiLU at the odd positions, so their
parameter names (``0.weight``, ``2.weight``, ... ``12.bias``) are the release's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_schemas.model import ENCODER_WIDTH

# Pose and label videos get their first frame repeated this many extra times in front, so
# that T = 4k + 1 frames become 4(k + 1) and the two temporal stride-2 convs give k + 1
# latent frames, the VAE's count (spec D.2).
FIRST_FRAME_REPEATS = 3

# (stride (t, h, w)) of the six 3x3x3 convs of the 3-D encoders (spec D.1).
_STRIDES_3D = ((1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
_STRIDES_2D = (1, 1, 1, 2, 2, 2)


def he_init(conv: nn.Module) -> nn.Module:
    """He-initialise a conv that a SiLU follows. PyTorch's default init shrinks the signal at
    every layer: through six of them a fresh encoder's tokens hardly vary over the image
    (spatial std 0.0008 against 0.03 with this init), so a briefly trained model cannot
    learn to use them. (Released weights replace all of this.)"""
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


def _zero(conv: nn.Module) -> nn.Module:
    """Zero-initialise an encoder's output conv (ControlNet's zero convolution): a fresh
    encoder adds nothing, so fine-tuning starts from the base model's own predictions and the
    only gradient is towards using the condition (with a random output layer the fresh tokens
    act as noise, and training shrank them to a constant instead of learning from them)."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _stack_3d(in_channels: int, out_dim: int, width: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, stride in enumerate(_STRIDES_3D):
        layers += [he_init(nn.Conv3d(in_channels if i == 0 else width, width, 3, stride=stride, padding=1)), nn.SiLU()]
    layers.append(_zero(nn.Conv3d(width, out_dim, (1, 2, 2), stride=(1, 2, 2))))
    return layers


def repeat_first_frame(x: torch.Tensor, dim: int = 2, times: int = FIRST_FRAME_REPEATS) -> torch.Tensor:
    """Prepend ``times`` copies of the first frame along ``dim`` (81 -> 84 frames)."""
    first = x.narrow(dim, 0, 1)
    return torch.cat([first.expand(*[times if d == dim else -1 for d in range(x.ndim)]), x], dim=dim)


class PoseGuider(nn.Sequential):
    """Pose video [B,3,T,H,W] (0..255) -> DiT tokens [B, D, (T-1)/4+1, H/16, W/16].

    The release's ``dwpose_embedding``."""

    def __init__(self, out_dim: int, width: int = ENCODER_WIDTH):
        super().__init__(*_stack_3d(3, out_dim, width))

    def forward(self, pose_BCTHW: torch.Tensor) -> torch.Tensor:
        x = repeat_first_frame(pose_BCTHW.to(self[0].weight.dtype) / 255.0)
        return super().forward(x)


class IdentifierAdapter(nn.Sequential):
    """Label map + channel assignment -> DiT tokens, the Identifier Adapter.

    Layer 0 holds weights for all ``pool`` identifier channels; a sample with K persons
    uses only the K + 1 channels its assignment names (the release's
    ``SelectChannelConv3d``): convolving a (K+1)-channel one-hot with ``weight[:, ids]``
    equals convolving the pool-wide one-hot with the full weight, at (K+1)/pool of the
    cost. In a batch, samples with fewer persons may carry extra (unused) channels: their
    one-hot channels are all zero. The release's ``label_embedding``.
    """

    def __init__(self, pool: int, out_dim: int, width: int = ENCODER_WIDTH):
        super().__init__(*_stack_3d(pool, out_dim, width))
        self.pool = pool

    def forward(self, labels_BTHW: torch.Tensor, channels_BK: torch.Tensor) -> torch.Tensor:
        first: nn.Conv3d = self[0]
        num_classes = channels_BK.shape[1]
        if int(channels_BK.max()) >= self.pool:
            raise ValueError(f"identifier channel {int(channels_BK.max())} outside the pool of {self.pool}")
        labels = repeat_first_frame(labels_BTHW.long(), dim=1)
        if int(labels.max()) >= num_classes:
            raise ValueError(
                f"label {int(labels.max())} has no channel: the assignment covers {num_classes - 1} persons"
            )
        # one sample at a time: each has its own channel selection
        outs = []
        for b in range(labels.shape[0]):
            onehot = F.one_hot(labels[b], num_classes).permute(3, 0, 1, 2)[None].to(first.weight.dtype)
            outs.append(F.conv3d(onehot, first.weight[:, channels_BK[b]], first.bias, first.stride, first.padding))
        x = torch.cat(outs)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


class RefPoseGuider(nn.Sequential):
    """Reference pose image [B,3,H,W] (0..255) -> [B, C, 1, H/8, W/8], added to every latent
    frame of the I2V condition ``y`` (C = its 20 channels). The release's
    ``randomref_embedding_pose``."""

    def __init__(self, out_channels: int = 20, width: int = ENCODER_WIDTH):
        layers: list[nn.Module] = []
        for i, stride in enumerate(_STRIDES_2D):
            last = i == len(_STRIDES_2D) - 1
            conv = nn.Conv2d(3 if i == 0 else width, out_channels if last else width, 3, stride, padding=1)
            layers += [_zero(conv)] if last else [he_init(conv), nn.SiLU()]
        super().__init__(*layers)

    def forward(self, ref_pose_BCHW: torch.Tensor) -> torch.Tensor:
        return super().forward(ref_pose_BCHW.to(self[0].weight.dtype) / 255.0).unsqueeze(2)


# ---- Identifier Assigner -------------------------------------------------------------


def labels_from_masks(masks_KTHW: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-person masks [K, T, H, W] (bool, or 0..255 thresholded at 127.5) -> label map
    [T, H, W] uint8: 0 background, person i (0-based) -> i + 1; later persons win where
    masks overlap (spec D.3)."""
    masks = torch.as_tensor(np.asarray(masks_KTHW) if not isinstance(masks_KTHW, torch.Tensor) else masks_KTHW)
    if masks.ndim != 4:
        raise ValueError(f"masks must be [K, T, H, W], got shape {tuple(masks.shape)}")
    fg = masks if masks.dtype == torch.bool else masks.float() > 127.5
    labels = torch.zeros(fg.shape[1:], dtype=torch.uint8)
    for k in range(fg.shape[0]):
        labels[fg[k]] = k + 1
    return labels


def inference_channels(num_persons: int, pool: int) -> list[int]:
    """The fixed assignment at inference: label i -> channel i (background 0), which is
    what the released inference code's plain Conv3d over an (N+1)-channel one-hot does."""
    _check_persons(num_persons, pool)
    return list(range(num_persons + 1))


def training_channels(num_persons: int, pool: int, rng: random.Random) -> list[int]:
    """K + 1 distinct channels drawn at random from the pool, background included, so
    every channel learns (the release's ``random.sample(range(8), 3)``)."""
    _check_persons(num_persons, pool)
    return rng.sample(range(pool), num_persons + 1)


def _check_persons(num_persons: int, pool: int) -> None:
    if not 1 <= num_persons <= pool - 1:
        raise ValueError(f"{num_persons} persons: this label pool of {pool} channels supports 1..{pool - 1}")


def stack_channels(channels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-sample assignments of equal length -> int64 [B, K + 1]."""
    return torch.tensor([list(c) for c in channels], dtype=torch.long)


def widen_label_weight(weight: torch.Tensor, pool: int) -> torch.Tensor:
    """First-layer weight [out, C, ...] -> [out, pool, ...]: tile the C input channels, then
    cut (4 -> 8 gives channels [0,1,2,3,0,1,2,3]; the release's
    ``build_subdict_with_inchannel_remap``)."""
    index = torch.arange(pool) % weight.shape[1]
    return weight[:, index].clone()
