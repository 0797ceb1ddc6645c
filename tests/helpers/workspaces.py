"""Synthetic clips with their 'detected' poses, and whole workspaces of them (clips, poses,
ground-truth masks and their manifests), as the stages before the shard writer leave them."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np

from data_schemas import ClipRecord, PoseRecord, write_records
from data_schemas.config import SegmentConfig, ShardConfig
from data_schemas.mask import MaskRecord
from data_schemas.workspace import Workspace
from preprocess.segment.ground_truth import GroundTruthSegmenter
from preprocess.segment.stage import segment_clip
from preprocess.synthetic import SyntheticSpec, ground_truth_poses, render_clip, write_video


def write_clip_and_poses(spec: SyntheticSpec, folder, seed: int = 0, keep=None):
    """The clip, its 'detected' poses (ground truth, shuffled rows) as poses.npz, and
    origin[t][row] = the figure of each pose row."""
    clip = render_clip(spec)
    video = write_video(clip.frames, folder / "clip.mp4", fps=spec.fps)
    arrays, origin = ground_truth_poses(clip, seed=seed, keep=keep)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (folder / "poses.npz").write_bytes(buffer.getvalue())
    return clip, video, folder / "poses.npz", origin


def make_workspace(
    root,
    num_clips: int = 4,
    clips_per_source: int = 2,
    num_frames: int = 12,
    width: int = 128,
    height: int = 96,
    first_seed: int = 0,
    **spec_fields,
):
    """A workspace with clips, poses and masks of synthetic two-person clips (ground-truth masks);
    ``spec_fields``: further SyntheticSpec fields (background, motions, walk_speed)."""
    ws = Workspace(root)
    clips, poses, masks, origins = [], [], [], {}
    for i in range(num_clips):
        folder = root / f"src{i}"
        folder.mkdir(parents=True)
        spec = SyntheticSpec(
            width=width, height=height, num_frames=num_frames, num_persons=2, seed=first_seed + i, **spec_fields
        )
        clip, video, pose_path, origin = write_clip_and_poses(spec, folder, seed=i)
        clip_id = f"{i // clips_per_source:016x}-{i % clips_per_source:03d}"
        ws.clips.mkdir(parents=True, exist_ok=True)
        ws.poses.mkdir(parents=True, exist_ok=True)
        shutil.copy(video, ws.clip_file(clip_id))
        shutil.copy(pose_path, ws.pose_file(clip_id))
        record = segment_clip(
            video,
            clip_id,
            pose_path,
            lambda c=clip: GroundTruthSegmenter(c.masks),
            "ground-truth",
            SegmentConfig(),
            root,
        )
        sha = hashlib.sha256(ws.clip_file(clip_id).read_bytes()).hexdigest()
        source = f"{i // clips_per_source:064x}"
        clips.append(
            ClipRecord(
                clip_id=clip_id,
                source_sha256=source,
                source_path=f"/in/{i}.mp4",
                clip_index=i % clips_per_source,
                start_s=0.0,
                end_s=num_frames / 25,
                num_frames=num_frames,
                fps=25.0,
                width=width,
                height=height,
                path=ws.relative(ws.clip_file(clip_id)),
                sha256=sha,
                size_bytes=1,
            )
        )
        poses.append(
            PoseRecord(
                clip_id=clip_id,
                path=ws.relative(ws.pose_file(clip_id)),
                sha256="x",
                num_frames=num_frames,
                width=width,
                height=height,
                max_persons=2,
                frames_with_persons=num_frames,
                frames_over_limit=0,
                models="gt",
                provider="none",
            )
        )
        masks.append(record)
        origins[clip_id] = (clip, origin)
    write_records(clips, ClipRecord, ws.clips_manifest)
    write_records(poses, PoseRecord, ws.poses_manifest)
    write_records(masks, MaskRecord, ws.masks_manifest)
    return origins


def make_train_workspace(root, shard_config=None, num_clips: int = 4, **clip_fields) -> Path:
    """A training workspace: make_workspace's clips (``num_clips``, ``clip_fields``), their shards
    (``shard_config``, by default no validation split) and the prompt embeddings of their captions."""
    # model imports (torch, transformers) only where a test trains
    from model.text_cache import captions_from_shards, fill_cache
    from model.text_encoder import WAN_NEGATIVE_PROMPT, build_tiny_text_encoder
    from preprocess.shards import write_shards

    ws = Workspace(root)
    make_workspace(ws.root, num_clips=num_clips, **clip_fields)
    write_shards(ws.root, shard_config or ShardConfig(val_fraction=0.0))
    texts = captions_from_shards(ws.shards_index) + [WAN_NEGATIVE_PROMPT]
    fill_cache(ws.embeddings, build_tiny_text_encoder(), texts)
    return ws.root
