"""The shard stage: clips + poses + masks -> WebDataset tar shards and shards/index.parquet.

Shards are byte-identical for identical inputs: samples sorted by key, members sorted by
name, fixed tar header fields (mtime 0, uid/gid 0, no user names, mode 0644) and npz
members with a fixed zip timestamp. Each shard is written under a temporary name and
renamed when whole; the index is published after its shards, and shard files the index no
longer lists are removed last. The split is by source video, so no source is on both sides.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np

from data_schemas import ClipRecord, PoseRecord, read_records, write_records
from data_schemas.arrays import npz_bytes
from data_schemas.atomic import atomic_path
from data_schemas.config import ShardConfig
from data_schemas.mask import MaskRecord
from data_schemas.shard import SHARDS_DIR, ShardSample, ShardSummary
from preprocess.media import read_frames
from preprocess.pose.stage import load_poses
from preprocess.segment.stage import load_masks

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def split_of(source_sha256: str, cfg: ShardConfig) -> str:
    """'val' for a reproducible ``val_fraction`` of source videos, else 'train'."""
    draw = int(hashlib.sha256(f"{cfg.seed}:{source_sha256}".encode()).hexdigest()[:16], 16) / 2**64
    return "val" if draw < cfg.val_fraction else "train"


def caption_for(persons: int, cfg: ShardConfig) -> str:
    count = NUMBER_WORDS[persons] if persons < len(NUMBER_WORDS) else str(persons)
    return cfg.caption.format(count=count)


def build_sample(workspace: Path, clip: ClipRecord, pose: PoseRecord, mask: MaskRecord, cfg: ShardConfig) -> tuple[dict[str, bytes], dict]:
    """The members of one sample (by extension) and its metadata."""
    workspace = Path(workspace)
    poses, masks = load_poses(workspace / pose.path), load_masks(workspace / mask.path)
    pose_index = masks["pose_index"].astype(np.int64)  # [T, K]
    num_frames, persons = pose_index.shape
    # Reorder the poses so that row k is person k+1 of the label map, every frame.
    keypoints = np.full((num_frames, persons, 133, 2), -1, np.float32)
    scores = np.zeros((num_frames, persons, 133), np.float32)
    t_idx, k_idx = np.nonzero(pose_index >= 0)
    keypoints[t_idx, k_idx] = poses["keypoints"][t_idx, pose_index[t_idx, k_idx]]
    scores[t_idx, k_idx] = poses["scores"][t_idx, pose_index[t_idx, k_idx]]
    ok, png = cv2.imencode(".png", np.ascontiguousarray(read_frames(workspace / clip.path, [0])[0][..., ::-1]))
    assert ok
    split = split_of(clip.source_sha256, cfg)
    meta = {
        "clip_id": clip.clip_id, "source": clip.source_sha256, "fps": clip.fps, "width": clip.width,
        "height": clip.height, "persons": persons, "num_frames": clip.num_frames, "split": split,
    }  # fmt: skip
    caption = caption_for(persons, cfg)
    members = {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "mask.npz": npz_bytes(label_map=masks["label_map"]),
        "mp4": (workspace / clip.path).read_bytes(),
        "pose.npz": npz_bytes(keypoints=keypoints, scores=scores),
        "ref.png": png.tobytes(),
        "txt": caption.encode(),
    }
    return members, meta | {"caption": caption}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Fills ``<split>-%06d.tar`` shards up to a target size, publishing each when whole."""

    def __init__(self, folder: Path, split: str, target_bytes: int):
        self.folder, self.split, self.target = folder, split, target_bytes
        self.count, self.written = 0, []
        self._tar = self._context = None

    def add(self, key: str, members: dict[str, bytes]) -> tuple[str, int, int]:
        if self._tar is None:
            name = f"{self.split}-{self.count:06d}.tar"
            self._context = atomic_path(self.folder / name)
            self._tar = tarfile.open(self._context.__enter__(), "w", format=tarfile.USTAR_FORMAT)
            self.written.append(name)
        start = self._tar.offset
        for ext in sorted(members):
            _add(self._tar, f"{key}.{ext}", members[ext])
        shard, size = self.written[-1], self._tar.offset - start
        if self._tar.offset >= self.target:
            self.close()
        return shard, start, size

    def close(self, error: BaseException | None = None) -> None:
        """Publish the open shard (fsync + rename), or with ``error`` discard its temp file."""
        if self._tar is not None:
            self._tar.close()
            if error is None:
                self._context.__exit__(None, None, None)
                self.count += 1
            else:
                self.written.pop()
                self._context.__exit__(type(error), error, error.__traceback__)
            self._tar, self._context = None, None


def write_shards(workspace: Path, cfg: ShardConfig) -> ShardSummary:
    """Every clip with poses and masks becomes one sample; see the module docstring."""
    workspace = Path(workspace)
    manifests = workspace / "manifests"
    poses = {r.clip_id: r for r in read_records(manifests / "poses.parquet", PoseRecord)}
    masks = {r.clip_id: r for r in read_records(manifests / "masks.parquet", MaskRecord)}
    clips = sorted((c for c in read_records(manifests / "clips.parquet", ClipRecord) if c.clip_id in poses and c.clip_id in masks),
                   key=lambda c: c.clip_id)  # fmt: skip
    folder = workspace / SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    writers = {split: _ShardWriter(folder, split, cfg.target_shard_bytes) for split in ("train", "val")}
    index: list[ShardSample] = []
    try:
        for clip in clips:
            members, meta = build_sample(workspace, clip, poses[clip.clip_id], masks[clip.clip_id], cfg)
            shard, offset, size = writers[meta["split"]].add(clip.clip_id, members)
            index.append(ShardSample(
                key=clip.clip_id, shard=shard, offset=offset, size_bytes=size, split=meta["split"],
                source_sha256=clip.source_sha256, num_frames=clip.num_frames, persons=meta["persons"],
                width=clip.width, height=clip.height, fps=clip.fps, caption=meta["caption"],
            ))  # fmt: skip
    except BaseException as error:
        for writer in writers.values():
            writer.close(error)
        raise
    for writer in writers.values():
        writer.close()
    index_path = write_records(index, ShardSample, folder / "index.parquet")
    shards = sorted(name for writer in writers.values() for name in writer.written)
    for stale in folder.glob("*.tar"):  # shards of an earlier, larger run
        if stale.name not in shards:
            stale.unlink()
    return ShardSummary(
        num_samples=len(index),
        shards=tuple(f"{SHARDS_DIR}/{name}" for name in shards),
        num_train=sum(s.split == "train" for s in index),
        num_val=sum(s.split == "val" for s in index),
        index=str(index_path),
    )
