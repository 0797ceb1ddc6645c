"""The segment stage: one clip + its poses -> masks/<clip_id>.npz (layout in data_schemas.mask)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_schemas.arrays import read_npz, write_npz
from data_schemas.config import SegmentConfig
from data_schemas.mask import MaskRecord
from data_schemas.workspace import Workspace
from preprocess.media import read_frames
from preprocess.pose.stage import load_poses, models_digest
from preprocess.segment.ground_truth import GroundTruthSegmenter
from preprocess.segment.identity import IdentityTracker, Segmenter
from preprocess.synthetic import SyntheticClip
from preprocess.truth import TRUTH


def _device(cfg: SegmentConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("segment.device is 'cuda' but torch sees no GPU")
    return "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


_builds = 0  # SAM2 models this process built: a Dask worker builds one and keeps it for the next clip


@lru_cache(maxsize=2)
def _model(models: str, folder: Path, seed: int, device: str):
    # Loading SAM2 is costly: once per process and model.
    from preprocess.segment import sam2

    global _builds
    _builds += 1

    if models == "tiny":
        return sam2.build_tiny_sam2(seed)
    return sam2.load_sam2(folder, device=device)


def model_builds() -> int:
    """How many SAM2 models this process has built."""
    return _builds


def models_held() -> int:
    """How many models this process keeps for its next clip."""
    return _model.cache_info().currsize


def release_models() -> None:
    """Drop the SAM2 models this process keeps and the GPU memory they held."""
    _model.cache_clear()
    torch = sys.modules.get("torch")  # never imported here: nothing to free
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def sam2_digest(cfg: SegmentConfig) -> str:
    """What identifies the SAM2 weights in cache keys: their content for real ones, the seed
    for tiny, 'truth' for the ground truth."""
    if cfg.models == "truth":
        return TRUTH
    if cfg.models == "tiny":
        return f"tiny{cfg.tiny_seed}"
    folder = cfg.model_folder()
    return models_digest(tuple(sorted(p for p in folder.iterdir() if p.is_file())))


def sam2_factory(cfg: SegmentConfig) -> tuple[Callable[[], Segmenter], str]:
    """A maker of fresh SAM2 trackers (one per clip) and the name of the mask source."""
    if cfg.models == "truth":
        raise ValueError("segment.models 'truth' has no SAM2: the ground truth is per clip (truth_factory)")
    import torch

    from preprocess.segment.sam2 import Sam2Tracker

    device = _device(cfg)
    dtype = getattr(torch, cfg.dtype)
    folder = cfg.model_folder() if cfg.models == "files" else Path()
    model, processor = _model(cfg.models, folder, cfg.tiny_seed, device)
    source = "sam2" if cfg.models == "files" else "sam2-tiny"
    return (lambda: Sam2Tracker(model, processor, device=device, dtype=dtype, state_on_cpu=cfg.state_on_cpu)), source


def truth_factory(truth: SyntheticClip) -> tuple[Callable[[], Segmenter], str]:
    """The truth model's segmenter for one clip (preprocess/truth.py) and its source name."""
    return (lambda: GroundTruthSegmenter(truth.masks)), TRUTH


def segment_clip(
    clip: Path,
    clip_id: str,
    poses_path: Path,
    make_segmenter: Callable[[], Segmenter],
    source: str,
    cfg: SegmentConfig,
    workspace: Workspace | Path,
) -> MaskRecord:
    """Track every person of one clip, fix their order, assign poses, write the label map."""
    poses = load_poses(poses_path)
    counts = poses["num_persons"]
    num_frames, height, width = len(counts), int(poses["height"]), int(poses["width"])
    # A clip with nobody in it never reaches the segmenter.
    segmenter = make_segmenter() if counts.any() else None
    tracker = IdentityTracker(
        segmenter, num_frames, height, width, cfg.max_persons, cfg.new_person_iou, cfg.keypoint_threshold
    )
    if segmenter is not None:
        for start in range(0, num_frames, cfg.frames_per_chunk):
            picks = list(range(start, min(start + cfg.frames_per_chunk, num_frames)))
            for t, frame in zip(picks, read_frames(clip, picks)):
                n = counts[t]
                tracker.step(frame, poses["keypoints"][t, :n], poses["scores"][t, :n], poses["boxes"][t, :n])
    label_map, pose_index, first_frame = tracker.finish()
    ws = Workspace.of(workspace)
    out = ws.mask_file(clip_id)
    sha256 = write_npz(
        out, label_map=label_map, pose_index=pose_index, first_frame=first_frame, source=np.array(source)
    )
    return MaskRecord(
        clip_id=clip_id,
        path=ws.relative(out),
        sha256=sha256,
        num_frames=num_frames,
        width=width,
        height=height,
        num_persons=int(pose_index.shape[1]),
        frames_with_persons=int((label_map.reshape(num_frames, -1).max(axis=1) > 0).sum()) if num_frames else 0,
        ignored_arrivals=tracker.ignored_arrivals,
        source=source,
    )


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """Read a masks npz (layout in data_schemas.mask)."""
    return read_npz(path)
