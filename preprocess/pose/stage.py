"""The pose stage: one normalised clip -> poses/<clip_id>.npz (layout in data_schemas.pose)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_schemas.arrays import read_npz, write_npz
from data_schemas.config import PoseConfig
from data_schemas.pose import PoseRecord
from data_schemas.workspace import Workspace
from preprocess.media import read_frames
from preprocess.pose.dwpose import DWPose, FramePoses
from preprocess.truth import TRUTH, TruthPoses


def resolve_models(cfg: PoseConfig, workspace: Workspace | Path) -> tuple[Path, ...]:
    """The (detector, pose model) files of a profile: built once for 'tiny', checked for
    'files'; none for 'truth' (preprocess/truth.py)."""
    if cfg.models == "truth":
        return ()
    if cfg.models == "tiny":
        from preprocess.pose.onnx_models import build_tiny_models  # exported from torch: loaded only for them

        return build_tiny_models(Workspace.of(workspace).tiny_dwpose, seed=cfg.tiny_seed)
    return cfg.model_files()


def models_name(cfg: PoseConfig, files: tuple[Path, ...]) -> str:
    """What records and cache keys call the pose models: 'truth', or the files' digest."""
    return TRUTH if cfg.models == "truth" else models_digest(files)


def models_digest(files: tuple[Path, ...]) -> str:
    """Content digest of the model files, for cache keys (hashed once per run, not per clip)."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


_builds = 0  # DWPose runners this process built: a Dask worker builds one and keeps it for the next clip


@lru_cache(maxsize=2)
def _runner(detector: Path, pose_model: Path, provider: str, pre: float, iou: float, thr: float, batch: int) -> DWPose:
    # Sessions are costly to build: one per process and model set.
    global _builds
    _builds += 1
    return DWPose(
        detector, pose_model, provider=provider, pre_threshold=pre, nms_iou=iou, threshold=thr, batch_size=batch
    )


def model_builds() -> int:
    """How many DWPose runners this process has built."""
    return _builds


def models_held() -> int:
    """How many models this process keeps for its next clip."""
    return _runner.cache_info().currsize


def release_models() -> None:
    """Drop the runners this process keeps (a closing worker frees their memory)."""
    _runner.cache_clear()


def runner_for(cfg: PoseConfig, files: tuple[Path, Path]) -> DWPose:
    return _runner(*files, cfg.provider, cfg.det_pre_threshold, cfg.nms_iou, cfg.det_threshold, cfg.batch_size)


def pack_poses(frames: list[FramePoses]) -> dict[str, np.ndarray]:
    """Pad per-frame persons to the most persons in any frame (layout in data_schemas.pose)."""
    num_frames = len(frames)
    persons = max((len(f.boxes) for f in frames), default=0)
    packed = {
        "keypoints": np.full((num_frames, persons, 133, 2), -1, np.float32),
        "scores": np.zeros((num_frames, persons, 133), np.float32),
        "boxes": np.zeros((num_frames, persons, 4), np.float32),
        "box_scores": np.zeros((num_frames, persons), np.float32),
        "num_persons": np.array([len(f.boxes) for f in frames], np.int32),
    }
    for t, frame in enumerate(frames):
        n = len(frame.boxes)
        packed["keypoints"][t, :n], packed["scores"][t, :n] = frame.keypoints, frame.scores
        packed["boxes"][t, :n], packed["box_scores"][t, :n] = frame.boxes, frame.box_scores
    return packed


def extract_poses(
    clip: Path,
    clip_id: str,
    cfg: PoseConfig,
    files: tuple[Path, ...],
    models: str,
    workspace: Workspace | Path,
    runner: DWPose | TruthPoses | None = None,
) -> PoseRecord:
    """Whole-body poses of every frame of one of OUR clips, written to poses/<clip_id>.npz;
    ``runner`` answers in DWPose's place (the truth model)."""
    runner = runner or runner_for(cfg, files)
    import decord  # our own normalised clips only (see preprocess.media)

    num_frames = len(decord.VideoReader(str(clip), num_threads=1))
    frames_out: list[FramePoses] = []
    over_limit = 0
    height = width = 0
    for start in range(0, num_frames, cfg.frames_per_chunk):
        chunk = read_frames(clip, list(range(start, min(start + cfg.frames_per_chunk, num_frames))))
        height, width = chunk.shape[1:3]
        if cfg.channel_order == "bgr":
            chunk = np.ascontiguousarray(chunk[..., ::-1])
        poses, truncated = runner.estimate(chunk, cfg.max_persons)
        frames_out.extend(poses)
        over_limit += truncated
    packed = pack_poses(frames_out)
    ws = Workspace.of(workspace)
    out = ws.pose_file(clip_id)
    sha256 = write_npz(out, **packed, width=np.int32(width), height=np.int32(height))
    return PoseRecord(
        clip_id=clip_id,
        path=ws.relative(out),
        sha256=sha256,
        num_frames=num_frames,
        width=width,
        height=height,
        max_persons=int(packed["keypoints"].shape[1]),
        frames_with_persons=int((packed["num_persons"] > 0).sum()),
        frames_over_limit=over_limit,
        models=models,
        provider=runner.provider,
    )


def load_poses(path: Path) -> dict[str, np.ndarray]:
    """Read a poses npz (layout in data_schemas.pose)."""
    return read_npz(path)
