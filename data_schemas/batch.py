"""Names and shapes of what the training loader (``model/data.py``) hands to the model.

One sample (T = LoaderConfig.num_frames, H x W = LoaderConfig.height x width, K = persons
in the clip; channels first, RGB)::

    video          uint8   [3, T, H, W]  frames of the sampled window, 0..255 (the model
                                          side maps them to [-1, 1]: video_to_model_range)
    pose           uint8   [3, T, H, W]  pose images rendered at H x W, 0..255 (RGB array;
                                          colour convention of preprocess.pose.render)
    labels         uint8   [T, H, W]     label map: 0 background, k = person k (1..K)
    ref_image      uint8   [3, H, W]     reference = the window's FIRST frame, 0..255
    ref_pose       uint8   [3, H, W]     pose image of that frame, 0..255
    num_persons    int                   K (rows of the pose arrays; labels are <= K)
    caption        str                   the sample's caption
    clip_id        str                   WebDataset key = clip id
    frame_indices  int64   [T]           clip frame of each window position (padding
                                          repeats the last one); provenance and tests
    crop_box       int64   [4]           (x0, y0, x1, y1) crop in source pixels, x1/y1
                                          exclusive; provenance and tests

A batch (``collate_samples``) has the same keys: tensors gain a leading batch dimension B
(``video`` [B, 3, T, H, W], ...), ``num_persons`` becomes int64 [B], strings become
``list[str]`` of length B.

Coordinate convention of the crop + resize (pixel centres at integer coordinates, as
OpenCV draws and as bilinear resizing with align_corners=False assumes)::

    x_out = (x_src - x0 + 0.5) * W / (x1 - x0) - 0.5      (y likewise with H)

Frames stay uint8 until they reach the device: a float32 81x480x832 video is 388 MB per
sample, and moving it from loader workers to the trainer cost more than decoding it.

No torch import at run time: this package stays light (pydantic, pyarrow, yaml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    import torch

VIDEO = "video"
POSE = "pose"
LABELS = "labels"
REF_IMAGE = "ref_image"
REF_POSE = "ref_pose"
NUM_PERSONS = "num_persons"
CAPTION = "caption"
CLIP_ID = "clip_id"
FRAME_INDICES = "frame_indices"
CROP_BOX = "crop_box"

# Collation rules: tensors are stacked, NUM_PERSONS becomes an int64 tensor, strings a list.
TENSOR_KEYS: tuple[str, ...] = (VIDEO, POSE, LABELS, REF_IMAGE, REF_POSE, FRAME_INDICES, CROP_BOX)
INT_KEYS: tuple[str, ...] = (NUM_PERSONS,)
STRING_KEYS: tuple[str, ...] = (CAPTION, CLIP_ID)
ALL_KEYS: tuple[str, ...] = TENSOR_KEYS + INT_KEYS + STRING_KEYS


class Sample(TypedDict):
    """One decoded training sample (shapes: module docstring)."""

    video: torch.Tensor
    pose: torch.Tensor
    labels: torch.Tensor
    ref_image: torch.Tensor
    ref_pose: torch.Tensor
    num_persons: int
    caption: str
    clip_id: str
    frame_indices: torch.Tensor
    crop_box: torch.Tensor


class Batch(TypedDict):
    """A collated batch: tensors with a leading B, ``num_persons`` int64 [B], lists of str."""

    video: torch.Tensor
    pose: torch.Tensor
    labels: torch.Tensor
    ref_image: torch.Tensor
    ref_pose: torch.Tensor
    num_persons: torch.Tensor
    caption: list[str]
    clip_id: list[str]
    frame_indices: torch.Tensor
    crop_box: torch.Tensor


def video_to_model_range(frames):
    """uint8 frames (``video``, ``ref_image``; a torch tensor) -> float32 in [-1, 1], on
    whatever device they are: ``x / 127.5 - 1`` as the seed normalises."""
    return frames.float().div_(127.5).sub_(1.0)
