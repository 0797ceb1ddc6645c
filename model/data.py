"""Training data loader: WebDataset shards -> windows of frames, pose images and label maps.

Sampling and augmentation follow the seed (spec D.5), generalised to a frame stride:

1. draw a stride s in min_stride..max_stride (among the strides whose window fits the clip, see
   ``sample_window``); draw the start uniformly so that the ``num_frames`` frames at stride s
   fit; a clip shorter than the window is read whole and its last frame repeated (padding);
2. one random crop (0..W*crop_fraction px off the left and, independently, off the right;
   the same for top and bottom) shared by frames, keypoints and label map;
3. frames are resized bilinearly (antialiased, like torchvision/PIL), the label map with
   nearest neighbour (pixel centres);
4. pose images are rendered ON THE FLY from the keypoints as the release made them (spec A.7):
   drawn on a canvas of the clip's size (stick widths are source pixels), cut by the same
   crop, resized like the frames (``render.draw_pose_rows``: the same pixels, less work);
5. the reference image and pose are the window's FIRST frame and pose image.

Only the needed frames are decoded (decord over the mp4 bytes in memory, one frame at a time)
and only the label-map frames up to the last needed one are decompressed. Each output frame
is made once, in a small reused buffer, and written into the planes of its final
[3, T, H, W] layout; inside a DataLoader worker the outputs are allocated in shared memory,
so nothing is copied to hand them to the trainer (a batch of one is a view of the sample;
larger batches are stacked once).

Shape legend (T = cfg.num_frames, H x W = cfg.height x cfg.width, K = persons, U = distinct
clip frames read for a window, h x w = clip size; see data_schemas/batch.py for the output)::

    frame_hwC        uint8   [h, w, 3]        one decoded frame (RGB)
    labels_Uhw       uint8   [U, h, w]        label-map frames
    keypoints_UK     float32 [U, K, 133, 2]   COCO-WholeBody pixels, -1 = missing
    scores_UK        float32 [U, K, 133]
    scratch_CHW      uint8   [3, H, W]        one output frame (video, pose or label rows)
    canvas_hw        uint8   [h, w]           one pose image as palette indices, clip size (render.py)
    rows_nWC         uint8   [n, W, 3]        the non-black rows of one resized pose image
    video_CTHW       uint8   [3, T, H, W]
    pose_CTHW        uint8   [3, T, H, W]
    labels_THW       uint8   [T, H, W]

Distribution: shards are split over ranks, then over DataLoader workers (both by position
in the shard list, like ``webdataset.split_by_node`` / ``split_by_worker``). The rank and
world size are, in this order: the explicit ``rank``/``world_size`` arguments; else
``torch.distributed`` when it is initialised; else the environment variables ``RANK`` and
``WORLD_SIZE`` (torchrun sets both); else 0 and 1. They are resolved when iteration starts,
so a dataset built before ``init_process_group`` is still split correctly. (The rank split
is our own stage because webdataset's ``split_by_node`` reads the environment first.)
Without resampling every sample is read once per epoch only when there are at least
ranks x workers shards, and ranks may then get different sample counts: for DDP training
use ``resampled=True`` with ``epoch_samples`` (equal per rank); keep exact epochs for
evaluation. Call ``dataset.set_epoch(e)`` each epoch, or every epoch repeats the same
shuffle and augmentation (with a fixed ``seed``).

Failures: a sample that cannot be decoded (missing member, undecodable mp4, broken npz or
json, arrays that disagree) and a shard that cannot be read (unopenable, truncated) are
skipped with a logged warning and counted in the dataset's ``SkipCounter`` (``skips``),
which is shared with the DataLoader worker processes. Two bounds keep bad data from hanging
training:

- every member read is bounded: the tar reader is our own stage (not webdataset's), which
  refuses a member whose header claims more bytes than its shard holds, or more than
  ``max_member_bytes`` (tarfile would otherwise "skip" such a member by reading forever at
  100% CPU), naming the shard and the member;
- a reader that skips ``max_consecutive_skips`` samples or shards in a row without one usable
  sample raises ``LoaderStalled`` with the counts by reason (with resampling it would
  otherwise warn forever and never yield a batch).

Local shard paths are resolved (symlinks followed) when the dataset is made, so a reader
keeps reading the shard set it started with even if ``workspace/shards`` is relinked to a
newer set meanwhile (if that older set is then removed, its reads fail and are counted).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import tarfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_schemas import batch as B
from data_schemas.batch import Batch, Sample
from data_schemas.shard import MEMBERS
from data_schemas.train import LoaderConfig
from preprocess.pose.convert import wholebody_to_openpose
from preprocess.pose.render import draw_pose_rows

__all__ = [
    "SKIP_REASONS",
    "ClipDataset",
    "LoaderConfig",
    "LoaderStalled",
    "SampleError",
    "ShardReadError",
    "SkipCounter",
    "collate_samples",
    "crop_resize_keypoints",
    "decode_sample",
    "distributed_rank_world",
    "draw_crop",
    "make_dataset",
    "make_loader",
    "sample_window",
]

logger = logging.getLogger(__name__)

REQUIRED_MEMBERS = tuple(m for m in MEMBERS if m != "ref.png")  # not read: the reference is the window's first frame
NUM_WHOLEBODY = 133

# Why a sample or shard was skipped. Sample reasons first, then shard reasons.
SKIP_REASONS: tuple[str, ...] = (
    "missing_member",  # a required member is absent (also the stub of a truncated sample)
    "bad_meta",  # json or caption unreadable
    "bad_pose",  # pose npz unreadable or wrongly shaped
    "bad_mask",  # mask npz unreadable or wrongly shaped
    "bad_video",  # mp4 not decodable
    "inconsistent",  # members disagree (frame counts, sizes, persons, key)
    "shard_error",  # the tar reader failed (cannot open, truncated member, bad header)
    "truncated_shard",  # the shard does not end with the tar end-of-archive blocks
    "oversized_member",  # a member's header claims more than max_member_bytes
    "empty_shard",  # a shard read to its end without a single sample
)
SAMPLE_REASONS = SKIP_REASONS[:6]
SHARD_REASONS = SKIP_REASONS[6:]


# --------------------------------------------------------------------------- failures


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of SAMPLE_REASONS."""

    def __init__(self, reason: str, key: str, detail: str):
        assert reason in SAMPLE_REASONS, reason
        super().__init__(f"{key}: {reason}: {detail}")
        self.reason, self.key, self.detail = reason, key, detail


class ShardReadError(Exception):
    """A shard, or a member of it, that cannot be read; ``reason`` is one of SHARD_REASONS."""

    def __init__(self, reason: str, url: str, detail: str):
        assert reason in SHARD_REASONS, reason
        super().__init__(f"{url}: {reason}: {detail}")
        self.reason, self.url, self.detail = reason, url, detail


class LoaderStalled(RuntimeError):
    """A reader skipped ``max_consecutive_skips`` samples or shards in a row: the data it
    was given is unusable, and going on would never yield a batch."""


class _Streak:
    """Skips since the last usable sample of one reader, by reason."""

    def __init__(self, limit: int):
        self.limit, self.counts = limit, Counter[str]()

    def skip(self, reason: str, exn: BaseException) -> None:
        self.counts[reason] += 1
        if self.counts.total() >= self.limit:
            raise LoaderStalled(
                f"{self.counts.total()} samples or shards skipped in a row without one usable sample "
                f"(max_consecutive_skips={self.limit}); by reason: {dict(sorted(self.counts.items()))}; last: {exn}"
            )

    def reset(self) -> None:
        self.counts.clear()


class SkipCounter:
    """Counts skipped samples and shards per reason, across DataLoader worker processes.

    The counts live in a shared-memory tensor created in the parent; torch's multiprocessing
    reductions hand the same memory to the workers' copies under fork and spawn alike (a
    multiprocessing lock could not cross from a fork context into a spawn one). Each process
    writes only its own row (row 0: the main process, row 1 + i: DataLoader worker i), so no
    lock is needed; readers sum the rows.
    """

    ROWS = 1 + 64  # workers beyond 64 share rows (their increments could then race)

    def __init__(self) -> None:
        self._table = torch.zeros(self.ROWS, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def add(self, reason: str, n: int = 1) -> None:
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (self.ROWS - 1)
        self._table[row, SKIP_REASONS.index(reason)] += n

    def counts(self) -> dict[str, int]:
        """Every reason with its count (zeros included)."""
        return dict(zip(SKIP_REASONS, self._table.sum(dim=0).tolist()))

    @property
    def samples(self) -> int:
        """Samples skipped so far."""
        c = self.counts()
        return sum(c[r] for r in SAMPLE_REASONS)

    @property
    def shards(self) -> int:
        """Shard-level errors seen so far (one damaged shard may count several times and
        under both shard reasons)."""
        c = self.counts()
        return sum(c[r] for r in SHARD_REASONS)

    def reset(self) -> None:
        """Zero the counts (call only while no worker is running)."""
        self._table.zero_()

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts()})"


# --------------------------------------------------------------------------- sampling


def sample_window(
    num_clip_frames: int, num_frames: int, max_stride: int, rng: np.random.Generator, min_stride: int = 1
) -> tuple[np.ndarray, int]:
    """Clip frame indices int64 [num_frames] of one window, and its stride.

    The stride is drawn uniformly among min_stride..max_stride restricted to strides whose
    window fits the clip (so a clip that fits at stride 1 is never padded; if none from
    min_stride up fits, the largest that fits, at least 1); the start is uniform
    over all positions where the window fits (the seed's extra 5-frame margin is dropped).
    A clip shorter than the window gives 0..n-1 followed by repeats of n-1.
    """
    if num_clip_frames < 1:
        raise ValueError(f"num_clip_frames must be >= 1, got {num_clip_frames}")
    fitting = (num_clip_frames - 1) // (num_frames - 1) if num_frames > 1 else max_stride
    high = max(1, min(max_stride, fitting))
    stride = int(rng.integers(min(min_stride, high), high + 1))
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, max(0, num_clip_frames - span) + 1))
    indices = np.minimum(start + stride * np.arange(num_frames, dtype=np.int64), num_clip_frames - 1)
    return indices, stride


def draw_crop(width: int, height: int, fraction: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: 0..floor(size*fraction) px off each side independently."""
    # The epsilon keeps floor(14 * (1/14)) == 1: the seed's integer W // 14.
    max_x, max_y = math.floor(width * fraction + 1e-9), math.floor(height * fraction + 1e-9)
    left, right = (int(v) for v in rng.integers(0, max_x + 1, size=2))
    top, bottom = (int(v) for v in rng.integers(0, max_y + 1, size=2))
    return left, top, width - right, height - bottom


def crop_resize_keypoints(keypoints: np.ndarray, crop: Sequence[int], out_width: int, out_height: int) -> np.ndarray:
    """Map pixel keypoints [..., 2] through the crop and resize; (-1, -1) stays (-1, -1).

    Pixel centres sit at integer coordinates (the convention of bilinear resizing with
    align_corners=False and of OpenCV drawing): x' = (x - x0 + 0.5) * W / (x1 - x0) - 0.5.
    """
    x0, y0, x1, y1 = crop
    kp = np.asarray(keypoints, dtype=np.float32)
    missing = (kp[..., 0] == -1) & (kp[..., 1] == -1)
    out = np.empty_like(kp)
    out[..., 0] = (kp[..., 0] - x0 + 0.5) * (out_width / (x1 - x0)) - 0.5
    out[..., 1] = (kp[..., 1] - y0 + 0.5) * (out_height / (y1 - y0)) - 0.5
    out[missing] = -1.0
    return out


def _nearest_rows(src_start: int, src_len: int, out_len: int) -> np.ndarray:
    # Nearest neighbour with pixel centres ("nearest-exact", PIL's NEAREST): aligned with the
    # bilinear frames and the keypoint map above (cv2's INTER_NEAREST is off by half a pixel).
    idx = np.floor((np.arange(out_len) + 0.5) * (src_len / out_len)).astype(np.int64)
    return src_start + np.minimum(idx, src_len - 1)


# --------------------------------------------------------------------------- decoding


def _npz_frames(data: bytes, name: str, wanted: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape of array ``name`` [T, ...] in the npz and its frames ``wanted`` (sorted, unique).

    Streams the (deflated) member and stops after the last wanted frame, so a long clip's
    label map is never held in memory whole.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported npy version {version}")
        if fortran or dtype.hasobject or len(shape) < 1:
            raise ValueError(f"{name}: expected a C-ordered array [T, ...], got {shape} fortran={fortran} {dtype}")
        if len(wanted) == 0:
            return shape, np.empty((0, *shape[1:]), dtype)
        if wanted[-1] >= shape[0]:
            raise ValueError(f"{name}: frame {wanted[-1]} requested, array has {shape[0]}")
        frame_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(wanted), *shape[1:]), dtype)
        j = 0
        for t in range(int(wanted[-1]) + 1):
            buf = member.read(frame_bytes)
            if len(buf) != frame_bytes:
                raise ValueError(f"{name}: data ends at frame {t}")
            if t == wanted[j]:
                out[j] = np.frombuffer(buf, dtype).reshape(shape[1:])
                j += 1
        return shape, out


def _load_pose(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        keypoints = np.asarray(z["keypoints"], dtype=np.float32)
        scores = np.asarray(z["scores"], dtype=np.float32)
    if keypoints.ndim != 4 or keypoints.shape[2:] != (NUM_WHOLEBODY, 2) or scores.shape != keypoints.shape[:3]:
        raise ValueError(f"keypoints {keypoints.shape} / scores {scores.shape} are not [T,K,133,2] / [T,K,133]")
    return keypoints, scores


def _open_video(data: bytes) -> Any:
    import decord  # imported here: it loads its own ffmpeg, only needed in workers

    # One decoder thread: the parallelism comes from DataLoader workers.
    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)


def _frame_at(reader: Any, index: int, position: int) -> torch.Tensor:
    """Frame ``index`` (uint8 [h, w, 3] RGB) of a reader whose next frame is ``position``."""
    if index != position:
        reader.seek_accurate(index)  # within a GOP decord decodes forward instead of seeking
    # DLPack shares decord's buffer: asnumpy() would copy every frame once more.
    return torch.utils.dlpack.from_dlpack(reader.next().to_dlpack())


def _resize_into(crop_hwC: torch.Tensor, out_CHW: np.ndarray) -> None:
    """Antialiased bilinear resize of one uint8 frame into the planes of ``out_CHW``."""
    # torch's uint8 channels-last kernel (several times faster than float) gives the pixels
    # torchvision/PIL give the seed's uint8 images. Frame by frame, so that the planes are
    # split off a result that is still in cache (a permute of the whole window costs more
    # than the resize).
    resized_1CHW = F.interpolate(
        crop_hwC[None].permute(0, 3, 1, 2), size=out_CHW.shape[1:], mode="bilinear", align_corners=False, antialias=True
    )
    # No copy: the input is channels-last (the unsqueeze before the permute keeps it so) and so is the output.
    resized_HWC = resized_1CHW[0].permute(1, 2, 0).contiguous().numpy()
    cv2.split(resized_HWC, list(out_CHW))  # writes into the given planes (views of out_CHW)


def _shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    # A new shared-memory file, as default_collate makes for batches; it reads as zeros.
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(*shape)


class _PlaneWriter:
    """A zero-filled uint8 tensor [..., H, W], written one band of rows of one plane at a time.

    Inside a DataLoader worker the tensor lives in shared memory, so handing it to the trainer
    copies nothing (writing a sample there in the first place saves copying 200+ MB into it
    again). There the rows go in with pwrite through the shared-memory file: the page faults
    of writing through a fresh shared mapping cost about twice the copy (90 vs 50 ms for a
    97 MB video). Rows never written stay zero.
    """

    def __init__(self, shape: tuple[int, ...]):
        *lead, self.height, self.width = shape
        self._fd: int | None = None
        if get_worker_info() is None:
            self.tensor = torch.from_numpy(np.zeros(shape, np.uint8))
        else:
            self.tensor = _shared_empty(shape, torch.uint8)
            if torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
                self._fd = self.tensor.untyped_storage()._share_fd_cpu_()[0]  # owned by the storage
        self._planes = self.tensor.numpy().reshape(math.prod(lead), self.height, self.width)

    def write(self, plane: int, row: int, rows_hW: np.ndarray) -> None:
        """Rows ``row, row + 1, ...`` of ``plane`` (an index into the flattened leading dims)."""
        if self._fd is None:
            self._planes[plane, row : row + len(rows_hW)] = rows_hW
            return
        data = np.ascontiguousarray(rows_hW)
        written = os.pwrite(self._fd, data, (plane * self.height + row) * self.width)
        assert written == data.nbytes, f"short write to shared memory: {written} of {data.nbytes} bytes"


def _guard(reason: str, key: str, fn: Any, *args: Any) -> Any:
    # Turns any failure of a member's decoder into a counted SampleError; errors of our own
    # code after decoding are NOT caught, so bugs still crash loudly.
    try:
        return fn(*args)
    except SampleError:
        raise
    except Exception as exn:  # decoders raise many types (DECORDError, BadZipFile, ...)
        raise SampleError(reason, key, f"{type(exn).__name__}: {exn}") from exn


def decode_sample(raw: dict[str, Any], cfg: LoaderConfig, rng: np.random.Generator) -> Sample:
    """One WebDataset sample (member bytes by extension) -> the training sample.

    Raises SampleError for unusable data; see the module docstring for what is done.
    """
    key = str(raw.get("__key__"))
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        raise SampleError("missing_member", key, f"missing {missing}")

    meta = _guard("bad_meta", key, lambda: json.loads(raw["json"]))
    caption = _guard("bad_meta", key, lambda: raw["txt"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise SampleError("bad_meta", key, "json is not an object")
    keypoints, scores = _guard("bad_pose", key, _load_pose, raw["pose.npz"])
    mask_shape, mask_head = _guard("bad_mask", key, _npz_frames, raw["mask.npz"], "label_map", np.empty(0, np.int64))
    if len(mask_shape) != 3 or mask_head.dtype != np.uint8:
        raise SampleError("bad_mask", key, f"label_map is {mask_head.dtype} {mask_shape}, expected uint8 [T,H,W]")

    num_clip, num_persons = keypoints.shape[:2]
    height, width = int(mask_shape[1]), int(mask_shape[2])
    problems = []
    if mask_shape[0] != num_clip:
        problems.append(f"mask has {mask_shape[0]} frames, poses {num_clip}")
    if meta.get("num_frames") not in (None, num_clip):
        problems.append(f"json num_frames {meta.get('num_frames')} != {num_clip}")
    if meta.get("persons") not in (None, num_persons):
        problems.append(f"json persons {meta.get('persons')} != {num_persons}")
    if (meta.get("width"), meta.get("height")) not in ((None, None), (width, height)):
        problems.append(f"json size {meta.get('width')}x{meta.get('height')} != mask {width}x{height}")
    if meta.get("clip_id") not in (None, key):
        problems.append(f"json clip_id {meta.get('clip_id')!r} != key")
    if num_clip < 1:
        problems.append("no frames")
    if problems:
        raise SampleError("inconsistent", key, "; ".join(problems))

    indices, _ = sample_window(num_clip, cfg.num_frames, cfg.max_stride, rng, cfg.min_stride)
    unique, inverse = np.unique(indices, return_inverse=True)
    # Window positions of each distinct clip frame: padding repeats one, made once.
    positions: list[list[int]] = [[] for _ in unique]
    for t, u in enumerate(inverse.reshape(-1).tolist()):
        positions[u].append(t)

    reader = _guard("bad_video", key, _open_video, raw["mp4"])
    if len(reader) != num_clip:
        raise SampleError("inconsistent", key, f"mp4 has {len(reader)} frames, poses {num_clip}")

    x0, y0, x1, y1 = crop = draw_crop(width, height, cfg.crop_fraction, rng)
    num_frames, out_h, out_w = cfg.num_frames, cfg.height, cfg.width
    scratch_CHW = np.empty((3, out_h, out_w), np.uint8)  # one output frame, reused: stays in cache

    # Frames: decoded one by one, cropped (a view), resized and split into planes of [3, T, H, W].
    # They stay uint8: the trainer maps them to [-1, 1] on its device (data_schemas.batch).
    video = _PlaneWriter((3, num_frames, out_h, out_w))
    position = 0
    for u, index in enumerate(unique.tolist()):
        frame_hwC = _guard("bad_video", key, _frame_at, reader, index, position)
        position = index + 1
        if frame_hwC.shape != (height, width, 3):
            raise SampleError("inconsistent", key, f"decoded frame {tuple(frame_hwC.shape)} vs mask {height}x{width}")
        _resize_into(frame_hwC[y0:y1, x0:x1], scratch_CHW)
        for t in positions[u]:
            for c in range(3):
                video.write(c * num_frames + t, 0, scratch_CHW[c])
    del frame_hwC, reader
    _, labels_Uhw = _guard("bad_mask", key, _npz_frames, raw["mask.npz"], "label_map", unique)

    # Label map: nearest neighbour through the same crop, rows then columns (two contiguous
    # gathers; one 2-D fancy index gives a transposed layout). Only the rows that show
    # something are written, here and for the pose images below: the outputs start zeroed,
    # and most of a pose image is black.
    rows, cols = _nearest_rows(y0, y1 - y0, out_h), _nearest_rows(x0, x1 - x0, out_w)
    labels = _PlaneWriter((num_frames, out_h, out_w))
    for u in range(len(unique)):
        _, top, _, band = cv2.boundingRect(labels_Uhw[u, y0:y1, x0:x1])
        r0, r1 = np.searchsorted(rows, [y0 + top, y0 + top + band])
        labels_band = np.take(labels_Uhw[u, rows[r0:r1]], cols, axis=1, out=scratch_CHW[0, r0:r1])
        for t in positions[u]:
            labels.write(t, r0, labels_band)

    # Poses: drawn at the clip's size (the keypoints' own pixels), cropped and resized as the
    # release did (module docstring, 4.); only their non-black rows are split into planes.
    pose = _PlaneWriter((3, num_frames, out_h, out_w))
    canvas_hw = np.empty((height, width), np.uint8)
    for u, index in enumerate(unique.tolist()):
        frame = wholebody_to_openpose(keypoints[index], scores[index], width, height, cfg.keypoint_threshold)
        top, rows_nWC = draw_pose_rows(frame, (height, width), (out_h, out_w), cfg.pose_style, crop, canvas_hw)
        band = len(rows_nWC)
        if band:
            cv2.split(rows_nWC, [scratch_CHW[c, top : top + band] for c in range(3)])
            for c in range(3):
                for t in positions[u]:
                    pose.write(c * num_frames + t, top, scratch_CHW[c, top : top + band])

    video_CTHW, pose_CTHW = video.tensor, pose.tensor
    return Sample(
        video=video_CTHW,
        pose=pose_CTHW,
        labels=labels.tensor,
        ref_image=video_CTHW[:, 0].clone(),  # seed D.5: the window's first frame
        ref_pose=pose_CTHW[:, 0].clone(),
        num_persons=int(num_persons),
        caption=caption,
        clip_id=key,
        frame_indices=torch.from_numpy(indices),
        crop_box=torch.tensor(crop, dtype=torch.int64),
    )


# --------------------------------------------------------------------------- pipeline


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size): torch.distributed when initialised, else env RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _expand_urls(urls: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(urls, (str, Path)):
        expanded = list(wds.shardlists.expand_urls(str(urls)))  # brace notation, "::" lists
    else:
        expanded = [str(u) for u in urls]
    # Plain local paths are pinned through symlinks: a relinked workspace/shards does not mix
    # the set being read with a newer one.
    return [os.path.realpath(u) if urlparse(u).scheme == "" else u for u in expanded]


def _local_path(url: str) -> str | None:
    parsed = urlparse(url)
    return parsed.path if parsed.scheme in ("", "file") else None


# Compressed tars: their member offsets are not file offsets (tarfile's "r|*" detects these).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_META_NAME = re.compile(r"^__[^/]*__($|/)")  # webdataset's metadata members, never samples


def _tar_members(url: str, select: Any, max_member_bytes: int) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members of shard ``url`` that ``select`` keeps, in order.

    Every member's claimed size is checked before tarfile reads or skips it: for a local
    uncompressed file against the bytes the file holds (``shard_error``), and against
    ``max_member_bytes`` (``oversized_member``; the only bound on a stream of unknown length).
    """
    path = _local_path(url)
    stream = open(path, "rb") if path is not None else wds.gopen(url)  # noqa: SIM115 - the with below closes it
    with stream:
        file_size = None
        if path is not None:
            head = stream.read(6)
            stream.seek(0)
            if not head.startswith(_COMPRESSED_MAGIC):
                file_size = os.fstat(stream.fileno()).st_size
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                claim = f"member {info.name!r} (header at byte {info.offset}) claims {info.size} bytes from byte {info.offset_data}"
                if file_size is not None and info.offset_data + info.size > file_size:  # cut, or a lying header
                    raise ShardReadError("shard_error", url, f"{claim}; the file ends at byte {file_size}")
                if info.size > max_member_bytes:
                    raise ShardReadError("oversized_member", url, f"{claim}; max_member_bytes is {max_member_bytes}")
                if not info.isreg() or _META_NAME.match(info.name) or not select(info.name):
                    continue
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if len(data) != info.size:
                    raise ShardReadError(
                        "shard_error", url, f"member {info.name!r} ends after {len(data)} of {info.size} bytes"
                    )
                yield info.name, data


def _has_tar_end(path: str) -> bool:
    # A tar archive ends with two zero blocks; tarfile's stream reader treats a file cut at a
    # member boundary as a clean end, so this is the only sign of such a truncation.
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return not any(fh.read(1024))


class ClipDataset(IterableDataset):
    """The streaming training dataset (see the module docstring); build it with make_dataset.

    The WebDataset pipeline is rebuilt at every ``iter()`` with seeds mixed from
    (cfg.seed, epoch, rank, worker): call ``set_epoch`` before each epoch so that shard order,
    sample order and augmentation change between epochs (with non-persistent workers the
    new epoch reaches the worker copies; make_loader does not use persistent workers).
    """

    def __init__(
        self,
        urls: list[str],
        cfg: LoaderConfig,
        *,
        epoch_samples: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skips: SkipCounter | None = None,
    ):
        super().__init__()
        self.urls, self.cfg, self.epoch_samples = urls, cfg, epoch_samples
        self.rank, self.world_size = rank, world_size
        self.skips = skips if skips is not None else SkipCounter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return distributed_rank_world()

    # Exception handlers (return True = skip and go on; LoaderStalled when the streak is too long).
    def _on_shard_error(self, exn: Exception, streak: _Streak) -> bool:
        reason = exn.reason if isinstance(exn, ShardReadError) else "shard_error"
        self.skips.add(reason)
        logger.warning("skipping unreadable shard data: %s: %s", type(exn).__name__, exn)
        streak.skip(reason, exn)
        return True

    def _on_sample_error(self, exn: Exception, streak: _Streak) -> bool:
        if not isinstance(exn, SampleError):
            raise exn  # a bug in the loader, not bad data
        self.skips.add(exn.reason)
        logger.warning("skipping sample %s", exn)
        streak.skip(exn.reason, exn)
        return True

    def _read_samples(self, src: Iterable[dict[str, Any]], streak: _Streak) -> Iterator[dict[str, Any]]:
        """Shard urls -> raw samples (member bytes by extension, as webdataset groups them)."""
        select = lambda name: not name.endswith(".ref.png")  # never read by the loader
        for item in src:
            url, sample, failed = item["url"], None, False
            try:
                for name, data in _tar_members(url, select, self.cfg.max_member_bytes):
                    key, ext = wds.tariterators.base_plus_ext(name)
                    if key is None:
                        continue
                    if sample is None or key != sample["__key__"]:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key, "__url__": url}
                    if ext.lower() in sample:
                        raise ShardReadError("shard_error", url, f"duplicate member {name!r}")
                    sample[ext.lower()] = data
            except Exception as exn:
                failed = True
                self._on_shard_error(exn, streak)
            # After an error this is the stub of the cut sample; decoding counts what it lacks.
            if sample is not None:
                yield sample
            elif not failed:
                # Nothing at all (with resampling this would repeat silently forever).
                self._on_shard_error(ShardReadError("empty_shard", url, "no samples"), streak)

    def _check_shard_ends(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            path = _local_path(item["url"])
            if path is not None and os.path.exists(path) and not _has_tar_end(path):
                self.skips.add("truncated_shard")
                logger.warning("shard %s lacks the tar end-of-archive blocks (truncated?)", item["url"])
            yield item

    def _split_by_rank(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, world = self.rank_world()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        yield from islice(src, rank, None, world)  # what webdataset.split_by_node does

    def _split_by_worker(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from self._check_shard_ends(wds.split_by_worker(src))

    def __iter__(self) -> Iterator[Sample]:
        cfg = self.cfg
        rank, _ = self.rank_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Every random choice of this reader derives from (seed, epoch, rank, worker); shard
        # order only matters after the rank/worker split, so readers need no common seed.
        if cfg.seed is None:
            root = np.random.SeedSequence()  # fresh OS entropy on every iteration
        else:
            root = np.random.SeedSequence([cfg.seed, self.epoch, rank, worker])
        shard_seed, buffer_seed = (int(v) for v in root.generate_state(2))
        rng = np.random.default_rng(root.spawn(1)[0])
        shuffle = cfg.shuffle_buffer > 0
        streak = _Streak(cfg.max_consecutive_skips)

        def decode(raw: dict[str, Any]) -> Sample:
            sample = decode_sample(raw, cfg, rng)
            streak.reset()
            return sample

        # webdataset's stages, with our own tar reader in place of its opener, expander and grouper.
        # ResampledShards mixes the time and the pid into its draws unless told to be
        # deterministic: seeded here by shard_seed, which already holds (seed, epoch, rank, worker).
        resampled = wds.ResampledShards(
            self.urls,
            seed=shard_seed,
            worker_seed=lambda: 0,
            deterministic=cfg.seed is not None,
            empty_check=False,
        )
        stages: list[Any] = [
            resampled if cfg.resampled else wds.SimpleShardList(self.urls),
            self._split_by_rank,
            self._split_by_worker,
        ]
        if shuffle and not cfg.resampled:
            stages.append(wds.filters.shuffle(len(self.urls), seed=shard_seed))  # this reader's whole shard list
        stages.append(lambda src: self._read_samples(src, streak))
        if shuffle:
            stages.append(wds.filters.shuffle(cfg.shuffle_buffer, rng=random.Random(buffer_seed)))
        stages.append(wds.filters.map(decode, handler=lambda exn: self._on_sample_error(exn, streak)))
        pipeline = wds.DataPipeline(*stages)
        if self.epoch_samples is not None:
            # epoch_samples is per rank: this worker's share (repeats a finite shard list).
            share = self.epoch_samples // num_workers + (worker < self.epoch_samples % num_workers)
            if share == 0:
                return  # with_epoch(0) would mean "no limit"
            pipeline = pipeline.with_epoch(share)
        for sample in pipeline:
            sample.pop("__key__", None)  # added back by webdataset's map
            yield sample


def make_dataset(
    urls: str | Path | Iterable[str | Path],
    cfg: LoaderConfig,
    *,
    epoch_samples: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    skips: SkipCounter | None = None,
) -> ClipDataset:
    """The streaming dataset over shard ``urls`` (a list, or a brace pattern like
    ``shards/train-{000000..000007}.tar``).

    ``epoch_samples``: samples per rank per epoch (split over the workers); required with
    ``cfg.resampled`` for finite epochs; without resampling the shards are repeated to reach
    it. ``rank``/``world_size`` override the automatic rank (module docstring). ``skips``:
    a counter to share; by default the dataset makes its own (``dataset.skips``).
    """
    url_list = _expand_urls(urls)
    if not url_list:
        raise ValueError("urls: no shards given")
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size must be given together")
    if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if epoch_samples is not None and epoch_samples < 1:
        raise ValueError(f"epoch_samples must be >= 1, got {epoch_samples}")
    if cfg.resampled and epoch_samples is None:
        warnings.warn("resampled=True without epoch_samples: every epoch is infinite", stacklevel=2)
    return ClipDataset(url_list, cfg, epoch_samples=epoch_samples, rank=rank, world_size=world_size, skips=skips)


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack tensors (leading B), num_persons -> int64 [B], strings -> list[str]."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    out: dict[str, Any] = {k: _stack([s[k] for s in samples]) for k in B.TENSOR_KEYS}  # type: ignore[literal-required]
    out.update({k: torch.tensor([s[k] for s in samples], dtype=torch.int64) for k in B.INT_KEYS})  # type: ignore[literal-required]
    out.update({k: [s[k] for s in samples] for k in B.STRING_KEYS})  # type: ignore[literal-required]
    return Batch(**out)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)  # a view: a worker's sample is in shared memory already
    if get_worker_info() is None:
        return torch.stack(tensors)
    # Straight into shared memory, which the main process maps (as default_collate does).
    return torch.stack(tensors, out=_shared_empty((len(tensors), *tensors[0].shape), tensors[0].dtype))


def make_loader(
    urls: str | Path | Iterable[str | Path],
    cfg: LoaderConfig,
    batch_size: int,
    num_workers: int,
    *,
    epoch_samples: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    skips: SkipCounter | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A torch DataLoader over make_dataset(...); ``loader.dataset`` is the ClipDataset
    (``.skips``, ``.set_epoch``). Batches are formed inside each worker.
    ``multiprocessing_context``: e.g. "spawn" or "forkserver" (None: the platform default)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = make_dataset(urls, cfg, epoch_samples=epoch_samples, rank=rank, world_size=world_size, skips=skips)
    if not cfg.resampled:
        readers = (world_size if world_size is not None else distributed_rank_world()[1]) * max(1, num_workers)
        if len(dataset.urls) < readers:
            warnings.warn(
                f"{len(dataset.urls)} shards for {readers} readers (ranks x workers): some read nothing",
                stacklevel=2,
            )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,  # so set_epoch reaches the workers' fresh copies
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
